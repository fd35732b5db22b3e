"""Where an ONNX Runtime session's time goes: per operator type, from onnxruntime's own profiler,
and the convolutions' arithmetic rate beside that of one large matrix product on the same threads,
about the most this CPU's kernels reach. A latency ratio against eager can then be read against
what the hardware leaves: convolutions already near the product's rate cannot get much faster."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np

from memseg_bench.bench.infer import CPU_PROVIDERS, WARMUP, _median_ms

GEMM_SIZE = 2048
CONV_OPS = ("Conv", "FusedConv")  # FusedConv: a convolution with its activation folded in


def conv_flops(weight_shape: list[int], output_shape: list[int]) -> float:
    """Floating-point operations (two per multiply-add) of a convolution with weight
    [Cout, Cin / groups, kh, kw] and output [N, Cout, H, W]."""
    batch, out_channels, height, width = output_shape[:4]
    return 2.0 * batch * out_channels * height * width * math.prod(weight_shape[1:])


def _shape(entry: dict) -> list[int]:
    """A shape from the profiler's {"float": [..]} entries."""
    (shape,) = entry.values()
    return list(shape)


def node_times(
    model: Path,
    feed: dict,
    threads: int,
    repeats: int,
    optimization: str = "all",
    warmup: int = WARMUP,
) -> tuple[list[dict], float]:
    """([{op, ms, flops}] per node, mean ms per run) over `repeats` profiled runs after `warmup`.
    The FLOPs are those of the shapes the kernels ran: after the "all" level's layout transforms
    channels are padded to the CPU's block size; at "disabled" they are the model's own."""
    import onnxruntime as ort

    from memseg_bench.runtime import Tuning, session_options

    options = session_options(Tuning(threads=threads, optimization=optimization))
    with tempfile.TemporaryDirectory(prefix="memseg-profile-") as work:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(work) / "ort")
        session = ort.InferenceSession(str(model), options, providers=CPU_PROVIDERS)
        for _ in range(warmup + repeats):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted((e["ts"], e["dur"]) for e in events if e.get("name") == "model_run")
    timed_from = runs[warmup][0]
    nodes: dict[str, dict] = {}
    for event in events:
        if event.get("cat") != "Node" or event["ts"] < timed_from:
            continue
        if not event["name"].endswith("_kernel_time"):
            continue
        args = event["args"]
        node = nodes.setdefault(event["name"], {"op": args["op_name"], "ms": 0.0, "flops": 0.0})
        node["ms"] += event["dur"] / 1000 / repeats
        if args["op_name"] in CONV_OPS:
            node["flops"] = conv_flops(
                _shape(args["input_type_shape"][1]), _shape(args["output_type_shape"][0])
            )
    run_ms = sum(duration for _, duration in runs[warmup:]) / 1000 / repeats
    return list(nodes.values()), run_ms


def gemm_gflops(threads: int, repeats: int, size: int = GEMM_SIZE) -> float:
    """GFLOP/s of onnxruntime's fp32 MatMul of two size x size matrices on `threads` threads."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from memseg_bench.runtime import Tuning, session_options

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((size, size), np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    session = ort.InferenceSession(
        model.SerializeToString(), session_options(Tuning(threads=threads)), CPU_PROVIDERS
    )
    feed = {"a": rng.standard_normal((size, size), np.float32)}
    (ms,) = _median_ms([lambda: session.run(None, feed)], repeats)
    return 2.0 * size**3 / ms / 1e6


def profile_model(model: Path, size: tuple[int, int], threads: int, repeats: int,
                  eager_ms: float, gemm: float) -> dict:  # fmt: skip
    """The operator types of `model` at `size` by share of the run, the convolutions' rate,
    eager's rate on the same convolutions (from its latency `eager_ms`), and `gemm`'s."""
    import pandas as pd

    image = np.random.default_rng(0).uniform(0, 255, (1, 3, *size)).astype(np.float32)
    nodes, run_ms = node_times(model, {"image": image}, threads, repeats)
    # The model's own arithmetic, not the padded shapes the tuned session's kernels ran.
    unoptimized, _ = node_times(model, {"image": image}, threads, 1, "disabled", warmup=0)
    table = pd.DataFrame(nodes).groupby("op").agg(ms=("ms", "sum"), nodes=("ms", "size"))
    table["share"] = table["ms"] / table["ms"].sum()
    table = table.sort_values("ms", ascending=False)
    flops = sum(node["flops"] for node in unoptimized)
    conv_ms = float(table.loc[table.index.isin(CONV_OPS), "ms"].sum())
    return {
        "size": f"{size[0]}x{size[1]}",
        "run_ms": run_ms,
        "by_op": [
            {"op": op, **{k: float(v) for k, v in row.items()}} for op, row in table.iterrows()
        ],
        "conv_gflop": flops / 1e9,
        "conv_gflops_per_s": flops / conv_ms / 1e6,
        # eager runs the same convolutions (and the few other operators) in eager_ms
        "eager_gflops_per_s": flops / eager_ms / 1e6,
        "gemm_gflops_per_s": gemm,
    }
