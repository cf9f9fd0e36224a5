"""Measurement stage: latency, memory and cost of one method on one dataset.

The protocol (docs/specs/protocol.md §1-3, README "Measurement protocol") in brief: exactly
`model.predict` is timed (eval, inference_mode, batch 1, input on the device), warm-up discarded,
synchronised on CUDA, FPS = 1 / median; memory from a background NVML/RSS poller and torch's peak
counters, "unavailable" where a source is missing (never estimated); parameters on the inference
path and MACs (FlopCounterMode FLOPs / 2); every result carries its environment. Writes
`results/measure/<dataset>/<method>[__variant].json` (+ `_sweep.csv/.png`) and an MLflow run.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import json
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from datasets import PreparedDataset, get_dataset
from datasets.base import DatasetError, read_meta
from methods import build_method, count_parameters, method_class, resolve_method_name
from pipelines import tracking
from pipelines.checkpoints import load_trained
from pipelines.config import Config, ConfigError, full_model_config, variant_label
from pipelines.paths import final_checkpoint, measure_file, size_sweep_stem

UNAVAILABLE = "unavailable"
MIB = 2 ** 20
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class MeasureSettings:
    """The `measure:` block of params.yaml, resolved for one device (CLI flags replace fields)."""

    warmup: int = 2
    warmup_seconds: float = 0.0  # ...and keep warming up until this long has passed
    iterations: int = 5
    min_seconds: float = 0.0
    source: str = "real"  # real: test-split images; dummy: random uint8-range tensor
    scale: float = 1.0
    max_images: int = 4  # real images held on the device and cycled through
    amp: str | None = None  # None (fp32), "fp16" or "bf16"
    channels_last: bool = False
    cudnn_benchmark: bool = False
    poll_interval_ms: float = 10.0
    sweep: tuple[int, ...] = (1024, 2048, 2448, 4096, 5000, 8192)
    seed: int = 0

    @property
    def precision(self) -> str:
        return f"amp-{self.amp}" if self.amp else "fp32"

    def check(self) -> MeasureSettings:
        rules = {"warmup": (isinstance(self.warmup, int) and self.warmup >= 0, "an integer >= 0"),
                 "warmup_seconds": (float(self.warmup_seconds) >= 0, ">= 0"),
                 "iterations": (isinstance(self.iterations, int) and self.iterations >= 1, "an integer >= 1"),
                 "source": (self.source in ("real", "dummy"), "real or dummy"),
                 "scale": (0 < float(self.scale) <= 4, "in (0, 4]"),
                 "amp": (self.amp in (None, "fp16", "bf16"), "null, fp16 or bf16"),
                 "poll_interval_ms": (0 < float(self.poll_interval_ms) <= 10, "in (0, 10] (10 ms or finer)")}
        for key, (ok, want) in rules.items():
            if not ok:
                raise ConfigError(f"measure.{key} must be {want}, got {getattr(self, key)!r}")
        return self


def settings_from_config(config: Config, device: torch.device) -> MeasureSettings:
    """`warmup`, `warmup_seconds`, `iterations`, `min_seconds` may be per device type ({cpu: 2, cuda: 50})."""
    raw = config.section("measure")
    known = {f for f in MeasureSettings.__dataclass_fields__} | {"device"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"measure: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    values = {}
    for key, value in raw.items():
        if key == "device":
            continue
        if isinstance(value, dict):
            if device.type not in value:
                raise ConfigError(f"measure.{key} has no entry for device type '{device.type}'")
            value = value[device.type]
        values[key] = tuple(int(s) for s in value) if key == "sweep" else value
    values.setdefault("seed", config.seed)
    return MeasureSettings(**values).check()


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(seconds: list[float], prefix: str = "latency_ms") -> dict:
    """median, p90, mean, std (sample), min, max in ms; FPS = 1 / median."""
    ms = [s * 1e3 for s in seconds]
    out = {f"{prefix}_median": statistics.median(ms), f"{prefix}_p90": percentile(ms, 90),
           f"{prefix}_mean": statistics.fmean(ms), f"{prefix}_std": statistics.stdev(ms) if len(ms) > 1 else 0.0,
           f"{prefix}_min": min(ms), f"{prefix}_max": max(ms)}
    if prefix == "latency_ms":
        out["fps"] = 1e3 / out["latency_ms_median"]
        out["timed_iterations"] = len(ms)
    return out


def time_calls(fn, inputs: list[torch.Tensor], device: torch.device, warmup: int, iterations: int,
               min_seconds: float = 0.0, warmup_seconds: float = 0.0) -> dict:
    """Run `fn(x)` at least `warmup` times and `warmup_seconds` (discarded), then at least `iterations` times and
    `min_seconds`. Returns {"wall": [s, ...], "device": [s, ...] (CUDA events; empty on CPU), "warmup": calls}."""
    cuda = device.type == "cuda"
    warm, start_warm = 0, time.perf_counter()
    while warm < warmup or time.perf_counter() - start_warm < warmup_seconds:
        fn(inputs[warm % len(inputs)])
        warm += 1
        if cuda and warmup_seconds and warm >= warmup:
            torch.cuda.synchronize(device)  # the clock must see the device's time, not the launch queue's
    if cuda:
        torch.cuda.synchronize(device)
    wall: list[float] = []
    events: list[tuple] = []
    start_all = time.perf_counter()
    i = 0
    while i < iterations or time.perf_counter() - start_all < min_seconds:
        x = inputs[i % len(inputs)]
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            begin.record()
            fn(x)
            end.record()
            torch.cuda.synchronize(device)
            wall.append(time.perf_counter() - t0)
            events.append((begin, end))
        else:
            t0 = time.perf_counter()
            fn(x)
            wall.append(time.perf_counter() - t0)
        i += 1
    return {"wall": wall, "device": [b.elapsed_time(e) / 1e3 for b, e in events], "warmup": warm}


def _nvml_handle(device: torch.device):
    """(pynvml module, handle) for the torch device, or (None, reason)."""
    if device.type != "cuda":
        return None, "not a CUDA device"
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - no library / no driver
        return None, f"NVML not available ({exc.__class__.__name__})"
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:  # CUDA_VISIBLE_DEVICES renumbers devices; the UUID does not lie
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return pynvml, pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
    except Exception:  # noqa: BLE001
        try:
            return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:  # noqa: BLE001
            return None, f"NVML has no handle for {device} ({exc.__class__.__name__})"


def _vm_hwm(reset: bool = False) -> int | None:
    """Linux's own peak RSS of this process (VmHWM, bytes); `reset` restarts it from the current RSS
    (`echo 5 > /proc/self/clear_refs`). None where the kernel does not offer it."""
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        with open("/proc/self/status") as handle:
            line = next(x for x in handle if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return None


class MemoryPoller:
    """Peak memory while the block runs: per-process GPU memory and device-wide used memory (NVML),
    polled by a background thread every `interval_s`, and process peak RSS, exact from the kernel
    (VmHWM, reset on entry) or polled where that is unavailable. Without NVML and with VmHWM no
    thread runs at all, so nothing competes with the model for the CPU. Read `result()` after."""

    def __init__(self, device: torch.device, interval_s: float = 0.01) -> None:
        import psutil

        self.interval_s = interval_s
        self.process = psutil.Process()
        self.pid = os.getpid()
        self.nvml, self.handle = _nvml_handle(device)
        self.nvml_reason = self.handle if self.nvml is None else ""
        self.rss_before = self.rss_peak = self.process.memory_info().rss
        self.hwm = _vm_hwm(reset=True) is not None
        self.threaded = self.nvml is not None or not self.hwm
        self.device_before = self.device_peak = self._device_used()
        self.proc_peak: int | None = None
        self.proc_seen = False
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="uhrbench-memory-poller")

    def _device_used(self) -> int | None:
        try:
            return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used) if self.nvml else None
        except Exception:  # noqa: BLE001
            return None

    def sample(self) -> None:
        self.samples += 1
        self.rss_peak = max(self.rss_peak, self.process.memory_info().rss)
        if self.nvml is None:
            return
        used = self._device_used()
        self.device_peak = max(self.device_peak or 0, used or 0) if used is not None else self.device_peak
        try:
            mine = [p.usedGpuMemory for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
                    if p.pid == self.pid and p.usedGpuMemory is not None]
        except Exception:  # noqa: BLE001
            mine = []
        if mine:
            self.proc_seen = True
            self.proc_peak = max(self.proc_peak or 0, int(mine[0]))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> MemoryPoller:
        if self.threaded:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.threaded:
            self._thread.join()
        self.sample()
        if self.hwm:
            self.rss_peak = max(self.rss_peak, _vm_hwm() or 0)
        if self.nvml is not None:
            with contextlib.suppress(Exception):
                self.nvml.nvmlShutdown()

    def result(self) -> dict:
        def mib(value):
            return UNAVAILABLE if value is None else value / MIB

        out = {"poll_interval_ms": self.interval_s * 1e3 if self.threaded else 0.0, "poll_samples": self.samples,
               "rss_peak_source": "kernel VmHWM (exact, reset before timing)" if self.hwm else "polled",
               "rss_before_mib": self.rss_before / MIB, "rss_peak_growth_mib": (self.rss_peak - self.rss_before) / MIB}
        if self.nvml is None:
            out.update(nvml_process_peak_mib=UNAVAILABLE, nvml_device_used_before_mib=UNAVAILABLE,
                       nvml_device_used_peak_mib=UNAVAILABLE, nvml_note=self.nvml_reason)
        else:
            out.update(nvml_process_peak_mib=mib(self.proc_peak), nvml_device_used_before_mib=mib(self.device_before),
                       nvml_device_used_peak_mib=mib(self.device_peak),
                       nvml_note="" if self.proc_seen else "this pid not in NVML's process list (container pid "
                                                            "namespace?); per-process peak unavailable")
        return out


def torch_memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"torch_max_allocated_mib": UNAVAILABLE, "torch_max_reserved_mib": UNAVAILABLE}
    return {"torch_max_allocated_mib": torch.cuda.max_memory_allocated(device) / MIB,
            "torch_max_reserved_mib": torch.cuda.max_memory_reserved(device) / MIB}


def _count_run(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """One `predict` call under FlopCounterMode with forward hooks recording which modules ran."""
    from torch.utils.flop_counter import FlopCounterMode

    ran: set[int] = set()
    hooks = [m.register_forward_hook(lambda mod, *_: ran.add(id(mod))) for m in model.modules()]
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model.predict(x)
    finally:
        for hook in hooks:
            hook.remove()
    used = {id(p): p.numel() for m in model.modules() if m is model or id(m) in ran  # owned by modules that ran
            for p in m.parameters(recurse=False)}
    return {"macs": counter.get_total_flops() / 2, "params_inference": sum(used.values())}


def count_cost(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """Parameters (total, inference path) and MACs at x's shape: meta tensors first, else one real call."""
    out = {"params_total": count_parameters(model)}
    try:
        meta_model = copy.deepcopy(model).to("meta")
        cost = _count_run(meta_model, torch.empty_like(x, device="meta"))
        cost["cost_source"] = "meta"
    except Exception as exc:  # noqa: BLE001 - data-dependent ops (.item(), nonzero, numpy) need real tensors
        cost = _count_run(model, x)
        cost["cost_source"] = f"real call (meta failed: {exc.__class__.__name__})"
    out.update(cost)
    out["gmacs"] = out.pop("macs") / 1e9
    return out


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def predictor(model: torch.nn.Module, device: torch.device, amp: str | None):
    def run(x):
        with torch.autocast(device.type, dtype=AMP_DTYPES[amp]):
            return model.predict(x)

    return run if amp else model.predict  # fp32: the bare method, nothing in between


def measure_model(model: torch.nn.Module, inputs: list[torch.Tensor], device: torch.device,
                  settings: MeasureSettings) -> dict:
    """Time and memory of `model.predict` on `inputs` (already on the device). An out-of-memory
    error gives {"status": "OOM", ...}; anything else propagates."""
    fn = predictor(model, device, settings.amp)
    try:
        with torch.inference_mode():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            with MemoryPoller(device, settings.poll_interval_ms / 1e3) as poller:
                times = time_calls(fn, inputs, device, settings.warmup, settings.iterations, settings.min_seconds,
                                   settings.warmup_seconds)
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"status": "OOM", "error": str(exc).splitlines()[0][:300] if str(exc) else exc.__class__.__name__}
    out = {"status": "ok", "warmup_iterations": times["warmup"], **summarize(times["wall"])}
    if times["device"]:
        out.update(summarize(times["device"], "device_latency_ms"))
    out.update(poller.result())
    out.update(torch_memory(device))
    return out


def native_size(config: Config, dataset: str) -> tuple[int, int]:
    try:
        size = read_meta(config.data_root / dataset).get("info", {}).get("native_size")
    except DatasetError:
        size = None
    return tuple(int(s) for s in (size or get_dataset(dataset).info.native_size))


def scaled(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return int(round(size[0] * scale)), int(round(size[1] * scale))


def resize_uint8(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return out.round().clamp(0, 255).to(torch.uint8)


def make_inputs(config: Config, dataset: str, settings: MeasureSettings, device: torch.device,
                size: tuple[int, int] | None = None) -> tuple[list[torch.Tensor], str]:
    """Batch-1 uint8-range inputs on the device, and a label for the source. Real: up to
    `max_images` test-split images (resized if a scale or size asks for it); dummy: random."""
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    if settings.source == "real":
        data = PreparedDataset(config.data_root / dataset, "test")
        images = [data[i][0] for i in range(min(len(data), settings.max_images))]
        target = size or scaled(tuple(images[0].shape[-2:]), settings.scale)
        resized = any(tuple(im.shape[-2:]) != target for im in images)
        tensors = [resize_uint8(im, target) for im in images]
        label = f"real test images x{len(tensors)}" + (" (bilinear-resized)" if resized else "")
    else:
        target = size or scaled(native_size(config, dataset), settings.scale)
        gen = torch.Generator(device).manual_seed(settings.seed)  # on the device: a CPU draws 79 M values in ~0.5 s
        tensors = [torch.randint(0, 256, (3, *target), generator=gen, dtype=torch.uint8, device=device)]
        label = "dummy random uint8"
    return [t[None].to(device).contiguous(memory_format=memory_format) for t in tensors], label


def load_model(config: Config, dataset: str, method: str, device: torch.device, untrained: bool,
               overrides: dict | None) -> tuple[torch.nn.Module, dict, str, str]:
    """(model, model config, weights note, params hash): the trained checkpoint when there is one."""
    path = final_checkpoint(config, dataset, method)
    if not untrained and path.is_file():
        model, checkpoint, model_cfg = load_trained(config, dataset, method, overrides, device)
        return model, model_cfg, f"trained checkpoint {path}", checkpoint.get("params_hash", "")
    note = "untrained (--untrained)" if untrained else f"untrained: no checkpoint at {path}"
    info = get_dataset(dataset).info
    model_cfg = full_model_config(method, {**config.method_model(method, dataset), **(overrides or {})})
    model = build_method(method, info.num_classes, ignore_index=info.ignore_index, **model_cfg)
    return model.to(device).eval(), model_cfg, note, config.params_hash(method, dataset)


def environment(device: torch.device, settings: MeasureSettings, method: str, model_cfg: dict) -> dict:
    env = tracking.environment_info(device)
    env.update(cudnn_benchmark=str(torch.backends.cudnn.benchmark),
               cuda_runtime=(torch.version.cuda or "none") if device.type == "cuda" else UNAVAILABLE,
               precision=settings.precision, memory_format="NHWC" if settings.channels_last else "NCHW",
               interop_threads=str(torch.get_num_interop_threads()))
    for knob in method_class(method).knobs:  # runtime settings that change the cost (RUE's K)
        if knob.name in model_cfg:
            env[f"model_{knob.name}"] = str(model_cfg[knob.name])
    return env


def run_sweep(model, make_input, sizes, device, settings, out_stem: Path) -> list[dict]:
    """Latency and memory at each square size; OOM is a row, not the end. Writes CSV + PNG."""
    rows = []
    for side in sizes:
        try:
            inputs = make_input((side, side))
            row = measure_model(model, inputs, device, settings)
        except Exception as exc:  # noqa: BLE001 - the input itself may not fit
            if not is_oom(exc):
                raise
            row = {"status": "OOM", "error": str(exc).splitlines()[0][:300]}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        finally:
            inputs = None
        rows.append({"size": side, "megapixels": side * side / 1e6, **row})
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    columns = ["size", "megapixels", "status", "latency_ms_median", "latency_ms_p90", "fps", "rss_peak_growth_mib",
               "nvml_process_peak_mib", "torch_max_allocated_mib", "torch_max_reserved_mib"]
    with open(out_stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows(rows)
    plot_sweep(rows, out_stem.with_suffix(".png"), device)
    return rows


def plot_sweep(rows: list[dict], path: Path, device: torch.device) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    mem_key = "torch_max_reserved_mib" if device.type == "cuda" else "rss_peak_growth_mib"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([r["megapixels"] for r in ok], [r["latency_ms_median"] for r in ok], "o-")
    ax1.set(xlabel="input megapixels", ylabel="median latency (ms)", title="latency")
    mem = [(r["megapixels"], r[mem_key]) for r in ok if r.get(mem_key) != UNAVAILABLE]
    ax2.plot([m for m, _ in mem], [v for _, v in mem], "o-")
    ax2.set(xlabel="input megapixels", ylabel=f"{mem_key} (MiB)", title="memory")
    for r in rows:
        if r["status"] != "ok":
            for ax in (ax1, ax2):
                ax.axvline(r["megapixels"], color="red", linestyle="--")
                ax.annotate(r["status"], (r["megapixels"], 0), xycoords=("data", "axes fraction"), color="red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_sizes(text: str | None, config: Config) -> list[int] | None:
    """'1024,2048' -> [1024, 2048]; 'default' -> measure.sweep from params; None -> no sweep."""
    if not text:
        return None
    if text.strip() == "default":
        return [int(s) for s in config.section("measure").get("sweep") or MeasureSettings.sweep]
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--sweep must be comma-separated integers such as 1024,2048,4096, got '{text}'") from None
    if not sizes or min(sizes) < 32:
        raise ConfigError(f"--sweep sizes must be integers >= 32, got '{text}'")
    return sizes


def format_summary(result: dict) -> str:
    def num(key, fmt="{:.1f}"):
        value = result.get(key, UNAVAILABLE)
        return fmt.format(value) if isinstance(value, (int, float)) else str(value)

    lines = [f"{result['method']} on {result['dataset']} ({result['input_size']}, {result['precision']}, "
             f"{result['device_name']}, {result['source']}; {result['weights']})"]
    if result.get("status") == "ok":
        lines.append(f"  latency median {num('latency_ms_median')} ms, p90 {num('latency_ms_p90')} ms, "
                     f"mean {num('latency_ms_mean')} +- {num('latency_ms_std')} ms over "
                     f"{result['timed_iterations']} runs -> {num('fps', '{:.2f}')} FPS")
        lines.append(f"  memory: NVML process peak {num('nvml_process_peak_mib')} MiB, torch allocated "
                     f"{num('torch_max_allocated_mib')} / reserved {num('torch_max_reserved_mib')} MiB, "
                     f"RSS growth {num('rss_peak_growth_mib')} MiB")
    else:
        lines.append(f"  {result.get('status')}: {result.get('error', '')}")
    lines.append(f"  params {result['params_total'] / 1e6:.2f} M (inference path "
                 f"{result.get('params_inference', 0) / 1e6:.2f} M), {num('gmacs', '{:.2f}')} GMACs "
                 f"({result.get('cost_source')})")
    for row in result.get("sweep", []):
        lines.append(f"  sweep {row['size']}^2 ({row['megapixels']:.1f} MP): " + (
            f"{row['latency_ms_median']:.1f} ms" if row["status"] == "ok" else row["status"]))
    lines.append(f"  wrote {result['output']}")
    return "\n".join(lines)


def variant_name(settings: MeasureSettings, base: MeasureSettings, overrides: dict | None) -> str:
    """'' for the params.yaml settings (the DVC metrics file); a label when CLI flags or runtime knobs change them."""
    parts = []
    if settings.scale != base.scale:
        parts.append(f"s{settings.scale:g}")
    if settings.amp != base.amp:
        parts.append(settings.precision)
    if settings.channels_last != base.channels_last:
        parts.append("nhwc" if settings.channels_last else "nchw")
    if settings.source != base.source:
        parts.append(settings.source)
    if overrides:  # e.g. RUE's K: a labelled variant, never the DVC-tracked default file
        parts.append(variant_label(overrides))
    return "_".join(parts)


def measure(config: Config, dataset: str, method: str, device: str | None = None, scale: float | None = None,
            amp: str | None = None, channels_last: bool | None = None, dummy: bool | None = None,
            untrained: bool = False, sweep: list[int] | None = None, overrides: dict | None = None,
            variant: str | None = None) -> dict:
    """Measure one method on one dataset; write the JSON (and sweep CSV/PNG) and an MLflow run. `variant` labels
    the run and file instead of the name derived from the settings (`bench.py ablation`'s rows)."""
    method = resolve_method_name(method)
    get_dataset(dataset)
    dev = tracking.resolve_device(device or config.section("measure").get("device", "auto"))
    base = settings_from_config(config, dev)
    changes = {k: v for k, v in {"scale": scale, "amp": amp, "channels_last": channels_last}.items() if v is not None}
    if dummy is not None:
        changes["source"] = "dummy" if dummy else "real"
    settings = replace(base, **changes).check()
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = bool(settings.cudnn_benchmark)
    model, model_cfg, weights, params_hash = load_model(config, dataset, method, dev, untrained, overrides)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    inputs, source_label = make_inputs(config, dataset, settings, dev)
    size = tuple(inputs[0].shape[-2:])
    env = environment(dev, settings, method, model_cfg)
    result = {"dataset": dataset, "method": method, "device": dev.type, "device_name": env["device_name"],
              "input_size": f"{size[0]}x{size[1]}", "megapixels": size[0] * size[1] / 1e6, "batch_size": 1,
              "scale": settings.scale, "native_size": "x".join(map(str, native_size(config, dataset))),
              "source": source_label, "weights": weights, "precision": settings.precision,
              "memory_format": env["memory_format"], "cudnn_benchmark": env["cudnn_benchmark"],
              "timed_region": "model.predict(uint8-range batch already on the device), inference_mode",
              "timing": "synchronize + perf_counter per call; CUDA events too" if dev.type == "cuda"
              else "perf_counter per call (CPU)",
              "settings": asdict(settings), "model_config": model_cfg, "environment": env}
    result.update(measure_model(model, inputs, dev, settings))
    try:
        result.update(count_cost(model, inputs[0]))
    except Exception as exc:  # noqa: BLE001 - the one real counting call may not fit either
        if not is_oom(exc):
            raise
        result.update(params_total=count_parameters(model), cost_source="OOM", gmacs=UNAVAILABLE)
    variant = variant or variant_name(settings, base, overrides)
    sweep_stem = size_sweep_stem(config, dataset, method, variant)
    if sweep:
        def make_input(hw):
            return make_inputs(config, dataset, settings, dev, hw)[0]

        result["sweep"] = run_sweep(model, make_input, sweep, dev, settings, sweep_stem)
    inputs = None
    with tracking.tracked_run(dataset, method, "measure", config.profile, params_hash,
                              tags={"precision": settings.precision, "input_size": result["input_size"],
                                    "scale": str(settings.scale), "variant": variant or "default"}) as run:
        run.tags({f"env.{k}": str(v)[:5000] for k, v in env.items()})
        run.tags({k: str(result[k]) for k in ("weights", "source", "status")})
        run.tags({k: v for k, v in result.items() if v == UNAVAILABLE})  # metrics must be numbers
        run.params({**{f"measure.{k}": v for k, v in asdict(settings).items() if k != "sweep"},
                    "input_size": result["input_size"], **{f"model.{k}": v for k, v in model_cfg.items()}})
        run.metrics({k: float(v) for k, v in result.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)})
        for row in result.get("sweep", []):
            for key in ("latency_ms_median", "fps", "rss_peak_growth_mib", "torch_max_reserved_mib",
                        "nvml_process_peak_mib"):
                if isinstance(row.get(key), float):
                    run.metrics({f"sweep.{key}": row[key]}, step=row["size"])
        result["mlflow_run_id"] = run.id
        out = measure_file(config, dataset, method, variant)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
        run.artifact(out)
        if sweep:
            for ext in (".csv", ".png"):
                run.artifact(sweep_stem.with_suffix(ext))
    result["output"] = str(out)
    return result
