"""No host synchronisation inside a training step, checked on CPU.

Under FakeTensorMode tensors carry shapes but no values, so every operation that needs a value on
the host (.item(), .tolist(), bool(tensor), boolean-mask indexing, nonzero, unique, bincount)
raises. A whole step (losses, backward, optimizer, EMA, memory update) running under it reads
nothing from the device; on a GPU that means it never waits for the device. Logging, which reads
the losses every log_every steps, happens outside the step.

Control: with the CPU's host-split heads (the default on CPU) the memseg step does read."""

import dataclasses

import pytest
import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)

from memseg_bench.models.grouped_mlp import set_form
from tests.trainers import make_trainer, tiny_config


def _with(config, selftrain=None, memseg=None, train=None):
    methods = config.methods
    methods = dataclasses.replace(
        methods,
        selftrain=dataclasses.replace(methods.selftrain, **(selftrain or {})),
        memseg=dataclasses.replace(methods.memseg, **(memseg or {})),
    )
    return dataclasses.replace(
        config, methods=methods, train=dataclasses.replace(config.train, **(train or {}))
    )


VARIANTS = {
    "supervised": ("supervised", {}),
    "selftrain+class_weights": ("selftrain", {"selftrain": {"class_weights": True}}),
    "memseg": ("memseg", {}),
    "memseg+quality_filter": ("memseg", {"memseg": {"quality_filter": True}}),
    "memseg+random_insertion": ("memseg", {"memseg": {"ranked_insertion": False}}),
    "memseg+no_feature_weights": ("memseg", {"memseg": {"feature_weights": False}}),
    "memseg+class_weights+bf16": (
        "memseg",
        {"selftrain": {"class_weights": True}, "train": {"amp": "bf16"}},
    ),
}


@pytest.mark.parametrize("behaviour", ["paper", "official"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_training_step_reads_nothing_from_the_device(variant, behaviour, tmp_path):
    method, changes = VARIANTS[variant]
    trainer = make_trainer(method, _with(tiny_config(behaviour), **changes), tmp_path)
    # The CPU reads group sizes on purpose (free there); GPUs take the segmented form checked here.
    for module in (trainer.model, trainer.teacher):
        if module is not None:
            set_form(module, "segmented")
    trainer.train_step()  # a real step first: the bank holds rows
    with FakeTensorMode(allow_non_fake_inputs=True):
        logs = trainer.train_step()
    if method == "memseg":
        assert {"loss_contr_lab", "loss_contr_unlab", "filter_pass_rate"} <= set(logs)


def test_the_check_catches_a_host_read(tmp_path):
    trainer = make_trainer("memseg", tiny_config(), tmp_path)
    trainer.train_step()
    host_read = (DataDependentOutputException, DynamicOutputShapeException)
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(host_read):
        trainer.train_step()


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["selftrain", "memseg"])
def test_training_step_does_not_wait_for_the_gpu(method, tmp_path):
    """The same promise on the device itself: CUDA's sync debug mode raises on a blocking call."""
    trainer = make_trainer(method, tiny_config(), tmp_path)
    assert trainer.device.type == "cuda"
    trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
