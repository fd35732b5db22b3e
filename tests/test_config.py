import dataclasses

import pytest

from memseg_bench.config import (
    Config,
    available_presets,
    config_from_dict,
    config_hash,
    dump_config,
    load_config,
    stored_config,
)
from memseg_bench.errors import UserError


def test_defaults_round_trip_through_yaml(tmp_path):
    config = config_from_dict({"preset": "embedded"})
    path = tmp_path / "params.yaml"
    path.write_text(dump_config(config))
    again = load_config(path)
    assert again == config
    assert config_hash(again) == config_hash(config)


def test_params_override_the_preset():
    config = config_from_dict({"preset": "embedded", "train": {"lr": 0.5}})
    preset_only = config_from_dict({"preset": "embedded"})
    assert config.train.lr == 0.5
    assert config.train.crop == preset_only.train.crop
    assert config_hash(config) != config_hash(preset_only)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"train": {"lrr": 1}}, "train.lrr"),
        ({"methods": {"memseg": {"memory_sise": 1}}}, "methods.memseg.memory_sise"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_unknown_key_is_named(values, key):
    with pytest.raises(UserError, match=f"unknown key '{key}'"):
        config_from_dict(values)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"train": {"iterations": 1.5}}, "train.iterations"),
        ({"train": {"deterministic": "yes"}}, "train.deterministic"),
        ({"methods": {"behaviour": "mine"}}, "methods.behaviour"),
        ({"sweep": {"seeds": 3}}, "sweep.seeds"),
        ({"train": {"augment": {"scale_range": [1.0]}}}, "train.augment.scale_range"),
    ],
)
def test_wrong_type_is_named(values, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        config_from_dict(values)


@pytest.mark.parametrize(
    ("key", "value"),
    [("checkpoint_every", 0), ("log_every", 0), ("iterations", 0), ("val_every", -1)],
)
def test_schedule_counts_out_of_range_are_named(key, value):
    with pytest.raises(UserError, match=rf"'train\.{key}' must be at least \d+, got {value}"):
        config_from_dict({"preset": "embedded", "train": {key: value}})


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="preset"):
        config_from_dict({"preset": "nope"})
    with pytest.raises(UserError, match="params file not found"):
        load_config(tmp_path / "missing.yaml")


def test_config_is_frozen():
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train = None  # type: ignore[misc]


def test_every_preset_loads():
    for name in available_presets():
        config = config_from_dict({"preset": name})
        assert config.preset == name


def test_repository_params_load():
    config = load_config("params.yaml")
    assert config.sweep.methods == ("supervised", "selftrain", "memseg")


def test_optimizer_is_a_named_choice():
    import torch

    from memseg_bench.engine import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    adamw = config_from_dict({"train": {"optimizer": "adamw", "lr": 0.001}}).train
    assert isinstance(make_optimizer(params, adamw), torch.optim.AdamW)
    sgd = make_optimizer(params, config_from_dict({}).train)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    with pytest.raises(UserError, match="train.optimizer"):
        config_from_dict({"train": {"optimizer": "adam"}})


def test_a_config_stored_by_an_earlier_version_loads_with_its_meaning():
    old = {
        "preset": "camvid",
        "methods": {
            "behaviour": "official",
            "selftrain": {"classmix_drop_background": True},
            "memseg": {"rank_order": "auto", "contrastive_start": 300},
        },
    }
    config = stored_config(old)
    assert config.train.augment.classmix_drop_background is True
    assert config.methods.selftrain.class_weights_start == 300
    assert config.methods.memseg.rank_order == "lowest"  # auto: the behaviour decided
    with pytest.raises(UserError, match="classmix_drop_background"):
        config_from_dict(old)  # params files get no such pass
