"""The report renders the committed tables again from the committed metrics, cell by cell.

Markdown may differ in padding and alignment-rule width, LaTeX in line layout: what is compared is
the text outside the tables (titles, notes, caption), the column alignment, and every cell."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from memseg_bench.tables import build_report

ROOT = Path(__file__).resolve().parents[1]
REPORTS = [ROOT / "reports", ROOT / "reports" / "camvid", ROOT / "reports" / "controls"]


def _split_row(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
    return [cell.strip() for cell in cells]


def markdown_parts(text: str) -> dict:
    rows, align, prose = [], None, []
    for line in text.splitlines():
        if not line.startswith("|"):
            prose.append(line.strip())
        elif re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line.strip()):
            align = ["r" if c.endswith(":") else "l" for c in _split_row(line)]
        else:
            rows.append(_split_row(line))
    return {"rows": rows, "align": align, "prose": [p for p in prose if p]}


def _tex_cells(line: str) -> list[str]:
    body = line.strip().removesuffix(r"\\").strip()
    spanned = re.fullmatch(r"\\multicolumn\{(\d+)\}\{l\}\{(.*)\}", body)
    if spanned:  # a block title over the whole width: the title and empty cells
        return [spanned.group(2)] + [""] * (int(spanned.group(1)) - 1)
    return [cell.strip() for cell in body.split(" & ")]


def latex_parts(text: str) -> dict:
    caption = re.search(r"\\caption\{(.*)\}\n", text).group(1)
    align = re.search(r"\\begin\{tabular\}\{([lr]+)\}", text).group(1)
    rows = [_tex_cells(line) for line in text.splitlines() if line.rstrip().endswith(r"\\")]
    rules = [line.strip() for line in text.splitlines() if line.strip().endswith("rule")]
    return {"caption": caption, "align": list(align), "rows": rows, "rules": rules}


def csv_rows(text: str) -> list[list[str]]:
    return list(csv.reader(text.splitlines()))


PARSERS = {".md": markdown_parts, ".tex": latex_parts, ".csv": csv_rows}


def committed_tables():
    for base in REPORTS:
        for path in sorted((base / "tables").iterdir()):
            yield pytest.param(base, path.name, id=f"{base.relative_to(ROOT)}/{path.name}")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = {}
    for base in REPORTS:
        default = json.loads((base / "summary.json").read_text())["default_protocol"]
        folder = tmp_path_factory.mktemp(base.name)
        build_report(base / "metrics", folder, default_protocol=default)
        out[base] = folder
    return out


@pytest.mark.parametrize(("base", "name"), committed_tables())
def test_committed_table_is_rendered_again_cell_by_cell(base, name, rendered):
    committed = (base / "tables" / name).read_text()
    new = (rendered[base] / name).read_text()
    parse = PARSERS[Path(name).suffix]
    assert parse(new) == parse(committed)


def test_no_table_is_missing_or_new(rendered):
    for base, folder in rendered.items():
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            p.name for p in (base / "tables").iterdir()
        )
