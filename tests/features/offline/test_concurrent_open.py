"""Workers started together (tessera up starts four) open one fresh warehouse at once: every
one of them must get the namespace and tables, none may fail on the creation race."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path


def _open(warehouse: str, barrier, results) -> None:
    from features.offline.raw import RawTables
    from features.offline.tables import OfflineTables
    from features.offline.training import TrainingTables

    barrier.wait()
    try:
        tables = OfflineTables.open(warehouse)
        RawTables(tables)
        TrainingTables(tables)
        results.put("ok")
    except Exception as exc:  # reported to the parent, which asserts
        results.put(f"{type(exc).__name__}: {exc}")


def test_processes_opening_a_fresh_warehouse_together_all_succeed(tmp_path: Path):
    ctx = mp.get_context("spawn")
    n = 6
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_open, args=(str(tmp_path / "wh"), barrier, results))
             for _ in range(n)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
    assert outcomes == ["ok"] * n, outcomes
