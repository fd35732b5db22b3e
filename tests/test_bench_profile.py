"""The ORT profile of `memseg bench infer --profile`: operator shares and convolution FLOPs."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from memseg_bench.bench.profile import conv_flops, gemm_gflops, node_times, profile_model


def test_conv_flops_count_two_per_multiply_add_and_respect_groups():
    # 1x1 convolution, 2 -> 3 channels, on a 4x5 output, batch 2: 2 * 3 * 4 * 5 * 2 multiply-adds
    assert conv_flops([3, 2, 1, 1], [2, 3, 4, 5]) == 2 * (2 * 3 * 4 * 5 * 2)
    # depthwise 3x3 on 8 channels: the weight's second dimension is 1
    assert conv_flops([8, 1, 3, 3], [1, 8, 10, 10]) == 2 * (8 * 10 * 10 * 9)


def conv_model(path, in_channels=4, out_channels=6, kernel=3):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((out_channels, in_channels, kernel, kernel)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "w"], ["y"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["y"], ["logits"]),
        ],
        "conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, in_channels, None, None])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    path.write_bytes(model.SerializeToString())
    return path


def test_node_times_find_the_convolution_and_its_flops(tmp_path):
    model = conv_model(tmp_path / "conv.onnx")
    feed = {"image": np.ones((1, 4, 16, 20), np.float32)}
    flops = conv_flops([6, 4, 3, 3], [1, 6, 16, 20])
    nodes, run_ms = node_times(model, feed, threads=1, repeats=1, optimization="disabled")
    assert sorted(node["op"] for node in nodes) == ["Conv", "Relu"]
    assert sum(node["flops"] for node in nodes) == flops
    assert all(node["ms"] >= 0 for node in nodes) and run_ms > 0
    tuned, _ = node_times(model, feed, threads=1, repeats=3)
    [conv] = [node for node in tuned if node["op"] in ("Conv", "FusedConv")]  # Relu folded in
    assert conv["flops"] >= flops  # channels padded to the CPU's block size, or not


def test_profile_model_shares_add_up_and_rates_follow_the_times(tmp_path):
    model = conv_model(tmp_path / "conv.onnx", in_channels=3)
    row = profile_model(model, (32, 40), threads=1, repeats=3, eager_ms=2.0, gemm=123.0)
    assert row["size"] == "32x40"
    assert sum(op["share"] for op in row["by_op"]) == pytest.approx(1.0)
    shares = [op["share"] for op in row["by_op"]]
    assert shares == sorted(shares, reverse=True)
    flops = conv_flops([6, 3, 3, 3], [1, 6, 32, 40])
    assert row["conv_gflop"] == pytest.approx(flops / 1e9)
    assert row["eager_gflops_per_s"] == pytest.approx(flops / 2.0 / 1e6)
    conv_ms = sum(op["ms"] for op in row["by_op"] if op["op"] in ("Conv", "FusedConv"))
    assert row["conv_gflops_per_s"] == pytest.approx(flops / conv_ms / 1e6)
    assert row["gemm_gflops_per_s"] == 123.0


def test_gemm_rate_is_positive_and_finite():
    rate = gemm_gflops(threads=1, repeats=1, size=128)
    assert 0 < rate < 1e5


def test_switches_count_a_wait():
    import time

    from memseg_bench.bench.folder import switches

    before = switches()
    time.sleep(0.01)  # a sleeping thread leaves the core: one voluntary switch at least
    assert switches() > before
