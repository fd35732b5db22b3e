"""dvc.yaml, params.yaml, README and .ci/run agree with the code."""

import re
import shlex
from pathlib import Path

import yaml
from typer.main import get_command

from memseg_bench.cli import app
from memseg_bench.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]


def _stages():
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _command_and_options(cmd: str):
    words = shlex.split(cmd.replace("${", "").replace("}", ""))
    assert words[0] == "memseg", cmd
    names = [w for w in words[1:] if not w.startswith("-")][:1]
    options = [w for w in words[1:] if w.startswith("--")]
    return names[0], options


def test_every_stage_command_and_option_exists():
    click_app = get_command(app)
    for name, stage in _stages().items():
        body = stage.get("do", stage)
        command, options = _command_and_options(body["cmd"])
        assert command in click_app.commands, f"stage {name}: unknown command {command}"
        known = {opt for p in click_app.commands[command].params for opt in p.opts}
        for option in options:
            assert option in known, f"stage {name}: {command} has no option {option}"


def test_every_params_section_and_interpolated_key_exists():
    sections = set(Config.__dataclass_fields__)
    config = load_config(ROOT / "params.yaml")
    text = (ROOT / "dvc.yaml").read_text()
    for name, stage in _stages().items():
        body = stage.get("do", stage)
        for section in body.get("params", []):
            if isinstance(section, dict):  # a params file of its own: the protocol's preset
                (file,) = section
                assert file == "memseg_bench/presets/${preset}.yaml", (name, file)
                continue
            assert section in sections, f"stage {name}: unknown params section {section}"
    for reference in set(re.findall(r"\$\{([a-z_.]+)\}", text)):
        if reference.startswith("item"):
            continue
        value = config
        for part in reference.split("."):
            value = getattr(value, part)
        assert value is not None, reference


def test_ci_runs_the_readme_commands_as_written():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    setup, tests = blocks[0].strip(), blocks[1].strip()
    assert setup.endswith("&& dvc repro")
    ci_lines = [
        line.strip()
        for line in (ROOT / ".ci/run").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert setup in ci_lines
    assert tests in ci_lines
    assert ci_lines.index(setup) < ci_lines.index(tests)


def test_the_protocol_values_are_params_of_the_prepare_and_train_stages():
    """`dvc params diff` and `dvc exp show` list the preset's values: its file is a params file."""
    stages = _stages()
    for name in ("prepare", "train", "train_full", "train_ablation"):
        body = stages[name].get("do", stages[name])
        assert {"memseg_bench/presets/${preset}.yaml": None} in body["params"], name
