"""The three methods share one step interface:
`losses(ctx, labeled, unlabeled, step) -> (named loss terms, extras)`; memseg also updates its bank
after the optimiser and EMA steps."""

from __future__ import annotations

# method -> (needs unlabeled data and an EMA teacher, needs heads and a memory bank)
METHODS = {
    "supervised": (False, False),
    "selftrain": (True, False),
    "memseg": (True, True),
}

# Ablation variants of memseg: name -> overrides of the methods.memseg params section.
ABLATIONS = {
    "no_contr_labeled": {"weight_labeled": 0.0},
    "no_contr_unlabeled": {"weight_unlabeled": 0.0},
    "no_feature_weights": {"feature_weights": False},
    "no_quality_filter": {"quality_filter": False},
    "random_insertion": {"ranked_insertion": False},
}


def method_losses(method: str):
    from memseg_bench.methods import memseg, selftrain, supervised

    return {"supervised": supervised, "selftrain": selftrain, "memseg": memseg}[method].losses
