#!/usr/bin/env python
"""uhrbench command line: argument parsing, then one call into pipelines/."""
from __future__ import annotations

import functools
import os
import sys

import click

PARAMS_HELP = "parameter file (default: params.yaml at the repository root)"
SET_HELP = "override a parameter, e.g. --set profile=paper or --set local.window=256 (repeatable)"


def one_line_errors(func):
    """Problems a user can cause become one line naming the file and the fix (exit code 1; 130 after a stop);
    anything else is one line pointing at the full traceback in a log file (`--debug` raises it instead)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except user_errors() as exc:  # an `except` clause is evaluated only once an exception is raised
            raise click.ClickException(str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__) from None
        except KeyboardInterrupt as exc:
            click.echo(f"Stopped: {exc}" if str(exc) else "Stopped.", err=True)
            sys.exit(130)
        except BrokenPipeError:  # the reader went away (`bench.py list | head -1`): stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python docs: no error at exit flush
            sys.exit(0)
        except OSError as exc:
            raise click.ClickException(os_error_line(exc)) from None
        except Exception as exc:
            if (click.get_current_context().find_root().obj or {}).get("debug"):
                raise
            log = write_traceback()
            text = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise click.ClickException(f"internal error ({exc.__class__.__name__}: {text}); the full traceback is "
                                       f"in {log}, or run again with `bench.py --debug ...`") from None

    return wrapper


# (module, class) of the errors a user can cause; tests/test_cli_fast.py checks each still names the class.
USER_ERRORS = (("pipelines.schema", "ConfigError"), ("datasets.base", "DatasetError"), ("methods.base", "MethodError"),
               ("pipelines.train", "TrainingError"), ("pipelines.checkpoints", "CheckpointError"),
               ("pipelines.launch", "LaunchError"))


def user_errors() -> tuple[type[Exception], ...]:
    """The user-error classes whose modules are imported. An exception of a class never imported cannot have been
    raised, so the torch-free commands (`list`, `env --no-torch`) need not import torch to be wrapped."""
    return tuple(getattr(sys.modules[module], name) for module, name in USER_ERRORS if module in sys.modules)


def os_error_line(exc: OSError) -> str:
    """A file-system error as one line: what happened to which file, and what to do."""
    import errno

    name = exc.filename or "a file"
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device while writing {name}; free disk space and run again"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{exc.strerror}: {name}; make it writable (or readable), or point the setting that names it elsewhere"
    if exc.errno == errno.ENOENT:
        return f"{name} does not exist; check the path"
    return f"{exc.strerror or exc.__class__.__name__}: {name}"


def write_traceback() -> str:
    """The current exception's traceback in logs/bench-<time>.log (a temporary file if logs/ is not writable)."""
    import tempfile
    import time
    import traceback
    from pathlib import Path

    text = f"$ {' '.join(sys.argv)}\n{traceback.format_exc()}"
    try:
        folder = Path(__file__).resolve().parent / "logs"
        folder.mkdir(exist_ok=True)
        path = folder / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.log"
        path.write_text(text)
    except OSError:
        with tempfile.NamedTemporaryFile("w", prefix="uhrbench-", suffix=".log", delete=False) as handle:
            handle.write(text)
            path = handle.name
    return str(path)


def _torchrun(nproc: int) -> int:
    """Re-run this very command under PyTorch's launcher with `nproc` processes."""
    import subprocess

    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            argv.append(arg)
    # one node unless a rendezvous is given (bench.py launch --nodes M sets torchrun's PET_RDZV_* variables)
    standalone = [] if os.environ.get("PET_RDZV_ENDPOINT") else ["--standalone"]
    return subprocess.call([sys.executable, "-m", "torch.distributed.run", *standalone,
                            f"--nproc_per_node={nproc}", sys.argv[0], *argv])


def _config(params: str | None, overrides: tuple[str, ...] = ()):
    from pipelines.config import load_config

    return load_config(params, list(overrides))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="show the full traceback of an unexpected error")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """uhrbench: one reproducible harness for ultra-high-resolution semantic segmentation.

    Typical use: `dvc repro` runs everything; these commands run single stages.
    """
    ctx.obj = {"debug": debug}


@cli.command("list")
@one_line_errors
def list_cmd() -> None:
    """Registered methods and datasets (read from their modules' source: no torch, about a second)."""
    from pipelines.discovery import CatalogError, dataset_catalog, method_catalog

    try:
        methods = {name: entry.description for name, entry in method_catalog().items()}
        datasets = dataset_catalog()
    except CatalogError:  # a registration not written literally: ask the imported registries (slow, same answer)
        from datasets import list_datasets
        from methods import list_methods

        methods, datasets = list_methods(), list_datasets()
    click.echo("methods:")
    for name, text in methods.items():
        click.echo(f"  {name:<10} {text}")
    click.echo("datasets:")
    for name, text in datasets.items():
        click.echo(f"  {name:<10} {text}")


@cli.command()
@click.option("--device", default="auto", show_default=True)
@click.option("--no-torch", is_flag=True,
              help="skip everything that needs torch (device, CUDA, cuDNN, driver): versions from package metadata, "
                   "git commit and MLflow URI in about a second")
@one_line_errors
def env(device: str, no_torch: bool) -> None:
    """Device, library versions and git commit, as recorded with every result.

    Importing torch takes seconds (tens on a loaded machine); `--no-torch` answers without it."""
    if no_torch:
        if device != "auto":
            from pipelines.schema import ConfigError  # the error `resolve_device` raises; one line, as it does

            raise ConfigError(f"--device {device} needs torch; drop --no-torch to check the device")
        from pipelines.discovery import environment_info

        info = environment_info()
    else:
        from pipelines.tracking import environment_info, resolve_device, tracking_uri

        info = {**environment_info(resolve_device(device)), "mlflow_tracking_uri": tracking_uri()}
    for key, value in info.items():
        click.echo(f"{key:<20} {value}")


@cli.command()
@click.option("--dataset", required=True)
@click.option("--source", default=None, help="local archive or folder; nothing is downloaded")
@click.option("--force", is_flag=True, help="overwrite an existing prepared dataset")
@click.option("--allow-incomplete", is_flag=True, help="prepare what is present and list what is missing")
@click.option("--params", default=None, help=PARAMS_HELP)
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@one_line_errors
def prepare(dataset: str, source: str | None, force: bool, allow_incomplete: bool, params: str | None,
            overrides: tuple[str, ...]) -> None:
    """Obtain, verify and convert a dataset into the prepared layout."""
    from pipelines.prepare import prepare as run

    summary = run(_config(params, overrides), dataset, source, force=force, allow_incomplete=allow_incomplete)
    click.echo(f"prepared {dataset}: {summary.get('images', '?')} images in {summary.get('path', '')}")


@cli.command()
@click.option("--dataset", required=True)
@click.option("--method", required=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="processes on this node: N > 1 relaunches this command under torchrun (DDP)")
@click.option("--params", default=None, help=PARAMS_HELP)
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@one_line_errors
def train(dataset: str, method: str, device: str, nproc: int, params: str | None, overrides: tuple[str, ...]) -> None:
    """Train a method on a dataset with its recipe for the current profile.

    Multi-node: `bench.py launch --nodes M`, or set torchrun's PET_NNODES / PET_RDZV_* variables on every node."""
    if (nproc > 1 or os.environ.get("PET_RDZV_ENDPOINT")) and "RANK" not in os.environ:
        sys.exit(_torchrun(nproc))
    from pipelines.train import train as run

    path = run(_config(params, overrides), dataset, method, device)
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"checkpoint: {path}")


@cli.command()
@click.option("--dataset", required=True)
@click.option("--method", required=True)
@click.option("--split", default=None, help="default: evaluate.split in params.yaml")
@click.option("--device", default="auto", show_default=True)
@click.option("--official", "--weights", "official", default=None, metavar="PATH",
              help="score a checkpoint in the official code's layout (an upstream release) instead of ours; the model "
                   "is built with the method's configuration for this dataset (variant 'official')")
@click.option("--params", default=None, help=PARAMS_HELP)
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@one_line_errors
def evaluate(dataset: str, method: str, split: str | None, device: str, official: str | None, params: str | None,
             overrides: tuple[str, ...]) -> None:
    """Score a trained method on a split (mIoU, per-class IoU, pixel accuracy)."""
    from methods import resolve_method_name
    from pipelines.evaluate import evaluate as run

    config = _config(params, overrides)
    name = resolve_method_name(method)
    result = run(config, dataset, name, split, device, config.model_overrides(name), official=official)
    if result:  # under torchrun only rank 0 has the scores
        click.echo(f"{name} on {dataset}/{result['split']}: mIoU {100 * result['miou']:.2f} "
                   f"(pixel accuracy {100 * result['pixel_accuracy']:.2f})")


@cli.command()
@click.option("--dataset", required=True)
@click.option("--format", "fmt", type=click.Choice(["terminal", "md", "csv", "latex"]), default="terminal",
              show_default=True)
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="write the table to this file")
@click.option("--run-id", "run_ids", multiple=True, help="use these evaluation runs instead of the latest")
@click.option("--all", "all_runs", is_flag=True, help="every finished evaluation, not only the latest per method")
@click.option("--per-class", is_flag=True, help="add every class's IoU and every measured column (wide)")
@one_line_errors
def compare(dataset: str, fmt: str, output: str | None, run_ids: tuple[str, ...], all_runs: bool,
            per_class: bool) -> None:
    """Comparison table of the methods evaluated on a dataset, from MLflow."""
    from datasets import get_dataset
    from pipelines.report import comparison_table, format_table

    get_dataset(dataset)
    text = format_table(comparison_table(dataset, list(run_ids), all_runs, per_class=per_class), fmt)
    if output:
        with open(output, "w") as handle:
            handle.write(text)
        click.echo(f"wrote {output}")
    else:
        click.echo(text, nl=False)


@cli.command()
@click.option("--dataset", required=True)
@click.option("--method", required=True)
@click.option("--scale", type=float, default=None, help="input scale of the native size (1.0; 0.8 = upstream fps_test)")
@click.option("--amp", type=click.Choice(["fp16", "bf16"]), default=None, help="autocast precision (default fp32)")
@click.option("--channels-last", is_flag=True, default=None, help="NHWC model and input")
@click.option("--dummy", is_flag=True, default=None, help="random tensor instead of real test-split images")
@click.option("--untrained", is_flag=True, help="build from params even when a trained checkpoint exists")
@click.option("--sweep", default=None, help="comma-separated square sizes (e.g. 1024,2048,4096); "
              "'default' = measure.sweep in params.yaml")
@click.option("--device", default=None, help="default: measure.device in params.yaml (auto)")
@click.option("--params", default=None, help=PARAMS_HELP)
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@one_line_errors
def measure(dataset: str, method: str, scale: float | None, amp: str | None, channels_last: bool | None,
            dummy: bool | None, untrained: bool, sweep: str | None, device: str | None, params: str | None,
            overrides: tuple[str, ...]) -> None:
    """Latency (median/p90, FPS), memory (NVML, torch, RSS), parameters and MACs of one method."""
    from methods import resolve_method_name
    from pipelines.measure import format_summary, parse_sizes
    from pipelines.measure import measure as run

    config = _config(params, overrides)
    name = resolve_method_name(method)
    result = run(config, dataset, name, device, scale, amp, channels_last or None, dummy or None, untrained,
                 parse_sizes(sweep, config), config.model_overrides(name))
    click.echo(format_summary(result))


@cli.command()
@click.option("--dataset", required=True)
@click.option("--method", required=True, help="a method that declares ablation rows (see `bench.py list`)")
@click.option("--row", "rows", multiple=True, help="train/evaluate only this configuration (repeatable); "
              "the table still lists every row with a finished checkpoint")
@click.option("--train-only", is_flag=True, help="train the configurations, write no table")
@click.option("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2: each row once per seed, the table "
              "gives mean and std (default: params' seed)")
@click.option("--measure/--no-measure", "measure_speed", default=None,
              help="also measure each row's FPS and memory (default: when a published table of the method has them)")
@click.option("--device", default="auto", show_default=True)
@click.option("--params", default=None, help=PARAMS_HELP)
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@one_line_errors
def ablation(dataset: str, method: str, rows: tuple[str, ...], train_only: bool, seeds: str | None,
             measure_speed: bool | None, device: str, params: str | None, overrides: tuple[str, ...]) -> None:
    """Train and evaluate the ablation rows a method declares; write its ablation tables to results/ablations/."""
    from pipelines.ablation import ablation as run
    from pipelines.ablation import parse_seeds

    seed_list = parse_seeds(seeds) if seeds else None
    for path in run(_config(params, overrides), dataset, method, device, list(rows) or None, train_only, seed_list,
                    measure_speed):
        click.echo(f"wrote {path}")


@cli.command()
@click.option("--dataset", required=True)
@click.option("--method", required=True)
@click.option("--knob", default=None, help="which declared runtime knob (default: the method's first)")
@click.option("--values", default=None, help="comma-separated values (default: the knob's declared sweep)")
@click.option("--device", default="auto", show_default=True)
@click.option("--params", default=None, help=PARAMS_HELP)
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@one_line_errors
def sweep(dataset: str, method: str, knob: str | None, values: str | None, device: str, params: str | None,
          overrides: tuple[str, ...]) -> None:
    """Evaluate and measure a trained method as a runtime knob varies (RUE's K): accuracy vs FPS."""
    from methods import resolve_method_name
    from pipelines.sweep import choose_knob, parse_values
    from pipelines.sweep import sweep as run

    config = _config(params, overrides)
    name = resolve_method_name(method)
    chosen = choose_knob(name, knob)
    table = run(config, dataset, name, parse_values(values, chosen), device, chosen.name)
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))


@cli.command("config")
@click.option("--dataset", required=True)
@click.option("--method", required=True)
@click.option("--params", default=None, help=PARAMS_HELP)
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@one_line_errors
def config_cmd(dataset: str, method: str, params: str | None, overrides: tuple[str, ...]) -> None:
    """Print the fully resolved configuration each stage will use for a method on a dataset (defaults included)."""
    from pipelines.checkpoints import describe

    click.echo(describe(_config(params, overrides), dataset, method), nl=False)


@cli.command()
@click.option("--all", "all_datasets", is_flag=True,
              help="also the tables of datasets we have no run of (published numbers only)")
@click.option("--params", default=None, help=PARAMS_HELP)
@one_line_errors
def tables(all_datasets: bool, params: str | None) -> None:
    """The papers' tables (ISDNet 1-7, UHRNet II-III) and the literature tables, ours beside, in results/tables/."""
    from pipelines.report import tables as run

    skipped: list[str] = []
    for path in run(_config(params), all_datasets, skipped):
        click.echo(f"wrote {path}")
    for line in skipped:
        click.echo(line)


@cli.command()
@click.option("--params", default=None, help=PARAMS_HELP)
@one_line_errors
def report(params: str | None) -> None:
    """Comparison tables, published tables (`tables`), plots and results/README.md; prints the comparison."""
    from pipelines.report import report as run
    from pipelines.report import summary_text

    config = _config(params)
    written = run(config)
    click.echo(f"wrote {len(written)} files under {config.results_root} (index: "
               f"{config.results_root / 'README.md'})\n")
    click.echo(summary_text(config))


@cli.command()
@click.option("--executor", default="slurm", show_default=True, help="slurm: one SLURM job per stage; local: one "
              "process per stage on this machine, started when its upstream stages are done")
@click.option("--partition", default=None, help="SLURM partition (default: the cluster's)")
@click.option("--gpus-per-job", type=click.IntRange(min=1), default=None,
              help="GPUs of a training job (default and required: train.nproc_per_node); evaluation and measurement "
                   "jobs get 1, data and report jobs none")
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True, help="nodes per training job")
@click.option("--slurm", "slurm", multiple=True, metavar="KEY=VALUE", help="another sbatch option for every job, as "
              "sbatch spells it (repeatable): account=P, qos=Q, constraint=C, cpus-per-task=N, mem=64G")
@click.option("--jobs", "jobs_at_once", type=click.IntRange(min=1), default=None, help="local executor: jobs at once "
              "(default: one per GPU of this machine, one without GPUs); a measurement always runs alone")
@click.option("--time", "timeout_min", type=click.IntRange(min=1), default=24 * 60, show_default=True,
              help="time limit of each job in minutes (an interrupted training resumes on the next launch)")
@click.option("--wait/--no-wait", default=None, help="wait for the jobs and take their outputs in (default: local "
              "waits, slurm returns after submitting)")
@click.option("--status", "show_status", is_flag=True, help="list every stage's job, state and log; submit nothing")
@one_line_errors
def launch(executor: str, partition: str | None, gpus_per_job: int | None, nodes: int, slurm: tuple[str, ...],
           jobs_at_once: int | None, timeout_min: int, wait: bool | None, show_status: bool) -> None:
    """Run the DVC pipeline as one job per stage instance (SLURM or local, through submitit), each in its own git
    worktree, outputs through the DVC remote, every run logged to one MLflow server (docs/cluster.md).

    Launching again skips the stages DVC finds done and resumes interrupted training from its last.pt."""
    from pipelines.launch import launch as run
    from pipelines.launch import status

    if show_status:
        click.echo(status())
        return
    for line in run(executor, partition, gpus_per_job, nodes, timeout_min, wait, slurm=slurm,
                    jobs_at_once=jobs_at_once):
        click.echo(line)


if __name__ == "__main__":
    sys.exit(cli())
