"""``tessera consistency``: do logged online feature values equal the offline recomputation?"""

from __future__ import annotations

import os
from pathlib import Path

import click

from features.errors import TesseraError
from tessera.commands.offline import _ENGINE, _RAY_ADDRESS, _RAY_WORKERS

# Columns read from the impressions besides the entity keys of the definitions.
_BASE_COLUMNS = ("impression_id", "event_ts", "feature_watermark", "features")


def _read_impressions(warehouse: Path, fs, from_ts: int, to_ts: int):
    """The logged impressions of the range and the offline tables they sit beside.

    What serving logged, as the archive worker wrote it (the raw impressions table): it is
    there seconds after the request, where a training example waits for its label window.
    The training table (version v1) when the raw table has no rows in the range.
    """
    from features.offline.raw import RawTables
    from features.offline.training import BASE_VERSION, TrainingTables

    training = TrainingTables.open(warehouse)
    entities = sorted({f.entity for f in fs.features})
    raw = RawTables(training.offline)
    have = set(raw.table("impressions").schema().column_names)
    cols = [c for c in dict.fromkeys([*_BASE_COLUMNS, *entities]) if c in have]
    rows = raw.scan("impressions", from_ts, to_ts, columns=cols)
    source = "raw impressions table"
    if rows.num_rows == 0:
        have = set(training.columns())
        cols = [c for c in dict.fromkeys([*_BASE_COLUMNS, *entities]) if c in have]
        rows = training.scan_examples(version=BASE_VERSION, from_ts=from_ts, to_ts=to_ts,
                                      columns=cols)
        source = f"training table ({BASE_VERSION})"
    return rows, training.offline, source


@click.command("consistency")
@click.option("--from", "from_", required=True, help="Impression time range start (ISO-8601 or epoch ms).")
@click.option("--to", required=True, help="Impression time range end, exclusive.")
@click.option("--sample", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="At most this many impressions are checked (uniform sample).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample.")
@click.option("--warehouse", type=click.Path(file_okay=False, path_type=Path),
              default=Path(".tessera/warehouse"), show_default=True,
              help="Iceberg warehouse directory (SQLite catalog inside).")
@click.option("--definitions", "features_file", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("features.yaml"), show_default=True, help="Feature definition file.")
@click.option("--png", "png", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("consistency.png"), show_default=True,
              help="Where to write the plot (needs the 'plots' extra).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON, not a table.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the JSON report to this file (replaced atomically; the "
                   "dashboard reads <home>/consistency.json).")
@_ENGINE
@_RAY_ADDRESS
@_RAY_WORKERS
def consistency(from_: str, to: str, sample: int, seed: int, warehouse: Path,
                features_file: Path, png: Path, as_json: bool, output: Path | None,
                engine: str, ray_address: str | None, ray_workers: int | None) -> None:
    """Check logged online feature values against the offline blocks.

    For a sample of the impressions logged in [--from, --to), every logged window or derived
    feature is recomputed point-in-time from the offline blocks (the window its online read
    used, ending at the logged feature watermark) and compared with the logged value
    (float32 tolerance). Mismatches are attributed to late data (a late event of the entity
    falls in the window; for counts and sums the logged value must be the offline one less
    the late events), missing blocks (the offline table and the online read disagree on
    whether there were blocks) or other causes; the last two are "unexplained". Prints a
    table per feature and writes a PNG.

    With --engine ray the values are recomputed on a Ray cluster (the backfill's engine: the
    same values); this process reads a feature's blocks only to attribute its mismatches.
    """
    from features.consistency import consistency_report
    from features.consistency_plot import plot_consistency
    from features.tiling import tail_hop
    from tessera.commands.offline import _load, _on_ray, _ray_backfill, _time

    fs = _load(features_file)
    from_ts, to_ts = _time(from_, "--from"), _time(to, "--to")
    if to_ts <= from_ts:
        raise click.BadParameter(f"--to ({to}) must be after --from ({from_})", param_hint="--to")
    try:
        rows, offline, source = _read_impressions(warehouse, fs, from_ts, to_ts)
        # Late events in any window of the range: back to the oldest window start.
        reach = max((w + tail_hop(w, f.block_sizes) for f in fs.features for w in f.windows),
                    default=0)
        late = offline.scan_late_events(from_ts=from_ts - reach, to_ts=to_ts)
        with _on_ray(engine, ray_address, ray_workers) as on_ray:
            report = consistency_report(rows, fs, offline.scan_blocks, late, sample=sample,
                                        seed=seed, from_ts=from_ts, to_ts=to_ts,
                                        engine=_ray_backfill(offline) if on_ray else None)
    except (TesseraError, KeyError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(report.to_json() if as_json else report.to_table())
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_text(report.to_json())
        os.replace(tmp, output)
    try:
        plot_consistency(report, png)
    except TesseraError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"impressions from the {source}; plot written to {png}", err=True)
