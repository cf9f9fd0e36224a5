"""benchmarks/gpu_reference.py: the GPU reference run's path, proven on CPU at tiny sizes."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gpu_reference as R  # noqa: E402

from datasets import get_dataset  # noqa: E402


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_plan_is_the_full_matrix_method_major():
    cells = R.plan(["a", "b"], ["x", "y"], [1.0, 0.8], ["fp32", "fp16"])
    assert len(cells) == 16 and len(set(cells)) == 16
    assert [c.method for c in cells] == ["a"] * 8 + ["b"] * 8  # one model build per (method, dataset)
    assert [c.dataset for c in cells[:8]] == ["x"] * 4 + ["y"] * 4


@pytest.mark.parametrize("share, probe, expected", [
    (10.0, 0.01, (19, 300)),   # fast cell: the protocol's 20 warm-up (probe included), at most 300 timed
    (1.0, 0.01, (19, 80)),
    (1.0, 0.1, (1, 8)),        # 0.2 s of warm-up = 2 calls, the probe is one of them
    (0.1, 1.0, (0, 3)),        # slower than its share: the probe alone warms up, 3 timed calls for a median
])
def test_iterations_fill_the_share(share, probe, expected):
    assert R.allot(share, probe) == expected


def test_runs_every_cell_on_cpu_and_writes_csv_and_markdown(tmp_path, monkeypatch):
    # a copy of the working tree (a GPU machine's, whose .git may be stale) names its commit through the environment
    monkeypatch.setattr(R.tracking, "git_commit", lambda: "stale-dirty")
    monkeypatch.setenv("UHRBENCH_COMMIT", "abc123")
    out = tmp_path / "ref"
    code = R.main(["--device", "cpu", "--shrink", "0.05", "--methods", "global,rue", "--datasets",
                   "deepglobe,cityscapes", "--precisions", "fp32", "--budget-s", "2", "--out", str(out)])
    assert code == 0
    rows = read_rows(out / "reference.csv")
    assert len(rows) == 2 * 2 * 2  # methods x datasets x scales x precisions
    assert {(r["method"], r["dataset"], float(r["scale"])) for r in rows} == {
        (m, d, s) for m in ("global", "rue") for d in ("deepglobe", "cityscapes") for s in (1.0, 0.8)}
    for row in rows:
        h, w = get_dataset(row["dataset"]).info.native_size
        scale = float(row["scale"])
        expected = (round(round(h * 0.05) * scale), round(round(w * 0.05) * scale))
        assert (int(row["height"]), int(row["width"])) == expected
        assert row["status"] == "ok" and int(row["timed_iterations"]) >= R.MIN_TIMED
        assert int(row["warmup_iterations"]) >= 1 and float(row["latency_ms_median"]) > 0
        assert float(row["fps"]) == pytest.approx(1e3 / float(row["latency_ms_median"]))
        assert int(row["params"]) > 1e6
    text = (out / "README.md").read_text()
    assert "## deepglobe (native 122x122)" in text and "## cityscapes (native 51x102)" in text
    assert "| global |" in text and "| rue |" in text
    assert "| git_commit | abc123 |" in text and "| device | cpu |" in text and "| torch |" in text
    assert "| abc123 | 8 | " in text and "stale" not in text  # rows by run: every cell from this one


def test_a_failing_cell_is_a_row_and_a_nonzero_exit(tmp_path, capsys):
    # GLNet's 508-px patches do not fit a 122-px image: the row says why, the run goes on, the exit code is 1
    code = R.main(["--device", "cpu", "--shrink", "0.05", "--methods", "glnet,global", "--datasets", "deepglobe",
                   "--precisions", "fp32", "--scales", "1", "--budget-s", "1", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in read_rows(tmp_path / "reference.csv")}
    assert code == 1 and rows["global"]["status"] == "ok"
    assert rows["glnet"]["status"] == "error" and "patch_size" in rows["glnet"]["error"]
    assert "glnet deepglobe fp32" in capsys.readouterr().out


@pytest.mark.parametrize("argv, expected", [
    (["--methods", "nosuch"], "--methods: unknown nosuch"),
    (["--datasets", "nosuch"], "--datasets"),
    (["--precisions", "int8"], "--precisions takes"),
])
def test_bad_arguments_are_one_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        R.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_resume_keeps_measured_rows_and_runs_only_the_missing_cells(tmp_path, monkeypatch):
    common = ["--device", "cpu", "--shrink", "0.05", "--methods", "global", "--datasets", "cityscapes",
              "--precisions", "fp32", "--budget-s", "0.5", "--out", str(tmp_path)]
    assert R.main(common + ["--scales", "1"]) == 0
    first = read_rows(tmp_path / "reference.csv")
    monkeypatch.delenv("UHRBENCH_COMMIT", raising=False)
    monkeypatch.setattr(R.tracking, "git_commit", lambda: "second")
    assert R.main(common + ["--scales", "1,0.8", "--resume"]) == 0
    rows = read_rows(tmp_path / "reference.csv")
    assert [(r["scale"], r["commit"]) for r in rows] == [("1.0", first[0]["commit"]), ("0.8", "second")]
    assert rows[0] == first[0]  # the earlier measurement is kept as it was
    assert "| resumed | 1 rows kept" in (tmp_path / "README.md").read_text()
    assert R.main(common + ["--scales", "1,0.8", "--resume"]) == 0  # nothing left to run: nothing rewritten
    assert read_rows(tmp_path / "reference.csv") == rows


def test_resume_from_a_file_that_is_not_a_reference_csv_is_one_line(tmp_path):
    (tmp_path / "reference.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit) as exc:
        R.main(["--device", "cpu", "--methods", "global", "--out", str(tmp_path), "--resume"])
    assert "reference.csv is not a reference.csv" in str(exc.value) and "--resume" in str(exc.value)
