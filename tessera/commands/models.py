"""``tessera models``: list, show, promote and roll back versions in the model registry."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

DEFAULT_REGISTRY = Path(".tessera/registry")
_METRICS_SHOWN = 4
_T = TypeVar("_T")

_registry_option = click.option(
    "--registry",
    "registry_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_REGISTRY,
    show_default=True,
    help="Root directory of the model registry.",
)


def _open(registry_dir: Path):  # type: ignore[no-untyped-def]
    from models.registry import ModelRegistry

    return ModelRegistry(registry_dir)


def _call(fn: Callable[[], _T]) -> _T:
    """Run a registry call; turn Tessera errors into a clean ``error: ...`` exit."""
    from features.errors import TesseraError

    try:
        return fn()
    except TesseraError as exc:
        raise click.ClickException(str(exc)) from exc


def _metrics_summary(manifest: dict[str, Any]) -> str:
    metrics = manifest.get("metrics")
    if not isinstance(metrics, dict):
        return ""
    parts = []
    for key in sorted(metrics)[:_METRICS_SHOWN]:
        value = metrics[key]
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        elif isinstance(value, int | str):
            parts.append(f"{key}={value}")
    more = len(metrics) - _METRICS_SHOWN
    return " ".join(parts) + (f" (+{more})" if more > 0 else "")


def _created(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@click.group("models")
def models() -> None:
    """Inspect and manage published model versions (two-tower, rankers, HNSW index)."""


@models.command("list")
@_registry_option
@click.option("--kind", default=None, help="Only versions of this model kind.")
def list_command(registry_dir: Path, kind: str | None) -> None:
    """List complete versions, oldest first; '*' marks each kind's current version."""
    registry = _open(registry_dir)
    versions = _call(lambda: registry.list(kind))
    if not versions:
        where = f" of kind {kind!r}" if kind else ""
        click.echo(f"no model versions{where} in {registry_dir}")
        return
    currents = {k: registry.current_version(k) for k in {v.kind for v in versions}}
    header = ("kind", "version", "created", "current", "metrics")
    rows = [
        (
            v.kind,
            v.version,
            _created(v.created_at),
            "*" if currents[v.kind] == v.version else "",
            _metrics_summary(v.manifest),
        )
        for v in sorted(versions, key=lambda v: (v.kind, v.created_at, v.version))
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


@models.command("show")
@_registry_option
@click.argument("kind")
@click.argument("version", required=False, default="current")
def show_command(registry_dir: Path, kind: str, version: str) -> None:
    """Print the manifest of KIND's VERSION (default: the current one) as JSON."""
    info = _call(lambda: _open(registry_dir).get(kind, version))
    click.echo(json.dumps(info.manifest, indent=2, sort_keys=True))


@models.command("promote")
@_registry_option
@click.argument("kind")
@click.argument("version")
def promote_command(registry_dir: Path, kind: str, version: str) -> None:
    """Verify KIND's VERSION and make it current (serving reloads it)."""
    registry = _open(registry_dir)
    previous = registry.current_version(kind)
    info = _call(lambda: registry.promote(kind, version))
    click.echo(f"promoted {info.kind} {info.version} (was {previous or 'none'})")


@models.command("rollback")
@_registry_option
@click.argument("kind")
def rollback_command(registry_dir: Path, kind: str) -> None:
    """Make KIND's previously promoted version current again."""
    registry = _open(registry_dir)
    previous = registry.current_version(kind)
    info = _call(lambda: registry.rollback(kind))
    click.echo(f"rolled back {info.kind} to {info.version} (was {previous or 'none'})")
