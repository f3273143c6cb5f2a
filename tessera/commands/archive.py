"""``tessera worker archive``: archive every Kafka event to the Iceberg raw tables."""

from __future__ import annotations

from pathlib import Path

import click

from tessera.commands.worker import (
    _bootstrap,
    _check_topics,
    _cluster,
    _duration,
    _fail,
    _run,
    echo_totals,
)

_HELP_EPILOG = """
\b
Exactly once: each commit writes the events and the next Kafka offset of every
partition in one Iceberg snapshot; a (re)start reads from those offsets, so a
crash or Ctrl-C loses nothing and repeats nothing (no --recovery-dir needed).
\b
Scaling out: -w N worker threads, or a cluster with -i/-a as for `tessera worker
blocks`; every process must reach the same warehouse catalog.
"""


def _declared_sources(features_file: Path | None, topics: tuple[str, ...]) -> tuple[str, ...]:
    """Load the features file that declares sources (registering them in this process) when
    one is given, or when a topic is not built in and ``features.yaml`` exists; return the
    topics its features read and the sources it declares (the default --topics then)."""
    from schemas.registry import TOPICS

    if features_file is None:
        if all(t in TOPICS for t in topics) or not Path("features.yaml").exists():
            return ()
        features_file = Path("features.yaml")
    from features.errors import TesseraError
    from features.spec_loader import load_features

    try:
        fs = load_features(features_file)
    except TesseraError as exc:
        raise _fail(str(exc)) from exc
    return tuple(dict.fromkeys([*fs.sources, *(s.name for s in fs.declared)]))


@click.command("archive", epilog=_HELP_EPILOG)
@click.option("--bootstrap", metavar="HOST:PORT[,...]", default=None,
              help="Kafka bootstrap servers (default: the running embedded broker, "
              "else $TESSERA_BOOTSTRAP).")
@click.option("--warehouse", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Directory of the Iceberg warehouse (created if missing); the raw_<topic> "
              "tables live there.")
@click.option("--topics", default=None, metavar="T1,T2",
              help="Comma-separated topics to archive (default: views, engagements, "
              "impressions, items; with --features, the topics its features read and the "
              "sources it declares).")
@click.option("--features", "features_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None,
              help="Features file whose declared sources (sources:) are archived too; "
              "features.yaml when a --topics name is not built in.")
@click.option("--bounded/--tail", default=False, show_default=True,
              help="--bounded stops at the end of the topics; --tail runs forever.")
@click.option("--commit-interval", default="5s", show_default=True, metavar="DURATION",
              help="Longest time read events wait before their Iceberg commit (e.g. 500ms, "
              "5s, 1m).")
@click.option("--max-batch-events", type=click.IntRange(min=1), default=200_000,
              show_default=True, help="Events of one topic that trigger an early commit.")
@click.option("-w", "--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker threads in this process.")
@click.option("-i", "--process-id", type=click.IntRange(min=0), default=None,
              help="Index of this process in the cluster (with -a).")
@click.option("-a", "--addresses", multiple=True, metavar="HOST:PORT",
              help="Address of every cluster process, repeated, in process-id order (with -i).")
def archive_command(
    bootstrap: str | None,
    warehouse: Path,
    topics: str | None,
    features_file: Path | None,
    bounded: bool,
    commit_interval: str,
    max_batch_events: int,
    workers: int,
    process_id: int | None,
    addresses: tuple[str, ...],
) -> None:
    """Archive every event of the topics to Iceberg raw tables, by event date and hour.

    Reads each topic from the offsets of its last commit, writes micro-batches to
    raw_<topic> in --warehouse, and sends undecodable messages to the dead-letter topic.
    """
    from dataflows.archive import ArchiveFlowConfig, build_archive_flow
    from dataflows.progress import FlowProgress
    from features.errors import TesseraError

    cluster = _cluster(process_id, addresses)
    interval_ms = _duration(commit_interval, "'--commit-interval'")
    topic_list = tuple(t.strip() for t in (topics or "").split(",") if t.strip())
    read = _declared_sources(features_file, topic_list)
    if not topic_list and read:
        topic_list = read
    try:
        config = ArchiveFlowConfig(
            bootstrap=_bootstrap(bootstrap),
            warehouse=warehouse,
            bounded=bounded,
            commit_interval_ms=interval_ms,
            max_batch_events=max_batch_events,
            **({"topics": topic_list} if topic_list else {}),
        )
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    _check_topics(config.bootstrap, config.topics, config.deadletter_topic)
    try:
        flow = build_archive_flow(config, progress := FlowProgress("archive"))
    except TesseraError as exc:
        raise _fail(f"--warehouse {warehouse}: {exc}") from exc
    _run(
        flow,
        workers=workers,
        process_id=process_id,
        addresses=cluster,
        recovery_dir=None,
        epoch_interval=2.0,
        bounded=bounded,
        what="archive",
    )
    echo_totals("archive", progress, late_note="archived like every event")
