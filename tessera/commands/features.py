"""``tessera features``: validate and list feature definitions."""

from __future__ import annotations

import json
from pathlib import Path

import click

from features.errors import FeatureSpecError
from features.spec import FeatureSet
from features.spec_loader import load_features
from features.timeutil import format_duration

DEFAULT_FILE = "features.yaml"
EXIT_INVALID = 2

_file_argument = click.argument(
    "file", required=False, default=DEFAULT_FILE, type=click.Path(dir_okay=False, path_type=Path)
)


def _load_or_exit(file: Path) -> FeatureSet:
    try:
        return load_features(file)
    except FeatureSpecError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_INVALID) from exc


def _windows(windows: tuple[int, ...]) -> str:
    return ",".join(format_duration(w) for w in windows)


@click.group("features")
def features() -> None:
    """Validate and list feature definitions (features.yaml)."""


@features.command("validate")
@_file_argument
def validate(file: Path) -> None:
    """Check FILE (default features.yaml) and print each feature, or the first error.

    Exits 0 when the file is valid and 2 when it is not.
    """
    fs = _load_or_exit(file)
    rows = [
        (f.name, f.source, f.entity, f.aggregation, _windows(f.windows), f.version)
        for f in fs.features
    ]
    header = ("name", "source", "entity", "aggregation", "windows", "version")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    for d in fs.derived:
        click.echo(f"derived {d.name} ({d.entity_type}) = {d.expression}")
    click.echo(
        f"ok: {file}: {len(fs.features)} features, {len(fs.derived)} derived, "
        f"{sum(len(f.windows) for f in fs.features)} window values"
    )


@features.command("list")
@_file_argument
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per value.")
def list_values(file: Path, as_json: bool) -> None:
    """List every readable value of FILE: one line per window value and derived feature."""
    fs = _load_or_exit(file)
    for f in fs.features:
        for w, name in zip(f.windows, f.window_names(), strict=True):
            if as_json:
                record = {
                    "name": name,
                    "feature": f.name,
                    "entity_type": f.entity_type,
                    "aggregation": f.aggregation,
                    "source": f.source,
                    "window": format_duration(w),
                    "version": f.version,
                }
                click.echo(json.dumps(record))
            else:
                click.echo(f"{name}\t{f.entity_type}\t{f.aggregation}\t{f.source}")
    for d in fs.derived:
        if as_json:
            record = {
                "name": d.name,
                "entity_type": d.entity_type,
                "aggregation": "derived",
                "expression": d.expression,
                "inputs": list(d.inputs),
            }
            click.echo(json.dumps(record))
        else:
            click.echo(f"{d.name}\t{d.entity_type}\tderived\t{d.expression}")
