"""``tessera generate``: play a seeded synthetic world into Kafka or Parquet files."""

from __future__ import annotations

from pathlib import Path

import click

from features.errors import TesseraError
from features.timeutil import parse_duration, parse_timestamp
from tessera.broker import resolve_bootstrap
from tessera.synth.world import DEFAULT_START_TS, WorldConfig


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except TesseraError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command()
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of every random draw: the same seed gives the same events.")
@click.option("--users", type=click.IntRange(min=1), default=10_000, show_default=True)
@click.option("--items", type=click.IntRange(min=1), default=20_000, show_default=True)
@click.option("--authors", type=click.IntRange(min=1), default=None,
              help="Number of authors (default: items / 20).")
@click.option("--topics", "n_topics", type=click.IntRange(min=1), default=32, show_default=True,
              help="Number of item topics (categories).")
@click.option("--days", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Length of the simulated period in days (default 7).")
@click.option("--duration", callback=_duration, default=None, metavar="DURATION",
              help="Length of the period as a duration (30m, 12h, 7d); overrides --days.")
@click.option("--start", default=None, metavar="TIME",
              help="Start of the period, ISO-8601 or epoch ms (default 2026-11-01T00:00:00Z).")
@click.option("--events", type=click.IntRange(min=0), default=200_000, show_default=True,
              help="Total views; each comes with its impression, engagements come on top.")
@click.option("--zipf", type=click.FloatRange(min=0, min_open=True), default=1.1,
              show_default=True, help="Item popularity exponent.")
@click.option("--late-fraction", type=click.FloatRange(0, 1), default=0.02, show_default=True,
              help="Share of events emitted out of event-time order.")
@click.option("--late-max", callback=_duration, default="10m", show_default=True,
              metavar="DURATION", help="Largest displacement of a late event.")
@click.option("--malformed-fraction", type=click.FloatRange(0, 1), default=0.0,
              show_default=True, help="Undecodable payloads injected per event (Kafka only).")
@click.option("--namespace", default="", help="Prefix of event, impression and request ids.")
@click.option("--out", type=click.Choice(["kafka", "parquet"]), default="kafka",
              show_default=True, help="Where the events go.")
@click.option("--bootstrap", metavar="HOST:PORT[,...]", default=None,
              help="Kafka bootstrap servers (default: the running embedded broker, "
                   "else $TESSERA_BOOTSTRAP).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="State directory of the embedded broker (default: $TESSERA_HOME/broker, "
                   "else ./.tessera/broker).")
@click.option("--batch-events", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Events per Kafka message (columnar batch); 1 = one Avro message per event.")
@click.option("--create-topics", is_flag=True,
              help="Create missing topics (with --partitions partitions).")
@click.option("--partitions", type=click.IntRange(min=1), default=4, show_default=True,
              help="Partitions of topics created by --create-topics.")
@click.option("--dir", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("synth-out"), show_default=True,
              help="Output directory for --out parquet (one <topic>.parquet per topic).")
def generate(
    seed: int, users: int, items: int, authors: int | None, n_topics: int, days: float | None,
    duration: int | None, start: str | None, events: int, zipf: float, late_fraction: float,
    late_max: int, malformed_fraction: float, namespace: str, out: str, bootstrap: str | None,
    state_dir: Path | None, batch_events: int, create_topics: bool, partitions: int,
    out_dir: Path,
) -> None:
    """Generate a deterministic synthetic world of views, impressions, engagements and items.

    Users with topic interests view items picked by popularity x affinity, in sessions that
    follow a daily traffic curve; every view has a bootstrap impression, engagements
    point back to impressions after a delay. A share of events comes late; malformed
    payloads can be injected to exercise the dead-letter path.

    \b
    Examples:
      tessera generate --events 2000000 --days 7 --create-topics
      tessera generate --out parquet --dir /tmp/world --seed 7
    """
    from tessera.synth.sinks import write_to_kafka, write_to_parquet

    duration_ms = duration if duration is not None else round((days or 7.0) * 86_400) * 1000
    duration_ms -= duration_ms % 60_000
    try:
        config = WorldConfig(
            seed=seed,
            n_users=users,
            n_items=items,
            n_authors=authors if authors is not None else max(1, items // 20),
            n_topics=n_topics,
            start_ts=parse_timestamp(start) if start is not None else DEFAULT_START_TS,
            duration_ms=max(duration_ms, 60_000),
            total_views=events,
            zipf_exponent=zipf,
            late_fraction=late_fraction,
            late_max_ms=late_max,
            malformed_fraction=malformed_fraction,
            id_namespace=namespace,
        )
        if out == "parquet":
            summary = write_to_parquet(config, out_dir)
            where = str(out_dir)
        else:
            address = resolve_bootstrap(bootstrap, state_dir=state_dir)
            summary = write_to_kafka(
                config,
                address,
                batch_events=batch_events,
                create_topics=create_topics,
                partitions=partitions,
            )
            where = address
    except (TesseraError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"generated seed={seed} -> {out} {where}")
    click.echo(summary.table())
