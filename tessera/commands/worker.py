"""``tessera worker``: run the streaming dataflows (blocks, sequences) on Bytewax."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from features.errors import TesseraError
from tessera.home import STORE_DEFAULT_TEXT, default_store_url, tessera_home
from tessera.logs import get_logger

log = get_logger("tessera.worker")

DEFAULT_FEATURES = "features.yaml"

_CLUSTER_HELP = """
\b
Scaling out: -w N runs N worker threads in this process. A cluster of P processes
runs the same command P times, each with every address (-a, in the same order) and
its own index (-i). For two processes on one host:
\b
  tessera worker WHAT -a 127.0.0.1:2101 -a 127.0.0.1:2102 -i 0 -w 2 &
  tessera worker WHAT -a 127.0.0.1:2101 -a 127.0.0.1:2102 -i 1 -w 2
\b
Bytewax spreads the Kafka partitions over all workers of all processes. Every
process must reach the same store: the LMDB store allows processes on one host
(one directory); across hosts use an Aerospike store URL. --recovery-dir must
then be a directory every process can read and write.
\b
Recovery: with --recovery-dir the worker snapshots its Kafka offsets (and state)
every --epoch-interval seconds and resumes from them after a crash or restart;
without it each start reads the topics from the beginning.
"""


idle_timeout_option = click.option(
    "--idle-timeout", default="5m", show_default=True, metavar="DURATION",
    help="A partition with no event for this long stops holding the watermark back: its "
    "watermark follows the wall clock less this (a later event older than that is late); a "
    "bounded partition that ends without an event never holds it. 0: never.")
"""The ``--idle-timeout`` option of the workers that hold watermarks (blocks, labels)."""


def idle_timeout_ms(text: str) -> int | None:
    """``--idle-timeout`` in ms; None for 0 (never idle)."""
    return _duration(text, "'--idle-timeout'", allow_zero=True) or None


EPOCH_S = 2.0
"""Default seconds between Bytewax epochs (recovery snapshots) of a worker."""

BLOCKS_EPOCH_S = 10.0
"""The blocks worker's default: its snapshot pickles every open block of every shard (about
85 MB after 1M events of the streaming bench's views), so at 2 s epochs a worker with
--recovery-dir spent more than half its time snapshotting (14k against 33k events/s at
10 s, measured on 1M single-event views). A crash replays at most one epoch more."""


def _common_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--bootstrap",
            metavar="HOST:PORT[,...]",
            default=None,
            help="Kafka bootstrap servers (default: the running embedded broker, "
            "else $TESSERA_BOOTSTRAP).",
        ),
        click.option(
            "--store",
            "store_url",
            metavar="URL",
            default=default_store_url,
            show_default=STORE_DEFAULT_TEXT,
            help="Online store URL: lmdb://relative/path, lmdb:///absolute/path or "
            "aerospike://host:3000/namespace.",
        ),
        click.option(
            "--recovery-dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Directory of Bytewax recovery snapshots (created on first use); "
            "resume from it after a crash. Default: no recovery.",
        ),
        click.option(
            "-w",
            "--workers",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Worker threads in this process.",
        ),
        click.option(
            "-i",
            "--process-id",
            type=click.IntRange(min=0),
            default=None,
            help="Index of this process in the cluster (with -a).",
        ),
        click.option(
            "-a",
            "--addresses",
            multiple=True,
            metavar="HOST:PORT",
            help="Address of every cluster process, repeated, in process-id order "
            "(with -i). Omit for a single process.",
        ),
        click.option(
            "--bounded/--tail",
            default=False,
            show_default=True,
            help="--bounded stops at the end of the topics; --tail runs forever, "
            "following new events.",
        ),
        click.option(
            "--epoch-interval",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            metavar="SECONDS",
            help="Seconds between Bytewax epochs (recovery snapshots). Default: "
            f"{BLOCKS_EPOCH_S:g} for blocks (each snapshot copies every open block: a shorter "
            f"interval costs throughput in proportion to the state), {EPOCH_S:g} otherwise.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _fail(message: str) -> click.ClickException:
    return click.ClickException(message)


def _bootstrap(explicit: str | None) -> str:
    from tessera.broker import resolve_bootstrap

    try:
        return resolve_bootstrap(explicit)
    except TesseraError as exc:
        raise _fail(str(exc)) from exc


def _cluster(process_id: int | None, addresses: Sequence[str]) -> list[str] | None:
    """Check -i/-a together; return the address list (None for a single process)."""
    if not addresses:
        if process_id not in (None, 0):
            raise click.BadParameter(
                f"-i {process_id} needs the addresses of every process (-a host:port, one per "
                "process); omit -i for a single process",
                param_hint="'-i' / '--process-id'",
            )
        return None
    for a in addresses:
        host, sep, port = a.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise click.BadParameter(
                f"expected HOST:PORT, got {a!r}", param_hint="'-a' / '--addresses'"
            )
    if process_id is None:
        raise click.BadParameter(
            f"with {len(addresses)} addresses (-a) give this process's index, "
            f"-i 0..{len(addresses) - 1}",
            param_hint="'-i' / '--process-id'",
        )
    if process_id >= len(addresses):
        raise click.BadParameter(
            f"-i {process_id} is out of range for {len(addresses)} addresses (-a): use "
            f"0..{len(addresses) - 1}",
            param_hint="'-i' / '--process-id'",
        )
    return list(addresses)


def _check_topics(bootstrap: str, topics: Sequence[str], deadletter: str) -> None:
    from tessera.topics import list_topics

    try:
        known = list_topics(bootstrap)
    except TesseraError as exc:
        raise _fail(f"cannot list topics at {bootstrap}: {exc}") from exc
    missing = [t for t in (*topics, deadletter) if t not in known]
    if missing:
        raise _fail(
            f"topics {', '.join(missing)} do not exist at {bootstrap}; create them with "
            f"`tessera topics create --bootstrap {bootstrap}` (all platform topics) or "
            f"`tessera topics create --bootstrap {bootstrap} {' '.join(missing)}`"
        )


def _check_store(url: str) -> None:
    from features.store import open_store

    try:
        open_store(url).close()
    except TesseraError as exc:
        raise _fail(f"--store {url}: {exc}") from exc


def _duration(text: str, option: str, *, allow_zero: bool = False) -> int:
    from features.timeutil import parse_duration

    if allow_zero and text.strip() in ("0", "0s", "0ms"):
        return 0
    try:
        return parse_duration(text)
    except (TesseraError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint=option) from exc


def _run(
    flow: Any,
    *,
    workers: int,
    process_id: int | None,
    addresses: list[str] | None,
    recovery_dir: Path | None,
    epoch_interval: float | None,
    bounded: bool,
    what: str,
) -> None:
    from dataflows.runner import run_flow

    if epoch_interval is None:
        epoch_interval = BLOCKS_EPOCH_S if what == "blocks" else EPOCH_S

    mode = "until the end of the topics" if bounded else "tailing (Ctrl-C to stop)"
    click.echo(
        f"tessera worker {what}: {workers} worker(s)"
        + (f", process {process_id} of {len(addresses)}" if addresses else "")
        + f", {mode}",
        err=True,
    )
    try:
        run_flow(
            flow,
            workers=workers,
            process_id=process_id if addresses else None,
            addresses=addresses,
            recovery_dir=recovery_dir,
            epoch_interval_s=epoch_interval,
        )
    except KeyboardInterrupt:
        click.echo(f"tessera worker {what}: stopped", err=True)
        raise SystemExit(130) from None
    click.echo(f"tessera worker {what}: done", err=True)


@click.group("worker")
def worker() -> None:
    """Run the streaming workers that keep the online store up to date.

    \b
    blocks       feature blocks from the events (features.yaml)
    sequences    each user's most recent actions (views and engagements)
    preassemble  finished window values of hot features, refreshed periodically
    archive      every event into the raw Iceberg tables, exactly once
    labels       impressions joined with their engagements into training examples

    Each reads Kafka (create the topics first: `tessera topics create`) and writes the
    online store. Run one of each; see `tessera worker blocks --help` for scaling out.
    """


@worker.command("blocks", epilog=_CLUSTER_HELP.replace("WHAT", "blocks"))
@_common_options
@click.option(
    "--features",
    "features_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_FEATURES,
    show_default=True,
    help="Feature definition file.",
)
@click.option(
    "--topics",
    default=None,
    metavar="T1,T2",
    help="Comma-separated topics to read (default: every topic a feature reads).",
)
@click.option(
    "--shards",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Stateful shards per (topic, entity); the unit of parallelism of the aggregation.",
)
@click.option(
    "--lateness",
    default="60s",
    show_default=True,
    metavar="DURATION",
    help="Allowed lateness (e.g. 30s, 5m; 0 for none): events further behind their "
    "partition's newest event are late, kept out of the blocks (and written to "
    "the warehouse's late_events table when --warehouse is set).",
)
@click.option(
    "--flush-interval",
    default="1s",
    show_default=True,
    metavar="DURATION",
    help="How often each shard writes its changed blocks to the store.",
)
@click.option(
    "--warehouse",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory of the Iceberg tables: sealed blocks and late events are appended "
    "there. Default: none (late events still kept, see --keep-late).",
)
@idle_timeout_option
@click.option(
    "--keep-late/--drop-late",
    default=True,
    show_default=True,
    help="Keep late events in the late_events table of --warehouse, or of the embedded "
    "warehouse under $TESSERA_HOME (.tessera/warehouse) when none is given.",
)
@click.option(
    "--catchup-flush-interval",
    default=None,
    metavar="DURATION",
    help="Flush interval while replaying a backlog (the newest event read is over 30 s "
    "old): the store is rewritten less often, the blocks are the same. "
    "Default: 30 x --flush-interval.",
)
@click.option(
    "--batch-messages",
    type=click.IntRange(min=1),
    default=5_000,
    show_default=True,
    help="Most Kafka messages read per poll and aggregated together (one event each from "
    "real producers; for batch envelopes, fewer are read: about 20,000 events a poll).",
)
def blocks(
    bootstrap: str | None,
    store_url: str,
    recovery_dir: Path | None,
    workers: int,
    process_id: int | None,
    addresses: tuple[str, ...],
    bounded: bool,
    epoch_interval: float | None,
    features_file: Path,
    topics: str | None,
    shards: int,
    lateness: str,
    flush_interval: str,
    warehouse: Path | None,
    idle_timeout: str,
    keep_late: bool,
    catchup_flush_interval: str | None,
    batch_messages: int,
) -> None:
    """Aggregate events into feature blocks in the online store.

    Reads the topics the features of --features are declared on, keeps event-time blocks
    per entity and feature, and writes them (and the feature watermarks) to --store.
    """
    from dataflows.blocks import BlocksFlowConfig, build_blocks_flow
    from dataflows.progress import FlowProgress
    from features.errors import FeatureSpecError
    from features.spec_loader import load_features

    cluster = _cluster(process_id, addresses)
    lateness_ms = _duration(lateness, "'--lateness'", allow_zero=True)
    flush_ms = _duration(flush_interval, "'--flush-interval'")
    catchup_ms = (_duration(catchup_flush_interval, "'--catchup-flush-interval'")
                  if catchup_flush_interval else None)
    try:
        fs = load_features(features_file)
    except FeatureSpecError as exc:
        raise _fail(str(exc)) from exc
    topic_list = tuple(t.strip() for t in (topics or "").split(",") if t.strip())
    late_warehouse = (warehouse or tessera_home() / "warehouse") if keep_late else None
    try:
        config = BlocksFlowConfig(
            bootstrap=_bootstrap(bootstrap),
            store_url=store_url,
            features=fs,
            topics=topic_list,
            shards=shards,
            lateness_ms=lateness_ms,
            flush_interval_ms=flush_ms,
            catchup_flush_interval_ms=catchup_ms,
            bounded=bounded,
            warehouse=warehouse,
            late_warehouse=late_warehouse,
            batch_messages=batch_messages,
            idle_timeout_ms=idle_timeout_ms(idle_timeout),
        )
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    _check_topics(config.bootstrap, config.topics, config.deadletter_topic)
    _check_store(store_url)
    progress = FlowProgress("blocks")
    _run(
        build_blocks_flow(config, progress),
        workers=workers,
        process_id=process_id,
        addresses=cluster,
        recovery_dir=recovery_dir,
        epoch_interval=epoch_interval,
        bounded=bounded,
        what="blocks",
    )
    echo_totals("blocks", progress)
    hint = late_hint(progress, late_warehouse, features_file)
    if hint:
        click.echo(f"tessera worker blocks: {hint}", err=True)


def echo_totals(what: str, progress, late_note: str = "") -> None:
    """The end-of-run line every worker prints: events, rate, late and dead-lettered (also
    logged as ``<flow>.done``)."""
    totals = progress.log_summary()
    late = f"{totals['late']:,} late" + (f" ({late_note})" if late_note and totals["late"] else "")
    dup = (f", {totals['duplicates']:,} duplicates dropped (repeated event ids)"
           if totals.get("duplicates") else "")
    click.echo(f"tessera worker {what}: {totals['events']:,} events in {totals['seconds']} s "
               f"({totals['events_per_s']:,}/s), {late}, {totals['deadlettered']:,} "
               f"dead-lettered{dup}; watermarks {totals['watermarks']}", err=True)


def late_hint(progress, late_warehouse: Path | None, features_file: Path) -> str | None:
    """One line on the late events of a run: how many, where they are kept, and the command
    that counts them in (None without late events). Also logged as ``blocks.late``."""
    from features.timeutil import to_iso

    if not progress.late:
        return None
    lo = progress.late_from - progress.late_from % 86_400_000
    hi = progress.late_to - progress.late_to % 86_400_000 + 86_400_000
    kept = (f"kept in {late_warehouse} (table late_events)" if late_warehouse is not None
            else "dropped (--drop-late)")
    fix = (f"tessera worker archive --bounded --warehouse W, then tessera batch blocks "
           f"--warehouse W --features {features_file} --from {to_iso(lo)} --to {to_iso(hi)}")
    log.warning("blocks.late", late=progress.late, late_from=to_iso(progress.late_from),
                late_to=to_iso(progress.late_to), kept=str(late_warehouse), fix=fix)
    return (f"{progress.late:,} late events ({to_iso(progress.late_from)} .. "
            f"{to_iso(progress.late_to)}) are not in the blocks; {kept}; to count them: {fix}")


@worker.command("sequences", epilog=_CLUSTER_HELP.replace("WHAT", "sequences"))
@_common_options
@click.option(
    "--max-len",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Actions kept per user: the newest by event time.",
)
@click.option(
    "--batch-messages",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Kafka messages read per source batch (smaller: finer progress, slower).",
)
@click.option(
    "--features",
    "features_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Features file whose declared sources with user_id and item_id are read too "
    "(then the default topics are those sources, and views/engagements if its features "
    "read them).",
)
def sequences(
    bootstrap: str | None,
    store_url: str,
    recovery_dir: Path | None,
    workers: int,
    process_id: int | None,
    addresses: tuple[str, ...],
    bounded: bool,
    epoch_interval: float | None,
    max_len: int,
    batch_messages: int,
    features_file: Path | None,
) -> None:
    """Keep each user's most recent actions in the online store.

    Reads views (action "view") and engagements (click, like, share, save, hide), and keeps
    the newest --max-len per user by event time, late events included. Writes are
    idempotent on event id, so a restart that replays events changes nothing.
    """
    from dataflows.progress import FlowProgress
    from dataflows.sequences import SequencesFlowConfig, build_sequences_flow, is_sequence_topic

    cluster = _cluster(process_id, addresses)
    topics: dict = {}
    if features_file is not None:
        from features.errors import FeatureSpecError
        from features.spec_loader import load_features

        try:
            fs = load_features(features_file)
        except FeatureSpecError as exc:
            raise _fail(str(exc)) from exc
        wanted = [*fs.sources, *(d.name for d in fs.declared)]
        topics = {"topics": tuple(dict.fromkeys(t for t in wanted if is_sequence_topic(t))),
                  "deduplicate": dict(fs.deduplicate)}
    try:
        config = SequencesFlowConfig(
            bootstrap=_bootstrap(bootstrap), store_url=store_url, max_len=max_len, bounded=bounded,
            batch_messages=batch_messages, **topics,
        )
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    _check_topics(config.bootstrap, config.topics, config.deadletter_topic)
    _check_store(store_url)
    _run(
        build_sequences_flow(config, progress := FlowProgress("sequences")),
        workers=workers,
        process_id=process_id,
        addresses=cluster,
        recovery_dir=recovery_dir,
        epoch_interval=epoch_interval,
        bounded=bounded,
        what="sequences",
    )
    echo_totals("sequences", progress, late_note="late events are in the sequences too")


@worker.command("preassemble")
@click.option("--store", "store_url", default=default_store_url, show_default=STORE_DEFAULT_TEXT,
              help="Online store URL (written: the values table).")
@click.option("--features", "features_file", type=click.Path(dir_okay=False, path_type=Path),
              default=DEFAULT_FEATURES, show_default=True, help="Feature definition file.")
@click.option("--entity", "entity_types", multiple=True, default=("item",), show_default=True,
              help="Entity types to pre-assemble (repeat for several).")
@click.option("--names", default=None,
              help="Comma-separated window values to keep (default: every numeric window "
                   "value of the entity type).")
@click.option("--interval", default="30s", show_default=True,
              help="Time between refreshes (a duration such as 30s or 1m).")
@click.option("--once", is_flag=True, help="Refresh once and exit.")
def preassemble(store_url: str, features_file: Path, entity_types: tuple[str, ...],
                names: str | None, interval: str, once: bool) -> None:
    """Keep pre-assembled window values (value + watermark per entity) fresh.

    Serving reads these instead of assembling blocks for every candidate when they are
    within the features' freshness budget; rows computed at another watermark are assembled
    from blocks instead, so values are always exact for the watermark logged.
    """
    import time as _time

    from features.errors import TesseraError
    from features.preassembled import refresh_preassembled
    from features.spec_loader import load_features
    from features.store import open_store

    try:
        fs = load_features(features_file)
    except TesseraError as exc:
        raise _fail(str(exc)) from exc
    every = _duration(interval, "--interval") / 1000
    name_list = [n for n in names.split(",") if n] if names else None
    with open_store(store_url) as store:
        while True:
            for et in entity_types:
                try:
                    rep = refresh_preassembled(store, fs, et, name_list)
                except TesseraError as exc:
                    raise _fail(str(exc)) from exc
                click.echo(f"preassembled {rep.entities} {et} entities x {len(rep.columns)} "
                           f"values at watermark {rep.watermark} in {rep.seconds:.2f}s", err=True)
            if once:
                return
            _time.sleep(every)

