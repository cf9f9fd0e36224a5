#!/usr/bin/env python
"""How much does the measurement harness itself cost? (issue 5 bar: < 1% of the cheapest real
method's latency at 2448x2448.)

Three numbers, using `pipelines.measure.measure_model` (the code `bench.py measure` runs):

1. identity: an `UHRMethod` whose `predict` returns its input. Its median latency is the
   harness's per-call cost inside the timed region (perf_counter pair, call dispatch,
   inference_mode, memory poller interference).
2. the memory poller's duty cycle: the cost of one sample times the sampling rate (CPU time it
   takes from the model's threads). On Linux without NVML no poller thread runs at all (peak RSS
   comes from the kernel's VmHWM), so this only applies on GPUs or without VmHWM.
3. poller interference on a real method: `global` (the cheapest real method: DeepLabv3-R18 on the
   4x-downsampled image) timed by the harness (poller on) and by a bare perf_counter loop (no
   poller, no harness), interleaved over several rounds in ABBA order so machine-load drift hits both alike.

    python benchmarks/harness_overhead.py [--size 2448] [--rounds 4] [--iterations 5] [--json out.json]

CPU numbers on a shared machine are noisy: run it with and without `nice`, and read the
identity ratio as the harness cost and the A/B difference as an upper bound dominated by noise.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from methods import build_method  # noqa: E402
from methods.base import UHRMethod  # noqa: E402
from pipelines import measure as M  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.tracking import environment_info  # noqa: E402


class Identity(UHRMethod):
    name = "identity"

    def __init__(self) -> None:
        super().__init__(num_classes=3)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return images


def bare_loop(model, x, warmup: int, iterations: int) -> list[float]:
    with torch.inference_mode():
        for _ in range(warmup):
            model.predict(x)
        out = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            model.predict(x)
            out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2448)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--identity-iterations", type=int, default=2000)
    parser.add_argument("--method", default="global")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()

    device = torch.device("cpu")
    config = load_config()
    cpu = M.settings_from_config(config, device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (1, 3, args.size, args.size), dtype=torch.uint8, generator=gen)

    poller = M.MemoryPoller(device, cpu.poll_interval_ms / 1e3)  # what one poll costs, deterministic
    threaded = poller.threaded
    t0 = time.perf_counter()
    for _ in range(2000):
        poller.sample()
    poll_us = (time.perf_counter() - t0) / 2000 * 1e6

    ident = M.measure_model(Identity().eval(), [x], device,
                            M.MeasureSettings(warmup=10, iterations=args.identity_iterations,
                                              poll_interval_ms=cpu.poll_interval_ms))
    model = build_method(args.method, 7, **config.method_model(args.method, "synthetic")).eval()
    settings = M.MeasureSettings(warmup=1, iterations=args.iterations, poll_interval_ms=cpu.poll_interval_ms)
    harness, bare = [], []
    for r in range(args.rounds):  # interleaved A/B, order alternating (ABBA) so load drift cancels
        for kind in (("harness", "bare") if r % 2 == 0 else ("bare", "harness")):
            if kind == "harness":
                harness.append(M.measure_model(model, [x], device, settings)["latency_ms_median"])
            else:
                bare.append(statistics.median(bare_loop(model, x, 1, args.iterations)) * 1e3)

    h, b = statistics.median(harness), statistics.median(bare)
    result = {
        "size": args.size, "method": args.method, "threads": torch.get_num_threads(),
        "cpu": environment_info(device)["cpu_model"], "poll_interval_ms": cpu.poll_interval_ms,
        "identity_latency_ms_median": ident["latency_ms_median"], "identity_latency_ms_p90": ident["latency_ms_p90"],
        "method_latency_ms_harness_median": h, "method_latency_ms_bare_median": b,
        "method_harness_rounds_ms": harness, "method_bare_rounds_ms": bare,
        "poller_thread_on_this_device": threaded, "poll_cost_us": poll_us,
        "poller_duty_pct_of_one_core": 100 * poll_us / (cpu.poll_interval_ms * 1e3),
        "identity_overhead_pct": 100 * ident["latency_ms_median"] / h,
        "ab_difference_pct": 100 * (h - b) / b,
        "round_to_round_spread_pct": 100 * (max(bare) - min(bare)) / b,
    }
    print(f"identity model via harness at {args.size}^2: median {result['identity_latency_ms_median'] * 1e3:.1f} us "
          f"(p90 {result['identity_latency_ms_p90'] * 1e3:.1f} us)")
    print(f"{args.method} at {args.size}^2: harness median {h:.1f} ms, bare loop median {b:.1f} ms "
          f"(rounds: harness {[round(v) for v in harness]}, bare {[round(v) for v in bare]})")
    print(f"memory poller: {poll_us:.1f} us per sample every {cpu.poll_interval_ms:g} ms = "
          f"{result['poller_duty_pct_of_one_core']:.2f} % of one core when it runs (poller thread on this device: "
          f"{threaded}; torch threads {torch.get_num_threads()})")
    print(f"harness cost = identity / {args.method}: {result['identity_overhead_pct']:.5f} %  "
          f"(bar: < 1 %)  -> {'PASS' if result['identity_overhead_pct'] < 1 else 'FAIL'}")
    print(f"harness vs bare A/B difference: {result['ab_difference_pct']:+.2f} % "
          f"(round-to-round spread of the bare loop alone: {result['round_to_round_spread_pct']:.1f} %)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
