"""Mutation score of the modules where a silent bug costs most (benchmarks/mutation.md).

Runs mutmut (configured in pyproject.toml) on the functions of each target below, then prints per target: mutants
killed, survived, with no covering test, and the score = killed / (all - equivalent). Equivalent mutants (same
behaviour, no test can tell) are listed with the reason, by mutmut name; a name that no longer exists is reported.

    pip install mutmut==3.8.1
    python benchmarks/mutation.py                 # every target (an hour or more on 2 cores)
    python benchmarks/mutation.py metrics timing  # some targets
    python benchmarks/mutation.py --report        # only summarise the last run (mutants/ is kept)
"""
from __future__ import annotations

import argparse
import fnmatch
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

TARGETS = {
    "metrics": ["pipelines.metrics.*"],
    "timing": ["pipelines.measure.x_percentile__*", "pipelines.measure.x_summarize__*",
               "pipelines.measure.x_time_calls__*", "pipelines.measure.x_measure_model__*",
               "pipelines.measure.x_predictor__*"],
    "distributed": ["pipelines.distributed.*"],
    "conversions": ["datasets.deepglobe.x_convert_mask__*", "datasets.deepglobe.x__convert__*",
                    "datasets.urur.x_convert_label__*", "datasets.urur.x__convert__*",
                    "datasets.inria.x__convert__*", "datasets.cityscapes.x__convert__*"],
    "geometry": ["methods.blocks.windows.*", "methods.blocks.patches.*"],
}

# mutmut name -> why no test can kill it
EQUIVALENT = {
    "pipelines.metrics.x_segmentation_scores__mutmut_30": 'float("nan") -> float("NAN"): the same value',
    "pipelines.metrics.x_segmentation_scores__mutmut_49": 'float("nan") -> float("NAN"): the same value',
    "pipelines.metrics.x_segmentation_scores__mutmut_62": 'float("nan") -> float("NAN"): the same value',
    "pipelines.metrics.x_segmentation_scores__mutmut_70": 'float("nan") -> float("NAN"): the same value',
    "pipelines.metrics.xǁConfusionMatrixǁ__init____mutmut_9": "device=None: the CPU, as asked (GPU test only)",
    "pipelines.metrics.xǁConfusionMatrixǁ__init____mutmut_12": "device dropped: the CPU, as asked (GPU test only)",
    "pipelines.metrics.xǁConfusionMatrixǁupdate__mutmut_7": ".to(None) keeps a CPU tensor on the CPU (GPU only)",
    "pipelines.metrics.xǁConfusionMatrixǁupdate__mutmut_12": ".to(None) keeps a CPU tensor on the CPU (GPU only)",
    "datasets.deepglobe.x__convert__mutmut_48": 'Image.fromarray(2-d uint8, mode="L" -> None): Pillow picks "L"',
    "datasets.deepglobe.x__convert__mutmut_50": 'Image.fromarray(2-d uint8, mode="L" -> None): Pillow picks "L"',
    "datasets.inria.x__convert__mutmut_65": 'Image.fromarray(2-d uint8, mode="L" -> None): Pillow picks "L"',
    "datasets.inria.x__convert__mutmut_67": 'Image.fromarray(2-d uint8, mode="L" -> None): Pillow picks "L"',
    "datasets.cityscapes.x__convert__mutmut_48": 'Image.fromarray(2-d uint8, mode="L" -> None): Pillow picks "L"',
    "datasets.cityscapes.x__convert__mutmut_50": 'Image.fromarray(2-d uint8, mode="L" -> None): Pillow picks "L"',
    "datasets.urur.x__convert__mutmut_51": 'Image.fromarray(2-d uint8, mode="L" -> None): Pillow picks "L"',
    "datasets.urur.x__convert__mutmut_53": 'Image.fromarray(2-d uint8, mode="L" -> None): Pillow picks "L"',
    "datasets.deepglobe.x__convert__mutmut_63": "bincount minlength 256 -> 257: only counts[:N] and [255] read",
    "datasets.cityscapes.x__convert__mutmut_63": "bincount minlength 256 -> 257: only counts[:N] and [255] read",
    "datasets.urur.x__convert__mutmut_66": "bincount minlength 256 -> 257: only counts[:N] and [255] read",
    "datasets.inria.x__convert__mutmut_19": "astype(None): float64 0/255, only compared and measured after",
    "datasets.urur.x_convert_label__mutmut_7": "astype without copy=True: NumPy copies anyway",
    "datasets.urur.x_convert_label__mutmut_26": "clip lower bound None: searchsorted is never negative",
    "datasets.urur.x_convert_label__mutmut_48": "where(..., 256) wraps to 0, overwritten by label[bad] = 255",
    "methods.blocks.windows.x_window_starts__mutmut_7": "length < window: length == window then gives [0] too",
    "methods.blocks.windows.x_sliding_window_logits__mutmut_1": "default batch 4 -> 5: a speed setting",
    "methods.blocks.windows.x_sliding_window_logits__mutmut_25": "shape[+2:] is shape[2:] of a 4-d tensor",
    "methods.blocks.windows.x_sliding_window_logits__mutmut_38": "dtype None: float32, the default dtype",
    "methods.blocks.windows.x_sliding_window_logits__mutmut_41": "dtype dropped: float32, the default dtype",
    "methods.blocks.windows.x_sliding_window_logits__mutmut_45": "dtype None: float32, the default dtype",
    "methods.blocks.windows.x_sliding_window_logits__mutmut_48": "dtype dropped: float32, the default dtype",
    "methods.blocks.windows.x_sliding_window_logits__mutmut_39": "device None: the CPU the images are on (GPU only)",
    "methods.blocks.windows.x_sliding_window_logits__mutmut_42": "device dropped: the CPU the images are on (GPU only)",
    "methods.blocks.windows.x_sliding_window_logits__mutmut_46": "device None: the CPU the images are on (GPU only)",
    "methods.blocks.windows.x_sliding_window_logits__mutmut_49": "device dropped: the CPU the images are on (GPU only)",
    "methods.blocks.windows.x_sliding_window_logits__mutmut_57": "range step dropped: batches of 1, same sums",
    "methods.blocks.windows.x_sliding_window_logits__mutmut_65": "torch.cat dim dropped: 0, the default",
    "methods.blocks.windows.x_sliding_window_logits__mutmut_70": ".to(None) on float32 logits: no change",
    "methods.blocks.patches.xǁPatchGridǁcoverage__mutmut_6": "device None: the CPU asked for (GPU only)",
    "methods.blocks.patches.xǁPatchGridǁcoverage__mutmut_11": "device dropped: the CPU asked for (GPU only)",
    "methods.blocks.patches.xǁLogitStitcherǁ__init____mutmut_7": "device None: the CPU asked for (GPU only)",
    "methods.blocks.patches.xǁLogitStitcherǁ__init____mutmut_8": "dtype None: float32, the default dtype",
    "pipelines.distributed.x_any_rank__mutmut_13": "ReduceOp MAX -> SUM: bool(sum of 0/1 flags) == bool(max)",
    "pipelines.distributed.x_init_distributed__mutmut_32": "torch.device(local_rank) is cuda:<local_rank> too",
    "methods.blocks.patches.x_grid_starts__mutmut_17": "n from +(-L // p): the overlap loop then finds the same n",
    "methods.blocks.patches.x_grid_starts__mutmut_19": "n from -(+L // p): the overlap loop then finds the same n",
    "methods.blocks.patches.x_crop_boxes__mutmut_4": "torch.cat dim dropped: 0, the default",
    "methods.blocks.patches.xǁLogitStitcherǁ__init____mutmut_14": "dtype dropped: float32, the default",
    "methods.blocks.patches.xǁLogitStitcherǁadd__mutmut_8": 'interpolate mode dropped: "nearest" is the default',
    "methods.blocks.patches.xǁLogitStitcherǁadd__mutmut_9": ".to(None) on float32 logits: no change",
    "methods.blocks.patches.xǁLogitStitcherǁresult__mutmut_7": "count (1, H, W) broadcasts like (1, 1, H, W)",
    "methods.blocks.patches.xǁLogitStitcherǁresult__mutmut_8": "count (1, H, W) broadcasts like (1, 1, H, W)",
    "methods.blocks.patches.xǁPatchGridǁupstream_coverage__mutmut_22": "align_corners None: False for bilinear",
    "methods.blocks.patches.xǁPatchGridǁupstream_coverage__mutmut_26": "align_corners dropped: False for bilinear",
}

# mutmut name -> why only a GPU run can tell (CUDA-only branches, or a device argument that is the CPU here); scored
# apart: `cpu score` leaves them out, `score` counts them as survivors
CUDA_ONLY = {
    "pipelines.measure.x_measure_model__mutmut_9": "CUDA branch of measure_model",
    "pipelines.measure.x_measure_model__mutmut_10": "CUDA branch of measure_model",
    "pipelines.measure.x_measure_model__mutmut_11": "CUDA branch of measure_model",
    "pipelines.measure.x_measure_model__mutmut_12": "CUDA branch of measure_model",
    "pipelines.measure.x_measure_model__mutmut_34": "CUDA branch of measure_model",
    "pipelines.measure.x_measure_model__mutmut_35": "CUDA branch of measure_model",
    "pipelines.measure.x_measure_model__mutmut_36": "CUDA branch of measure_model",
    "pipelines.measure.x_measure_model__mutmut_61": "CUDA branch of measure_model",
    "pipelines.measure.x_measure_model__mutmut_62": "CUDA branch of measure_model",
    "pipelines.measure.x_measure_model__mutmut_63": "CUDA branch of measure_model",
    "pipelines.measure.x_measure_model__mutmut_64": "CUDA branch of measure_model",
    "pipelines.measure.x_measure_model__mutmut_65": "CUDA branch of measure_model",
    "pipelines.measure.x_measure_model__mutmut_66": "CUDA branch of measure_model",
    "pipelines.measure.x_measure_model__mutmut_67": "CUDA branch of measure_model",
    "pipelines.measure.x_measure_model__mutmut_68": "CUDA branch of measure_model",
    "pipelines.measure.x_measure_model__mutmut_69": "CUDA branch of measure_model",
    "pipelines.distributed.x_any_rank__mutmut_5": "device None: the CPU anyway here",
    "pipelines.distributed.x_any_rank__mutmut_7": "device dropped: the CPU anyway here",
    "pipelines.distributed.x_all_reduce_mean__mutmut_5": "device None: the CPU anyway here",
    "pipelines.distributed.x_all_reduce_mean__mutmut_8": "device dropped: the CPU anyway here",
    "methods.blocks.patches.xǁLogitStitcherǁ__init____mutmut_13": "device dropped: the CPU anyway here",
    "methods.blocks.patches.xǁLogitStitcherǁresult__mutmut_6": "device None: the CPU anyway here",
    "methods.blocks.patches.xǁLogitStitcherǁresult__mutmut_11": "device dropped: the CPU anyway here",
    "methods.blocks.patches.xǁPatchGridǁupstream_coverage__mutmut_6": "device None: the CPU anyway here",
    "methods.blocks.patches.xǁPatchGridǁupstream_coverage__mutmut_11": "device dropped: the CPU anyway here",
}


def results() -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    status = {}
    for line in out.splitlines():
        name, _, value = line.strip().partition(": ")
        if value:
            status[name] = value
    return status


def report(targets: list[str]) -> int:
    status = results()
    worst = 100.0
    for target in targets:
        names = sorted(n for n in status if any(fnmatch.fnmatchcase(n, p) for p in TARGETS[target]))
        counts: dict[str, int] = {}
        for name in names:
            counts[status[name]] = counts.get(status[name], 0) + 1
        equivalent = [n for n in names if n in EQUIVALENT]
        caught = ("killed", "timeout")  # a mutant that hangs the tests is caught too
        killed = sum(status[n] in caught for n in names)
        gpu_only = [n for n in names if n in CUDA_ONLY and status[n] not in caught]
        scored = len(names) - len(equivalent)
        score = 100.0 * killed / scored if scored else float("nan")
        cpu_score = 100.0 * killed / (scored - len(gpu_only)) if scored - len(gpu_only) else float("nan")
        worst = min(worst, cpu_score)
        print(f"{target}: {killed} caught of {len(names)} mutants ({len(equivalent)} equivalent, {len(gpu_only)} "
              f"GPU-only), score {score:.1f}%, CPU score {cpu_score:.1f}%; "
              + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()) if k not in caught))
        for name in names:
            if status[name] not in caught:
                note = (f"  [equivalent: {EQUIVALENT[name]}]" if name in EQUIVALENT else
                        f"  [GPU only: {CUDA_ONLY[name]}]" if name in CUDA_ONLY else "")
                print(f"    {status[name]:>10}  {name}{note}")
    missing = [n for n in (*EQUIVALENT, *CUDA_ONLY) if n not in status]
    if missing:
        print("equivalent mutants no longer generated (code changed; review EQUIVALENT):", ", ".join(missing))
    return 0 if worst >= 90.0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help=f"any of {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--report", action="store_true", help="summarise the last run only")
    args = parser.parse_args()
    targets = args.targets or list(TARGETS)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    if not args.report:
        patterns = [p for t in targets for p in TARGETS[t]]
        subprocess.run([sys.executable, "-m", "mutmut", "run", *patterns], cwd=REPO, check=False)
    return report(targets)


if __name__ == "__main__":
    sys.exit(main())
