"""``tessera train retrieval|l1|l2``: train from the Iceberg training table, export, publish."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from features.errors import TesseraError
from tessera.commands.offline import _RAY_ADDRESS, _RAY_WORKERS


def _time(text: str | None, option: str) -> int | None:
    from features.timeutil import parse_timestamp

    if text is None:
        return None
    try:
        return parse_timestamp(text)
    except TesseraError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from exc


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--from", "from_", required=True, help="Range start (ISO-8601 or epoch ms)."),
        click.option("--to", required=True, help="Range end, exclusive."),
        click.option("--eval-from", default=None,
                     help="Start of the evaluation slice (default: the last 20% of the range)."),
        click.option("--warehouse", type=click.Path(file_okay=False, path_type=Path),
                     default=Path(".tessera/warehouse"), show_default=True,
                     help="Iceberg warehouse directory."),
        click.option("--version", "table_version", default=None,
                     help="Training table version (default: the latest backfill, else v1)."),
        click.option("--registry", type=click.Path(file_okay=False, path_type=Path),
                     default=Path(".tessera/registry"), show_default=True,
                     help="Model registry directory."),
        click.option("--epochs", type=click.IntRange(min=1), default=2, show_default=True),
        click.option("--batch-size", type=click.IntRange(min=2), default=256, show_default=True),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-3,
                     show_default=True, help="Adam learning rate."),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True),
        click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Torch threads."),
        click.option("--publish/--no-publish", default=True, show_default=True,
                     help="Publish the exported model to the registry (and make it current)."),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Also keep the ONNX files and metrics.json in this directory."),
        click.option("--engine", type=click.Choice(["local", "ray"]), default="local",
                     show_default=True,
                     help="Who reads the training table: this process, or a Ray cluster's "
                          "tasks streaming the rows here (Ray Data; pip install -e '.[ray]'). "
                          "The same rows."),
        _RAY_ADDRESS,
        _RAY_WORKERS,
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


@click.group("train")
def train() -> None:
    """Train models from the training table; evaluate on a later slice; export ONNX; publish."""


class _Bars:
    """One click progress bar per stage (fit, epoch 1.., eval)."""

    def __init__(self) -> None:
        self.stage: str | None = None
        self.bar: Any = None

    def __call__(self, event: Any) -> None:
        if event.stage != self.stage:
            self.close()
            self.stage = event.stage
            self.bar = click.progressbar(length=event.total or 0, label=f"{event.stage:>8}",
                                         show_pos=True, file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(event.rows)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _run(kind: str, from_: str, to: str, eval_from: str | None, warehouse: Path,
         table_version: str | None, registry: Path, epochs: int, batch_size: int, lr: float,
         seed: int, threads: int, publish: bool, out: Path | None, engine: str = "local",
         ray_address: str | None = None, ray_workers: int | None = None) -> None:
    from tessera.commands.offline import _on_ray

    with _on_ray(engine, ray_address, ray_workers) as on_ray:
        _train(kind, from_, to, eval_from, warehouse, table_version, registry, epochs,
               batch_size, lr, seed, threads, publish, out, on_ray)


def _train(kind: str, from_: str, to: str, eval_from: str | None, warehouse: Path,
           table_version: str | None, registry: Path, epochs: int, batch_size: int, lr: float,
           seed: int, threads: int, publish: bool, out: Path | None, on_ray: bool) -> None:
    from features.offline.training import TrainingTables
    from models.data import IcebergExamples, RayExamples, latest_version, time_split
    from models.onnx_export import export_result
    from models.publish import publish_result
    from models.train import TrainConfig, train_l1, train_l2, train_retrieval

    start, end = _time(from_, "--from") or 0, _time(to, "--to") or 0
    try:
        train_range, eval_range = time_split(start, end, _time(eval_from, "--eval-from"))
        training = TrainingTables.open(warehouse)
        version = table_version or latest_version(training)
        source = (RayExamples if on_ray else IcebergExamples)(training, version)
        config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                             threads=threads)
        click.echo(f"training {kind} on {training.identifier} version {version}: "
                   f"train {train_range.as_dict()}, eval {eval_range.as_dict()}", err=True)
        bars = _Bars()
        fn = {"retrieval": train_retrieval, "l1": train_l1, "l2": train_l2}[kind]
        try:
            result = fn(source, train_range, eval_range, config=config, progress=bars)
        finally:
            bars.close()
        with tempfile.TemporaryDirectory(prefix="tessera-train-") as tmp:
            target = out or Path(tmp)
            reports = export_result(result, target)
            (target / "metrics.json").write_text(json.dumps(result.metrics, indent=2))
            for name, rep in reports.items():
                click.echo(f"exported {name}: {rep.path} (parity max abs diff "
                           f"{rep.max_abs_diff:.2e} on {rep.parity_rows} rows)", err=True)
            if publish:
                from models.registry import ModelRegistry

                info = publish_result(ModelRegistry(registry),
                                      result, {n: r.path for n, r in reports.items()})
                click.echo(f"published {kind} version {info.version} to {registry}", err=True)
    except TesseraError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(result.metrics, indent=2))


@train.command("retrieval")
@_common
def train_retrieval_cmd(**kwargs: Any) -> None:
    """Train the two-tower retrieval model and publish it with its HNSW item index."""
    _run("retrieval", **kwargs)


@train.command("l1")
@_common
def train_l1_cmd(**kwargs: Any) -> None:
    """Train the cheap L1 ranker (a few dense features)."""
    _run("l1", **kwargs)


@train.command("l2")
@_common
def train_l2_cmd(**kwargs: Any) -> None:
    """Train the multi-task DCN-v2 L2 ranker."""
    _run("l2", **kwargs)
