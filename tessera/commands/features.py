"""``tessera features``: validate and list feature definitions."""

from __future__ import annotations

import json
from pathlib import Path

import click

from features.errors import FeatureSpecError
from features.spec import FeatureSet
from features.spec_loader import load_features
from features.timeutil import format_duration
from tessera.home import STORE_DEFAULT_TEXT, default_store_url

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


@features.command("get")
@click.option("--entity", "entity_type", required=True, help="Entity type: item, user, author.")
@click.option("--ids", required=True, help="Comma-separated entity ids, e.g. i1,i2.")
@click.option("--names", default=None,
              help="Comma-separated feature names (default: every feature of the entity type).")
@click.option("--at", default=None,
              help="Read time: ISO-8601 (2026-11-29T16:05:00Z) or epoch ms (default: now).")
@click.option("--store", "store_url", default=default_store_url, show_default=STORE_DEFAULT_TEXT,
              help="Online store URL.")
@click.option("--features", "features_file", type=click.Path(path_type=Path),
              default=Path("features.yaml"), show_default=True, help="Feature definitions.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def get(entity_type: str, ids: str, names: str | None, at: str | None, store_url: str,
        features_file: Path, as_json: bool) -> None:
    """Look up feature vectors of entities at a time, with watermark, staleness and missing."""
    import json as _json

    from features.client import FeatureClient, HistoricalReadError, UnknownFeatureError
    from features.errors import TesseraError
    from features.store import open_store
    from features.timeutil import parse_timestamp, to_iso

    fs = _load_or_exit(features_file)
    try:
        store = open_store(store_url, readonly=True)
    except TesseraError as exc:
        raise click.ClickException(f"{exc} (run `tessera worker blocks` to fill a store)") from exc
    client = FeatureClient(store, fs)
    known = client.entity_types()
    if entity_type not in known:
        store.close()
        raise click.BadParameter(
            f"unknown entity type {entity_type!r}; {features_file} defines "
            f"{', '.join(known) or 'none'}", param_hint="'--entity'")
    id_list = [i for i in ids.split(",") if i]
    name_list = [n for n in names.split(",") if n] if names else client.names_for(entity_type)
    try:
        res = client.get_features(entity_type, id_list, name_list,
                                  at=parse_timestamp(at) if at else None)
    except (UnknownFeatureError, HistoricalReadError, TesseraError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        store.close()
    if as_json:
        out = {"entity_type": entity_type, "watermark": res.watermark,
               "watermark_iso": to_iso(res.watermark) if res.watermark > 0 else None,
               "stale": list(res.stale), "lag_ms": res.lag_ms,
               "rows": [{"id": e, "values": res.row(i),
                         "missing": [n for j, n in enumerate(res.names) if res.missing[i, j]]}
                        for i, e in enumerate(res.ids)]}
        click.echo(_json.dumps(out, indent=2, default=str))
        return
    wm_text = to_iso(res.watermark) if res.watermark > 0 else "none (no blocks yet)"
    click.echo(f"feature watermark: {wm_text}  (lag {res.lag_ms / 1000:.0f}s)")
    if res.stale:
        click.echo(f"stale beyond freshness budget: {', '.join(res.stale)}")
    width = max(len(n) for n in res.names) if res.names else 10
    for i, e in enumerate(res.ids):
        click.echo(f"\n{entity_type} {e}")
        row = res.row(i)
        for j, n in enumerate(res.names):
            flag = "  (missing: default)" if res.missing[i, j] else ""
            value = row[n]
            shown = f"{value:.6g}" if isinstance(value, float) else str(value)
            click.echo(f"  {n:<{width}}  {shown}{flag}")
