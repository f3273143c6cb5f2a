"""Run a dataflow with Bytewax's own runtime: workers, cluster addresses, recovery."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.run import cli_main

from dataflows.memory import use_small_pages
from tessera.logs import get_logger
from tessera.topics import SAFE_LIBRDKAFKA, librdkafka_is_safe

log = get_logger("dataflows.runner")

NO_RECOVERY_EPOCH_S = 600.0
"""Epoch length when a flow runs without a recovery directory (epochs then pace nothing)."""


def prepare_recovery_dir(recovery_dir: Path, partitions: int = 1) -> RecoveryConfig:
    """Create the Bytewax recovery directory on first use and return its config.

    Args:
        partitions: number of recovery partitions (fixed for the life of the directory).
    """
    recovery_dir = Path(recovery_dir)
    if not any(recovery_dir.glob("part-*.sqlite3")):
        recovery_dir.mkdir(parents=True, exist_ok=True)
        init_db_dir(recovery_dir, partitions)
        log.info("recovery_dir_created", path=str(recovery_dir), partitions=partitions)
    return RecoveryConfig(str(recovery_dir))


def run_flow(
    flow: Dataflow,
    *,
    workers: int = 1,
    process_id: int | None = None,
    addresses: list[str] | None = None,
    recovery_dir: Path | None = None,
    epoch_interval_s: float = 2.0,
) -> None:
    """Run ``flow`` until its inputs end (bounded) or forever (tailing).

    Args:
        workers: worker threads in this process (``-w``).
        process_id, addresses: this process's index and every process's ``host:port``
            for a multi-process cluster (``-i`` / ``-a``).
        recovery_dir: snapshot directory; state and offsets resume from it after a crash.
        epoch_interval_s: how often snapshots are taken.
    """
    recovery = prepare_recovery_dir(recovery_dir) if recovery_dir else None
    if recovery is None:
        # Bytewax asks every stateful step for a snapshot at each epoch even without
        # recovery; a blocks shard's snapshot copies its whole state, so epochs that pace
        # nothing would cost time and memory in proportion to the state
        epoch_interval_s = max(epoch_interval_s, NO_RECOVERY_EPOCH_S)
    small_pages = use_small_pages()  # a flow's arrays are short-lived: huge pages cost CPU
    librdkafka, safe = librdkafka_is_safe()
    log.info("flow_start", flow=flow.flow_id, workers=workers, process_id=process_id,
             addresses=addresses, recovery=str(recovery_dir) if recovery_dir else None,
             small_pages=small_pages, librdkafka=librdkafka)
    if not safe:
        log.warning("librdkafka_too_old", librdkafka=librdkafka,
                    safe_from=".".join(map(str, SAFE_LIBRDKAFKA)),
                    why="a tailing worker can segfault when the broker restarts",
                    fix="pip install -c requirements.lock confluent-kafka (2.16 is locked)")
    cli_main(
        flow,
        workers_per_process=workers,
        process_id=process_id,
        addresses=addresses,
        epoch_interval=timedelta(seconds=epoch_interval_s),
        recovery_config=recovery,
    )
    log.info("flow_end", flow=flow.flow_id)
