"""The guarantees that the README's "Guarantees" section lists, one test per case.

Faults: a run killed (SIGKILL) or interrupted (SIGINT) while it trains, writes a checkpoint,
evaluates or exports ends, once resumed or rerun, with the metrics of an uninterrupted run, and no
half-written file is left under a name a later stage reads. Hostile files: a pickle payload in a
checkpoint, model file or weights file is refused and never runs. Inputs to `predict`: every image
form is segmented as displayed, large images in bounded memory, bad files are skipped. Data:
`memseg data check` names the usual label mistakes. Every failure is one line and a non-zero exit.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageOps

from tests.fakes import make_cityscapes, make_folder, make_voc
from tests.project import TINY_PARAMS, make_project, memseg, one_error_line

RUN = "supervised-n6-s0"
TRAIN = ("train", "--method", "supervised", "--n-labeled", "6", "--seed", "0")
ITERATIONS = 8
FAST_PARAMS = copy.deepcopy(TINY_PARAMS)
FAST_PARAMS["train"].update(
    {"iterations": ITERATIONS, "checkpoint_every": 2, "val_every": 4, "log_every": 2}
)
# A model this briefly trained has near-tied logits on a few pixels, where eager and ONNX argmax
# may differ; the export test is about the kill, not about that agreement.
FAST_PARAMS["export"]["min_argmax_agreement"] = 0.99
# Torch's words when it refuses a pickle, and its warnings: none may reach the user.
TORCH_ADVICE = ("weights_only", "Weights only", "trust", "pickle", "Warning")


def temporary_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.tmp"))


def start(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "memseg_bench", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_for(condition, process: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while not condition() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)


def results(metrics: dict) -> dict:
    """A metrics file without its timings and the hash of the model file's bytes (torch.save
    writes a new serialization id each time): what an interrupted run must reproduce exactly."""
    kept = {k: v for k, v in metrics.items() if k != "compute"}
    kept["provenance"] = {k: v for k, v in metrics["provenance"].items() if k != "checkpoint_hash"}
    return kept


def assert_same_weights(a: Path, b: Path) -> None:
    from memseg_bench import torchfile

    first, second = (torchfile.load(p, "model file")["model_state"] for p in (a, b))
    assert first.keys() == second.keys()
    for key in first:
        assert bool((first[key] == second[key]).all()), key


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = make_project(tmp_path_factory.mktemp("reliability") / "p", FAST_PARAMS)
    memseg(root, "prepare")
    return root


@pytest.fixture(scope="module")
def trained(prepared) -> dict:
    """The uninterrupted reference: one tiny supervised run, trained and evaluated."""
    memseg(prepared, *TRAIN)
    started = time.perf_counter()
    memseg(prepared, "evaluate", "--run", f"runs/{RUN}")
    evaluate_s = time.perf_counter() - started
    metrics = json.loads((prepared / "reports/metrics" / f"{RUN}.json").read_text())
    return {"root": prepared, "metrics": metrics, "evaluate_s": evaluate_s}


# -- faults --------------------------------------------------------------------------------

CHECKPOINT_WRITER = """
import sys
import torch
from memseg_bench import checkpoint

path, n = sys.argv[1], 4_000_000
checkpoint.save(path, {"step": 0, "w": torch.zeros(n)})
# Built once: the next write starts as soon as one ends, so the writer is nearly always inside one.
states = [{"step": k, "w": torch.full((n,), float(k))} for k in (1, 2)]
print("first written", flush=True)
while True:
    for state in states:
        checkpoint.save(path, state)
"""


def writing(folder: Path) -> bool:
    """A temporary file with bytes in it: a write under way."""
    for path in temporary_files(folder):
        try:
            if path.stat().st_size:
                return True
        except FileNotFoundError:  # renamed into place meanwhile
            pass
    return False


def test_sigkill_during_checkpoint_write_keeps_a_whole_checkpoint(tmp_path):
    from memseg_bench import checkpoint

    path = tmp_path / "run" / "checkpoint.pt"
    for attempt in range(2):
        writer = subprocess.Popen(
            [sys.executable, "-c", CHECKPOINT_WRITER, str(path)], stdout=subprocess.PIPE, text=True
        )
        assert writer.stdout.readline().strip() == "first written"
        wait_for(lambda: writing(path.parent), writer)
        writer.kill()
        writer.wait()
        assert writer.returncode == -signal.SIGKILL
        # The kill landed inside a write: its temporary file is still there...
        leftovers = temporary_files(path.parent)
        assert leftovers, "the writer was not killed inside a write"
        # ...and the checkpoint under the final name is one whole earlier state.
        state = checkpoint.load(path)
        assert bool((state["w"] == float(state["step"])).all()), attempt
        for leftover in leftovers:
            leftover.unlink()


def stop_training(root: Path, runs: Path, how: signal.Signals) -> tuple[int, str]:
    """Start the reference run's command, send `how` once its first checkpoint exists; the
    exit status and stderr."""
    process = start(root, *TRAIN, "--runs-dir", str(runs), "--curves-dir", str(runs / "curves"))
    wait_for((runs / RUN / "checkpoint.pt").exists, process)
    process.send_signal(how)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


def resume_and_evaluate(root: Path, runs: Path) -> dict:
    memseg(root, *TRAIN, "--runs-dir", str(runs), "--curves-dir", str(runs / "curves"), "--resume")
    memseg(root, "evaluate", "--run", str(runs / RUN), "--metrics-dir", str(runs / "metrics"))
    return json.loads((runs / "metrics" / f"{RUN}.json").read_text())


@pytest.mark.slow
def test_sigkill_during_a_step_then_resume_matches_uninterrupted(trained):
    from memseg_bench import checkpoint

    root, runs = trained["root"], trained["root"] / "runs_sigkill"
    status, _ = stop_training(root, runs, signal.SIGKILL)
    assert status == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (runs / RUN / "model.pt").exists()
    assert 0 < checkpoint.load(runs / RUN / "checkpoint.pt")["step"] < ITERATIONS
    assert results(resume_and_evaluate(root, runs)) == results(trained["metrics"])
    assert_same_weights(runs / RUN / "model.pt", root / "runs" / RUN / "model.pt")


@pytest.mark.slow
def test_sigint_during_training_then_resume_matches_uninterrupted(trained):
    from memseg_bench import checkpoint

    root, runs = trained["root"], trained["root"] / "runs_sigint"
    status, stderr = stop_training(root, runs, signal.SIGINT)
    assert status == 130, stderr
    assert [line for line in stderr.splitlines() if line.strip()] == ["interrupted"]
    assert not (runs / RUN / "model.pt").exists() and not temporary_files(runs)
    assert 0 < checkpoint.load(runs / RUN / "checkpoint.pt")["step"] < ITERATIONS
    assert results(resume_and_evaluate(root, runs)) == results(trained["metrics"])
    assert_same_weights(runs / RUN / "model.pt", root / "runs" / RUN / "model.pt")


@pytest.mark.slow
def test_sigkill_during_evaluate_then_rerun_matches_uninterrupted(trained):
    root = trained["root"]
    metrics_dir = root / "metrics_kill"
    killed = 0
    for fraction in (0.5, 0.75, 0.9):
        process = start(root, "evaluate", "--run", f"runs/{RUN}", "--metrics-dir", "metrics_kill")
        time.sleep(fraction * trained["evaluate_s"])
        process.kill()
        process.communicate()
        killed += process.returncode == -signal.SIGKILL
        written = metrics_dir / f"{RUN}.json"
        if written.exists():  # only ever whole, and then with the per-class CSV beside it
            assert json.loads(written.read_text()) == trained["metrics"]
            assert (metrics_dir / f"{RUN}.per_class.csv").is_file()
        if metrics_dir.exists():  # nothing else but hidden temporary files, which no stage reads
            finals = {f"{RUN}.json", f"{RUN}.per_class.csv"}
            assert all(
                p.name in finals or (p.name.startswith(".") and p.suffix == ".tmp")
                for p in metrics_dir.iterdir()
            )
    assert killed, "evaluate always ended before it was killed"

    memseg(root, "evaluate", "--run", f"runs/{RUN}", "--metrics-dir", "metrics_kill")
    metrics = json.loads((metrics_dir / f"{RUN}.json").read_text())
    assert metrics == trained["metrics"]


@pytest.mark.slow
def test_sigkill_during_export_then_rerun_matches_uninterrupted(trained):
    root = trained["root"]
    export = ("export", "--run", f"runs/{RUN}")
    memseg(root, *export, "--output", "ref/student.onnx", "--check-report", "ref/check.json")
    process = start(
        root, *export, "--output", "out/student.onnx", "--check-report", "out/check.json"
    )
    out = root / "out"
    wait_for(lambda: out.is_dir() and bool(temporary_files(out)), process)
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL, "export ended before it was killed"
    assert not (out / "student.onnx").exists() and not (out / "check.json").exists()

    memseg(root, *export, "--output", "out/student.onnx", "--check-report", "out/check.json")
    reference = json.loads((root / "ref/check.json").read_text())
    rerun = json.loads((out / "check.json").read_text())
    paths = ("onnx",)
    assert {k: v for k, v in rerun.items() if k not in paths} == {
        k: v for k, v in reference.items() if k not in paths
    }
    assert rerun["passed"] is True


# -- hostile files -------------------------------------------------------------------------


class MakesMarker:
    """Unpickling this calls os.mkdir(marker): a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_the_payload_runs_when_unpickled(tmp_path):
    # What the refusals below prevent: plain unpickling runs the payload.
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(MakesMarker(marker)))
    assert marker.is_dir()


def hostile(path: Path, content: dict) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(content, path)
    return path


def refused(result: subprocess.CompletedProcess, path: Path, kind: str, marker: Path) -> None:
    line = one_error_line(result, str(path), f"is not {kind}", "posix.mkdir")
    printed = (result.stderr + result.stdout).replace(str(path.parent), "<folder>")
    for advice in TORCH_ADVICE:
        assert advice not in printed, line
    assert not marker.exists(), "the payload ran"


def test_checkpoint_with_a_pickle_payload_is_refused(prepared, tmp_path):
    marker = tmp_path / "ran"
    runs = tmp_path / "runs"
    path = hostile(runs / RUN / "checkpoint.pt", {"step": 1, "model": MakesMarker(marker)})
    result = memseg(prepared, *TRAIN, "--runs-dir", str(runs), "--resume", check=False)
    refused(result, path, "a memseg_bench checkpoint", marker)
    assert not (runs / RUN / "model.pt").exists()


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_model_file_with_a_pickle_payload_is_refused(prepared, tmp_path, command):
    marker = tmp_path / "ran"
    run = tmp_path / "runs" / RUN
    path = hostile(run / "model.pt", {"model_state": MakesMarker(marker), "config": {}})
    (run / "train.json").write_text("{}")
    outputs = (
        ["--metrics-dir", str(tmp_path / "metrics")]
        if command == "evaluate"
        else ["--output", str(tmp_path / "m.onnx"), "--check-report", str(tmp_path / "c.json")]
    )
    result = memseg(prepared, command, "--run", str(run), *outputs, check=False)
    refused(result, path, "a memseg_bench model file", marker)
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]  # nothing written


def test_weights_file_with_a_pickle_payload_is_refused(prepared, tmp_path):
    import torch

    marker = tmp_path / "ran"
    content = {"conv.weight": torch.zeros(1), "x": MakesMarker(marker)}
    path = hostile(tmp_path / "backbone.pth", content)
    params = copy.deepcopy(FAST_PARAMS)
    params["model"] = {"weights": str(path)}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = memseg(
        prepared, *TRAIN, "--params", str(tmp_path / "params.yaml"),
        "--runs-dir", str(tmp_path / "runs"), check=False,
    )  # fmt: skip
    refused(result, path, "a weights file", marker)
    assert not (tmp_path / "runs").exists()


def test_truncated_checkpoint_is_named(tmp_path):
    import warnings

    import torch

    from memseg_bench import checkpoint
    from memseg_bench.errors import UserError

    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, {"step": 3, "model": {"w": torch.zeros(10_000)}})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with warnings.catch_warnings(record=True) as caught, pytest.raises(UserError) as error:
        warnings.simplefilter("always")
        checkpoint.load(path)
    message = str(error.value)
    assert message.startswith(f"checkpoint {path} is not a memseg_bench checkpoint: ")
    assert "truncated" in message and "\n" not in message
    assert not caught


def other_protocol_run(run: Path) -> Path:
    """A valid model file whose config is not the one its run's train.json records."""
    import torch

    from memseg_bench.config import Config, config_hash, config_to_dict

    config = Config()
    run.mkdir(parents=True)
    model = {
        "model_state": {},
        "config": config_to_dict(config),
        "class_names": ["a", "b"],
        "palette": [[0, 0, 0], [9, 9, 9]],
        "config_hash": config_hash(config),
    }
    torch.save(model, run / "model.pt")
    (run / "train.json").write_text(json.dumps({"provenance": {"config_hash": "0" * 16}}))
    return run / "model.pt"


def foreign_file(run: Path, form: str) -> Path:
    import torch

    run.mkdir(parents=True)
    (run / "train.json").write_text(json.dumps({"provenance": {"config_hash": "0" * 16}}))
    path = run / "model.pt"
    if form == "state dict":  # torchvision's weights file format, not a model file
        torch.save({"conv.weight": torch.zeros(2, 3)}, path)
    else:  # a plain pickle, another serialization protocol than torch.save's
        path.write_bytes(pickle.dumps({"model_state": {}, "config": {}}, protocol=2))
    return path


@pytest.mark.parametrize("form", ["other protocol", "state dict", "plain pickle"])
def test_model_file_of_another_protocol_is_named(tmp_path, form):
    from memseg_bench.errors import UserError
    from memseg_bench.evaluate_stage import evaluate_run

    run = tmp_path / "runs" / RUN
    path = other_protocol_run(run) if form == "other protocol" else foreign_file(run, form)
    with pytest.raises(UserError) as error:
        evaluate_run(run, tmp_path / "metrics")
    message = str(error.value)
    assert message.startswith(f"model file {path} ") and "\n" not in message
    expected = "written under another protocol" if form == "other protocol" else "is not a"
    assert expected in message, message
    assert not (tmp_path / "metrics").exists()


# -- inputs to predict ---------------------------------------------------------------------

CLASS_NAMES = ["bright", "middle", "dark"]


def colour_model(path: Path) -> Path:
    """An ONNX model in our export format whose logits are (R, 96, 255 - B) at every pixel."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.zeros((3, 3, 1, 1), np.float32)
    weight[0, 0], weight[2, 2] = 1.0, -1.0
    bias = np.array([0.0, 96.0, 255.0], np.float32)
    shape = ["batch", 3, "height", "width"]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "weight", "bias"], ["logits"])],
        "colour",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    palette = [[255, 255, 255], [128, 128, 128], [0, 0, 0]]
    metadata = {"class_names": CLASS_NAMES, "palette": palette, "num_classes": 3}
    helper.set_model_props(model, {k: json.dumps(v) for k, v in metadata.items()})
    onnx.save(model, str(path))
    return path


def expected_mask(path: Path) -> np.ndarray:
    """What the colour model gives for the image as displayed."""
    with Image.open(path) as image:
        rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB")).astype(np.float32)
    logits = np.stack([rgb[..., 0], np.full(rgb.shape[:2], 96.0), 255.0 - rgb[..., 2]])
    return logits.argmax(0).astype(np.uint8)


def halves(height: int, width: int) -> np.ndarray:
    """White left half (class 0), black right half (class 2)."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2] = 255
    return image


def gradient(height: int = 24, width: int = 36) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (height + width)], -1)


def write_forms(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True)
    rgb = gradient().astype(np.uint8)
    grey = rgb[..., 0]
    paths = {}

    def save(name: str, image: Image.Image, **options) -> None:
        paths[name] = folder / name
        image.save(paths[name], **options)

    save("rgba.png", Image.fromarray(np.dstack([rgb, np.full(grey.shape, 128, np.uint8)])))
    save("greyscale.png", Image.fromarray(grey))
    save("palette.png", Image.fromarray(rgb).quantize(16))
    save("deep16.png", Image.fromarray(grey.astype(np.uint16) * 257))
    save("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: stored rotated; viewers turn it 90 degrees clockwise
    save("exif_rotated.jpg", Image.fromarray(halves(20, 40)), exif=exif, quality=95)
    save("one_pixel.png", Image.fromarray(np.full((1, 1, 3), 200, np.uint8)))
    return paths


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return colour_model(tmp_path_factory.mktemp("model") / "colour.onnx")


@pytest.fixture(scope="module")
def forms(model, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("forms")
    paths = write_forms(root / "in")
    result = memseg(root, "predict", "in", "-o", "out", "--model", str(model), "--provider", "cpu")
    return {"paths": paths, "out": root / "out", "result": result}


FORMS = ["rgba.png", "greyscale.png", "palette.png", "deep16.png", "cmyk.jpg", "one_pixel.png"]


# The 16-bit PNG holds the greyscale image times 257: it must be segmented as that image.
SAME_AS = {"deep16.png": "greyscale.png"}


@pytest.mark.parametrize("name", FORMS)
def test_predict_reads_every_image_form(forms, name):
    expected = expected_mask(forms["paths"][SAME_AS.get(name, name)])
    with Image.open(forms["out"] / f"{Path(name).stem}_mask.png") as mask:
        np.testing.assert_array_equal(np.asarray(mask), expected)
    assert sum(name in line for line in forms["result"].stdout.splitlines()) == 1


def test_predict_gives_the_mask_of_an_exif_rotated_jpeg_as_displayed(forms):
    with Image.open(forms["out"] / "exif_rotated_mask.png") as opened:
        mask = np.asarray(opened)
    assert mask.shape == (40, 20)  # stored 40 wide, 20 high: displayed turned
    assert (mask[:18] == 0).all() and (mask[22:] == 2).all()  # white on top, black below
    np.testing.assert_array_equal(mask, expected_mask(forms["paths"]["exif_rotated.jpg"]))
    with Image.open(forms["out"] / "exif_rotated_overlay.jpg") as overlay:
        assert overlay.size == (20, 40)


PEAK_MEMORY = """
import resource
import sys
from memseg_bench.predict import predict

small, large, model, out = sys.argv[1:]
predict([small], model, out, "cpu")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
[result] = predict([large], model, out, "cpu")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("growth_mib", (after - before) / 1024, result["model_width"], result["model_height"])
"""
MAX_GROWTH_MIB = 1024


def test_predict_bounds_the_memory_of_a_6000x4000_image(model, tmp_path):
    Image.fromarray(halves(24, 36)).save(tmp_path / "small.png")
    Image.fromarray(halves(4000, 6000)).save(tmp_path / "large.jpg", quality=90)
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY, str(tmp_path / "small.png"),
         str(tmp_path / "large.jpg"), str(model), str(tmp_path / "out")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    _, growth, width, height = result.stdout.splitlines()[-1].split()
    assert (int(width), int(height)) == (2048, 1365)  # what the model saw
    assert float(growth) < MAX_GROWTH_MIB, f"peak memory grew by {growth} MiB"
    with Image.open(tmp_path / "out/large_mask.png") as opened:
        mask = np.asarray(opened)
    assert mask.shape == (4000, 6000)
    assert (mask[:, :2990] == 0).all() and (mask[:, 3010:] == 2).all()


def test_predict_skips_empty_and_non_image_files_and_fails_at_the_end(model, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(gradient().astype(np.uint8)).save(folder / "a_good.png")
    Image.fromarray(halves(10, 12)).save(folder / "z_good.jpg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image\n")
    result = memseg(
        tmp_path, "predict", "in", "-o", "out", "--model", str(model), "--provider", "cpu",
        check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    for bad in ("empty.png", "notes.png"):
        assert sum(bad in line and line.startswith("skipped: ") for line in lines) == 1, lines
    assert len(lines) == 3 and lines[-1].startswith("error: 2 of 4 inputs"), lines
    for good in ("a_good", "z_good"):
        assert (tmp_path / "out" / f"{good}_mask.png").is_file()
        assert (tmp_path / "out" / f"{good}_overlay.jpg").is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a_good_mask.png", "a_good_overlay.jpg", "z_good_mask.png", "z_good_overlay.jpg",
    ]  # fmt: skip


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_predict_into_an_unwritable_folder_fails_in_one_line(model, tmp_path, where):
    if where == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    Image.fromarray(halves(10, 12)).save(tmp_path / "image.png")
    (tmp_path / "taken").write_text("a file\n")
    output = {"a file": "taken", "under a file": "taken/masks", "read-only": "locked"}[where]
    if where == "read-only":
        (tmp_path / "locked").mkdir(mode=0o555)
    result = memseg(tmp_path, "predict", "image.png", "-o", output, "--model", str(model),
                    check=False)  # fmt: skip
    one_error_line(result, f"output folder {output} is not writable")
    assert not list(tmp_path.rglob("*_mask.png"))


# -- data ----------------------------------------------------------------------------------


def problem_line(result: subprocess.CompletedProcess, name: str, *needles: str) -> None:
    """`memseg data check` failed and named `name` on exactly one line holding every needle."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if name in line]
    assert len(lines) == 1, result.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_data_check_names_a_voc_colour_label(tmp_path):
    from memseg_bench.data.datasets import VOC_PALETTE

    make_voc(tmp_path, train=3, val=2)
    path = tmp_path / "SegmentationClassAug" / "2007_000001.png"
    label = np.asarray(Image.open(path))
    colours = np.array(VOC_PALETTE + ((224, 224, 192),) * 235, np.uint8)
    Image.fromarray(colours[label]).save(path)  # the colour form, saved as RGB
    result = memseg(tmp_path, "data", "check", "--dataset", "voc", "--root", ".", check=False)
    problem_line(result, "2007_000001.png", "RGB colour image", "indices")


def test_data_check_names_cityscapes_label_ids_as_train_ids(tmp_path):
    make_cityscapes(tmp_path, cities={"train": ["aachen"], "val": ["bonn"]}, train_ids=True)
    train_ids = next((tmp_path / "gtFine/train/aachen").glob("*_labelTrainIds.png"))
    label_ids = train_ids.with_name(train_ids.name.replace("labelTrainIds", "labelIds"))
    shutil.copy(label_ids, train_ids)
    result = memseg(tmp_path, "data", "check", "--dataset", "cityscapes", "--root", ".",
                    check=False)  # fmt: skip
    problem_line(result, train_ids.name, "labelIds, not trainIds")


def test_data_check_names_jpeg_compressed_labels(tmp_path):
    make_folder(tmp_path, counts={"train": 3, "val": 1}, size=(32, 48))
    labels = tmp_path / "labels/train"
    classes = np.random.default_rng(0).integers(0, 4, (4, 6))
    blocks = np.roll(np.kron(classes, np.ones((8, 8), int)), (3, 5), (0, 1)).astype(np.uint8)
    blocks[:, :2] = 255  # an ignore border
    encoded = io.BytesIO()
    Image.fromarray(blocks).save(encoded, format="JPEG", quality=75)
    (labels / "train000.png").write_bytes(encoded.getvalue())  # JPEG data under a .png name
    Image.open(io.BytesIO(encoded.getvalue())).save(labels / "train001.png")  # decoded JPEG
    result = memseg(tmp_path, "data", "check", "--dataset", "folder", "--root", ".", check=False)
    problem_line(result, "train000.png", "JPEG data", "lossless PNG")
    problem_line(result, "train001.png", "JPEG", "values outside")
