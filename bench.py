#!/usr/bin/env python
"""uhrbench command line: argument parsing, then one call into pipelines/."""
from __future__ import annotations

import functools
import sys

import click

PARAMS_HELP = "parameter file (default: params.yaml at the repository root)"
SET_HELP = "override a parameter, e.g. --set profile=paper or --set local.window=256 (repeatable)"


def one_line_errors(func):
    """Known problems become one-line messages with exit code 1, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from datasets.base import DatasetError
        from methods.base import MethodError
        from pipelines.config import ConfigError
        from pipelines.train import TrainingError

        try:
            return func(*args, **kwargs)
        except (ConfigError, DatasetError, MethodError, TrainingError) as exc:
            raise click.ClickException(str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__) from None

    return wrapper


def _config(params: str | None, overrides: tuple[str, ...] = ()):
    from pipelines.config import load_config

    return load_config(params, list(overrides))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """uhrbench: one reproducible harness for ultra-high-resolution semantic segmentation.

    Typical use: `dvc repro` runs everything; these commands run single stages.
    """


@cli.command("list")
@one_line_errors
def list_cmd() -> None:
    """Registered methods and datasets."""
    from datasets import list_datasets
    from methods import list_methods

    click.echo("methods:")
    for name, text in list_methods().items():
        click.echo(f"  {name:<10} {text}")
    click.echo("datasets:")
    for name, text in list_datasets().items():
        click.echo(f"  {name:<10} {text}")


@cli.command()
@click.option("--device", default="auto", show_default=True)
@one_line_errors
def env(device: str) -> None:
    """Device, library versions and git commit, as recorded with every result."""
    from pipelines.tracking import environment_info, resolve_device, tracking_uri

    for key, value in {**environment_info(resolve_device(device)), "mlflow_tracking_uri": tracking_uri()}.items():
        click.echo(f"{key:<20} {value}")


@cli.command()
@click.option("--dataset", required=True)
@click.option("--source", default=None, help="local archive or folder; nothing is downloaded")
@click.option("--params", default=None, help=PARAMS_HELP)
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@one_line_errors
def prepare(dataset: str, source: str | None, params: str | None, overrides: tuple[str, ...]) -> None:
    """Obtain, verify and convert a dataset into the prepared layout."""
    from pipelines.prepare import prepare as run

    summary = run(_config(params, overrides), dataset, source)
    click.echo(f"prepared {dataset}: {summary.get('images', '?')} images in {summary.get('path', '')}")


@cli.command()
@click.option("--dataset", required=True)
@click.option("--method", required=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--params", default=None, help=PARAMS_HELP)
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@one_line_errors
def train(dataset: str, method: str, device: str, params: str | None, overrides: tuple[str, ...]) -> None:
    """Train a method on a dataset with its recipe for the current profile."""
    from pipelines.train import train as run

    path = run(_config(params, overrides), dataset, method, device)
    click.echo(f"checkpoint: {path}")


@cli.command()
@click.option("--dataset", required=True)
@click.option("--method", required=True)
@click.option("--split", default=None, help="default: evaluate.split in params.yaml")
@click.option("--device", default="auto", show_default=True)
@click.option("--params", default=None, help=PARAMS_HELP)
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@one_line_errors
def evaluate(dataset: str, method: str, split: str | None, device: str, params: str | None,
             overrides: tuple[str, ...]) -> None:
    """Score a trained method on a split (mIoU, per-class IoU, pixel accuracy)."""
    from methods import resolve_method_name
    from pipelines.config import model_overrides
    from pipelines.evaluate import evaluate as run

    config = _config(params, overrides)
    name = resolve_method_name(method)
    result = run(config, dataset, name, split, device, model_overrides(list(overrides), name))
    click.echo(f"{name} on {dataset}/{result['split']}: mIoU {100 * result['miou']:.2f} "
               f"(pixel accuracy {100 * result['pixel_accuracy']:.2f})")


@cli.command()
@click.option("--dataset", required=True)
@click.option("--format", "fmt", type=click.Choice(["terminal", "md", "csv", "latex"]), default="terminal",
              show_default=True)
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="write the table to this file")
@click.option("--run-id", "run_ids", multiple=True, help="use these evaluation runs instead of the latest")
@click.option("--all", "all_runs", is_flag=True, help="every finished evaluation, not only the latest per method")
@one_line_errors
def compare(dataset: str, fmt: str, output: str | None, run_ids: tuple[str, ...], all_runs: bool) -> None:
    """Comparison table of the methods evaluated on a dataset, from MLflow."""
    from datasets import get_dataset
    from pipelines.report import comparison_table, format_table

    get_dataset(dataset)
    text = format_table(comparison_table(dataset, list(run_ids), all_runs), fmt)
    if output:
        with open(output, "w") as handle:
            handle.write(text)
        click.echo(f"wrote {output}")
    else:
        click.echo(text, nl=False)


@cli.command()
@click.option("--params", default=None, help=PARAMS_HELP)
@one_line_errors
def report(params: str | None) -> None:
    """Write the comparison tables of every benchmark dataset to results/tables/."""
    from pipelines.report import report as run

    for path in run(_config(params)):
        click.echo(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(cli())
