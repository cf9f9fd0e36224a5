"""Table cells and files: one formatting for every table the suite writes (terminal, md, csv, LaTeX)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from tabulate import tabulate

from pipelines.config import ConfigError

FORMATS = {"terminal": "simple", "md": "github", "latex": "latex_booktabs", "csv": None}
SUFFIX = {"md": "md", "latex": "tex", "csv": "csv", "terminal": "txt"}
TABLE_FORMATS = ("md", "csv", "latex")


def format_table(table: pd.DataFrame, fmt: str, numparse: bool = True) -> str:
    """`numparse=False` prints string cells exactly as given (the published tables' "+0.70", "73.30")."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format '{fmt}'; use one of {', '.join(FORMATS)}")
    if fmt == "csv":
        return table.to_csv(index=False)
    return tabulate(table.values.tolist(), headers=list(table.columns), tablefmt=FORMATS[fmt],
                    floatfmt=".2f", missingval="n/a", disable_numparse=not numparse) + "\n"


def write_table(table: pd.DataFrame, stem: Path, title: str, notes: list[str]) -> list[Path]:
    """<stem>.md (title and notes around the table), .csv and .tex."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in TABLE_FORMATS:
        path = stem.with_name(f"{stem.name}.{SUFFIX[fmt]}")
        text = format_table(table, fmt, numparse=False)
        if fmt == "md":
            text = f"# {title}\n\n{text}\n" + "".join(f"- {n}\n" for n in notes)
        path.write_text(text)
        paths.append(path)
    return paths


def measured(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not pd.isna(value)


def pct(value) -> float | None:
    return None if value is None or pd.isna(value) else round(100.0 * float(value), 2)


def interval_cell(low, high) -> str:
    """A 95% interval (in %), or n/a: a run from before evaluations saved per-image matrices (the note says so)."""
    return f"{low:.2f}–{high:.2f}" if measured(low) and measured(high) else "n/a"


def published_cell(value: float | None, text: str | None, digits: int) -> str:
    if text:
        return text
    return "—" if value is None else f"{value:.{digits}f}"


def our_cell(value, digits: int) -> str:
    return f"{value:.{digits}f}" if measured(value) else str(value)


def difference(ours, published: float | None, digits: int) -> str:
    if not measured(ours):
        return ""
    if published is None:
        return "no published value"
    return f"{ours - published:+.{digits}f}"


def triple(name: str, published, published_text, ours, digits: int) -> dict:
    """The published, ours and difference cells of one quantity."""
    return {f"{name} (published)": published_cell(published, published_text, digits),
            f"{name} (ours)": our_cell(ours, digits),
            f"{name} Δ (ours − published)": difference(ours, published, digits)}
