"""Result tables from a folder of metrics JSON files (one per run), the way papers print them.

One table per protocol (dataset + split family + model + crop + eval mode + schedule): cells of
different protocols are never mixed. Cells are mean +- sample std over seeds with n shown; quoted
paper numbers sit in their own labelled block. Every call recomputes everything from the files
and returns a summary with the numbers and the runs behind every cell.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from memseg_bench.errors import UserError
from memseg_bench.fileio import read_json, write_text
from memseg_bench.published import published_cells
from memseg_bench.run_metrics import check_metrics

# Row order; the last method is the one under study, paired against every other row.
DEFAULT_ORDER = ("supervised", "fixmatch", "unimatch", "selftrain", "memseg")
TABLE_KINDS = ("main", "ablation", "per_class", "last_vs_best", "compute")
_STALE = re.compile(r"^(" + "|".join(TABLE_KINDS) + r")(_.+)?\.(md|csv|tex)$")


class ProtocolMixError(ValueError):
    """Raised when a table would hold runs of more than one protocol."""


# -- loading -------------------------------------------------------------------------------------


def load_metrics(metrics_dir: str | Path) -> list[dict]:
    """Every metrics JSON of the folder, checked; UserError naming the folder or the file."""
    metrics_dir = Path(metrics_dir)
    if not metrics_dir.is_dir():
        raise UserError(f"metrics folder not found: {metrics_dir}")
    paths = sorted(metrics_dir.glob("*.json"))
    if not paths:
        raise UserError(f"metrics folder {metrics_dir} holds no metrics JSON files")
    records = [{**check_metrics(path, read_json(path)), "_file": str(path)} for path in paths]
    seen: dict[tuple, str] = {}
    for record in records:
        key = (record["protocol"]["id"], record["run"])
        if key in seen:
            raise UserError(f"{record['_file']}: run {record['run']} also in {seen[key]}")
        seen[key] = record["_file"]
    return records


def group_by_protocol(records: Iterable[dict]) -> dict[str, list[dict]]:
    """Runs per protocol id, in id order; runs of one protocol must agree on its description,
    the evaluation split and the class names."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["protocol"]["id"], []).append(record)
    for pid, group in groups.items():
        first = group[0]
        for record in group[1:]:
            for key in ("protocol", "eval_split", "class_names"):
                if record[key] != first[key]:
                    raise UserError(
                        f"{record['_file']}: '{key}' differs from {first['_file']} "
                        f"within protocol {pid}"
                    )
    return dict(sorted(groups.items()))


def single_protocol(records: Sequence[dict]) -> str:
    """The one protocol id of `records`; refuses (ProtocolMixError) to put two in one table."""
    ids = sorted({record["protocol"]["id"] for record in records})
    if len(ids) != 1:
        raise ProtocolMixError(f"refusing to mix protocols in one table: {ids}")
    return ids[0]


def protocol_slug(pid: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", pid).strip("_")


# -- writers: Markdown, CSV, LaTeX booktabs, all through pandas ----------------------------------


@dataclass
class Table:
    title: str
    header: list[str]
    # (block title or None, rows); a titled block is set apart and labelled in every format.
    blocks: list[tuple[str | None, list[list[str]]]]
    notes: list[str] = field(default_factory=list)


def _right_aligned(table: Table) -> list[bool]:
    """Columns of numbers align right; the first column and text columns align left."""
    rows = [row for _, block in table.blocks for row in block]

    def numeric(cell: str) -> bool:
        return cell[:1].isdigit() or cell[:2].lstrip("+-–")[:1].isdigit() or cell in ("–", "")

    return [False] + [all(numeric(row[i]) for row in rows) for i in range(1, len(table.header))]


def to_frame(table: Table) -> pd.DataFrame:
    """One row per table row; the `section` column names its block ("measured" when untitled)."""
    rows = [[title or "measured", *row] for title, block in table.blocks for row in block]
    return pd.DataFrame(rows, columns=["section", *table.header], dtype=object)


def _display_frame(table: Table, title_cell) -> pd.DataFrame:
    """The table as printed: a titled block starts with a row holding its title."""
    rows = []
    for title, block in table.blocks:
        if title:
            rows.append([title_cell(title)] + [""] * (len(table.header) - 1))
        rows += block
    return pd.DataFrame(rows, columns=table.header, dtype=object)


def to_markdown(table: Table) -> str:
    frame = _display_frame(table, lambda title: f"*{title}*")
    frame = frame.map(lambda cell: cell.replace("|", "\\|"))
    frame.columns = [c.replace("|", "\\|") for c in frame.columns]
    align = ["right" if right else "left" for right in _right_aligned(table)]
    body = frame.to_markdown(index=False, colalign=align, disable_numparse=True)
    return "\n".join([f"### {table.title}", "", body, "", *table.notes]) + "\n"


def to_csv(table: Table) -> str:
    return to_frame(table).to_csv(index=False, lineterminator="\n")


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
        "±": r"$\pm$", "†": r"$^\dagger$", "−": r"$-$", "Δ": r"$\Delta$", "–": "--",
        "`": ""}  # fmt: skip


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(char, char) for char in text)


def to_latex(table: Table) -> str:
    """booktabs through pandas' Styler; a block title spans the row, a rule opens each block."""
    width = len(table.header)
    span = r"\multicolumn{" + str(width) + r"}{l}{\emph{"
    frame = _display_frame(table, lambda title: span + tex_escape(title) + "}}")
    frame = frame.map(lambda cell: cell if cell.startswith(span) else tex_escape(cell))
    frame.columns = [tex_escape(c) for c in frame.columns]
    latex = frame.style.hide(axis="index").to_latex(
        column_format="".join("r" if r else "l" for r in _right_aligned(table)),
        position="t",
        position_float="centering",
        hrules=True,
        caption=tex_escape(table.title + ". " + " ".join(table.notes)),
    )
    lines = []
    for line in latex.splitlines():
        if line.startswith(span):  # the title cell alone, after a rule between blocks
            lines += [r"\midrule", line.split(" & ")[0] + r" \\"]
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


def write_table(table: Table, stem: Path) -> list[str]:
    """Write stem.md, stem.csv and stem.tex; return the file names."""
    names = []
    for suffix, render in ((".md", to_markdown), (".csv", to_csv), (".tex", to_latex)):
        write_text(stem.parent / (stem.name + suffix), render(table))
        names.append(stem.name + suffix)
    return names


# -- cells ---------------------------------------------------------------------------------------


def row_label(record: dict) -> str:
    label = (
        record["method"] if record["variant"] is None else f"{record['method']}+{record['variant']}"
    )
    return label if record["behaviour"] == "paper" else f"{label} ({record['behaviour']})"


def _order(methods_order: Sequence[str]):
    def key(record: dict) -> tuple:
        method = record["method"]
        rank = methods_order.index(method) if method in methods_order else len(methods_order)
        return (rank, method, record["behaviour"] != "paper", record["behaviour"],
                record["variant"] is not None, record["variant"] or "")  # fmt: skip

    return key


def _labels(records: Sequence[dict], methods_order: Sequence[str]) -> list[str]:
    labels: list[str] = []
    for record in sorted(records, key=_order(methods_order)):
        if row_label(record) not in labels:
            labels.append(row_label(record))
    return labels


def stats(values: Sequence[float], runs: Sequence[str], seeds: Sequence[int] = ()) -> dict:
    """Mean and sample std (ddof 1; None for one value) with the values, runs and seeds behind
    them."""
    values = list(values)
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
        "values": values,
        "runs": list(runs),
        "seeds": list(seeds),
    }


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def t_quantile_975(dof: int) -> float:
    if dof <= len(T_975):
        return T_975[dof - 1]
    z = 1.959964  # beyond the table, the first Cornish-Fisher correction of the normal quantile
    return z + (z**3 + z) / (4 * dof)


def paired_gain(cell: dict, base: dict) -> dict:
    """Mean difference over the seeds both cells hold, with a 95% t interval (None below two
    pairs)."""
    mine = dict(zip(cell["seeds"], cell["values"], strict=True))
    theirs = dict(zip(base["seeds"], base["values"], strict=True))
    seeds = sorted(set(mine) & set(theirs))
    diffs = [mine[s] - theirs[s] for s in seeds]
    gain = {
        "value": statistics.fmean(diffs) if diffs else None,
        "n": len(diffs),
        "seeds": seeds,
        "differences": diffs,
        "interval95": None,
        "runs": cell["runs"],
        "baseline_runs": base["runs"],
    }
    if len(diffs) > 1:
        half = t_quantile_975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        gain["interval95"] = [gain["value"] - half, gain["value"] + half]
    return gain


def format_gain(gain: dict | None) -> str:
    if gain is None or gain["value"] is None:
        return "–"
    if gain["interval95"] is None:
        return f"{gain['value']:+.1f} (n={gain['n']})"
    low, high = gain["interval95"]
    return f"{gain['value']:+.1f} [{low:+.1f}, {high:+.1f}] (n={gain['n']})"


def _comparisons(cells: dict, methods_order: Sequence[str]) -> list[tuple[str, str]]:
    """(row, baseline row) pairs: every method against supervised of the same behaviour, and the
    method under study (the last of methods_order, memseg) against every other semi-supervised
    method (the controls fixmatch and unimatch, and selftrain)."""
    pairs = []
    for label in cells:
        method = label.split(" (")[0]
        behaviour = label[len(method) :]
        if method == "supervised" or method not in methods_order:
            continue
        baselines = ["supervised"]
        if method == methods_order[-1]:
            baselines += [m for m in methods_order[:-1] if m != "supervised"]
        for base in baselines:
            base_label = base + behaviour if base + behaviour in cells else base
            if base_label in cells:
                pairs.append((label, base_label))
    return pairs


def format_cell(cell: dict | None) -> str:
    if cell is None:
        return "–"
    if cell["std"] is None:
        return f"{cell['mean']:.1f} (n={cell['n']})"
    return f"{cell['mean']:.1f} ± {cell['std']:.1f} (n={cell['n']})"


def _cell(records: Sequence[dict], value) -> dict | None:
    rows = [(value(r), r["run"], r["seed"]) for r in sorted(records, key=lambda r: r["seed"])]
    rows = [row for row in rows if row[0] is not None]
    return stats(*zip(*rows, strict=True)) if rows else None


def _miou(record: dict) -> float:
    return 100.0 * record["miou"]


def _cells(records: Sequence[dict], methods_order: Sequence[str], value=_miou) -> dict:
    """{row label: {n_labeled: cell}} over the given runs."""
    out: dict[str, dict[int, dict]] = {}
    for label in _labels(records, methods_order):
        mine = [r for r in records if row_label(r) == label]
        for n in sorted({r["n_labeled"] for r in mine}):
            cell = _cell([r for r in mine if r["n_labeled"] == n], value)
            if cell is not None:
                out.setdefault(label, {})[n] = cell
    return out


def _caption(pid: str, records: Sequence[dict]) -> str:
    return f"protocol `{pid}`, mIoU (%) on the {records[0]['eval_split']} split"


# -- tables --------------------------------------------------------------------------------------


def main_table(records: Sequence[dict], methods_order: Sequence[str] = DEFAULT_ORDER):
    """Methods x label counts (last iterate), gain over supervised, quoted paper numbers."""
    pid = single_protocol(records)
    proto = records[0]["protocol"]
    full = [r for r in records if r["variant"] is None]
    counts = sorted({r["n_labeled"] for r in full})
    cells = _cells(full, methods_order)
    header = ["method"] + [f"{n} labeled" for n in counts]
    measured = [[label] + [format_cell(row.get(n)) for n in counts] for label, row in cells.items()]
    gains: dict[str, dict[int, dict]] = {}
    gain_rows = []
    for label, base_label in _comparisons(cells, methods_order):
        row, base = cells[label], cells[base_label]
        name = f"{label} − {base_label}"
        for n in counts:
            if n in row and n in base:
                gains.setdefault(name, {})[n] = paired_gain(row[n], base[n])
        gain_rows.append([name] + [format_gain(gains.get(name, {}).get(n)) for n in counts])
    quoted = published_cells(proto["dataset"], proto["arch"], proto["backbone"], counts)
    quoted_rows = []
    for method in dict.fromkeys(entry["method"] for entry in quoted):
        by_n = {e["n_labeled"]: e["miou"] for e in quoted if e["method"] == method}
        quoted_rows.append(
            [f"{method} (reported)"] + [f"{by_n[n]:g}" if n in by_n else "" for n in counts]
        )
    blocks = [(None, measured)]
    if gain_rows:
        blocks.append(("gain (points), paired by seed: mean [95% interval]", gain_rows))
    notes = [
        f"Last iterate; mean ± sample std over seeds (n runs); {_caption(pid, records)}.",
        "Gains pair the runs of one seed (one split draw); the interval is Student's t over "
        "the paired differences.",
    ]
    if quoted_rows:
        blocks.append(("reported in the paper (quoted, not measured here)", quoted_rows))
        notes.append(
            "Reported rows are quoted from the paper (METHOD.md section 8): best val mIoU over "
            "training, under the authors' own setup; they are not measurements of this code."
        )
    table = Table(f"Main results: {pid}", header, blocks, notes)
    return table, {"cells": cells, "gain": gains, "reported": quoted}


def ablation_table(records: Sequence[dict], methods_order: Sequence[str] = DEFAULT_ORDER):
    """Variants and their full method at the smallest label count that has variants; None when
    the protocol has no variant runs."""
    single_protocol(records)
    variants = [r for r in records if r["variant"] is not None]
    if not variants:
        return None, None
    n = min(r["n_labeled"] for r in variants)
    at_n = [r for r in records if r["n_labeled"] == n]
    groups = sorted({(r["method"], r["behaviour"]) for r in variants})
    rows, summary = [], {}
    for method, behaviour in groups:
        mine = [r for r in at_n if r["method"] == method and r["behaviour"] == behaviour]
        full = _cell([r for r in mine if r["variant"] is None], _miou)
        for label in _labels(mine, methods_order):
            runs = [r for r in mine if row_label(r) == label]
            cell = _cell(runs, _miou)
            if runs[0]["variant"] is None:
                summary[label] = {"cell": cell, "delta_same_seeds": None, "paired_n": 0}
                rows.append([label, format_cell(cell), "(full method)"])
                continue
            gain = paired_gain(cell, full) if full is not None else None
            summary[label] = {
                "cell": cell,
                "delta_same_seeds": gain and gain["value"],
                "paired_n": gain["n"] if gain else 0,
                "interval95": gain and gain["interval95"],
            }
            rows.append([label, format_cell(cell), format_gain(gain)])
    pid = records[0]["protocol"]["id"]
    notes = [
        f"{n} labeled images, last iterate; {_caption(pid, records)}; Δ = variant − full method "
        "over the seeds both have, with Student's t interval over the paired differences."
    ]
    header = ["variant", "mIoU (%)", "Δ vs full, paired by seed: mean [95% interval]"]
    return Table(f"Ablations: {pid}", header, [(None, rows)], notes), {"n_labeled": n, **summary}


def per_class_table(records: Sequence[dict], methods_order: Sequence[str] = DEFAULT_ORDER):
    pid = single_protocol(records)
    names = list(records[0]["class_names"])
    rows, summary = [], {}
    for label in _labels(records, methods_order):
        mine = [r for r in records if row_label(r) == label]
        for n in sorted({r["n_labeled"] for r in mine}):
            runs = [r for r in mine if r["n_labeled"] == n]
            cells = {}
            for name in names:

                def value(r, name=name):
                    v = r["per_class_iou"].get(name)
                    return None if v is None else 100.0 * v

                cells[name] = _cell(runs, value)
            cells["mIoU"] = _cell(runs, _miou)
            summary.setdefault(label, {})[n] = cells
            shown = ["–" if c is None else f"{c['mean']:.1f}" for c in cells.values()]
            rows.append([label, str(n), *shown])
    notes = [f"IoU (%) per class, mean over seeds, last iterate; {_caption(pid, records)}."]
    header = ["method", "labeled", *names, "mIoU"]
    return Table(f"Per-class IoU: {pid}", header, [(None, rows)], notes), summary


def last_vs_best_table(records: Sequence[dict], methods_order: Sequence[str] = DEFAULT_ORDER):
    pid = single_protocol(records)
    rows, summary = [], {}
    for label, by_n in _cells(records, methods_order).items():
        for n, last in by_n.items():
            runs = [r for r in records if row_label(r) == label and r["n_labeled"] == n]
            with_best = [r for r in runs if r["best_val"] is not None]
            best = _cell(with_best, lambda r: 100.0 * r["best_val"]["miou"])
            gap = _cell(with_best, lambda r: 100.0 * (r["best_val"]["miou"] - r["miou"]))
            summary.setdefault(label, {})[n] = {"last": last, "best_on_val": best, "gap": gap}
            gap_text = "–" if gap is None else f"{gap['mean']:+.1f} (n={gap['n']})"
            rows.append([label, str(n), format_cell(last), format_cell(best), gap_text])
    notes = [
        f"{_caption(pid, records)}. † Secondary: the checkpoint with the best validation mIoU "
        "during training, scored on the same split; choosing it on val makes it optimistic.",
    ]
    header = ["method", "labeled", "last iterate", "best on val †", "gap (best − last)"]
    return Table(f"Last iterate vs best on val: {pid}", header, [(None, rows)], notes), summary


def _joined(values: Iterable) -> str:
    return ", ".join(sorted({str(v) for v in values}))


def compute_table(records: Sequence[dict], methods_order: Sequence[str] = DEFAULT_ORDER):
    pid = single_protocol(records)
    rows, summary = [], {}
    for label in _labels(records, methods_order):
        mine = [r for r in records if row_label(r) == label]
        for n in sorted({r["n_labeled"] for r in mine}):
            runs = sorted((r for r in mine if r["n_labeled"] == n), key=lambda r: r["seed"])
            comp = [r["compute"] for r in runs]
            entry = {
                "runs": [r["run"] for r in runs],
                "wall_time_s": statistics.fmean(c["wall_time_s"] for c in comp),
                "images_per_s": statistics.fmean(c["images_per_s"] for c in comp),
                "peak_memory_mb": max(c["peak_memory_mb"] for c in comp),
                "memory_kind": _joined(c["memory_kind"] for c in comp),
                "device": _joined(c["device"] for c in comp),
                "torch": _joined(c["torch"] for c in comp),
            }
            summary.setdefault(label, {})[n] = entry
            rows.append([label, str(n), str(len(runs)), f"{entry['wall_time_s']:.1f}",
                         f"{entry['images_per_s']:.1f}", f"{entry['peak_memory_mb']:.0f}",
                         entry["memory_kind"], entry["device"], entry["torch"]])  # fmt: skip
    header = ["method", "labeled", "runs", "train wall time (s, mean)",
              "labeled images/s (mean, all ranks)", "peak memory (MB, max)", "memory kind",
              "device", "torch"]  # fmt: skip
    notes = [f"Training cost per run; protocol `{pid}`."]
    return Table(f"Compute: {pid}", header, [(None, rows)], notes), summary


# -- the report ----------------------------------------------------------------------------------

_BUILDERS = {
    "main": main_table,
    "ablation": ablation_table,
    "per_class": per_class_table,
    "last_vs_best": last_vs_best_table,
    "compute": compute_table,
}


def build_report(
    metrics_dir: str | Path,
    out_dir: str | Path,
    methods_order: Sequence[str] = DEFAULT_ORDER,
    default_protocol: str | None = None,
) -> dict:
    """Write every table of every protocol (md, csv, tex) under `out_dir`, plus main.* for
    `default_protocol` (when it has runs; else the protocol with the most runs); remove table
    files of earlier calls that were not rewritten.
    Returns the summary: per protocol its description, runs, every cell's numbers and runs."""
    records = load_metrics(metrics_dir)
    groups = group_by_protocol(records)
    out_dir = Path(out_dir)
    written: list[str] = []
    protocols = {}
    for pid, group in groups.items():
        slug = protocol_slug(pid)
        entry = {
            "protocol": group[0]["protocol"],
            "eval_split": group[0]["eval_split"],
            "runs": sorted(r["run"] for r in group),
            "tables": {},
        }
        for kind, builder in _BUILDERS.items():
            table, data = builder(group, methods_order)
            if table is None:
                continue
            written += write_table(table, out_dir / f"{kind}_{slug}")
            entry["tables"][kind] = {"file": f"{kind}_{slug}", **data}
        protocols[pid] = entry
    default = default_protocol
    if default not in groups:
        default = sorted(groups, key=lambda pid: (-len(groups[pid]), pid))[0]
    main, _ = main_table(groups[default], methods_order)
    written += write_table(main, out_dir / "main")
    for path in out_dir.iterdir():
        if _STALE.match(path.name) and path.name not in written:
            path.unlink()
    return {
        "unit": "mIoU in percent (0-100); cells are mean and sample std over seeds",
        "metrics_dir": str(metrics_dir),
        "num_runs": len(records),
        "default_protocol": default,
        "files": sorted(written),
        "protocols": protocols,
    }
