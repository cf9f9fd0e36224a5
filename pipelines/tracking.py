"""MLflow setup and run provenance (git commit, versions, device).

The tracking URI is always absolute: `MLFLOW_TRACKING_URI` if set, else an sqlite file at the
repository root. A relative URI would silently create a second database whenever a stage runs from
another directory (DVC queued experiments run in .dvc/tmp/exps), see docs/specs/protocol.md §6.5.

What a user browsing `mlflow ui` relies on, all set here so every stage gets it:
- experiments are tagged `mlflow.experimentKind = custom_model_development` (also ones made before) and carry a note;
  MLflow 3.17's UI still opens in its GenAI mode unless the link selects model training (`ui_url`);
- runs are named `<method> · <stage> · <dataset>[ · variant][ · phase p]` and described in one line
  (`mlflow.note.content`: stage, method, dataset and split, variant, profile, device);
- `Run.dataset` logs the prepared split a run read as an MLflow dataset input (metadata and a digest, no pixels);
- Ctrl-C and SIGTERM end a run as KILLED (never left RUNNING), other errors as FAILED;
- readers never create a store: `finished_runs` on a missing sqlite file is "no runs", and MLflow's and alembic's
  INFO lines (table creation, migrations) are silenced for our commands.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from pipelines.discovery import cpu_model, git_commit, tracking_uri  # torch-free: `bench.py env --no-torch`

EXPERIMENT_PREFIX = "uhrbench"
# MLflow 3's experiment kind (values in its UI bundle: genai_development, custom_model_development, ...). The 3.17 UI
# chooses GenAI or model-training views from a per-browser switch instead (see ui_url); the tag records the kind for
# UIs and clients that read it and for the UI's kind selector
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # the description the UI shows for an experiment or a run
STAGE_TEXT = {"train": "Training", "evaluate": "Evaluation", "measure": "Speed and memory measurement",
              "sweep": "Runtime-knob sweep"}
QUIET_LOGGERS = ("mlflow", "alembic")  # their INFO lines (table creation, migrations) are noise in our CLI

OFFICIAL_VARIANT = "official"  # the variant of an evaluation of an upstream release's weights (evaluate --weights)
DATA_DIGEST_TAG = "dataset_digest"  # the prepared split's fingerprint (dataset_digest), on runs that read one


def experiment_name(dataset: str) -> str:
    return f"{EXPERIMENT_PREFIX}-{dataset}"


def artifact_location(name: str) -> str | None:
    """Artifacts of an sqlite store live next to the database file (not in the current directory,
    MLflow's default); a server decides for itself."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).parent / "mlruns" / name).resolve().as_uri()


def sqlite_file(uri: str | None = None) -> Path | None:
    """The database file of an sqlite tracking URI (None for a server or an in-memory store)."""
    uri = uri or tracking_uri()
    if not uri.startswith("sqlite:///") or uri[len("sqlite:///"):] in ("", ":memory:"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def store_exists() -> bool:
    """False only for an sqlite store whose file is not there yet: reading it would create it (and print
    MLflow's table-creation lines), so readers answer "no runs yet" instead."""
    path = sqlite_file()
    return path is None or path.is_file()


def quiet_logging() -> None:
    """MLflow and alembic log table creation and migrations at INFO; our commands show warnings only."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _mlflow():
    import mlflow  # slow import; only commands that track pay for it

    quiet_logging()
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


UI_MODEL_TRAINING = "workflowType=machine_learning"  # MLflow 3.17's UI: open in "Model training" mode (runs table)


def ui_url(dataset: str | None = None, base: str = "http://127.0.0.1:5000") -> str:
    """A link into `mlflow ui` that opens on the runs table. MLflow 3.17's UI picks GenAI or model-training views from
    a per-browser switch (default GenAI: traces and token usage), not from the experiment's kind tag; the
    `workflowType` query parameter selects model training for that page and the pages reached from it. Reads the
    store only when it exists (it is never created here)."""
    target = "experiments"
    if dataset is not None and store_exists():
        experiment = _mlflow().get_experiment_by_name(experiment_name(dataset))
        if experiment is not None:
            target = f"experiments/{experiment.experiment_id}"
    return f"{base.rstrip('/')}/#/{target}?{UI_MODEL_TRAINING}"


def experiment_note(dataset: str) -> str:
    return (f"uhrbench on the {dataset} dataset: one run per method and stage (train, evaluate, measure, sweep), "
            f"each named method · stage · dataset. `python bench.py compare --dataset {dataset}` tabulates the "
            "latest evaluation and measurement of each method.")


def ensure_experiment(dataset: str) -> str:
    """Create the dataset's experiment once (artifacts next to the default database), tagged as model development
    with a note saying what it holds; an experiment made before these tags existed gets them too."""
    mlflow = _mlflow()
    name = experiment_name(dataset)
    tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, NOTE_TAG: experiment_note(dataset)}
    for attempt in range(5):  # first creation of the sqlite schema can race with another process
        try:
            experiment = mlflow.get_experiment_by_name(name)
            if experiment is None:
                return mlflow.create_experiment(name, artifact_location=artifact_location(name), tags=tags)
            client = mlflow.MlflowClient()
            for key, value in tags.items():
                if key not in experiment.tags:  # never overwrite a note or a kind someone set in the UI
                    client.set_experiment_tag(experiment.experiment_id, key, value)
            return experiment.experiment_id
        except Exception:  # noqa: BLE001 - retried, then re-raised
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def default_run_name(method: str, stage: str, dataset: str, variant: str | None = None,
                     phase: str | None = None) -> str:
    """What the runs table lists: `<method> · <stage> · <dataset>[ · variant][ · phase]`."""
    from methods import display_name

    parts = [display_name(method), stage, dataset]
    if variant and variant != "default":
        parts.append(variant)
    if phase:
        parts.append(f"phase {phase}")
    return " · ".join(parts)


def run_description(method: str, stage: str, dataset: str, profile: str, tags: dict) -> str:
    """One line saying what a run is: stage, method, dataset (split), variant, phase, profile and device."""
    from methods import display_name

    where = dataset + (f" ({tags['split']} split)" if tags.get("split") else "")
    text = f"{STAGE_TEXT.get(stage, stage.capitalize())} of {display_name(method)} on {where}"
    extras = [f"{key} {tags[key]}" for key in ("variant", "phase", "knob")
              if tags.get(key) not in (None, "", "default")]
    extras.append(f"profile {profile}")
    device = tags.get("env.device")
    if device:
        name = tags.get("env.device_name")
        extras.append(f"device {device}" + (f" ({name})" if name and name != device else ""))
    return f"{text}: " + ", ".join(extras) + "."


def dataset_digest(root: Path, split: str) -> str:
    """A fingerprint of one split of a prepared dataset without reading its pixels: meta.json, the split's ids
    and the size of each of its image and label files (a re-prepared or edited dataset gets another digest)."""
    from datasets.base import read_split

    digest = hashlib.sha256((root / "meta.json").read_bytes())
    for image_id in read_split(root, split):
        digest.update(image_id.encode() + b"\0")
        for folder in ("images", "labels"):
            path = root / folder / f"{image_id}.png"
            digest.update(str(path.stat().st_size if path.is_file() else -1).encode() + b"\0")
    return digest.hexdigest()[:8]


def prepared_dataset(root: Path, dataset: str, split: str):
    """The prepared split as an MLflow dataset (metadata only: source path, digest, image count), for log_input."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    from datasets.base import read_split

    root = Path(root).resolve()
    with warnings.catch_warnings():  # MLflow finds two equivalent local-path sources and warns about the choice
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(root))
    profile = {"dataset": dataset, "split": split, "images": len(read_split(root, split)), "path": str(root)}
    return _profiled_meta_dataset_class()(source, name=f"{dataset}-{split}", digest=dataset_digest(root, split),
                                          profile=profile)


def _profiled_meta_dataset_class():
    from mlflow.data.meta_dataset import MetaDataset

    class ProfiledMetaDataset(MetaDataset):
        """MetaDataset with a profile (image count, split), which the UI shows beside the dataset."""

        def __init__(self, source, name: str, digest: str, profile: dict) -> None:
            self._profile = profile
            super().__init__(source, name=name, digest=digest)

        @property
        def profile(self) -> dict:
            return self._profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self._profile)}

    return ProfiledMetaDataset


class Run:
    """The one way stages write to MLflow: an active run's params, metrics, tags and artifacts."""

    def __init__(self, run, describe=None, facts: dict | None = None) -> None:
        self.id = run.info.run_id
        self._describe, self._facts = describe, dict(facts or {})

    def params(self, values: dict) -> None:
        _mlflow().log_params(values)

    def metrics(self, values: dict, step: int | None = None) -> None:
        _mlflow().log_metrics(values, step=step)

    def tags(self, values: dict) -> None:
        _mlflow().set_tags(values)
        # the description names the device as soon as the stage records it (every stage logs env.* tags)
        if self._describe is not None and {"env.device", "env.device_name"} & set(values):
            self._facts.update(values)
            _mlflow().set_tag(NOTE_TAG, self._describe(self._facts))

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        _mlflow().log_artifact(str(path), folder)

    def artifacts(self, directory: str | Path, folder: str | None = None) -> None:
        _mlflow().log_artifacts(str(directory), folder)

    def json(self, data: dict, name: str) -> None:
        _mlflow().log_dict(data, name)

    def figure(self, figure, name: str) -> None:
        """A matplotlib figure as an image artifact (the UI previews it on the run's page)."""
        _mlflow().log_figure(figure, name)

    def dataset(self, root: Path, dataset: str, split: str, context: str) -> None:
        """Record the prepared split this run read ("training", "evaluation"): the run page's dataset column, and
        its digest as a tag, so tables can say which data each number came from."""
        data = prepared_dataset(root, dataset, split)
        _mlflow().log_input(data, context=context)
        _mlflow().set_tag(DATA_DIGEST_TAG, data.digest)


def finished_runs(dataset: str, stage: str):
    """Every finished run of one stage on a dataset, newest first (a pandas frame; empty without any), with a
    `variant` column ("default" where the run has no variant tag). A store that does not exist yet has no runs:
    it is not created by reading it."""
    import pandas as pd

    if not store_exists():
        return pd.DataFrame()
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
        # `<method>@seed<N>` runs (benchmark.extra_seeds) are the same method trained with another seed: tables
        # group them under the method; `seed` is -1 for the run with params.yaml's own seed
        from methods.base import split_seed

        split = runs["tags.method"].map(split_seed)
        runs["run_name"] = runs["tags.method"]
        runs["tags.method"] = split.map(lambda pair: pair[0])
        runs["seed"] = split.map(lambda pair: -1 if pair[1] is None else pair[1])
    return runs


def download_artifact(run_id: str, suffix: str, destination: Path) -> Path | None:
    """The run's top-level artifact whose name ends with `suffix`, copied into `destination` (a folder); None when
    the run has none."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per small file is noise
    mlflow = _mlflow()
    names = [a.path for a in mlflow.MlflowClient().list_artifacts(run_id) if a.path.endswith(suffix)]
    if not names:
        return None
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=names[0], dst_path=str(destination)))


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every logged value of one metric of a run, by step (training curves)."""
    history = _mlflow().MlflowClient().get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)


class Terminated(KeyboardInterrupt):
    """SIGTERM reached a tracked stage: it stops like Ctrl-C, so its MLflow run ends as KILLED, not RUNNING forever."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into `Terminated` while a run is open, unless the process already handles SIGTERM itself
    (training stops at the end of a step) or this is not the main thread (only it can take signals)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        raise Terminated("SIGTERM")

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def tracked_run(dataset: str, method: str, stage: str, profile: str, params_hash: str = "",
                nested: bool = False, run_name: str | None = None, tags: dict | None = None,
                run_id: str | None = None, device: str | None = None,
                log_system_metrics: bool = False) -> Iterator[Run]:
    """A `Run` tagged method/dataset/stage/profile/git commit/params hash, named `<method> · <stage> · <dataset>`
    (+ variant, phase) and described in one line; `run_id` reopens an existing run (a resumed training).
    `log_system_metrics`: MLflow samples CPU, memory and GPU use into `system/*` metrics (training runs).
    Ctrl-C and SIGTERM end the run as KILLED, any other exception as FAILED."""
    mlflow = _mlflow()
    experiment_id = ensure_experiment(dataset)
    from methods import display_name

    all_tags = {"method": method, "method_label": display_name(method), "dataset": dataset, "stage": stage,
                "profile": profile,
                "git_commit": git_commit(), "params_hash": params_hash,
                "dvc_stage": os.environ.get("DVC_STAGE", "")}
    all_tags.update(tags or {})
    if device:
        all_tags.setdefault("env.device", device)

    def describe(facts: dict) -> str:
        return run_description(method, stage, dataset, profile, facts)

    if run_id is not None and not _exists(mlflow, run_id):
        print(f"MLflow run {run_id} of the interrupted training is not in {tracking_uri()} (store deleted or "
              "replaced); the training resumes in a new run, tagged lost_run_id", file=sys.stderr)
        all_tags["lost_run_id"], run_id = run_id, None
    if run_id is not None:
        run = mlflow.start_run(run_id=run_id, nested=nested, log_system_metrics=log_system_metrics or None)
    else:
        name = run_name or default_run_name(method, stage, dataset, all_tags.get("variant"), all_tags.get("phase"))
        run = mlflow.start_run(experiment_id=experiment_id, run_name=name, nested=nested, tags=all_tags,
                               description=describe(all_tags), log_system_metrics=log_system_metrics or None)
    try:
        with _sigterm_as_interrupt():
            yield Run(run, describe, all_tags)
    except KeyboardInterrupt:  # Ctrl-C, or a SIGTERM turned into a stop: not a failure
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
