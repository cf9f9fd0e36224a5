#!/usr/bin/env python
"""GPU reference run: every registered method, untrained, at each real dataset's native size and at 0.8x, fp32 and
fp16 (autocast), batch 1, timed with the measurement protocol's code (pipelines.measure: `model.predict` only,
warm-up discarded, CUDA-synchronised, median of CUDA-event times; memory from torch's peak counters and NVML).

Architectures are the `paper` profile's model blocks of params.yaml (code defaults where a dataset has none), with
`pretrained` off: weights do not change the cost, and nothing is downloaded. Inputs are random uint8 images of the
dataset's native size (no dataset is needed): RUE's patch selection depends on content, so its row is the cost at
its fixed top-K, not on real images.

The protocol asks for >= 20 warm-up and >= 200 timed iterations or 10 s per cell (README "Measurement protocol");
the whole matrix (34 runs x 4 datasets x 2 scales x 2 precisions) in under 9 minutes cannot afford that, so each
cell gets an equal share of a time budget: one probe call, then as many warm-up (up to 20) and timed (3 to 300)
iterations as the share allows. Every row records the counts it got. Use `bench.py measure` for one cell at full
protocol.

Writes `<out>/reference.csv` (one row per cell, appended as it goes: a run cut short keeps what it measured) and
`<out>/README.md` (tables per dataset and the full environment); `--out` defaults to
`results/reference/<device name>/`. `--resume` keeps the measured rows of an existing `<out>/reference.csv` and runs
only the cells it lacks (each row names the commit that measured it).

    python benchmarks/gpu_reference.py                      # on a CUDA machine; prints the plan and estimate first
    python benchmarks/gpu_reference.py --device cpu --shrink 0.05 --methods global,rue --precisions fp32
"""
from __future__ import annotations

import argparse
import csv
import gc
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from datasets import get_dataset
from methods import MethodError, build_method, count_parameters, run_names
from pipelines import tracking
from pipelines.config import ConfigError, full_model_config, load_config
from pipelines.measure import MeasureSettings, is_oom, make_inputs, measure_model, predictor, scaled

DATASETS = ("deepglobe", "inria", "cityscapes", "urur")
SCALES = (1.0, 0.8)
PRECISIONS = ("fp32", "fp16")
PROTOCOL_WARMUP, MIN_TIMED, MAX_TIMED = 20, 3, 300
COLUMNS = ["commit", "method", "dataset", "scale", "height", "width", "precision", "status", "params",
           "warmup_iterations", "timed_iterations", "latency_ms_median", "device_latency_ms_median", "latency_ms_p90",
           "fps", "torch_max_allocated_mib", "torch_max_reserved_mib", "nvml_process_peak_mib", "build_s", "cell_s",
           "error"]


@dataclass(frozen=True)
class Cell:
    method: str
    dataset: str
    scale: float
    precision: str


def plan(methods: list[str], datasets: list[str], scales: list[float], precisions: list[str]) -> list[Cell]:
    """Method-major, so one model serves all its cells of a dataset."""
    return [Cell(m, d, s, p) for m in methods for d in datasets for p in precisions for s in scales]


def allot(share_s: float, probe_s: float) -> tuple[int, int]:
    """(extra warm-up, timed iterations) that fit a cell's time share after a probe call that took `probe_s`:
    a fifth of the share warms up (the probe counts as one), the rest is timed."""
    per_call = max(probe_s, 1e-6)
    warmup = max(0, min(PROTOCOL_WARMUP - 1, int(0.2 * share_s / per_call) - 1))
    timed = max(MIN_TIMED, min(MAX_TIMED, int(0.8 * share_s / per_call)))
    return warmup, timed


def model_config(config, method: str, dataset: str) -> dict:
    """The method's paper-profile architecture for the dataset, without ImageNet weights or training-only knobs."""
    model = full_model_config(method, config.method_model(method, dataset))
    model.pop("pretrained", None)
    return model


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def native_size(dataset: str, shrink: float) -> tuple[int, int]:
    h, w = get_dataset(dataset).info.native_size
    return max(32, round(h * shrink)), max(32, round(w * shrink))


def build_on(device: torch.device, method: str, info, model_cfg: dict):
    """Initialise the weights on the device itself (136 builds of up to 140 M parameters: minutes on a CPU's
    random number generator); a module whose constructor needs host tensors is built on the CPU and moved."""
    try:
        with device:
            model = build_method(method, info.num_classes, ignore_index=info.ignore_index, **model_cfg)
    except (RuntimeError, TypeError):
        model = build_method(method, info.num_classes, ignore_index=info.ignore_index, **model_cfg)
    return model.to(device).eval()


def run_cell(model, config, cell: Cell, size: tuple[int, int], device: torch.device, share_s: float, seed: int,
             warmup_seconds: float = 0.0) -> dict:
    amp = None if cell.precision == "fp32" else cell.precision
    [x], _ = make_inputs(config, cell.dataset, MeasureSettings(source="dummy", seed=seed), device, size)
    try:
        with torch.inference_mode():
            fn = predictor(model, device, amp)
            t0 = time.perf_counter()
            fn(x)  # probe: the first call also loads kernels; it is one of the warm-up calls
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            probe_s = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            raise
        return {"status": "OOM", "error": str(exc).splitlines()[0][:200]}
    warmup, timed = allot(share_s, probe_s)
    settings = MeasureSettings(warmup=warmup, warmup_seconds=warmup_seconds, iterations=timed, amp=amp,
                               source="dummy", seed=seed)
    out = measure_model(model, [x], device, settings)
    out["warmup_iterations"] += 1  # the probe
    return out


def environment(device: torch.device, args, commit: str) -> dict:
    env = tracking.environment_info(device)
    env.update(git_commit=commit, cudnn_benchmark=str(torch.backends.cudnn.benchmark),
               cudnn_allow_tf32=str(torch.backends.cudnn.allow_tf32),
               matmul_allow_tf32=str(torch.backends.cuda.matmul.allow_tf32), batch="1",
               input="random uint8 at each dataset's native size x scale", weights="untrained (random init)",
               architecture="params.yaml profile 'paper' model blocks, pretrained off",
               precisions=", ".join(f"{p} ({'weights fp32, autocast' if p != 'fp32' else 'plain'})"
                                    for p in args.precisions),
               budget_s=str(args.budget_s), shrink=str(args.shrink))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu_memory_mib=str(props.total_memory // 2 ** 20),
                   gpu_multiprocessors=str(props.multi_processor_count))
    return env


def fmt(value, spec: str = "{:.1f}") -> str:
    try:
        return spec.format(float(value))
    except (TypeError, ValueError):
        return str(value) if value not in (None, "") else "-"


def markdown(rows: list[dict], env: dict, args) -> str:
    lines = [f"# GPU reference run: {env['device_name']}", "",
             "Every registered method, **untrained**, batch 1, random uint8 input at each dataset's native size and "
             f"at 0.8x, precisions {', '.join(args.precisions)} (half precisions: fp32 weights under autocast); "
             "written by `python benchmarks/gpu_reference.py`. FPS = 1 / median "
             "wall latency of `model.predict` (CUDA-synchronised); memory = torch's peak allocated MiB during the "
             "timed calls. Iteration counts per cell are in `reference.csv` (a time budget shares them out; the "
             "protocol's 20 warm-up / 200 timed iterations are what `bench.py measure` runs for one cell). A cell "
             "with few timed calls (\"Rows by run\") is an estimate: a model of a few milliseconds moves by tens of "
             "percent between machines of one kind; a slow one, whose few calls take seconds, much less.", ""]
    for dataset in args.datasets:
        subset = [r for r in rows if r["dataset"] == dataset]
        if not subset:
            continue
        h, w = subset[0]["height"], subset[0]["width"]
        combos = [(p, s) for p in args.precisions for s in args.scales]
        head = (["method", "params (M)"] + [f"{p} {s:g}x FPS" for p, s in combos]
                + [f"{p} {s:g}x MiB" for p, s in combos])
        lines += [f"## {dataset} (native {h}x{w})", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        for method in dict.fromkeys(r["method"] for r in subset):
            cells = {(r["precision"], float(r["scale"])): r for r in subset if r["method"] == method}
            first = next(iter(cells.values()))
            fps, mem = [], []
            for key in combos:
                row = cells.get(key)
                ok = row is not None and row["status"] == "ok"
                fps.append(fmt(row["fps"], "{:.2f}") if ok else (row["status"] if row else "not run"))
                mem.append(fmt(row["torch_max_allocated_mib"], "{:.0f}") if ok else "-")
            params = fmt(int(first["params"]) / 1e6, "{:.2f}") if first.get("params") not in (None, "") else "-"
            lines.append("| " + " | ".join([method, params] + fps + mem) + " |")
        lines.append("")
    lines += ["## Rows by run", "", "| commit | cells | timed calls per cell (median, min-max) | warm-up calls "
              "(median) |", "|---|---|---|---|"]
    for commit in dict.fromkeys(r.get("commit", "") for r in rows):
        mine = [r for r in rows if r.get("commit", "") == commit and r["status"] == "ok"]
        timed = sorted(int(r["timed_iterations"]) for r in mine)
        warm = sorted(int(r["warmup_iterations"]) for r in mine)
        if timed:
            lines.append(f"| {commit or 'unknown'} | {len(mine)} | {timed[len(timed) // 2]} ({timed[0]}-{timed[-1]}) "
                         f"| {warm[len(warm) // 2]} |")
    lines += ["", "## Environment (of the run that wrote this file)", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    return "\n".join(lines) + "\n"


def previous_rows(path: Path) -> list[dict]:
    """The measured (ok or OOM) rows of an earlier run's CSV; errors are measured again."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and not {"method", "dataset", "scale", "precision", "status"} <= set(rows[0]):
        sys.exit(f"gpu_reference: {path} is not a reference.csv (columns {', '.join(rows[0])}); "
                 "move it away or run without --resume")
    return [r for r in rows if r["status"] in ("ok", "OOM")]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="all", help="comma-separated run names (default: every one)")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--scales", default=",".join(f"{s:g}" for s in SCALES))
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="fp32, fp16, bf16")
    parser.add_argument("--budget-s", type=float, default=390.0,
                        help="seconds shared out among the cells' timing (model builds come on top)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shrink", type=float, default=1.0, help="multiply native sizes (CPU path checks)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default=None, help="default results/reference/<device name>/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="keep the ok/OOM rows of <out>/reference.csv")
    args = parser.parse_args(argv)
    names = run_names()
    args.methods = names if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in names]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; run names: {', '.join(names)}")
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    try:
        [get_dataset(d) for d in args.datasets]
    except Exception as exc:  # noqa: BLE001 - unknown dataset: one line
        parser.error(f"--datasets: {exc}")
    args.scales = [float(s) for s in args.scales.split(",")]
    args.precisions = [p.strip() for p in args.precisions.split(",")]
    bad = [p for p in args.precisions if p not in ("fp32", "fp16", "bf16")]
    if bad or not all(0 < s <= 1 for s in args.scales) or args.budget_s <= 0 or not 0 < args.shrink <= 1:
        parser.error("--precisions takes fp32, fp16, bf16; --scales in (0, 1]; --budget-s > 0; --shrink in (0, 1]")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_reference: --device cuda but torch sees no CUDA device; use --device cpu (with --shrink)")
    torch.backends.cudnn.benchmark = False  # as params.yaml measure.cudnn_benchmark (mmseg, ISDNet, RUE)
    try:
        config = load_config(args.params, ["profile=paper"])
    except ConfigError as exc:
        sys.exit(f"gpu_reference: {exc}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else tracking.environment_info(device)[
        "device_name"]
    out = Path(args.out) if args.out else Path("results/reference") / slug(name)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "reference.csv"
    kept = previous_rows(csv_path) if args.resume else []
    done = {(r["method"], r["dataset"], float(r["scale"]), r["precision"]) for r in kept}
    cells = [c for c in plan(args.methods, args.datasets, args.scales, args.precisions)
             if (c.method, c.dataset, c.scale, c.precision) not in done]
    if not cells:
        print(f"gpu_reference: every cell is already in {csv_path}")
        return 0
    # a copy of the working tree (a GPU machine's) names its commit this way: its .git may be absent or stale
    commit = os.environ.get("UHRBENCH_COMMIT") or tracking.environment_info(device)["git_commit"]
    env = environment(device, args, commit)
    if kept:
        env["resumed"] = (f"{len(kept)} rows kept from an earlier run of {csv_path.name} (their commit column says "
                          f"which); this run measured the other {len(cells)}")
    share, builds = args.budget_s / len(cells), len({(c.method, c.dataset) for c in cells})
    # overheads seen on an H200: ~0.3 s per model build (initialised on the device), ~0.1 s per cell besides its calls
    estimate = args.budget_s + 0.3 * builds + 0.1 * len(cells)
    print(f"gpu_reference: {len(cells)} cells to run (of {len(args.methods)} runs x {len(args.datasets)} datasets x "
          f"{len(args.scales)} scales x {len(args.precisions)} precisions) on {name}: {args.budget_s:.0f} s of "
          f"timing = {share:.2f} s per cell, {builds} model builds; estimate {estimate / 60:.1f} min on a GPU "
          f"(a CPU builds and draws inputs slower). Writing {out}/", flush=True)
    started = time.perf_counter()
    rows: list[dict] = list(kept)
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS, extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows(kept)
        model = key = None
        build_s = params = 0.0
        for i, cell in enumerate(tqdm(cells, desc="reference", unit="cell", mininterval=5)):
            size = scaled(native_size(cell.dataset, args.shrink), cell.scale)
            row = {"commit": commit, "method": cell.method, "dataset": cell.dataset, "scale": cell.scale,
                   "height": size[0], "width": size[1], "precision": cell.precision}
            t0 = time.perf_counter()
            try:
                if key != (cell.method, cell.dataset):
                    model = None
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    info = get_dataset(cell.dataset).info
                    model = build_on(device, cell.method, info, model_config(config, cell.method, cell.dataset))
                    key, build_s = (cell.method, cell.dataset), time.perf_counter() - t0
                    params = count_parameters(model)
                    t0 = time.perf_counter()
                elapsed = time.perf_counter() - started
                share = max(0.05, (args.budget_s - elapsed) / (len(cells) - i))  # late cells absorb early overruns
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                # a process's first seconds on a GPU run slow (README, "Measurement protocol"): the first cell
                # warms the device up for the protocol's 5 s; the cells after it keep it busy
                row.update(run_cell(model, config, cell, size, device, share, args.seed,
                                    warmup_seconds=5.0 if i == 0 and device.type == "cuda" else 0.0))
            except (MethodError, ConfigError, RuntimeError, ValueError) as exc:  # one row, not the end of the run
                row.update(status="error", error=f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}")
                model, key = None, None
            row.update(params=params if key else "", build_s=round(build_s, 2),
                       cell_s=round(time.perf_counter() - t0, 2))
            rows.append(row)
            writer.writerow(row)
            handle.flush()
    order = {(m, d): i for i, (m, d) in enumerate((m, d) for m in args.methods for d in args.datasets)}
    rows.sort(key=lambda r: order.get((r["method"], r["dataset"]), len(order)))
    (out / "README.md").write_text(markdown(rows, {**env, "wall_s": f"{time.perf_counter() - started:.0f}"}, args))
    failed = [r for r in rows if r["status"] not in ("ok", "OOM")]
    print(f"gpu_reference: {len(rows) - len(failed)}/{len(rows)} cells measured in "
          f"{(time.perf_counter() - started) / 60:.1f} min -> {csv_path}, {out / 'README.md'}")
    for row in failed:
        print(f"  {row['method']} {row['dataset']} {row['precision']} {row['scale']}: {row['error']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
