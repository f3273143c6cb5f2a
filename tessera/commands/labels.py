"""``tessera worker labels``: join impressions with their engagements into training examples."""

from __future__ import annotations

from pathlib import Path

import click

from tessera.commands.worker import (
    _CLUSTER_HELP,
    _bootstrap,
    _check_topics,
    _cluster,
    _duration,
    _fail,
    _run,
    echo_totals,
    idle_timeout_ms,
    idle_timeout_option,
)


@click.command("labels", epilog=_CLUSTER_HELP.replace("WHAT", "labels"))
@click.option(
    "--bootstrap",
    metavar="HOST:PORT[,...]",
    default=None,
    help="Kafka bootstrap servers (default: the running embedded broker, else "
    "$TESSERA_BOOTSTRAP).",
)
@click.option(
    "--warehouse",
    required=True,
    metavar="DIR|URL",
    help="Iceberg warehouse: a local directory (SQLite catalog inside) or an object-store URL. "
    "Examples go to its training_examples table, late events to late_events.",
)
@click.option(
    "--label-window",
    default="30m",
    show_default=True,
    metavar="DURATION",
    help="Engagements up to this long after an impression are its labels; its example is "
    "written once the event-time watermark passes the window's end.",
)
@click.option(
    "--lateness",
    default="60s",
    show_default=True,
    metavar="DURATION",
    help="Allowed lateness (0 for none): events further behind their partition's newest "
    "event are late, kept out of the join and written to late_events.",
)
@click.option(
    "--bounded/--tail",
    default=False,
    show_default=True,
    help="--bounded stops at the end of the topics, writing only examples whose window has "
    "closed; --tail runs forever.",
)
@click.option(
    "--recovery-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory of Bytewax recovery snapshots (created on first use); resume from it "
    "after a crash. Default: no recovery (each start rereads the topics; the table "
    "deduplicates the rows written again).",
)
@click.option("-w", "--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker threads in this process.")
@click.option("-i", "--process-id", type=click.IntRange(min=0), default=None,
              help="Index of this process in the cluster (with -a).")
@click.option("-a", "--addresses", multiple=True, metavar="HOST:PORT",
              help="Address of every cluster process, repeated, in process-id order (with -i).")
@click.option("--shards", type=click.IntRange(min=1), default=8, show_default=True,
              help="Stateful shards of impression ids; the unit of parallelism of the join.")
@click.option("--commit-interval", default="5s", show_default=True, metavar="DURATION",
              help="How often finished examples are committed to the Iceberg table.")
@click.option("--batch-messages", type=click.IntRange(min=1), default=500, show_default=True,
              help="Kafka messages read per source batch (smaller: finer progress, slower).")
@click.option("--epoch-interval", type=click.FloatRange(min=0, min_open=True), default=2.0,
              show_default=True, metavar="SECONDS",
              help="Seconds between Bytewax epochs (recovery snapshots).")
@idle_timeout_option
def labels_command(
    bootstrap: str | None,
    warehouse: str,
    label_window: str,
    lateness: str,
    bounded: bool,
    recovery_dir: Path | None,
    workers: int,
    process_id: int | None,
    addresses: tuple[str, ...],
    shards: int,
    commit_interval: str,
    batch_messages: int,
    epoch_interval: float,
    idle_timeout: str,
) -> None:
    """Join impressions with their engagements into the training_examples table.

    Reads the impressions (forward log) and engagements topics, labels each impression
    with the engagements on it within --label-window (deduplicating repeated impressions and
    engagements, waiting for engagements that arrive before their impression), and appends
    one example per impression (logged features, 0/1 label per action, delay to the first
    engagement) to --warehouse.
    """
    from dataflows.labels import LABEL_TOPICS, LabelFlowConfig, build_label_flow
    from dataflows.progress import FlowProgress

    cluster = _cluster(process_id, addresses)
    window_ms = _duration(label_window, "'--label-window'")
    lateness_ms = _duration(lateness, "'--lateness'", allow_zero=True)
    commit_ms = _duration(commit_interval, "'--commit-interval'")
    try:
        config = LabelFlowConfig(
            bootstrap=_bootstrap(bootstrap),
            warehouse=warehouse,
            label_window_ms=window_ms,
            lateness_ms=lateness_ms,
            bounded=bounded,
            shards=shards,
            commit_interval_ms=commit_ms,
            batch_messages=batch_messages,
            idle_timeout_ms=idle_timeout_ms(idle_timeout),
        )
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    _check_topics(config.bootstrap, LABEL_TOPICS, config.deadletter_topic)
    _check_warehouse(warehouse)
    _run(
        build_label_flow(config, progress := FlowProgress("labels")),
        workers=workers,
        process_id=process_id,
        addresses=cluster,
        recovery_dir=recovery_dir,
        epoch_interval=epoch_interval,
        bounded=bounded,
        what="labels",
    )
    echo_totals("labels", progress, late_note="kept out of the join, in late_events")


def _check_warehouse(warehouse: str) -> None:
    from features.errors import TesseraError
    from features.offline.training import TrainingTables

    try:
        TrainingTables.open(warehouse)
    except TesseraError as exc:
        raise _fail(f"--warehouse {warehouse}: {exc}") from exc
