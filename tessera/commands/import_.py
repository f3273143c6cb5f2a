"""``tessera import``: load existing event logs (CSV or Parquet) into Kafka."""

from __future__ import annotations

import time
from pathlib import Path
from typing import get_args

import click

from features.errors import TesseraError
from features.timeutil import parse_timestamp, to_iso
from tessera.broker import resolve_bootstrap
from tessera.importer import (
    FileFormat,
    ImportConfig,
    ImportOrder,
    ImportReport,
    TimeUnit,
    import_events,
)


def _pairs(items: tuple[str, ...], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected FIELD=VALUE, got {item!r}", param_hint=option)
        out[key.strip()] = value
    return out


def _shift_to(value: str | None) -> int | None:
    if value is None:
        return None
    if value.strip().lower() == "now":
        return int(time.time() * 1000)
    try:
        return parse_timestamp(value)
    except TesseraError as exc:
        raise click.BadParameter(str(exc), param_hint="--shift-to") from exc


def summary_lines(report: ImportReport) -> list[str]:
    """Return the human summary of an import, one line each."""
    lines = [
        f"rows      {report.rows}",
        f"produced  {report.produced} events in {report.messages} messages",
        f"rejected  {report.rejected}",
    ]
    if report.out_of_order:
        how = (f"sorted by event time in {report.buckets} buckets" if report.buckets > 1
               else "sorted by event time" if report.buckets else "produced in file order "
               "(--order file): the workers count most of them as late")
        lines.append(f"out of order {report.out_of_order} rows behind an earlier row; {how}")
    for reason, count in report.rejected_reasons.most_common():
        lines.append(f"  {count:>8}  {reason}")
    for sample in report.samples:
        lines.append(f"  e.g. {sample}")
    if report.min_ts is not None and report.max_ts is not None:
        span_s = (report.max_ts - report.min_ts) / 1000
        lines.append(
            f"time span {to_iso(report.min_ts)} .. {to_iso(report.max_ts)} ({span_s:g} s)"
        )
    lines.append(f"took      {report.seconds:.2f} s ({report.events_per_s:,.0f} events/s)")
    return lines


def _declared_source(topic: str, features_file: Path | None):
    """The declared source ``topic`` of the features file (registered in this process), or
    None for a built-in topic. Reads ``features.yaml`` when no file is given and it exists."""
    from schemas.registry import TOPICS

    if topic in TOPICS and features_file is None:
        return None
    path = features_file or Path("features.yaml")
    if not path.exists():
        if features_file is not None:
            raise click.BadParameter(f"no such file: {str(path)!r}", param_hint="--features")
        return None
    from features.spec_loader import load_features

    return load_features(path).declared_source(topic)


@click.group("import")
def import_group() -> None:
    """Import existing logs into Kafka so a deployment can start from its own history."""


@import_group.command("events")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--topic", required=True, help="Event topic the rows belong to (views, ...).")
@click.option("--map", "maps", multiple=True, metavar="FIELD=COLUMN",
              help="Take Avro field FIELD from column COLUMN (repeatable); other fields "
                   "take the column of the same name.")
@click.option("--time-column", default=None, metavar="COLUMN",
              help="Column holding event time (default: the one mapped to event_ts).")
@click.option("--time-unit", type=click.Choice(get_args(TimeUnit)), default=None,
              help="How the time column is written (default: the declared source's unit, "
                   "else ms).")
@click.option("--features", "features_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None,
              help="Features file declaring the source (sources:); default features.yaml "
                   "when the topic is not built in.")
@click.option("--format", "file_format", type=click.Choice(get_args(FileFormat)),
              default=None, help="File format (default: from the file name).")
@click.option("--no-header", is_flag=True,
              help="The CSV/TSV file has no header line; name its columns with --columns.")
@click.option("--columns", default=None, metavar="A,B,...",
              help="Column names of a file without a header, in order.")
@click.option("--order", type=click.Choice(get_args(ImportOrder)), default="time",
              show_default=True,
              help="time: produce in event-time order (sorting the file, in buckets beyond "
                   "--sort-rows); file: as written (out-of-order rows are then late).")
@click.option("--sort-rows", type=click.IntRange(min=1), default=5_000_000, show_default=True,
              help="Rows sorted in memory at once.")
@click.option("--compress", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="X", help="Play the history X times faster (relative to the first event).")
@click.option("--shift-to", default=None, metavar="now|TIME",
              help="Move the history so it ends at this time (ISO-8601, epoch ms, or now).")
@click.option("--default", "defaults", multiple=True, metavar="FIELD=VALUE",
              help="Constant value of a field the file lacks (repeatable).")
@click.option("--id-prefix", default=None,
              help="Prefix of generated event ids (default import-<file stem>-).")
@click.option("--bootstrap", metavar="HOST:PORT[,...]", default=None,
              help="Kafka bootstrap servers (default: the running embedded broker, "
                   "else $TESSERA_BOOTSTRAP).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="State directory of the embedded broker.")
@click.option("--batch-events", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Events per Kafka message (columnar batch).")
@click.option("--create-topic", is_flag=True, help="Create the topic if it does not exist.")
@click.option("--partitions", type=click.IntRange(min=1), default=4, show_default=True,
              help="Partitions of a topic made by --create-topic.")
def events(
    file: Path, topic: str, maps: tuple[str, ...], time_column: str | None,
    time_unit: str | None, features_file: Path | None, file_format: str | None,
    no_header: bool, columns: str | None, order: str, sort_rows: int,
    compress: float | None, shift_to: str | None, defaults: tuple[str, ...],
    id_prefix: str | None, bootstrap: str | None, state_dir: Path | None, batch_events: int,
    create_topic: bool, partitions: int,
) -> None:
    """Load FILE (CSV, TSV or Parquet) into Kafka as events of --topic.

    --topic is a built-in topic or a source declared in the features file; a declared
    source's event_time (column, unit) and event_id column are the defaults here. Rows are
    produced in event-time order unless --order file.

    Invalid rows (a missing required value, an unknown enum symbol, a non-integer) are
    counted by reason and not sent; valid rows are produced as columnar batches,
    partitioned by user (items: by item) like `tessera generate`.

    \b
    Examples:
      tessera import events views.csv --topic views --map user_id=uid \\
          --map event_ts=ts --time-unit s --default author_id=unknown
      tessera import events old.parquet --topic views --compress 60 --shift-to now
      tessera import events ratings.tsv --topic ratings --no-header \
          --columns user_id,item_id,rating,ts
    """
    try:
        mapping = _pairs(maps, "--map")
        declared = _declared_source(topic, features_file)
        if declared is not None:
            if time_column is None and "event_ts" not in mapping:
                time_column = declared.time_column
            time_unit = time_unit or declared.time_unit
            if declared.id_column is not None and "event_id" not in mapping:
                mapping["event_id"] = declared.id_column
        config = ImportConfig(
            path=file,
            topic=topic,
            mapping=mapping,
            time_column=time_column,
            time_unit=(time_unit or "ms"),  # type: ignore[arg-type]
            format=file_format,  # type: ignore[arg-type]
            header=not no_header,
            columns=tuple(c.strip() for c in columns.split(",")) if columns else None,
            order=order,  # type: ignore[arg-type]
            sort_rows=sort_rows,
            compress=compress,
            shift_to=_shift_to(shift_to),
            defaults=_pairs(defaults, "--default"),
            id_prefix=id_prefix,
            batch_events=batch_events,
        )
        address = resolve_bootstrap(bootstrap, state_dir=state_dir)
        last = [time.monotonic()]

        def progress(r: ImportReport) -> None:
            if time.monotonic() - last[0] >= 5.0:
                last[0] = time.monotonic()
                click.echo(f"... {r.rows} rows, {r.produced} produced, {r.rejected} rejected")

        report = import_events(
            config, address, partitions=partitions, create_topic=create_topic, progress=progress
        )
    except (TesseraError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"imported {file} -> {topic} at {address}")
    for line in summary_lines(report):
        click.echo(line)
