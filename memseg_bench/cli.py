"""The `memseg` command: a thin Typer layer over the library. Every stage of dvc.yaml is one
command here. Hyper-parameters come from params.yaml only; options select runs and paths."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from memseg_bench.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Semi-supervised segmentation benchmark: prepare, train, evaluate, report, export.",
)
bench_app = typer.Typer(no_args_is_help=True, help="Speed and memory benchmarks.")
data_app = typer.Typer(no_args_is_help=True, help="Dataset checks.")
splits_app = typer.Typer(no_args_is_help=True, help="Split files under splits/.")
app.add_typer(bench_app, name="bench")
app.add_typer(data_app, name="data")
app.add_typer(splits_app, name="splits")

PARAMS = typer.Option(Path("params.yaml"), "--params", help="params file")


def _config(params: Path, preset: str | None = None):
    from memseg_bench.config import load_config

    return load_config(params, None if preset is None else {"preset": preset})


def _training_config(params: Path, preset: str | None = None):
    """The config of a command that builds a model: a weights file it names is checked first."""
    from memseg_bench.torchfile import check_weights_option

    config = _config(params, preset)
    check_weights_option(config.model.weights)
    return config


@app.command()
def prepare(
    params: Path = PARAMS,
    prepared: Path = typer.Option(Path("data/prepared.json"), help="summary file to write"),
) -> None:
    """Make the dataset available (generate the embedded one) and verify the sweep's splits."""
    from memseg_bench.prepare import prepare as run_prepare

    run_prepare(_config(params), prepared)


@app.command()
def train(
    method: str = typer.Option(..., help="supervised | fixmatch | unimatch | selftrain | memseg"),
    n_labeled: int = typer.Option(..., help="label count of the split family in params"),
    seed: int = typer.Option(
        0, help="training seed (and split draw when split.seed_suffix is set)"
    ),
    variant: str = typer.Option(None, help="memseg ablation variant"),
    resume: bool = typer.Option(False, "--resume", help="continue from runs/<run>/checkpoint.pt"),
    runs_dir: Path = typer.Option(Path("runs")),
    curves_dir: Path = typer.Option(Path("reports/curves")),
    params: Path = PARAMS,
) -> None:
    """Train one run; writes runs/<run>/ and reports/curves/<run>.csv."""
    from memseg_bench.engine import train as run_train
    from memseg_bench.runs import config_for_run, make_spec

    config = _training_config(params)
    spec = make_spec(method, config.split.family, n_labeled, seed, variant)
    summary = run_train(config_for_run(config, spec), spec, runs_dir, curves_dir, resume=resume)
    typer.echo(
        f"{summary['run']}: {summary['steps']} steps in {summary['compute']['wall_time_s']:.1f} s"
    )


@app.command()
def sweep(
    jobs: int = typer.Option(1, help="runs at once: 2 one-thread runs on 2 cores, more on a GPU"),
    runs_dir: Path = typer.Option(Path("runs")),
    curves_dir: Path = typer.Option(Path("reports/curves")),
    logs_dir: Path = typer.Option(None, help="a log per run [default: logs/<runs dir name>]"),
    list_runs: bool = typer.Option(False, "--list", help="print each run's state and stop"),
    params: Path = PARAMS,
) -> None:
    """Train the sweep's runs `--jobs` at a time: finished ones skipped, interrupted ones resumed.
    Then `dvc commit` records them and `dvc repro` evaluates and reports."""
    from memseg_bench.sweep import plan, run_sweep

    planned = plan(_training_config(params), runs_dir)
    if list_runs:
        for item in planned:
            typer.echo(f"{item.state:6} {item.spec.name}")
        return
    logs_dir = logs_dir or Path("logs") / runs_dir.name
    failed = run_sweep(planned, params, runs_dir, curves_dir, logs_dir, jobs, typer.echo)
    if failed:
        raise UserError(f"{len(failed)} run(s) failed: " + "; ".join(failed))


@app.command()
def evaluate(
    run: Path = typer.Option(..., help="run directory, e.g. runs/supervised-random-20-s0"),
    metrics_dir: Path = typer.Option(Path("reports/metrics")),
) -> None:
    """Score a trained run on its evaluation split; writes reports/metrics/<run>.json."""
    from memseg_bench.evaluate_stage import evaluate_run

    result = evaluate_run(run, metrics_dir)
    typer.echo(f"{result['run']}: mIoU {100 * result['miou']:.2f}")


@app.command()
def report(
    metrics_dir: Path = typer.Option(Path("reports/metrics")),
    out_dir: Path = typer.Option(Path("reports")),
    runs_dir: Path = typer.Option(Path("runs")),
    update_readme: Path = typer.Option(None, help="replace the results block of this README"),
    readme_block: str = typer.Option("results", help="name of the README block to replace"),
    params: Path = PARAMS,
) -> None:
    """Tables (md/csv/tex), figures and summary.json from the metrics of finished runs."""
    from memseg_bench.protocol_checks import describe
    from memseg_bench.report_stage import write_reports

    summary = write_reports(
        _config(params), metrics_dir, out_dir, runs_dir, update_readme, readme_block
    )
    print(f"protocol checks of {summary['checks']['protocol']}:")
    for line in describe(summary["checks"]):
        print(f"  {line}")


@app.command()
def export(
    run: Path = typer.Option(None, help="run directory (default: export.run in params)"),
    output: Path = typer.Option(Path("models/student.onnx")),
    int8: bool = typer.Option(
        None, "--int8/--no-int8", help="also write the int8 model (default: export.int8)"
    ),
    int8_output: Path = typer.Option(Path("models/student.int8.onnx")),
    check_report: Path = typer.Option(Path("reports/export_check.json")),
    params: Path = PARAMS,
) -> None:
    """Export the student of a run to ONNX (and int8) and check it against PyTorch."""
    from memseg_bench.export import Int8Export, export_onnx
    from memseg_bench.quantize import Int8Method

    settings = _config(params).export
    run = run or Path("runs") / settings.run
    quantized = None
    if settings.int8 if int8 is None else int8:
        quantized = Int8Export(
            int8_output,
            calibration_images=settings.int8_calibration_images,
            calibration_seed=settings.int8_calibration_seed,
            max_miou_drop=settings.int8_max_miou_drop,
            method=Int8Method(
                per_channel=settings.int8_per_channel,
                calibrate_method=settings.int8_calibrate_method,
            ),
        )
    result = export_onnx(
        run / "model.pt",
        output,
        check_report,
        sizes=settings.parity_sizes,
        opset=settings.opset,
        max_abs_tolerance=settings.max_abs_tolerance,
        min_argmax_agreement=settings.min_argmax_agreement,
        int8=quantized,
    )
    typer.echo(f"exported {output}: parity {result.get('passed')}")
    if "int8" in result:
        checked = result["int8"]
        typer.echo(
            f"exported {int8_output}: mIoU {100 * checked['fp32_miou']:.2f} (fp32) -> "
            f"{100 * checked['int8_miou']:.2f} (int8) on {checked['eval_split']}, pixel "
            f"agreement {checked['pixel_agreement']:.4f}"
        )


@app.command()
def predict(
    inputs: list[Path] = typer.Argument(..., help="image files and/or folders"),
    model: Path = typer.Option(Path("models/student.onnx"), help="exported ONNX model"),
    output: Path = typer.Option(None, "--output", "-o", help="output folder"),
    provider: str = typer.Option("auto", help="auto | cpu | cuda"),
    max_side: int = typer.Option(
        2048, help="longest side the model sees; larger images are downscaled (0: no limit)"
    ),
    batch: int = typer.Option(1, help="images of one size that go through the model together"),
    threads: int = typer.Option(0, help="onnxruntime threads (0: every core of this process)"),
    overlay: bool = typer.Option(True, "--overlay/--no-overlay", help="write <name>_overlay.jpg"),
) -> None:
    """Segment images with the exported model (onnxruntime, no torch)."""
    from memseg_bench.predict import predict as run_predict

    run_predict(
        [str(p) for p in inputs],
        str(model),
        None if output is None else str(output),
        provider,
        max_side=max_side,
        batch=batch,
        threads=threads,
        with_overlay=overlay,
    )


@bench_app.command("infer")
def bench_infer(
    model: list[Path] = typer.Option(
        None, help="runs/<run>/model.pt (repeatable; default: the random init and export.run)"
    ),
    backbone: str = typer.Option("resnet50", help="backbone of the random-init model"),
    size: list[int] = typer.Option(None, help="square size (repeatable; default: 512)"),
    repeats: int = typer.Option(10),
    threads: int = typer.Option(2),
    folder: Path = typer.Option(None, help="images for predict's throughput, e.g. a test split"),
    tuning: bool = typer.Option(False, "--tuning", help="also time each session option"),
    profile: bool = typer.Option(
        False, "--profile", help="also profile the ORT fp32 session: time per operator, GFLOP/s"
    ),
    params: Path = PARAMS,
) -> None:
    """Eager vs ORT fp32 vs ORT int8 latency at 512x512 and the protocol's size, the int8 mIoU
    cost, and predict's folder throughput against the bare session."""
    from memseg_bench.bench.infer import bench_infer as run

    config = _config(params)
    if model:
        models = [str(path) for path in model]
    else:
        student = Path("runs") / config.export.run / "model.pt"
        models = [None] + ([str(student)] if student.is_file() else [])
    sizes = [(s, s) for s in size] if size else [(512, 512)]
    run(
        models,
        config,
        backbone,
        sizes=[*sizes, None],
        repeats=repeats,
        threads=threads,
        folder=None if folder is None else str(folder),
        tuning=tuning,
        profile=profile,
    )


@bench_app.command("loss")
def bench_loss(
    preset: str = typer.Option(
        "voc_v3p_r50",
        help="the sizes of a preset's step: voc_v3p_r50 | cityscapes_v3p_r50 | embedded",
    ),
    threads: int = typer.Option(2),
    repeats: int = typer.Option(3),
    device: str = typer.Option("cpu"),
) -> None:
    """Contrastive loss and memory update: closed form vs pairwise, time and peak memory."""
    from memseg_bench.bench.loss import bench_loss as run
    from memseg_bench.bench.loss import print_summary

    print_summary(run(preset, threads=threads, repeats=repeats, device=device))


@bench_app.command("step")
def bench_step(
    steps: int = typer.Option(5),
    threads: int = typer.Option(2),
    preset: str = typer.Option(None, help="benchmark another preset's configuration"),
    params: Path = PARAMS,
) -> None:
    """Step time of every method against supervised at equal batch, as ratios."""
    from memseg_bench.bench.train import bench_step as run

    run(_training_config(params, preset), steps=steps, threads=threads)


@bench_app.command("unlabeled-forward")
def bench_unlabeled_forward(
    seed: list[int] = typer.Option([2], help="run seed = split draw (repeatable)"),
    control: list[str] = typer.Option(
        None, help="supervised | joint | separate | more_labeled (repeatable; default: all)"
    ),
    out: Path = typer.Option(None, help="JSON file of the results"),
    threads: int = typer.Option(2),
    params: Path = PARAMS,
) -> None:
    """Diagnosis: the supervised loss alone, with unlabeled crops in the labeled batch's
    forward, in a forward of their own, or more labeled crops instead, under BatchNorm from
    batch statistics and from running statistics (train.freeze_bn); validation mIoU."""
    from memseg_bench.bench.unlabeled_forward import CONTROLS, diagnose

    diagnose(_training_config(params), seed, control or list(CONTROLS), out, threads)


@bench_app.command("train")
def bench_train(
    steps: int = typer.Option(5),
    warmup: int = typer.Option(2),
    method: str = typer.Option("memseg"),
    threads: int = typer.Option(2),
    preset: str = typer.Option(None, help="benchmark another preset's configuration"),
    amp: str = typer.Option(None, help="none | bf16 (default: train.amp)"),
    params: Path = PARAMS,
) -> None:
    """Images/s, per-phase step breakdown and peak memory on the present device."""
    from memseg_bench.bench.train import bench_train as run

    run(
        _training_config(params, preset),
        method=method,
        steps=steps,
        warmup=warmup,
        threads=threads,
        amp=amp,
    )


@data_app.command("check")
def data_check(
    dataset: str = typer.Option(..., help="synthetic | folder | voc | cityscapes | camvid"),
    root: Path = typer.Option(..., help="dataset root folder"),
    limit: int = typer.Option(None, help="check at most this many images per split"),
) -> None:
    """Validate a dataset on disk; exits 1 with the list of problems."""
    from memseg_bench.data.check import print_check

    problems = print_check(dataset, root, limit=limit)
    if problems:
        raise typer.Exit(1)


@splits_app.command("draw")
def splits_draw(
    n_labeled: list[int] = typer.Option(..., "--n", help="label counts to draw"),
    family: str = typer.Option("random"),
    seed: int = typer.Option(0),
    params: Path = PARAMS,
) -> None:
    """Draw our own split family from the sorted train ids (once; the files are committed)."""
    from memseg_bench.prepare import draw_family

    draw_family(_config(params), family, n_labeled, seed)


@app.command()
def init(
    root: Path = typer.Argument(..., help="dataset folder in the generic (folder) layout"),
    name: str = typer.Option(..., help="protocol name: splits/<name>, pipelines/<name>"),
    preset: str = typer.Option("camvid", help="protocol to start from (memseg_bench/presets)"),
    labeled: list[str] = typer.Option(
        ["1/8"], "--labeled", help="label count or fraction of the train images (repeatable)"
    ),
    seeds: int = typer.Option(3, help="seeds, each with its own split draw"),
    settings: list[str] = typer.Option(
        [], "--set", help="SECTION.KEY=VALUE written into the params (repeatable)"
    ),
) -> None:
    """Check a folder dataset and write its splits, params and pipeline; prints the command."""
    from memseg_bench.own_dataset import init_dataset

    made = init_dataset(root, name, preset, tuple(labeled), seeds, tuple(settings))
    counts = ", ".join(str(n) for n in made["label_counts"])
    typer.echo(
        f"{made['splits']}/random_s*: {seeds} split draws of {counts} and all "
        f"{made['train_images']} labeled train images\n"
        f"wrote {made['params']} and {made['pipeline']}\n"
        f"commit them (git add {made['splits']} {made['params'].parent}), then run:\n"
        f"  {made['command']}\n"
        f"tables land in {made['tables']}/"
    )


def main() -> None:
    try:
        app()
    except UserError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit as stop:
        if stop.code == 130:  # typer ends a command on Ctrl-C with this code and no word
            typer.echo("interrupted", err=True)
        raise


if __name__ == "__main__":
    main()
