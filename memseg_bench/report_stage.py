"""The report stage: tables from the metrics of finished runs, figures from their curves and
models, and reports/summary.json. Nothing is cached: every number is recomputed from the files."""

from __future__ import annotations

import re
from pathlib import Path

from memseg_bench.config import Config
from memseg_bench.errors import UserError
from memseg_bench.fileio import write_json, write_text


def grid_rows(config: Config, runs_dir: Path) -> tuple[list[dict], list[str], list]:
    """Fixed evaluation images with the ground truth and the seed-0 prediction of every method
    at the smallest label count."""
    import torch

    from memseg_bench.data.datasets import load_sample, open_dataset
    from memseg_bench.models import load_segmenter
    from memseg_bench.scoring import logits_for_image

    index = open_dataset(config.data)
    split = config.evaluate.split
    ids = index.ids(split)[: config.report.grid_images]
    n_labeled = min(config.sweep.n_labeled)
    seed = config.sweep.seeds[0]
    models = {}
    for method in config.sweep.methods:
        model_file = runs_dir / f"{method}-n{n_labeled}-s{seed}" / "model.pt"
        if model_file.is_file():
            models[method] = load_segmenter(model_file)[0]
    rows = []
    for item in ids:
        image, label = load_sample(index, split, item)
        tensor = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float()
        predictions = {}
        with torch.inference_mode():
            for method, segmenter in models.items():
                logits = logits_for_image(
                    segmenter,
                    tensor,
                    config.evaluate.mode,
                    config.evaluate.window,
                    config.evaluate.stride,
                    out_size=label.shape,
                    align_corners=segmenter.align_corners,
                )
                predictions[method] = logits.argmax(1)[0].byte().numpy()
        rows.append({"image": image, "label": label, "predictions": predictions})
    return rows, list(index.class_names), [list(c) for c in index.palette]


def update_readme(readme: Path, table_markdown: str, block: str = "results") -> None:
    """Replace the text between <!-- BLOCK:start --> and <!-- BLOCK:end --> in the README."""
    pattern = re.compile(
        rf"(<!-- {re.escape(block)}:start -->\n)(.*?)(<!-- {re.escape(block)}:end -->)", re.S
    )
    text = readme.read_text()
    if not pattern.search(text):
        raise UserError(f"{readme} has no <!-- {block}:start --> ... <!-- {block}:end --> block")
    replaced = pattern.sub(lambda m: m.group(1) + table_markdown.strip() + "\n" + m.group(3), text)
    write_text(readme, replaced)


def readme_results(tables_dir: Path, protocol_tables: dict, checks: dict) -> str:
    """The README's results block: the main table, the ablation table when the protocol has
    variant runs, and the protocol checks that apply."""
    from memseg_bench.protocol_checks import describe

    shown = [(tables_dir / "main.md").read_text()]
    if "ablation" in protocol_tables:
        shown.append((tables_dir / f"{protocol_tables['ablation']['file']}.md").read_text())
    lines = describe(checks)
    if lines:
        shown.append("Protocol checks:\n\n" + "\n".join(f"- {line}" for line in lines))
    return "\n".join(shown)


def write_reports(
    config: Config,
    metrics_dir: Path,
    out_dir: Path,
    runs_dir: Path,
    readme: Path | None = None,
    readme_block: str = "results",
) -> dict:
    from memseg_bench import figures
    from memseg_bench.evaluate_stage import protocol
    from memseg_bench.protocol_checks import protocol_checks
    from memseg_bench.tables import build_report

    tables = out_dir / "tables"
    figures_dir = out_dir / "figures"
    summary = build_report(
        metrics_dir, tables, default_protocol=protocol(config, config.split.family)["id"]
    )
    curves = out_dir / "curves"
    figures.training_curves(curves, figures_dir / "training_curves.png")
    figures.bank_diagnostics(curves, figures_dir / "memory_bank.png")
    figures.method_diagnostics(curves, figures_dir / "method_diagnostics.png")
    rows, class_names, palette = grid_rows(config, runs_dir)
    figures.qualitative_grid(rows, class_names, palette, figures_dir / "qualitative.png")
    default = summary["protocols"][summary["default_protocol"]]
    checks = protocol_checks(default["tables"]["main"], curves, config.report)
    summary["checks"] = {"protocol": summary["default_protocol"], **checks}
    write_json(out_dir / "summary.json", summary)
    if readme is not None:
        update_readme(readme, readme_results(tables, default["tables"], checks), readme_block)
    return summary
