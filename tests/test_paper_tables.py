"""Every published cell of the generated paper tables equals the papers' text as transcribed in
docs/published/paper-tables.md: row for row, group for group, number for number (as printed), ablation marks
included. The literature tables carry a source for every cell and no table named after a paper carries another
paper's number."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from methods import list_methods, method_class
from pipelines.published import (
    ablation_table,
    ablation_tables,
    cell_source,
    cell_value,
    published_ablations,
    published_table,
    tables,
)

TRANSCRIPTION = Path(__file__).parent.parent / "docs" / "published" / "paper-tables.md"
NO_RUNS = {"runs": False, "rows": {}}
MARK = {"✓": True, "": False}


def transcription() -> dict[tuple[str, str], dict]:
    """{(paper section, "Table N"): {"header": [...], "rows": [{column: cell}]}} from the markdown."""
    out: dict[tuple[str, str], dict] = {}
    paper = key = None
    for line in TRANSCRIPTION.read_text().splitlines():
        if line.startswith("## "):
            paper, key = line[3:].strip(), None
        elif line.startswith("### "):
            key = (paper, line[4:].split(".")[0].strip())
            out[key] = {"header": None, "rows": []}
        elif key and line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            if out[key]["header"] is None:
                out[key]["header"] = cells
            else:
                out[key]["rows"].append(dict(zip(out[key]["header"], cells, strict=True)))
    return out


PAPER = transcription()
PAPER_TABLES = {tid: spec for tid, spec in tables().items() if spec.get("kind") != "literature"}
# the quantity columns of the transcription -> our column keys
QUANTITY = {"mIoU": "miou", "FPS": "fps", "Memory (MB)": "memory", "local": "local", "global": "global"}


def test_transcription_has_every_table_the_issue_names():
    assert {("ISDNet (CVPR 2022)", f"Table {n}") for n in range(1, 8)} <= set(PAPER)
    assert {("UHRNet / UHRSNet (ICPR 2020)", "Table II"), ("UHRNet / UHRSNet (ICPR 2020)", "Table III")} <= set(PAPER)
    assert len(PAPER[("ISDNet (CVPR 2022)", "Table 1")]["rows"]) == 16


def test_every_paper_table_of_the_transcription_is_generated():
    generated = {(spec["paper"], spec["table"]) for spec in PAPER_TABLES.values()}
    generated |= {(meta["paper"], table) for meta in published_ablations().values() for table in meta["tables"]}
    assert generated == set(PAPER)


@pytest.mark.parametrize("table_id", sorted(PAPER_TABLES))
def test_published_cells_equal_the_paper(table_id):
    spec = PAPER_TABLES[table_id]
    paper = PAPER[(spec["paper"], spec["table"])]
    frame = published_table(table_id, NO_RUNS)
    assert len(frame) == len(paper["rows"]), "rows added or dropped"
    columns = {(c if isinstance(c, str) else c["key"]) for c in spec["columns"]}
    assert columns == {QUANTITY[h] for h in paper["header"] if h in QUANTITY}, "columns differ from the paper's"
    for (_, ours), theirs in zip(frame.iterrows(), paper["rows"], strict=True):
        assert ours["method"] == theirs.get("method", theirs.get("model"))
        assert ours.get("group", "") == theirs.get("group", "")
        for header, key in QUANTITY.items():
            if header in theirs:
                title = next(c for c in frame.columns if c.endswith("(published)")
                             and _column_key(spec, c) == key)
                assert ours[title] == theirs[header], (ours["method"], header)


def _column_key(spec: dict, title: str) -> str:
    """Which quantity a generated '<title> (published)' column holds."""
    name = title[:-len(" (published)")]
    for column in spec["columns"]:
        if isinstance(column, dict) and column.get("title") == name:
            return column["key"]
    return {"FPS": "fps", "memory (MB)": "memory"}.get(name, "miou")


ABLATIONS = [(method, table) for method in list_methods() for table, spec in ablation_tables(method) if spec]


@pytest.mark.parametrize(("method", "table"), ABLATIONS)
def test_ablation_rows_equal_the_paper(method, table, tmp_path):
    """The declared rows print the paper's marks (✓, blank, "-" or text) and numbers, in the paper's order."""
    meta = published_ablations()[method]
    paper = PAPER[(meta["paper"], table)]
    frame = ablation_table(method, meta["dataset"], tmp_path / "none.csv", table)
    assert len(frame) == len(paper["rows"])
    for (_, ours), theirs in zip(frame.iterrows(), paper["rows"], strict=True):
        for header, cell in theirs.items():
            if header in QUANTITY:
                title = {"Memory (MB)": "memory (MB)"}.get(header, header)
                assert ours[f"{title} (published)"] == cell, header
            elif header == "model":
                assert ours["configuration"] == cell
            else:  # a mark column: the row's declared switch
                assert ours[header] == cell, (ours["configuration"], header)
    declared = [r for r in method_class(method).ablations if r.table == table]
    for row, theirs in zip(declared, paper["rows"], strict=True):
        marks = {h: MARK.get(c, c) for h, c in theirs.items() if h not in QUANTITY and h != "model"}
        assert row.marks == marks, row.key


def test_no_number_from_another_paper():
    """Paper tables have no per-cell source tags and no row the paper lacks; literature cells all have one."""
    for table_id, spec in tables().items():
        for row in spec["rows"]:
            cells = [row[c if isinstance(c, str) else c["key"]] for c in spec["columns"]
                     if (c if isinstance(c, str) else c["key"]) in row]
            if spec.get("kind") == "literature":
                assert cells and all(cell_source(c) in {"paper", "table", "fig", "F2Net", "cite"} for c in cells), row
            else:
                assert not any(cell_source(c) for c in cells), (table_id, row)


@pytest.mark.parametrize(("text", "value"), [("73.30", 73.3), ("74.1 [table]", 74.1), ("< 1 [fig]", None),
                                             ("-", None), (None, None), ("970", 970.0)])
def test_cell_value(text, value):
    assert cell_value(text) == value


def test_literature_cell_prints_its_source():
    frame = published_table("literature_deepglobe", NO_RUNS).set_index("method")
    assert frame.loc["WSDNet", "FPS (published)"] == "30.3 [fig]"
    assert frame.loc["WSDNet", "mIoU (published)"] == "74.1 [table]"
    assert frame.loc["BPT", "FPS (published)"] == "—"
    assert re.fullmatch(r"CVPR'23", frame.loc["WSDNet", "published in"])
