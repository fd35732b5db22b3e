"""The training methods, each a `Method` record (methods/method.py) in its own module.

Adding a method: a module here that defines `METHOD = Method(...)`, and a line below."""

from __future__ import annotations

from memseg_bench.methods import fixmatch, memseg, selftrain, supervised, unimatch
from memseg_bench.methods.method import Method

METHODS: dict[str, Method] = {
    "supervised": supervised.METHOD,
    "fixmatch": fixmatch.METHOD,
    "unimatch": unimatch.METHOD,
    "selftrain": selftrain.METHOD,
    "memseg": memseg.METHOD,
}
