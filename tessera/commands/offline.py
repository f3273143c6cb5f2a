"""Offline commands: batch correction and roll-ups, point-in-time backfill, Kafka replay."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from features.errors import TesseraError
from tessera.home import STORE_DEFAULT_TEXT, default_store_url

_FEATURES = click.option("--features", "features_file", type=click.Path(dir_okay=False, path_type=Path),
                         default=Path("features.yaml"), show_default=True,
                         help="Feature definition file.")
_WAREHOUSE = click.option("--warehouse", type=click.Path(file_okay=False, path_type=Path),
                          default=Path(".tessera/warehouse"), show_default=True,
                          help="Iceberg warehouse directory (SQLite catalog inside).")
_STORE = click.option("--store", "store_url", default=default_store_url, show_default=STORE_DEFAULT_TEXT,
                      help="Online store URL.")


_ENGINE = click.option("--engine", type=click.Choice(["local", "ray"]), default="local",
                       show_default=True,
                       help="Where the job runs: this process, or a Ray cluster (Ray Data; "
                            "pip install -e '.[ray]'). Both write the same rows.")
_RAY_ADDRESS = click.option("--ray-address", default=None,
                            help="With --engine ray: an existing cluster (ray://host:10001 or "
                                 "auto); default: start a local one for the job.")
_RAY_WORKERS = click.option("--ray-workers", type=click.IntRange(min=1), default=None,
                            help="With --engine ray and no --ray-address: the local cluster's "
                                 "worker processes (CPUs; default: this machine's).")


@contextmanager
def _on_ray(engine: str, address: str | None, workers: int | None) -> Iterator[bool]:
    """Whether the job runs on Ray; with ``--engine ray`` a Ray runtime is up meanwhile."""
    if engine == "local":
        if address or workers:
            raise click.UsageError("--ray-address and --ray-workers need --engine ray")
        yield False
        return
    from features.ray_engine import RayUnavailableError, ray_runtime

    try:
        with ray_runtime(address, workers) as cpus:
            click.echo(f"  ray: {cpus} CPUs ({address or 'local cluster'})", err=True)
            yield True
    except RayUnavailableError as exc:
        raise click.ClickException(str(exc)) from exc


def _ray_blocks(raw):
    from features.ray_engine import RayBlocksEngine

    return RayBlocksEngine(raw)


def _ray_backfill(tables):
    from features.ray_engine import RayBackfillEngine

    return RayBackfillEngine(tables)


def _time(text: str, option: str) -> int:
    from features.timeutil import parse_timestamp

    try:
        return parse_timestamp(text)
    except TesseraError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from exc


def _load(path: Path):
    from features.spec_loader import load_features

    try:
        return load_features(path)
    except TesseraError as exc:
        raise click.ClickException(str(exc)) from exc


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


@click.group("batch")
def batch() -> None:
    """Batch jobs over the raw Iceberg tables."""


@batch.command("blocks")
@click.option("--from", "from_", required=True, help="Range start (ISO-8601 or epoch ms).")
@click.option("--to", required=True, help="Range end, exclusive.")
@click.option("--names", default=None, help="Comma-separated feature names (default: all).")
@click.option("--online-sizes", type=click.Choice(["all", "coarse"]), default="all",
              show_default=True,
              help="Which corrected blocks to write to the online store: 'all' (what a read "
                   "can still need), so served values equal what the backfill recomputes; "
                   "'coarse' leaves the streaming-size blocks as the stream wrote them.")
@click.option("--sealed-only/--whole-range", default=True, show_default=True,
              help="Stop each feature's range at its live blocks flow's watermark (read from "
                   "--store): blocks the flow has not sealed yet are left to it, which writes "
                   "them again when it seals them. --whole-range corrects them too (for a "
                   "flow that is stopped for good).")
@_FEATURES
@_WAREHOUSE
@_STORE
@_ENGINE
@_RAY_ADDRESS
@_RAY_WORKERS
def batch_blocks(from_: str, to: str, names: str | None, online_sizes: str, sealed_only: bool,
                 features_file: Path, warehouse: Path, store_url: str, engine: str,
                 ray_address: str | None, ray_workers: int | None) -> None:
    """Recompute blocks of a range from the raw tables (late events count) and roll them up.

    Streaming-size blocks are recomputed from every archived event of the range and rolled
    up into 1h and 1d blocks; the range's blocks are replaced in the Iceberg blocks table
    and written to the online store (those a read can still need). Running it twice changes
    nothing. By default a feature's range ends at its live flow's watermark.

    With --engine ray the raw events are read, shuffled by entity and aggregated on a Ray
    cluster (the same kernels; the same blocks are written).
    """
    from features.batch import run_batch_blocks
    from features.offline.raw import RawTables
    from features.store import open_store

    fs = _load(features_file)
    from_ms, to_ms = _time(from_, "--from"), _time(to, "--to")
    raw = RawTables.open(warehouse)
    with open_store(store_url) as store, _on_ray(engine, ray_address, ray_workers) as on_ray:
        try:
            rep = run_batch_blocks(raw, raw.offline, store, fs, from_ms, to_ms,
                                   names=_names(names), online_sizes=online_sizes,
                                   sealed_only=sealed_only,
                                   engine=_ray_blocks(raw) if on_ray else None,
                                   progress=lambda m: click.echo(f"  {m}", err=True))
        except (TesseraError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc
    sizes = ", ".join(f"{k // 60000}m: {v:,}" for k, v in sorted(rep.blocks.items()))
    click.echo(f"{rep.events:,} raw events -> blocks ({sizes}) for {len(rep.features)} features "
               f"in {rep.seconds:.1f}s")
    if rep.held_back:
        from features.timeutil import to_iso

        low = min(rep.held_back.values())
        click.echo(f"{len(rep.held_back)} of them stopped at their live flow's watermark (from "
                   f"{to_iso(low)}): run again once it has passed --to, or --whole-range")


@click.command("backfill")
@click.option("--features", "names", required=True,
              help="Comma-separated features: names (all windows), window values "
                   "(item_views_1h) or derived features.")
@click.option("--from", "from_", default=None, help="Impression time range start.")
@click.option("--to", default=None, help="Impression time range end, exclusive.")
@click.option("--spine", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Instead of the impressions: a CSV or Parquet file of rows (entity columns "
                   "and a time column) to compute the features for.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --spine: the Parquet file to write (the spine's columns plus one "
                   "per feature).")
@click.option("--timestamp-column", default="event_ts", show_default=True,
              help="With --spine: the column of each row's time (epoch ms or ISO-8601).")
@click.option("--watermark-column", default=None,
              help="With --spine: a column of the watermark each row's read saw (default: "
                   "the row's time).")
@click.option("--base-version", default="v1", show_default=True,
              help="Training table version whose rows are extended.")
@click.option("--version", default=None, help="Name of the new version (default backfill-<ms>).")
@click.option("--definitions", "features_file", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("features.yaml"), show_default=True, help="Feature definition file.")
@_WAREHOUSE
@_ENGINE
@_RAY_ADDRESS
@_RAY_WORKERS
def backfill(names: str, from_: str | None, to: str | None, spine: Path | None,
             out: Path | None, timestamp_column: str, watermark_column: str | None,
             base_version: str, version: str | None, features_file: Path,
             warehouse: Path, engine: str, ray_address: str | None,
             ray_workers: int | None) -> None:
    """Add point-in-time feature columns to the training examples, as a new version; or,
    with --spine, to any rows, written to --out.

    Each impression's features are computed over exactly the window its online read used
    (ending at its logged feature watermark) from the offline blocks: no data at or after
    the watermark is read. A spine row's window ends at align_down(time, 5m) (or at its
    --watermark-column, if earlier); a window with no data gives null.

    With --engine ray the rows and the blocks are shuffled by entity on a Ray cluster and
    each shard is computed there (the same values).
    """
    from features.backfill import run_backfill

    fs = _load(features_file)
    if spine is not None:
        with _on_ray(engine, ray_address, ray_workers) as on_ray:
            _spine_backfill(fs, names, spine, out, timestamp_column, watermark_column,
                            warehouse, on_ray)
        return
    if from_ is None or to is None:
        raise click.UsageError("give --from and --to (impressions), or --spine FILE --out FILE")
    from features.offline.training import TrainingTables

    from_ms, to_ms = _time(from_, "--from"), _time(to, "--to")
    training = TrainingTables.open(warehouse)
    with _on_ray(engine, ray_address, ray_workers) as on_ray:
        try:
            rep = run_backfill(training, training.offline, fs, _names(names), from_ms, to_ms,
                               base_version=base_version, version=version,
                               engine=_ray_backfill(training.offline) if on_ray else None)
        except (TesseraError, KeyError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(f"version {rep.version}: {rep.rows:,} impressions x {len(rep.features)} features "
               f"in {rep.seconds:.1f}s ({rep.rows_per_s:,.0f} rows/s)")


def _spine_backfill(fs, names: str, spine: Path, out: Path | None, timestamp: str,
                    watermark: str | None, warehouse: Path, on_ray: bool) -> None:
    import time

    import pyarrow.parquet as pq

    from features.backfill import SpineError, spine_columns
    from features.offline.tables import OfflineTables
    from tessera.api import read_spine

    if out is None:
        raise click.UsageError("--spine needs --out FILE.parquet")
    t0 = time.perf_counter()
    try:
        rows = read_spine(spine)
        tables = OfflineTables.open(warehouse)
        table = spine_columns(rows, fs, _names(names) or [], tables.scan_blocks,
                              timestamp=timestamp, watermark=watermark,
                              warn=lambda m: click.echo(f"warning: {m}", err=True),
                              progress=lambda m: click.echo(f"  {m}", err=True),
                              engine=_ray_backfill(tables) if on_ray else None)
    except (SpineError, KeyError) as exc:
        raise click.ClickException(str(exc.args[0] if isinstance(exc, KeyError) else exc)) \
            from exc
    except (TesseraError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    pq.write_table(table, out)
    added = table.num_columns - rows.num_columns
    click.echo(f"{out}: {table.num_rows:,} spine rows x {added} feature columns in "
               f"{time.perf_counter() - t0:.1f}s")


@click.command("replay")
@click.option("--topics", default=None, help="Comma-separated topics (default: the features').")
@click.option("--from", "from_", required=True, help="Event time range start.")
@click.option("--to", default=None,
              help="Event time range end, exclusive (default: the end of the topics). It may "
                   "not be before the store's watermark: reads there would see the replayed "
                   "features only in part.")
@click.option("--features", "names", required=True, help="Comma-separated feature names.")
@click.option("--bootstrap", default=None, help="Kafka bootstrap (default: the embedded broker).")
@click.option("--lateness", default="60s", show_default=True, help="Allowed lateness.")
@click.option("--definitions", "features_file", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("features.yaml"), show_default=True, help="Feature definition file.")
@click.option("--warehouse", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Iceberg warehouse: sealed blocks go there, and ranges Kafka no longer holds "
                   "are computed from its raw tables.")
@_STORE
def replay(topics: str | None, from_: str, to: str | None, names: str, bootstrap: str | None,
           lateness: str, features_file: Path, warehouse: Path | None, store_url: str) -> None:
    """Compute blocks of new or changed features by replaying Kafka history.

    Runs the live blocks flow's code over the topics' retained history, for the chosen
    features and events in [--from, --to). Only the chosen features' blocks are written;
    every other feature in the store stays as it was. While the replay runs (or if it stops
    part way) reads flag the chosen features stale. Progress: one line a second on stderr,
    messages read of the messages to read per topic, and an ETA.
    """
    from dataflows.replay import ReplayProgress, run_replay
    from features.timeutil import parse_duration
    from tessera.broker import resolve_bootstrap

    fs = _load(features_file)

    def show(p: ReplayProgress) -> None:
        topics_text = "  ".join(f"{t} {d:,}/{n:,}" for t, (d, n) in sorted(p.by_topic.items()))
        eta = "--" if p.eta_s is None else f"{p.eta_s:.0f}s"
        click.echo(f"replay {p.fraction:6.1%}  {topics_text} messages  "
                   f"{p.events:,} events  {p.elapsed_s:.0f}s elapsed  ETA {eta}", err=True)

    try:
        rep = run_replay(resolve_bootstrap(bootstrap), store_url, fs, _names(names) or [],
                         _time(from_, "--from"), _time(to, "--to") if to else None,
                         topics=_names(topics), warehouse=warehouse,
                         lateness_ms=parse_duration(lateness), progress=show)
    except (TesseraError, KeyError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    src = " (head of the range from the raw tables)" if rep.raw_fallback else ""
    click.echo(f"replayed {', '.join(rep.features)} from {', '.join(rep.topics)}{src}: "
               f"{rep.events:,} events, {rep.blocks_written:,} blocks written in "
               f"{rep.seconds:.1f}s")
