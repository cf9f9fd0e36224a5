"""MLflow setup and run provenance (git commit, versions, device).

The tracking URI is always absolute: `MLFLOW_TRACKING_URI` if set, else an sqlite file at the
repository root. A relative URI would silently create a second database whenever a stage runs from
another directory (DVC queued experiments run in .dvc/tmp/exps), see specs/protocol.md §6.5.
"""
from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipelines.config import REPO_ROOT

EXPERIMENT_PREFIX = "uhrbench"


def tracking_uri(root: Path = REPO_ROOT) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def experiment_name(dataset: str) -> str:
    return f"{EXPERIMENT_PREFIX}-{dataset}"


def artifact_location(name: str) -> str | None:
    """Artifacts of an sqlite store live next to the database file (not in the current directory,
    MLflow's default); a server decides for itself."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).parent / "mlruns" / name).resolve().as_uri()


def _mlflow():
    import mlflow  # slow import; only commands that track pay for it

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def ensure_experiment(dataset: str) -> str:
    """Create the dataset's experiment once (artifacts next to the default database)."""
    mlflow = _mlflow()
    name = experiment_name(dataset)
    for attempt in range(5):  # first creation of the sqlite schema can race with another process
        try:
            experiment = mlflow.get_experiment_by_name(name)
            if experiment is not None:
                return experiment.experiment_id
            return mlflow.create_experiment(name, artifact_location=artifact_location(name))
        except Exception:  # noqa: BLE001 - retried, then re-raised
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


class Run:
    """The one way stages write to MLflow: an active run's params, metrics, tags and artifacts."""

    def __init__(self, run) -> None:
        self.id = run.info.run_id

    def params(self, values: dict) -> None:
        _mlflow().log_params(values)

    def metrics(self, values: dict, step: int | None = None) -> None:
        _mlflow().log_metrics(values, step=step)

    def tags(self, values: dict) -> None:
        _mlflow().set_tags(values)

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        _mlflow().log_artifact(str(path), folder)

    def artifacts(self, directory: str | Path, folder: str | None = None) -> None:
        _mlflow().log_artifacts(str(directory), folder)

    def json(self, data: dict, name: str) -> None:
        _mlflow().log_dict(data, name)


def finished_runs(dataset: str, stage: str):
    """Every finished run of one stage on a dataset, newest first (a pandas frame; empty without any), with a
    `variant` column ("default" where the run has no variant tag)."""
    import pandas as pd

    mlflow = _mlflow()
    experiment = mlflow.get_experiment_by_name(experiment_name(dataset))
    if experiment is None:
        return pd.DataFrame()
    runs = mlflow.search_runs(
        experiment_ids=[experiment.experiment_id],
        filter_string=f"tags.stage = '{stage}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], output_format="pandas")
    if not runs.empty:
        variant = runs["tags.variant"] if "tags.variant" in runs else pd.Series(index=runs.index, dtype=object)
        runs["variant"] = variant.fillna("default")
    return runs


@contextlib.contextmanager
def tracked_run(dataset: str, method: str, stage: str, profile: str, params_hash: str = "",
                nested: bool = False, run_name: str | None = None, tags: dict | None = None,
                run_id: str | None = None):
    """A `Run` tagged method/dataset/stage/profile/git commit/params hash; `run_id` reopens an existing run (a
    resumed training)."""
    mlflow = _mlflow()
    experiment_id = ensure_experiment(dataset)
    from methods import display_name

    all_tags = {"method": method, "method_label": display_name(method), "dataset": dataset, "stage": stage,
                "profile": profile,
                "git_commit": git_commit(), "params_hash": params_hash,
                "dvc_stage": os.environ.get("DVC_STAGE", "")}
    all_tags.update(tags or {})
    if run_id is not None and not _exists(mlflow, run_id):
        print(f"MLflow run {run_id} of the interrupted training is not in {tracking_uri()} (store deleted or "
              "replaced); the training resumes in a new run, tagged lost_run_id", file=sys.stderr)
        all_tags["lost_run_id"], run_id = run_id, None
    if run_id is not None:
        run = mlflow.start_run(run_id=run_id, nested=nested)
    else:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name or f"{display_name(method)}-{stage}",
                               nested=nested, tags=all_tags)
    try:
        yield Run(run)
    except KeyboardInterrupt:  # Ctrl-C, or a SIGTERM the trainer turned into a stop: not a failure
        mlflow.end_run(status="KILLED")
        raise
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run(status="FINISHED")


def _exists(mlflow, run_id: str) -> bool:
    try:
        mlflow.get_run(run_id)
        return True
    except Exception:  # noqa: BLE001 - MlflowException RESOURCE_DOES_NOT_EXIST (or a store without it)
        return False


def git_commit(root: Path = REPO_ROOT) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
        commit = out.stdout.strip()
        if out.returncode != 0 or not commit:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from pipelines.config import ConfigError

        raise ConfigError(f"device '{name}' asked for but CUDA is not available; use device: auto or cpu")
    return torch.device(name)


def environment_info(device: torch.device | None = None) -> dict[str, str]:
    """Where and with what a result was produced."""
    import timm

    device = device or resolve_device()
    info = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda_compiled": torch.version.cuda or "none",
        "cuda_available": str(torch.cuda.is_available()),
        "cudnn": str(torch.backends.cudnn.version()) if torch.cuda.is_available() else "unavailable",
        "git_commit": git_commit(),
        "platform": platform.platform(),
    }
    try:
        import pynvml

        pynvml.nvmlInit()
        info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML library or no GPU: say so, do not guess
        info["driver"] = "unavailable"
    return info
