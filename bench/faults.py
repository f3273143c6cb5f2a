"""Fault injection on the real stack: each scenario breaks one part, clears the fault, and
checks against an oracle that nothing was lost or counted twice.

    python bench/faults.py            # full sizes, writes docs/reliability.md
    python bench/faults.py --only duplicate_events   # one scenario; writes no doc
    python bench/faults.py --quick    # small sizes (smoke test)
    python bench/faults.py --only sigstop_broker,store_unavailable

Every scenario runs real parts: the embedded broker (Tansu), real `tessera worker`
processes killed with SIGKILL, a real uvicorn server, a real LMDB store, real Iceberg
tables, a real tmpfs for "disk full". Only "store unavailable" injects its fault in-process
(the LMDB store is a memory map that cannot be made to fail from outside): the server's
store object is wrapped so every read raises ``StoreUnavailableError``, as a lost
Aerospike cluster would.

Each scenario returns a :class:`Row`; the script prints a table, writes
``docs/reliability.md`` and ends with
``RESULT faults scenarios=<n> passed=<p> events_lost=<l> double_counted=<d>
physical_duplicates=<c> commit_ms_first=<a> commit_ms_<n>=<b>`` (physical duplicates: rows
on disk beyond one per logical row, what a reader that does not deduplicate would see; the
commit cost scenario's first and last commits). ``kill_in_commit`` SIGKILLs the worker
inside its own Iceberg commits through ``bench/killpoint.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TESSERA = [sys.executable, "-m", "tessera.cli", "--log-level", "WARNING"]
LATENESS = "60s"


# ---------------------------------------------------------------------------- results


@dataclass
class Row:
    """One scenario's outcome (a line of the table)."""

    scenario: str
    fault: str
    recovery_s: float | None = None
    events_in: int = 0
    events_out: int = 0
    lost: int = 0
    double_counted: int = 0
    #: rows on disk (Iceberg) beyond one per logical row: what a reader that does not
    #: deduplicate (DuckDB, Spark, a user's training loop) would count twice
    physical_duplicates: int = 0
    passed: bool = False
    notes: list[str] = field(default_factory=list)
    #: commit_cost only: median commit time of the first 10 commits and of the last 10
    commit_ms_first: float | None = None
    commit_ms_last: float | None = None
    commits: int = 0

    def note(self, text: str) -> None:
        self.notes.append(text)


@dataclass(frozen=True)
class Sizes:
    """Workload sizes; ``quick`` is the smoke-test scale."""

    views: int
    users: int
    items: int
    pause_s: float
    requests: int

    @classmethod
    def of(cls, quick: bool) -> Sizes:
        if quick:
            return cls(views=30_000, users=300, items=1_000, pause_s=3.0, requests=20)
        return cls(views=100_000, users=400, items=2_000, pause_s=6.0, requests=60)


# ---------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def platform_broker(tmp: Path, *, port: int | None = None, partitions: int = 3) -> Iterator:
    """A broker of the scenario's own with the platform topics; yields the EmbeddedBroker."""
    from tessera.broker import EmbeddedBroker
    from tessera.topics import PLATFORM_TOPICS, create_topics

    broker = EmbeddedBroker(port=port, state_dir=tmp / "broker")
    info = broker.start(timeout_s=30)
    create_topics(info.bootstrap, PLATFORM_TOPICS, partitions=partitions)
    try:
        yield broker
    finally:
        broker.stop(timeout_s=1)


def bootstrap_of(broker) -> str:
    return f"127.0.0.1:{broker.port}" if broker.port else broker.read_info().bootstrap


def spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    out = log.open("ab")
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True)


def kill9(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stop_proc(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_to_end(cmd: list[str], log: Path, timeout: float = 600) -> None:
    proc = spawn(cmd, log)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_proc(proc)
        raise RuntimeError(f"{cmd[4:6]} did not finish in {timeout}s") from None
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd[4:6])} exited {rc}: {log.read_text()[-1500:]}")


def _text(path: Path) -> str:
    """A log file's text so far ('' before it exists)."""
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for(pred: Callable[[], bool], timeout: float, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return True
        except Exception:  # the thing polled may not exist yet
            pass
        time.sleep(every)
    return False


def kill_mid_stream(proc: subprocess.Popen, started: Callable[[], bool], row: Row,
                    settle_s: float = 0.3) -> bool:
    """SIGKILL ``proc`` once ``started()`` (output exists) and a few epochs later."""
    wait_for(lambda: proc.poll() is not None or started(), 180)
    if proc.poll() is not None:
        row.note(f"the worker finished (rc {proc.returncode}) before it could be killed")
        return False
    time.sleep(settle_s)
    if proc.poll() is not None:
        row.note("the worker finished before it could be killed: make the world bigger")
        return False
    kill9(proc)
    return True


def world(sz: Sizes, seed: int, **kw):
    from tests.dataflows.flowcheck import small_world

    params = dict(total_views=sz.views, n_users=sz.users, n_items=sz.items, seed=seed,
                  malformed_fraction=0.0)
    params.update(kw)
    return small_world(**params)


def features():
    from features.spec_loader import load_features

    return load_features(str(ROOT / "features.yaml"))


def block_counts(store_url: str, feats, oracle, feature: str = "item_views"):
    """Compare a count feature's finest blocks: (events in oracle, in store, lost, double)."""
    from features.aggregations import build_aggregation
    from tests.dataflows.flowcheck import entity_ids_of, store_blocks

    got = store_blocks(store_url, feats, entity_ids_of(oracle, feats))
    spec = next(f for f in feats.features if f.key.startswith(feature) or f.name == feature)
    agg = build_aggregation(spec)
    keys = [k for k in oracle if k[0] == spec.key]
    size = min(k[3] for k in keys)
    want_n = got_n = lost = double = 0
    for k in (k for k in set(keys) | {k for k in got if k[0] == spec.key} if k[3] == size):
        w = int(agg.finalize(oracle[k])) if k in oracle else 0
        g = int(agg.finalize(agg.from_bytes(got[k]))) if k in got else 0
        want_n, got_n = want_n + w, got_n + g
        lost += max(0, w - g)
        double += max(0, g - w)
    return got, want_n, got_n, lost, double


# ---------------------------------------------------------------------------- kill -9: blocks


def physical_copies(table, keys: Sequence[str]) -> tuple[int, pa.Table]:
    """(rows beyond one per ``keys`` value, the rows) of an Iceberg table, read as stored:
    no deduplication on read, as DuckDB or Spark would see it."""
    rows = table.scan(selected_fields=tuple(keys)).to_arrow() if table.current_snapshot() \
        else pa.table({k: pa.array([], pa.string()) for k in keys})
    return rows.num_rows - rows.group_by(list(keys)).aggregate([]).num_rows, rows


def sealed_blocks_check(wh: Path, store_url: str, oracle: dict, feats) -> tuple[int, list[str]]:
    """The sealed blocks on disk against the oracle: (physical copies, problems).

    Every block in the table must equal the oracle's; every oracle block that ends by its
    shard's final watermark must be there (it was sealed), exactly once on disk."""
    from features.offline.tables import OfflineTables
    from features.store import open_store
    from tests.dataflows.flowcheck import compare_to_oracle

    tables = OfflineTables.open(wh)
    copies, _ = physical_copies(tables.table("blocks"),
                                ["entity_type", "entity_id", "feature_key", "start_ms", "size_ms"])
    blocks = tables.scan_blocks()
    got = {(fk, e, st, sz): rep for fk, e, st, sz, rep in zip(
        *(blocks.column(c).to_pylist() for c in
          ("feature_key", "entity_id", "start_ms", "size_ms", "rep")))}
    with open_store(store_url, readonly=True) as store:
        sealed_by = min(store.get_watermarks("blocks/").values())
    # a shard seals through its own watermark: a block ending after the lowest one may be
    # sealed already, one ending by it must be
    want = {k: v for k, v in oracle.items() if k in got or k[2] + k[3] <= sealed_by}
    problems = [f"sealed: {p}" for p in compare_to_oracle(got, want, feats)]
    return copies, problems


def late_events_check(wh: Path, bs: str, w, feats) -> tuple[int, int, int, int]:
    """The late events on disk against the reference late rule, per partition in order:
    (late events expected, kept, lost, physical copies)."""
    from features.offline.tables import OfflineTables
    from features.reference import reference_late
    from tessera.synth import generate_records
    from tessera.synth.sinks import partition_of
    from tessera.topics import list_topics
    from tests.dataflows.flowcheck import LATENESS_MS

    records = generate_records(w)
    n_parts = list_topics(bs)
    want: set[str] = set()
    for topic in feats.sources:
        key = "item_id" if topic == "items" else "user_id"
        parts: dict[int, list[dict]] = {}
        for rec in records.get(topic, []):
            parts.setdefault(partition_of(rec[key], n_parts[topic]), []).append(rec)
        for recs in parts.values():
            want.update(r["event_id"] for r, late in zip(recs, reference_late(recs, LATENESS_MS))
                        if late)
    tables = OfflineTables.open(wh)
    # one Kafka message may hold many events (a batch envelope): the event id tells them apart
    copies, _ = physical_copies(tables.table("late_events"),
                                ["topic", "partition", "offset", "event_id"])
    kept = set(tables.scan_late_events().column("event_id").to_pylist())
    return len(want), len(kept & want), len(want - kept), copies


def _blocks_cmd(bs: str, store_url: str, tmp: Path, wh: Path, *catchup: str) -> list[str]:
    """A bounded blocks worker with recovery and a warehouse (sealed blocks, late events)."""
    return ["worker", "blocks", "--bootstrap", bs, "--store", store_url, "--bounded",
            "--shards", "3", "--lateness", LATENESS, "--recovery-dir", str(tmp / "recovery"),
            "--epoch-interval", "0.2", "--flush-interval", "100ms", "--warehouse", str(wh),
            *catchup]


def _check_blocks_run(row: Row, bs: str, w, summary, store_url: str, wh: Path) -> None:
    """Count a blocks worker's output against the oracle: the store's blocks, the sealed
    blocks and the late events on disk (physical copies included)."""
    from tests.dataflows.flowcheck import compare_to_oracle, expiry_for, oracle_for

    feats = features()
    oracle = oracle_for(bs, w, feats)
    got, want_n, got_n, row.lost, row.double_counted = block_counts(store_url, feats, oracle)
    problems = compare_to_oracle(got, oracle, feats, expiry_for(store_url, feats))
    sealed_copies, sealed_problems = sealed_blocks_check(wh, store_url, oracle, feats)
    late_want, late_kept, late_lost, late_copies = late_events_check(wh, bs, w, feats)
    row.events_in, row.events_out = want_n + late_want, got_n + late_kept
    row.lost += late_lost
    row.physical_duplicates = sealed_copies + late_copies
    row.note(f"item_views counted: oracle {want_n}, store {got_n}; every feature's blocks "
             f"compared: {len(problems)} differences")
    row.note(f"late events (the reference late rule, per partition in order; "
             f"{summary.total_late} produced late by the generator): {late_want} expected, "
             f"{late_kept} in the late_events table, {late_lost} missing, {late_copies} "
             "physical copies")
    row.note(f"sealed blocks in the blocks table: {len(sealed_problems)} differences from the "
             f"oracle, {sealed_copies} physical copies")
    row.note("events in/out = item_views counted + late events kept")
    row.notes += problems[:3] + sealed_problems[:3]
    row.passed = (not problems and not sealed_problems and row.lost == 0
                  and row.double_counted == 0 and row.physical_duplicates == 0)


def _kill_blocks_mid_stream(cmd: list[str], store_url: str, tmp: Path, row: Row) -> bool:
    """Start the blocks worker ``cmd`` and SIGKILL it once it has written blocks (False,
    with a note, if it finished first)."""
    from features.store import open_store

    def started() -> bool:
        with open_store(store_url, readonly=True) as store:
            return bool(store.get_watermarks("blocks/"))

    return kill_mid_stream(spawn(cmd, tmp / "worker.log"), started, row)


def kill9_blocks(tmp: Path, sz: Sizes) -> Row:
    from tests.dataflows.flowcheck import produce_world

    row = Row("kill9_blocks", "kill -9 of the blocks worker mid-stream, restart from "
              "--recovery-dir")
    wh = tmp / "warehouse"
    with platform_broker(tmp) as broker:
        bs = bootstrap_of(broker)
        w = world(sz, seed=5, total_views=max(100_000, sz.views), n_users=400, n_items=2_000)
        summary = produce_world(bs, w, batch_events=50)
        store_url = f"lmdb://{tmp}/store"
        cmd = [*TESSERA, *_blocks_cmd(bs, store_url, tmp, wh)]
        if not _kill_blocks_mid_stream(cmd, store_url, tmp, row):
            return row
        t0 = time.monotonic()
        run_to_end(cmd, tmp / "worker.log")
        row.recovery_s = time.monotonic() - t0
        _check_blocks_run(row, bs, w, summary, store_url, wh)
    row.note("recovery_s = restart to caught up (the bounded run re-reads from the snapshot)")
    return row


# ---------------------------------------------------------------------------- kill in a commit

#: (table, n-th commit of the run, before/after the catalog moves): the kills of
#: ``kill_in_commit``, one run each, then a run to the end
COMMIT_KILLS = (("blocks", 5, "after"), ("blocks", 5, "before"),
                ("late_events", 5, "after"), ("late_events", 5, "before"))


def kill_in_commit(tmp: Path, sz: Sizes) -> Row:
    """The blocks worker SIGKILLed inside its Iceberg commits (``bench/killpoint.py``):
    after the catalog moved but before the worker returned (the replay must not append
    again), and with the files written but the catalog not moved (the table must not see
    them; the replay appends once)."""
    from tests.dataflows.flowcheck import produce_world

    row = Row("kill_in_commit", "blocks worker SIGKILLed inside its sealed-block and "
              "late-event Iceberg commits (before and after the catalog moves), restarted each "
              "time")
    wh = tmp / "warehouse"
    with platform_broker(tmp) as broker:
        bs = bootstrap_of(broker)
        w = world(sz, seed=7, total_views=max(60_000, sz.views), n_users=400, n_items=2_000)
        summary = produce_world(bs, w, batch_events=50)
        store_url = f"lmdb://{tmp}/store"
        # flushes (and so sealed-block commits) as often as live, though it reads a backlog
        # and in small polls (10 messages of 50 events): many commits, so every kill lands
        # mid-stream
        args = [*TESSERA[3:], *_blocks_cmd(bs, store_url, tmp, wh,
                                           "--catchup-flush-interval", "100ms",
                                           "--batch-messages", "10")]
        killed = []
        for table, nth, when in COMMIT_KILLS:
            proc = spawn([sys.executable, str(ROOT / "bench" / "killpoint.py"), table, str(nth),
                          when, "--", *args], tmp / "worker.log")
            try:
                rc = proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                kill9(proc)
                rc = None
            killed.append(f"{table} #{nth} {when}: " + (
                "killed" if rc == -signal.SIGKILL else f"not killed (rc {rc})"))
        t0 = time.monotonic()
        run_to_end([*TESSERA, *_blocks_cmd(bs, store_url, tmp, wh)], tmp / "worker.log")
        row.recovery_s = time.monotonic() - t0
        _check_blocks_run(row, bs, w, summary, store_url, wh)
    row.note("kills (table, commit of the run, when): " + "; ".join(killed))
    if not all(k.endswith("killed") for k in killed):
        row.passed = False
        row.note("a run ended before its kill: make the world bigger")
    row.note("recovery_s = the last restart to caught up")
    return row


# ---------------------------------------------------------------------------- duplicate events


def duplicate_events(tmp: Path, sz: Sizes) -> Row:
    """Every views and engagements message produced twice in a row (a producer retrying
    after a lost acknowledgement): the blocks worker with the default features file
    (``deduplicate:``) must count each event once; the same run with ``deduplicate``
    removed is the baseline that double counts."""
    import yaml

    from tessera.synth import sinks
    from tests.dataflows.flowcheck import compare_to_oracle, expiry_for, oracle_for, produce_world

    row = Row("duplicate_events", "every views and engagements message produced twice "
              "(same event ids, new offsets)")
    feats = features()
    produce_once = sinks._Producer.produce
    copies = {"n": 0}

    def produce_twice(self, topic, value, *, partition, key):
        produce_once(self, topic, value, partition=partition, key=key)
        if topic in ("views", "engagements"):
            produce_once(self, topic, value, partition=partition, key=key)
            copies["n"] += 1

    plain_file = tmp / "features-no-dedup.yaml"
    doc = yaml.safe_load((ROOT / "features.yaml").read_text())
    doc.pop("deduplicate", None)
    plain_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    with platform_broker(tmp) as broker:
        bs = bootstrap_of(broker)
        w = world(sz, seed=9)
        sinks._Producer.produce = produce_twice
        try:
            summary = produce_world(bs, w, batch_events=1)
        finally:
            sinks._Producer.produce = produce_once
        oracle = oracle_for(bs, w, feats)
        results = {}
        for name, ffile in (("dedup", ROOT / "features.yaml"), ("plain", plain_file)):
            url = f"lmdb://{tmp}/store-{name}"
            t0 = time.monotonic()
            run_to_end([*TESSERA, "worker", "blocks", "--bootstrap", bs, "--store", url,
                        "--bounded", "--lateness", LATENESS, "--features", str(ffile)],
                       tmp / f"worker-{name}.log")
            took = time.monotonic() - t0
            got, want_n, got_n, lost, double = block_counts(url, feats, oracle)
            problems = compare_to_oracle(got, oracle, feats, expiry_for(url, feats))
            results[name] = (want_n, got_n, lost, double, problems, took)
    want_n, got_n, row.lost, row.double_counted, problems, took = results["dedup"]
    row.events_in, row.events_out = want_n, got_n
    row.recovery_s = took  # nothing to recover from: the bounded run over the doubled topics
    _, p_got, _, p_double, p_problems, p_took = results["plain"]
    log_text = (tmp / "worker-dedup.log").read_text(errors="replace")
    dropped = re.search(r"([\d,]+) duplicates dropped", log_text)
    row.note(f"{copies['n']:,} messages sent a second time ({summary.total_late} events late "
             "by design, not in the oracle)")
    row.note(f"with deduplicate (features.yaml): item_views oracle {want_n}, store {got_n}; "
             f"every feature's blocks compared: {len(problems)} differences; the worker "
             f"reported {dropped.group(1) if dropped else 'no'} duplicates dropped; "
             f"{took:.1f} s")
    row.note(f"baseline without deduplicate: item_views store {p_got} ({p_double} double "
             f"counted), {len(p_problems)} blocks differ from the oracle; {p_took:.1f} s")
    row.notes += problems[:3]
    row.passed = (not problems and row.lost == 0 and row.double_counted == 0
                  and p_double > 0 and dropped is not None)
    return row


def duplicates_after_restart(tmp: Path, sz: Sizes) -> Row:
    """The blocks worker is killed mid-stream; a producer then sends every views message
    again; the worker resumes from its recovery directory. The event ids are not in the
    snapshot: the resumed source reads its log again from the oldest remembered id
    (``PartitionCursor.dedup_from``) and must drop every copy. The horizon is set past the
    world's span (30 days), so every copy is a duplicate however old."""
    import yaml

    from tessera.synth import generate_records, sinks
    from tests.dataflows.flowcheck import produce_world

    row = Row("duplicates_after_restart", "kill -9 of the blocks worker, every views message "
              "sent again, restart from --recovery-dir")
    wh = tmp / "warehouse"
    ffile = tmp / "features-30d-dedup.yaml"
    doc = yaml.safe_load((ROOT / "features.yaml").read_text())
    doc["deduplicate"] = {**(doc.get("deduplicate") or {}), "views": "30d"}
    ffile.write_text(yaml.safe_dump(doc, sort_keys=False))
    with platform_broker(tmp) as broker:
        bs = bootstrap_of(broker)
        w = world(sz, seed=5, total_views=max(100_000, sz.views), n_users=400, n_items=2_000)
        summary = produce_world(bs, w, batch_events=50)
        store_url = f"lmdb://{tmp}/store"
        cmd = [*TESSERA, "--log-level", "INFO", *_blocks_cmd(bs, store_url, tmp, wh),
               "--features", str(ffile)]
        if not _kill_blocks_mid_stream(cmd, store_url, tmp, row):
            return row
        produce_once = sinks._Producer.produce

        def views_only(self, topic, value, *, partition, key):
            if topic == "views":
                produce_once(self, topic, value, partition=partition, key=key)

        sinks._Producer.produce = views_only
        try:
            produce_world(bs, w, batch_events=50)
        finally:
            sinks._Producer.produce = produce_once
        copies = len(generate_records(w)["views"])
        t0 = time.monotonic()
        run_to_end(cmd, tmp / "worker.log")
        row.recovery_s = time.monotonic() - t0
        _check_blocks_run(row, bs, w, summary, store_url, wh)
    log_text = (tmp / "worker.log").read_text(errors="replace")
    dropped = re.search(r"([\d,]+) duplicates dropped", log_text)
    n_dropped = int(dropped.group(1).replace(",", "")) if dropped else 0
    rebuilt = re.findall(r"source.dedup_rebuilt.*?messages=(\d+).*?took_s=([\d.]+)",
                         log_text)
    row.note(f"{copies:,} views sent again after the kill; the resumed worker dropped "
             f"{n_dropped:,} as duplicates; to rebuild its event-id memory it read "
             f"{sum(int(m) for m, _ in rebuilt):,} messages again over {len(rebuilt)} "
             f"partitions (slowest {max((float(t) for _, t in rebuilt), default=0):.2f} s)")
    row.note("recovery_s = restart (rebuild included) to caught up")
    row.passed = row.passed and n_dropped == copies
    return row


# ---------------------------------------------------------------------------- kill -9: sequences


def kill9_sequences(tmp: Path, sz: Sizes) -> Row:
    from features.store import open_store
    from tessera.synth import generate_records
    from tests.dataflows.flowcheck import produce_world

    row = Row("kill9_sequences", "kill -9 of the sequences worker mid-stream, restart from "
              "--recovery-dir")
    max_len = 100_000  # keep every action, so every event can be accounted for
    with platform_broker(tmp) as broker:
        bs = bootstrap_of(broker)
        w = world(sz, seed=21)
        produce_world(bs, w, batch_events=20)
        recs = generate_records(w)
        oracle: dict[str, set[str]] = {}
        for topic in ("views", "engagements"):
            for r in recs[topic]:
                oracle.setdefault(r["user_id"], set()).add(r["event_id"])
        users = sorted(oracle)
        store_url = f"lmdb://{tmp}/store"
        cmd = [*TESSERA, "worker", "sequences", "--bootstrap", bs, "--store", store_url,
               "--bounded", "--max-len", str(max_len), "--recovery-dir", str(tmp / "recovery"),
               "--epoch-interval", "0.2", "--batch-messages", "2"]

        def started() -> bool:
            with open_store(store_url, readonly=True) as store:
                return any(len(s.event_ids) for s in store.get_sequences("user", users))

        proc = spawn(cmd, tmp / "worker.log")
        if not kill_mid_stream(proc, started, row):
            return row
        with open_store(store_url, readonly=True) as store:
            at_kill = sum(len(s.event_ids) for s in store.get_sequences("user", users))
        t0 = time.monotonic()
        run_to_end(cmd, tmp / "worker.log")
        row.recovery_s = time.monotonic() - t0
        with open_store(store_url, readonly=True) as store:
            seqs = store.get_sequences("user", users)
    row.events_in = sum(len(v) for v in oracle.values())
    for u, s in zip(users, seqs):
        ids = s.event_ids.tolist()
        row.events_out += len(ids)
        row.double_counted += len(ids) - len(set(ids))
        row.lost += len(oracle[u] - set(ids))
        unexpected = set(ids) - oracle[u]
        if unexpected:
            row.note(f"user {u}: {len(unexpected)} unexpected event ids")
        ts = s.ts.tolist()
        if ts != sorted(ts, reverse=True):
            row.note(f"user {u}: sequence not newest first")
    row.note(f"{at_kill} actions were in the store when the worker was killed; "
             f"{len(users)} users compared event by event")
    row.passed = row.lost == 0 and row.double_counted == 0 and not row.notes[:-1]
    return row


# ---------------------------------------------------------------------------- kill -9: archive


def kill9_archive(tmp: Path, sz: Sizes) -> Row:
    from features.offline.raw import RawTables
    from schemas.registry import TOPICS
    from tessera.synth import generate_records
    from tests.dataflows.flowcheck import produce_world

    row = Row("kill9_archive", "kill -9 of the archive worker mid-stream, restart (offsets "
              "in the Iceberg snapshot)")
    with platform_broker(tmp) as broker:
        bs = bootstrap_of(broker)
        w = world(sz, seed=5, total_views=max(20_000, sz.views // 2))
        produce_world(bs, w, batch_events=20)
        want = {t: Counter(r["event_id"] for r in recs)
                for t, recs in generate_records(w).items()}
        wh = tmp / "wh"
        cmd = [*TESSERA, "worker", "archive", "--bootstrap", bs, "--warehouse", str(wh),
               "--bounded", "--commit-interval", "200ms"]

        def started() -> bool:
            raw = RawTables.open(wh)
            return any(raw.committed_offsets(t) for t in TOPICS)

        proc = spawn(cmd, tmp / "worker.log")
        if not kill_mid_stream(proc, started, row, settle_s=0.5):
            return row
        t0 = time.monotonic()
        run_to_end(cmd, tmp / "worker.log")
        row.recovery_s = time.monotonic() - t0
        raw = RawTables.open(wh)
        got = {t: Counter(raw.scan(t, columns=["event_id"])["event_id"].to_pylist())
               for t in TOPICS}
    for t in TOPICS:
        w_t, g_t = want.get(t, Counter()), got[t]
        row.events_in += sum(w_t.values())
        row.events_out += sum(g_t.values())
        row.lost += sum((w_t - g_t).values())
        row.double_counted += sum((g_t - w_t).values())
    row.physical_duplicates = row.double_counted  # the scan reads the rows as stored
    row.note("exactly once per raw table (event ids counted in the rows as stored), views/"
             "engagements/impressions/items")
    row.passed = row.lost == 0 and row.double_counted == 0 and row.events_in > 0
    return row


# ---------------------------------------------------------------------------- kill -9: labels


def _label_reference(recs: dict, n_parts: int, window_ms: int, lateness_ms: int):
    import numpy as np

    from features.blockstate import classify_late
    from features.labeljoin import join_reference
    from tessera.synth.sinks import partition_of

    on_time: dict[str, list] = {"impressions": [], "engagements": []}
    final_wm = None
    for topic in on_time:
        parts: dict[int, list] = {p: [] for p in range(n_parts)}
        for r in recs[topic]:
            parts[partition_of(r["user_id"], n_parts)].append(r)
        for seq in parts.values():
            if not seq:
                continue
            late, high = classify_late(-(2**62), np.array([r["event_ts"] for r in seq]),
                                       lateness_ms)
            on_time[topic] += [r for r, x in zip(seq, late.tolist()) if not x]
            wm = high - lateness_ms
            final_wm = wm if final_wm is None else min(final_wm, wm)
    return [r for r in join_reference(on_time["impressions"], on_time["engagements"], window_ms)
            if r["event_ts"] + window_ms <= final_wm]


def kill9_labels(tmp: Path, sz: Sizes) -> Row:
    from features.labeljoin import LABEL_ACTIONS
    from features.offline.training import TrainingTables, decode_json_columns
    from tessera.synth import generate_records
    from tests.dataflows.flowcheck import produce_world

    row = Row("kill9_labels", "kill -9 of the label-join worker mid-stream, restart from "
              "--recovery-dir")
    window_ms, lateness_ms = 30 * 60_000, 60_000
    with platform_broker(tmp) as broker:
        bs = bootstrap_of(broker)
        w = world(sz, seed=13, total_views=max(15_000, sz.views // 2),
                  duration_ms=6 * 3_600_000)
        produce_world(bs, w, batch_events=5)
        recs = generate_records(w)
        want = _label_reference(recs, 3, window_ms, lateness_ms)
        wh = tmp / "wh"
        cmd = [*TESSERA, "worker", "labels", "--bootstrap", bs, "--warehouse", str(wh),
               "--bounded", "--label-window", "30m", "--lateness", LATENESS, "--shards", "3",
               "--recovery-dir", str(tmp / "recovery"), "--epoch-interval", "0.2",
               "--commit-interval", "200ms", "--batch-messages", "2"]
        # two small messages per batch: the run spans many commits even on a fast machine,
        # so the kill lands mid-stream

        def started() -> bool:
            return TrainingTables.open(wh).count_rows() > 0

        proc = spawn(cmd, tmp / "worker.log")
        if not kill_mid_stream(proc, started, row, settle_s=0.0):
            return row
        at_kill = TrainingTables.open(wh).count_rows()
        if at_kill >= len(want):
            row.note("every example was committed before the kill: not mid-stream")
        t0 = time.monotonic()
        run_to_end(cmd, tmp / "worker.log")
        row.recovery_s = time.monotonic() - t0
        tables = TrainingTables.open(wh)
        stored = tables.count_rows()
        got = decode_json_columns(tables.scan_examples())
    want_by = {r["impression_id"]: r for r in want}
    got_ids = Counter(r["impression_id"] for r in got)
    row.events_in = len(want_by)
    row.events_out = len(got)
    row.lost = len(set(want_by) - set(got_ids))
    row.double_counted = sum(n - 1 for n in got_ids.values()) + len(set(got_ids) - set(want_by))
    wrong_labels = 0
    for r in got:
        ref = want_by.get(r["impression_id"])
        if ref is not None and any(r[f"label_{a}"] != ref[f"label_{a}"] for a in LABEL_ACTIONS):
            wrong_labels += 1
    row.double_counted += wrong_labels
    copies = stored - len(got)  # physical rows on disk beyond one per example
    row.physical_duplicates = copies
    row.note(f"{at_kill} rows committed when killed; {stored} rows stored on disk for "
             f"{len(got)} examples ({copies} re-appended copies; a read would deduplicate "
             "them by (impression_id, version), a DuckDB query or a user's reader would not); "
             f"label mismatches vs join_reference: {wrong_labels}")
    row.passed = (row.lost == 0 and row.double_counted == 0 and copies == 0
                  and row.events_in > 100 and at_kill < len(want))
    return row


# ---------------------------------------------------------------------------- broker SIGSTOP


def sigstop_broker(tmp: Path, sz: Sizes) -> Row:
    """Pause the broker (SIGSTOP) while a producer keeps producing and a tail worker runs."""
    from confluent_kafka import Producer

    from schemas.columnar import encode_batch, records_to_columns
    from tessera.synth import generate_records
    from tessera.synth.sinks import partition_of
    from tessera.topics import producer_config
    from tests.dataflows.flowcheck import compare_to_oracle, expiry_for, oracle_for

    row = Row("sigstop_broker", f"broker SIGSTOP for {sz.pause_s:.0f}s under load, then SIGCONT")
    feats = features()
    n_parts, steps = 3, 40
    with platform_broker(tmp, partitions=n_parts) as broker:
        bs = bootstrap_of(broker)
        w = world(sz, seed=31, total_views=max(10_000, sz.views // 3))
        recs = generate_records(w)
        slices: list[list[tuple[str, int, list]]] = [[] for _ in range(steps)]
        for topic in feats.sources:
            key = "item_id" if topic == "items" else "user_id"
            parts: dict[int, list] = {p: [] for p in range(n_parts)}
            for r in recs[topic]:
                parts[partition_of(r[key], n_parts)].append(r)
            for p, seq in parts.items():
                per = -(-len(seq) // steps) or 1
                for k in range(steps):
                    if seq[k * per:(k + 1) * per]:
                        slices[k].append((topic, p, seq[k * per:(k + 1) * per]))
        n_views = len(recs["views"])
        store_url = f"lmdb://{tmp}/store"
        worker = spawn([*TESSERA, "worker", "blocks", "--bootstrap", bs, "--store", store_url,
                        "--tail", "--shards", "3", "--lateness", LATENESS,
                        "--flush-interval", "200ms", "--epoch-interval", "0.5"],
                       tmp / "worker.log")
        produced = threading.Event()
        errors: list[str] = []

        def produce() -> None:
            producer = Producer(producer_config(bs))
            for batch in slices:
                for topic, p, chunk in batch:
                    for i in range(0, len(chunk), 50):
                        payload = encode_batch(records_to_columns(topic, chunk[i:i + 50]))
                        producer.produce(topic, payload, partition=p)
                producer.poll(0)
                time.sleep(0.1)
            left = producer.flush(120)
            if left:
                errors.append(f"{left} messages not delivered")
            produced.set()

        pid = broker.running_pid()
        t = threading.Thread(target=produce, daemon=True)
        t.start()
        time.sleep(1.0)  # under load: the producer is mid-way, the worker consuming
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(sz.pause_s)
        finally:
            os.kill(pid, signal.SIGCONT)
        t_resume = time.monotonic()
        t.join(180)
        oracle = oracle_for(bs, w, feats)
        from tests.dataflows.flowcheck import entity_ids_of, store_blocks

        ids = entity_ids_of(oracle, feats)
        problems: list[str] = ["not compared"]

        def caught_up() -> bool:
            nonlocal problems
            got = store_blocks(store_url, feats, ids)
            problems = compare_to_oracle(got, oracle, feats, expiry_for(store_url, feats))
            return not problems

        ok = wait_for(caught_up, 120, every=0.5)
        row.recovery_s = time.monotonic() - t_resume if ok else None
        worker_alive = worker.poll() is None
        _, want_n, got_n, row.lost, row.double_counted = block_counts(store_url, feats, oracle)
        stop_proc(worker)
    row.events_in, row.events_out = want_n, got_n
    row.note(f"{n_views} views produced, {n_views - want_n} of them late beyond the lateness "
             "(kept out of blocks by design, as in the oracle)")
    row.note(f"producer errors: {errors or 'none'}; worker alive after resume: {worker_alive}; "
             f"item_views oracle {want_n}, store {got_n}")
    if problems:
        row.notes += problems[:3]
    row.passed = ok and not errors and worker_alive and row.lost == 0 and row.double_counted == 0
    return row


# ---------------------------------------------------------------------------- serving stack


@dataclass
class Serving:
    bootstrap: str
    base_url: str
    store_url: str
    server: object
    state: object
    registry_dir: Path


def build_store(bootstrap: str, store_url: str, seed: int = 3, users: int = 200,
                items: int = 1_500, views: int = 6_000):
    """A generated world in Kafka and the blocks/sequences it makes in the store."""
    from dataflows.blocks import BlocksFlowConfig, build_blocks_flow
    from dataflows.runner import run_flow
    from dataflows.sequences import SequencesFlowConfig, build_sequences_flow
    from features.preassembled import refresh_preassembled
    from features.store import open_store
    from tessera.synth import WorldConfig, write_to_kafka

    now = int(time.time() * 1000)
    w = WorldConfig(seed=seed, n_users=users, n_items=items, n_authors=60, n_topics=8,
                    total_views=views, start_ts=now - 86_400_000, duration_ms=86_400_000,
                    id_namespace="f-")
    write_to_kafka(w, bootstrap, batch_events=500)
    feats = features()
    run_flow(build_blocks_flow(BlocksFlowConfig(bootstrap=bootstrap, store_url=store_url,
                                                features=feats, bounded=True)))
    run_flow(build_sequences_flow(SequencesFlowConfig(bootstrap=bootstrap, store_url=store_url,
                                                      bounded=True)))
    with open_store(store_url) as store:
        refresh_preassembled(store, feats, "item")
    return w


@contextlib.contextmanager
def serving(tmp: Path, bootstrap: str | None, store_url: str) -> Iterator[Serving]:
    """Run the real app with uvicorn in a thread; yield once /readyz answers 200."""
    import httpx
    import uvicorn

    from serving.app import create_app
    from serving.config import ServingConfig
    from tessera.broker import find_free_port

    port = find_free_port()
    config = ServingConfig(port=port, store_url=store_url, bootstrap=bootstrap,
                           spool_dir=tmp / "spool", registry_dir=tmp / "registry",
                           features_path=str(ROOT / "features.yaml"))
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=port,
                                           log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    base = f"http://{config.host}:{port}"
    if not wait_for(lambda: httpx.get(f"{base}/readyz", timeout=1).status_code == 200, 60, 0.1):
        server.should_exit = True
        raise RuntimeError("the server did not become ready")
    try:
        yield Serving(bootstrap or "", base, store_url, server, app.state.serving,
                      tmp / "registry")
    finally:
        server.should_exit = True
        th.join(15)


def feed(base: str, user: str = "f-u1", limit: int = 10, timeout: float = 30):
    import httpx

    return httpx.post(f"{base}/v1/feed", json={"user_id": user, "limit": limit},
                      timeout=timeout)


def metric(base: str, name: str, **labels: str) -> float:
    import httpx

    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    total = 0.0
    for line in httpx.get(f"{base}/metrics", timeout=5).text.splitlines():
        if line.startswith(name) and (not want or want in line) and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            if head.split("{")[0] == name:
                total += float(value)
    return total


# ---------------------------------------------------------------------------- store unavailable


class FlakyStore:
    """Wrap a store; while ``down`` is set every method call raises StoreUnavailableError."""

    def __init__(self, inner):
        self._inner = inner
        self.down = threading.Event()
        self.failed_calls = 0

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self.down.is_set():
                from features.store.errors import StoreUnavailableError

                self.failed_calls += 1
                raise StoreUnavailableError(f"injected fault: store unreachable ({name})")
            return attr(*args, **kwargs)

        return call


def store_unavailable(tmp: Path, sz: Sizes, stack: Serving | None = None) -> Row:
    row = Row("store_unavailable", "online store reads raise StoreUnavailableError "
              "(injected at the store interface), then recover")
    with contextlib.ExitStack() as es:
        if stack is None:
            stack = es.enter_context(_serving_stack(tmp))
        st = stack.state
        flaky = FlakyStore(st.client.store)
        st.client.store = flaky
        st.store = flaky
        try:
            before = feed(stack.base_url)
            if before.status_code != 200 or before.json().get("degraded"):
                row.note(f"healthy before the fault? {before.status_code} "
                         f"{before.json().get('degraded')}")
            m0 = metric(stack.base_url, "tessera_degraded_total", reason="store_unavailable")
            flaky.down.set()
            codes: Counter = Counter()
            degraded_ok = 0
            for k in range(sz.requests):
                r = feed(stack.base_url, user=f"f-u{k % 50}")
                codes[r.status_code] += 1
                if r.status_code == 200:
                    body = r.json()
                    if "store_unavailable" in body.get("degraded", []) and body["items"]:
                        degraded_ok += 1
            m1 = metric(stack.base_url, "tessera_degraded_total", reason="store_unavailable")
            flaky.down.clear()
            t0 = time.monotonic()
            healthy = wait_for(lambda: _healthy(stack.base_url), 30, 0.1)
            row.recovery_s = time.monotonic() - t0 if healthy else None
        finally:
            flaky.down.clear()
            st.client.store = flaky._inner
            st.store = flaky._inner
    row.events_in = sz.requests
    row.events_out = codes[200]
    row.lost = sz.requests - degraded_ok
    row.note(f"during the fault: status codes {dict(codes)}, {degraded_ok} pages with items "
             f"and degraded=['store_unavailable']; tessera_degraded_total "
             f"+{m1 - m0:.0f}; {flaky.failed_calls} store calls failed")
    row.passed = healthy and degraded_ok == sz.requests and m1 - m0 >= sz.requests
    return row


def _healthy(base: str) -> bool:
    r = feed(base)
    return r.status_code == 200 and not r.json().get("degraded") and bool(r.json()["items"])


@contextlib.contextmanager
def _serving_stack(tmp: Path) -> Iterator[Serving]:
    with platform_broker(tmp, partitions=2) as broker:
        bs = bootstrap_of(broker)
        store_url = f"lmdb://{tmp}/store"
        build_store(bs, store_url)
        with serving(tmp, bs, store_url) as stack:
            yield stack


# ---------------------------------------------------------------------------- corrupt model


def tiny_ranker(path: Path, weight: float) -> Path:
    """A one-feature ONNX L2: score = weight * dense[:, 0] (a real, valid model)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.array([[weight]], dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["dense", "w"], ["score"])], "tiny",
        [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["n", 1])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["n", 1])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _publish_l2(registry, tmp: Path, version: str, weight: float = 1.0):
    from models.features import DenseFeature, FeatureSchema
    from models.publish import publish_model

    schema = FeatureSchema(dense=(DenseFeature("item_views_1d", log1p=True),))
    onnx_path = tiny_ranker(tmp / f"{version}.onnx", weight)
    return publish_model(registry, "l2", {"l2": onnx_path}, schema, {}, {}, version=version)


def corrupt_model(tmp: Path, sz: Sizes, stack: Serving | None = None) -> Row:
    from models.registry import ModelRegistry

    row = Row("corrupt_model", "L2 versions published with a garbage ONNX file and with a "
              "hash mismatch")
    with contextlib.ExitStack() as es:
        if stack is None:
            stack = es.enter_context(_serving_stack(tmp))
        registry = ModelRegistry(stack.registry_dir)
        tag = uuid.uuid4().hex[:6]
        good, garbage, tampered, fixed = (f"good-{tag}", f"garbage-{tag}", f"tampered-{tag}",
                                          f"fixed-{tag}")

        def l2_version() -> str | None:
            r = feed(stack.base_url)
            return r.json()["model_versions"].get("l2") if r.status_code == 200 else None

        _publish_l2(registry, tmp, good)
        loaded = wait_for(lambda: l2_version() == good, 30, 0.2)
        if not loaded:
            row.note(f"the good version never served (model_versions l2={l2_version()})")
            return row
        codes: Counter = Counter()
        served: Counter = Counter()

        def probe(n: int) -> None:
            for _ in range(n):
                r = feed(stack.base_url)
                codes[r.status_code] += 1
                if r.status_code == 200:
                    served[r.json()["model_versions"].get("l2")] += 1

        # 1. garbage bytes with a correct manifest hash: the load probe refuses it
        registry.publish("l2", {"l2.onnx": b"\x08\x07garbage, not a protobuf" * 10},
                         {"feature_schema": {"dense": [{"name": "item_views_1d"}]},
                          "feature_names": ["item_views_1d"]}, version=garbage)
        time.sleep(2.5)  # > the watcher's 1 s poll, twice
        probe(sz.requests // 2)
        # 2. a valid model whose file is changed after publishing: the hash check refuses it
        info = _publish_l2(registry, tmp, tampered, weight=-1.0)
        onnx_file = info.path / "l2.onnx"
        onnx_file.chmod(0o644)
        onnx_file.write_bytes(onnx_file.read_bytes() + b"\x00tampered")
        # (published then tampered: the watcher may win the race and load it first)
        time.sleep(2.5)
        probe(sz.requests // 2)
        current = registry.current_version("l2")
        # 3. a good version is then picked up again
        _publish_l2(registry, tmp, fixed)
        t0 = time.monotonic()
        ok = wait_for(lambda: l2_version() == fixed, 30, 0.2)
        row.recovery_s = time.monotonic() - t0 if ok else None
    row.events_in = 2 * (sz.requests // 2)
    row.events_out = codes[200]
    row.lost = row.events_in - served[good]
    row.note(f"CURRENT pointed at {current!r}; pages served by l2 version: {dict(served)}; "
             f"status codes {dict(codes)}; then {fixed!r} loaded: {ok}")
    race = served.get(tampered, 0)
    if race:
        row.note("the tampered version served: the watcher loaded it between publish and "
                 "tamper (a race of the fault injection, not a refusal failure)")
    row.passed = ok and served[good] == row.events_in and codes[200] == row.events_in
    return row


# ---------------------------------------------------------------------------- broker bounce

#: broker restarts in a row, each started again as soon as the old process is gone
BOUNCES = 5


def broker_bounce(tmp: Path, sz: Sizes) -> Row:
    """Restart the broker (empty, same port) again and again with no pause, so each restart
    lands inside the tail worker's poll loop; the worker must survive every one and count the
    events of each new log exactly once."""
    from confluent_kafka import Producer

    from features.aggregations import build_aggregation
    from features.store import open_store
    from schemas.columnar import encode_batch, records_to_columns
    from tessera.broker import EmbeddedBroker, find_free_port
    from tessera.topics import PLATFORM_TOPICS, create_topics, producer_config

    row = Row("broker_bounce", f"broker restarted empty {BOUNCES} times in a row with no "
              "pause (each restart inside the tail worker's poll loop)")
    spec = next(f for f in features().features if f.name == "item_views")
    agg = build_aggregation(spec)
    store_url = f"lmdb://{tmp}/store"

    def produce(bs: str, item: str, n: int) -> None:
        now = int(time.time() * 1000)
        views = [{"event_id": f"v-{item}-{j}", "event_ts": now + j, "user_id": f"u{j % 7}",
                  "item_id": item, "author_id": "a", "topic": "t", "dwell_ms": 100,
                  "request_id": None} for j in range(n)]
        producer = Producer(producer_config(bs))
        for k in range(0, n, 10):
            producer.produce("views", encode_batch(records_to_columns("views", views[k:k + 10])),
                             partition=(k // 10) % 2)
        if producer.flush(15):
            raise RuntimeError("the broker did not acknowledge every message")

    def count(item: str) -> int:
        with contextlib.suppress(Exception), open_store(store_url, readonly=True) as store:
            [t] = store.get_block_tables("item", "views", [item])
            rows = [r for r in (t.to_rows() if t is not None else []) if r[0] == spec.key]
            finest = min((r[2] for r in rows), default=0)
            return sum(int(agg.finalize(agg.from_bytes(rep))) for _, _, size, rep in rows
                       if size == finest)
        return 0

    port = find_free_port()
    broker = EmbeddedBroker(port=port, state_dir=tmp / "broker")
    bs = broker.start(timeout_s=30).bootstrap
    create_topics(bs, PLATFORM_TOPICS, partitions=2)
    worker = None
    per_log = 50
    items = [f"bounce{k}-{uuid.uuid4().hex[:6]}" for k in range(BOUNCES + 1)]
    try:
        worker = spawn([*TESSERA, "worker", "blocks", "--bootstrap", bs, "--store", store_url,
                        "--tail", "--topics", "views", "--shards", "2",
                        "--flush-interval", "200ms"], tmp / "worker.log")
        produce(bs, items[0], per_log)
        if not wait_for(lambda: count(items[0]) == per_log, 120, 0.2):
            raise RuntimeError(f"the worker did not count the first log:\n"
                               f"{_text(tmp / 'worker.log')[-2000:]}")
        t0 = time.monotonic()
        for k in range(1, BOUNCES + 1):
            broker.stop(timeout_s=2)
            broker = EmbeddedBroker(port=port, state_dir=tmp / "broker")
            broker.start(timeout_s=30)
            create_topics(bs, PLATFORM_TOPICS, partitions=2)
            produce(bs, items[k], per_log)
            if k < BOUNCES:  # the next restart while this log is being read
                time.sleep(0.05 * k)
        wait_for(lambda: count(items[-1]) == per_log, 90, 0.2)
        row.recovery_s = time.monotonic() - t0
        time.sleep(2)  # a late duplicate would show now
        alive = worker.poll() is None
        rc = worker.returncode
        counts = [count(i) for i in items]
    finally:
        if worker is not None:
            stop_proc(worker)
        broker.stop(timeout_s=1)
    # a log cut short by the next restart loses its unread events with the memory-only
    # broker (what it held is gone by design); the first and the last log must be whole
    must = [counts[0], counts[-1]]
    row.events_in = 2 * per_log
    row.events_out = sum(min(c, per_log) for c in must)
    row.lost = sum(max(0, per_log - c) for c in must)
    row.double_counted = sum(max(0, c - per_log) for c in counts)
    row.note(f"views counted per log (first, {BOUNCES - 1} cut short by the next restart, "
             f"last): {counts} of {per_log} each; worker alive after the bounces: {alive}"
             + ("" if alive else f" (exit status {rc})"))
    import confluent_kafka

    row.note(f"librdkafka {confluent_kafka.libversion()[0]} (2.12 segfaults in about one run "
             "of three here; the locked 2.16 passed 6 of 6)")
    row.note("a log the next restart cuts short may lose unread events with the memory-only "
             "broker; none may be counted twice")
    row.passed = alive and row.lost == 0 and row.double_counted == 0
    return row


# ---------------------------------------------------------------------------- broker restart


def broker_restart(tmp: Path, sz: Sizes) -> Row:
    """Stop the broker with serving and a tail worker running; restart it on the same port."""
    from confluent_kafka import Producer

    from features.offline.raw import RawTables
    from features.store import open_store
    from schemas.columnar import (
        columns_to_records,
        decode_message,
        encode_batch,
        records_to_columns,
    )
    from tessera.broker import EmbeddedBroker, find_free_port
    from tessera.topics import (
        PLATFORM_TOPICS,
        create_topics,
        list_topics,
        producer_config,
        read_to_end,
    )

    row = Row("broker_restart", "broker stopped with serving and a blocks worker running, "
              "restarted empty on the same port")
    port = find_free_port()
    broker = EmbeddedBroker(port=port, state_dir=tmp / "broker")
    bs = broker.start(timeout_s=30).bootstrap
    create_topics(bs, PLATFORM_TOPICS, partitions=2)
    worker = archiver = None
    wh = tmp / "warehouse"
    try:
        store_url = f"lmdb://{tmp}/store"
        build_store(bs, store_url)
        # INFO: the wait below reads the worker's source.partition_open lines
        worker = spawn([*TESSERA[:-2], "--log-level", "INFO", "worker", "blocks",
                        "--bootstrap", bs, "--store", store_url,
                        "--tail", "--shards", "2", "--flush-interval", "200ms"],
                       tmp / "worker.log")
        # the outage must find the worker reading (a worker that starts during it finds no
        # topics and exits, as it should), not still importing on a loaded machine
        if not wait_for(lambda: "source.partition_open" in _text(tmp / "worker.log"), 120, 0.2):
            raise RuntimeError(f"the blocks worker did not start:\n{_text(tmp / 'worker.log')}")

        # the archive: the durable copy of what the memory-only broker acknowledged
        archiver = spawn([*TESSERA[:-2], "--log-level", "INFO", "worker", "archive",
                          "--bootstrap", bs, "--warehouse",
                          str(wh), "--tail", "--topics", "impressions",
                          "--commit-interval", "200ms"], tmp / "archive.log")

        def logged() -> Counter:
            out: Counter = Counter()
            for m in read_to_end(bs, "impressions", idle_timeout_s=2):
                for r in columns_to_records(decode_message(m.value(), "impressions")):
                    out[r["impression_id"]] += 1
            return out

        def archived() -> Counter:
            with contextlib.suppress(Exception):  # no commit yet
                raw = RawTables.open(wh)
                return Counter(raw.scan("impressions", columns=["impression_id"])
                               ["impression_id"].to_pylist())
            return Counter()

        with serving(tmp, bs, store_url) as stack:
            pre = [i["impression_id"] for k in range(3)
                   for i in feed(stack.base_url, f"f-u{k}").json()["items"]]
            # Kafka acknowledged these; the embedded broker keeps them in memory only, so
            # they survive its restart only in the archive: stop it once they are there
            wait_for(lambda: all(archived()[i] >= 1 for i in pre), 60, 0.2)
            broker.stop(timeout_s=2)
            t_down = time.monotonic()
            outage: list[str] = []
            codes: Counter = Counter()
            slow = 0.0
            for k in range(sz.requests):
                t0 = time.monotonic()
                r = feed(stack.base_url, f"f-u{k % 40}")
                slow = max(slow, time.monotonic() - t0)
                codes[r.status_code] += 1
                if r.status_code == 200:
                    outage += [i["impression_id"] for i in r.json()["items"]]
            # let the outage outlast librdkafka's message timeout (5 s): spooled to disk
            time.sleep(max(0.0, 7.0 - (time.monotonic() - t_down)))
            spooled = stack.state.logger.spool.pending()
            worker_survived = worker.poll() is None
            broker = EmbeddedBroker(port=port, state_dir=tmp / "broker")
            broker.start(timeout_s=30)
            create_topics(bs, PLATFORM_TOPICS, partitions=2)
            t_up = time.monotonic()
            got: Counter = Counter()

            def arrived() -> bool:
                nonlocal got
                got = logged()
                return all(got[i] >= 1 for i in outage)

            all_in = wait_for(arrived, 60, 0.5)
            row.recovery_s = time.monotonic() - t_up if all_in else None
            time.sleep(3)  # a late duplicate would show now
            got = logged()
            after = [i["impression_id"] for i in feed(stack.base_url, "f-u7").json()["items"]]
            # the worker must pick up events produced after the restart
            item = f"f-fault-{uuid.uuid4().hex[:6]}"
            # ten minutes ahead: the generated sessions run a little past the wall clock, and
            # a partition keeps its running maximum across the reset, so events stamped
            # "now" could be late there (dropped by design) rather than lost
            now = int(time.time() * 1000) + 600_000
            views = [{"event_id": f"fv-{item}-{j}", "event_ts": now + j, "user_id": "f-u1",
                      "item_id": item, "author_id": "a", "topic": "t", "dwell_ms": 100,
                      "request_id": None} for j in range(25)]
            producer = Producer(producer_config(bs))
            producer.produce("views", encode_batch(records_to_columns("views", views)),
                             partition=0)
            producer.flush(10)

            def worker_counted() -> bool:
                with open_store(store_url, readonly=True) as store:
                    [table] = store.get_block_tables("item", "views", [item])
                return table is not None and len(table.to_rows()) > 0

            worker_ok = wait_for(worker_counted, 120, 0.5)
            after_ok = wait_for(lambda: all(logged()[i] >= 1 for i in after), 30, 0.5)
            wait_for(lambda: all(archived()[i] >= 1 for i in outage), 60, 0.5)
            kept = archived()
            archiver_rc = archiver.poll()
            # a producer that reached the new broker before create_topics must not have made
            # the topic with the broker's own partition count (Tansu: 4)
            parts_after = list_topics(bs).get("impressions")
    finally:
        for proc in (worker, archiver):
            if proc is not None:
                stop_proc(proc)
        broker.stop(timeout_s=1)
    row.events_in = len(pre) + len(outage)
    row.events_out = sum(min(kept[i], 1) for i in pre) + sum(got[i] for i in outage)
    row.lost = sum(1 for i in pre if kept[i] == 0) + sum(1 for i in outage if got[i] == 0)
    row.double_counted = sum(got[i] - 1 for i in outage if got[i] > 1)
    row.physical_duplicates = sum(kept[i] - 1 for i in pre + outage if kept[i] > 1)
    outage_archived = all(kept[i] >= 1 for i in outage)
    row.note(f"{len(pre)} impressions acknowledged before the stop: {sum(kept[i] >= 1 for i in pre)} "
             "in the raw archive (the broker keeps its log in memory only, so the archive is "
             "their durable copy; the broker is stopped once they are there), "
             f"{row.physical_duplicates} copies; {len(outage)} impressions of the outage in "
             f"the new broker's log, {sum(kept[i] >= 1 for i in outage)} of them archived by "
             f"the end; impressions has {parts_after} partitions after the restart (2 "
             "declared)" + ("" if archiver_rc is None else
                          f" (the archive worker exited with status {archiver_rc})"))
    row.note(f"during the outage: status codes {dict(codes)}, slowest page {slow:.2f}s, "
             f"{spooled} messages on the spool; worker survived the outage: "
             f"{worker_survived}; worker consumed events produced after the restart: "
             f"{worker_ok}; impressions of a page after the restart arrived: {after_ok}")
    if not worker_ok:
        tail = (tmp / "worker.log").read_text(errors="replace").strip().splitlines()[-2:]
        row.note(f"worker log tail: {' / '.join(t[-200:] for t in tail) or '(empty)'}")
    if not outage_archived:
        # the cause found on 2026-12-07: the spool's producer reached the restarted broker
        # before create_topics and Tansu auto-created `impressions` with 4 partitions, which
        # the archive (2 partitions listed at start) never read; producers no longer create
        # topics (tessera.topics.producer_config)
        row.note("NOT ALL OUTAGE IMPRESSIONS ARCHIVED within 60 s of the restart")
    row.passed = (all_in and row.lost == 0 and row.double_counted == 0 and codes[200] ==
                  sz.requests and worker_ok and after_ok and row.physical_duplicates == 0
                  and outage_archived and parts_after == 2)
    return row


# ---------------------------------------------------------------------------- aerospike restart


def aerospike_restart(tmp: Path, sz: Sizes) -> Row:
    """Stop the Aerospike server under serving and a tail blocks worker; start it again."""
    from confluent_kafka import Producer

    from features.aggregations import build_aggregation
    from features.store import open_store
    from schemas.codec import encode
    from tessera.aerospike_local import LocalAerospike, available, server_dir
    from tessera.topics import producer_config

    row = Row("aerospike_restart", f"Aerospike server stopped for {sz.pause_s:.0f}s under "
              "serving and a tail blocks worker, then started again (file-backed namespace)")
    if not available():
        row.note(f"no Aerospike server build at {server_dir()}: not run")
        return row
    feats = features()
    spec = next(f for f in feats.features if f.name == "item_views")
    agg = build_aggregation(spec)
    items = [f"f-as-{uuid.uuid4().hex[:6]}-{k}" for k in range(20)]

    def counted() -> int:
        """item_views events in the store over the fault items (finest blocks)."""
        with open_store(store_url, readonly=True) as store:
            tables = store.get_block_tables("item", "views", items)
        total = 0
        for t in tables:
            if t is None:
                continue
            rows = [r for r in t.to_rows() if r[0] == spec.key]
            finest = min((r[2] for r in rows), default=0)
            total += sum(int(agg.finalize(agg.from_bytes(r[3]))) for r in rows
                         if r[2] == finest)
        return total

    server = LocalAerospike(tmp / "aerospike", persistent=True, size_mb=512).start()
    worker = None
    try:
        store_url = server.store_url
        with platform_broker(tmp, partitions=2) as broker:
            bs = bootstrap_of(broker)
            build_store(bs, store_url)
            def day_blocks() -> list:
                """The sample's 1d item_views blocks. The tail worker re-reads the world
                (the same counts), but its retention drops old 5m and 1h blocks as time
                moves on, and sketch bytes depend on the order values arrived in."""
                with open_store(store_url, readonly=True) as store:
                    tables = store.get_block_tables("item", "views", sample)
                return [t and [r for r in t.to_rows()
                               if r[0] == spec.key and r[2] == 86_400_000] for t in tables]

            with open_store(store_url, readonly=True) as store:
                sample = sorted(store.list_entity_ids("item", "views"))[:200]
            kept = day_blocks()
            worker = spawn([*TESSERA, "worker", "blocks", "--bootstrap", bs, "--store", store_url,
                            "--tail", "--shards", "2", "--flush-interval", "200ms"],
                           tmp / "worker.log")
            produced = [0]
            stop_producing = threading.Event()

            def produce() -> None:  # one view a message, what producers send, 50 a second
                producer = Producer(producer_config(bs))
                base = int(time.time() * 1000) + 600_000  # ahead of the world's sessions
                j = 0
                while not stop_producing.is_set():
                    rec = {"event_id": f"fa-{j}", "event_ts": base + 20 * j,
                           "user_id": f"f-u{j % 40}", "item_id": items[j % len(items)],
                           "author_id": "a", "topic": "t", "dwell_ms": 100,
                           "request_id": None}
                    producer.produce("views", encode("views", rec), partition=j % 2)
                    producer.poll(0)
                    produced[0] += 1
                    j += 1
                    time.sleep(0.02)
                producer.flush(30)

            with serving(tmp, bs, store_url) as stack:
                t = threading.Thread(target=produce, daemon=True)
                t.start()
                healthy_before = wait_for(lambda: _healthy(stack.base_url), 30, 0.2)
                wait_for(lambda: counted() > 0, 60, 0.2)
                server.stop()
                t_down = time.monotonic()
                codes: Counter = Counter()
                degraded_ok = 0
                m0 = metric(stack.base_url, "tessera_degraded_total", reason="store_unavailable")
                while time.monotonic() - t_down < sz.pause_s:
                    r = feed(stack.base_url, f"f-u{codes.total() % 40}")
                    codes[r.status_code] += 1
                    if r.status_code == 200 and r.json()["items"] and \
                            "store_unavailable" in r.json().get("degraded", []):
                        degraded_ok += 1
                    time.sleep(0.1)
                m1 = metric(stack.base_url, "tessera_degraded_total", reason="store_unavailable")
                worker_alive_down = worker.poll() is None
                server.start()
                t_up = time.monotonic()
                time.sleep(2.0)  # a little more traffic after the restart
                stop_producing.set()
                t.join(60)
                total = produced[0]
                caught_up = wait_for(lambda: counted() == total, 120, 0.5)
                healthy_after = wait_for(lambda: _healthy(stack.base_url), 60, 0.2)
                row.recovery_s = time.monotonic() - t_up if caught_up and healthy_after else None
                got = counted()
                after = day_blocks()
            worker_alive = worker.poll() is None
    finally:
        if worker is not None:
            stop_proc(worker)
        server.stop()
    retries = (tmp / "worker.log").read_text(errors="replace").count("store.unavailable")
    row.events_in, row.events_out = total, got
    row.lost = max(0, total - got)
    row.double_counted = max(0, got - total)
    pages = codes.total()
    row.note(f"{total} single-event views of {len(items)} new items produced across the "
             f"outage; item_views in the store after the restart: {got}")
    row.note(f"during the outage: {pages} feed requests, status codes {dict(codes)}, "
             f"{degraded_ok} pages with items and degraded=['store_unavailable'], "
             f"tessera_degraded_total +{m1 - m0:.0f}; healthy before: {healthy_before}")
    row.note(f"worker alive during the outage: {worker_alive_down}, after: {worker_alive}; "
             f"store.unavailable retries logged: {retries}")
    row.note(f"1d item_views blocks written before the outage survived the restart: "
             f"{after == kept} "
             f"({sum(1 for k in kept if k)} items compared)")
    row.passed = (healthy_before and caught_up and healthy_after and row.lost == 0
                  and row.double_counted == 0 and pages > 0 and degraded_ok == pages
                  and worker_alive_down and worker_alive and after == kept and retries > 0)
    return row


# ---------------------------------------------------------------------------- disk full


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def can_mount(tmp: Path) -> bool:
    probe = tmp / "mount-probe"
    try:
        with tmpfs(probe, "16k"):
            return True
    except (subprocess.CalledProcessError, FileNotFoundError, PermissionError):
        return False


def _imp(i: int) -> dict:
    return {"impression_id": f"df-{i}", "event_id": f"df-{i}", "event_ts": 1_790_000_000_000 + i,
            "request_id": f"r-{i // 5}", "user_id": "u1", "item_id": f"i{i}", "author_id": "a",
            "topic": "t", "position": i % 5, "feed_type": "EXPLORE", "source": "trending",
            "model_versions": {"l2": "v1"}, "scores": {"l2": 0.5},
            "features": {"item_views_1d": float(i), "item_ctr_1d": 0.01},
            "feature_watermark": 1_790_000_000_000}


def spool_disk_full(tmp: Path, sz: Sizes) -> Row:
    """The broker is down, so impressions spool; the spool's file system fills up."""
    from schemas.columnar import columns_to_records, decode_message
    from serving.forward_log import ImpressionLogger, Spool
    from tessera.broker import EmbeddedBroker, find_free_port
    from tessera.topics import create_topics, read_to_end

    row = Row("spool_disk_full", "impression spool on a 64 KiB tmpfs, broker down (every "
              "impression spools), then space freed and broker back")
    if not can_mount(tmp):
        row.note("cannot mount a tmpfs here (not root?): scenario skipped")
        return row
    port = find_free_port()
    bs = f"127.0.0.1:{port}"
    spool_dir = tmp / "spool"
    acked: list[str] = []
    errors: list[str] = []
    with tmpfs(spool_dir, "64k"):
        logger = ImpressionLogger(bs, spool_dir, drain_interval_s=0.5)
        requests = 120  # 600 impressions of ~200 bytes: about twice the space
        for k in range(requests):
            recs = [_imp(5 * k + j) for j in range(5)]
            try:
                logger.log(recs)
                acked += [r["impression_id"] for r in recs]
            except OSError as exc:
                errors.append(f"log(): {exc}")
        # the deliveries fail after message.timeout.ms (5 s), then spool
        time.sleep(8)
        thread_alive = logger._thread.is_alive()
        df = os.statvfs(spool_dir)
        free_kb = df.f_bavail * df.f_frsize // 1024
        segments = sorted(spool_dir.glob("spool-*.bin"))
        on_disk = sum(len(Spool.read(s)) for s in segments)
        undecodable = 0
        for s in segments:
            for p in Spool.read(s):
                try:
                    decode_message(p, "impressions")
                except Exception:
                    undecodable += 1
        # space comes back, then the broker
        subprocess.run(["mount", "-o", "remount,size=16m", str(spool_dir)], check=True)
        broker = EmbeddedBroker(port=port, state_dir=tmp / "broker")
        broker.start(timeout_s=30)
        t_up = time.monotonic()
        try:
            create_topics(bs, ["impressions"], partitions=1)
            got: Counter = Counter()
            bad_messages = 0

            def arrived() -> bool:
                nonlocal got, bad_messages
                got, bad_messages = Counter(), 0
                for m in read_to_end(bs, "impressions", idle_timeout_s=1):
                    try:
                        recs = columns_to_records(decode_message(m.value(), "impressions"))
                    except Exception:
                        bad_messages += 1
                        continue
                    for r in recs:
                        got[r["impression_id"]] += 1
                with contextlib.suppress(Exception):
                    logger.drain_now()
                return all(got[i] >= 1 for i in acked)

            all_in = wait_for(arrived, 40, 1.0)
            row.recovery_s = time.monotonic() - t_up if all_in else None
            arrived()
        finally:
            logger.close(timeout_s=2)
            broker.stop(timeout_s=1)
    row.events_in = len(acked)
    row.events_out = sum(got[i] for i in acked)
    row.lost = sum(1 for i in acked if got[i] == 0)
    row.double_counted = sum(got[i] - 1 for i in acked if got[i] > 1)
    row.note(f"log() raised {len(errors)} times; logger thread alive after ENOSPC: "
             f"{thread_alive}; {on_disk} messages readable on the full spool "
             f"({undecodable} undecodable, {free_kb} KiB free); after recovery "
             f"{bad_messages} undecodable messages reached Kafka")
    row.passed = (all_in and row.lost == 0 and row.double_counted == 0 and bad_messages == 0
                  and undecodable == 0)
    return row


def warehouse_disk_full(tmp: Path, sz: Sizes) -> Row:
    """The archive worker's warehouse fills up: a clear error, then exactly once after space."""
    from features.offline.raw import RawTables
    from schemas.registry import TOPICS
    from tessera.synth import generate_records
    from tests.dataflows.flowcheck import produce_world

    row = Row("warehouse_disk_full", "archive warehouse on a 512 KiB tmpfs, then grown to "
              "256 MiB and the worker restarted")
    if not can_mount(tmp):
        row.note("cannot mount a tmpfs here (not root?): scenario skipped")
        return row
    with platform_broker(tmp) as broker:
        bs = bootstrap_of(broker)
        w = world(sz, seed=41, total_views=max(10_000, sz.views // 3))
        produce_world(bs, w, batch_events=50)
        want = {t: Counter(r["event_id"] for r in recs)
                for t, recs in generate_records(w).items()}
        wh = tmp / "wh"
        cmd = [*TESSERA, "worker", "archive", "--bootstrap", bs, "--warehouse", str(wh),
               "--bounded", "--commit-interval", "200ms"]
        with tmpfs(wh, "512k"):
            log = tmp / "full.log"
            proc = spawn(cmd, log)
            try:
                rc = proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                stop_proc(proc)
                rc = None
            text = log.read_text(errors="replace")
            clear = "No space left on device" in text or "ENOSPC" in text
            last = [ln for ln in text.splitlines() if ln.strip()][-1:] or ["(no output)"]
            subprocess.run(["mount", "-o", "remount,size=256m", str(wh)], check=True)
            t0 = time.monotonic()
            run_to_end(cmd, tmp / "worker.log")
            row.recovery_s = time.monotonic() - t0
            raw = RawTables.open(wh)
            got = {t: Counter(raw.scan(t, columns=["event_id"])["event_id"].to_pylist())
                   for t in TOPICS}
    for t in TOPICS:
        w_t, g_t = want.get(t, Counter()), got[t]
        row.events_in += sum(w_t.values())
        row.events_out += sum(g_t.values())
        row.lost += sum((w_t - g_t).values())
        row.double_counted += sum((g_t - w_t).values())
    row.note(f"worker on the full disk exited {rc}; ENOSPC named in its output: {clear}; "
             f"last line: {last[0][-160:]!r}")
    row.passed = (rc not in (0, None) and clear and row.lost == 0 and row.double_counted == 0)
    return row


# ---------------------------------------------------------------------------- runner


def commit_cost(tmp: Path, sz: Sizes) -> Row:
    """Thousands of small Iceberg commits (a blocks flow's sealed blocks): flat commit time."""
    import statistics

    from features.offline import BlockRow, OfflineTables
    from features.offline.maintenance import COMMITS, MaintenancePolicy

    n = 300 if sz.requests < 60 else 5_000
    row = Row("commit_cost", f"{n:,} commits of 50 sealed blocks each to one Iceberg table")
    policy = MaintenancePolicy()  # what every writer runs
    saved = COMMITS.policy

    def run(commits: int, maintained: bool, wh: Path) -> list[float]:
        COMMITS.policy = policy if maintained else MaintenancePolicy(every_commits=0)
        tables = OfflineTables.open(wh)
        times = []
        for i in range(commits):
            rows = [BlockRow("item", f"i{j}", "views:count", 1_700_000_000_000 + i * 300_000,
                             300_000, b"\x01" * 8) for j in range(50)]
            t0 = time.perf_counter()
            tables.append_blocks(rows)
            times.append((time.perf_counter() - t0) * 1000)
        got = tables.scan_blocks().num_rows
        if got != commits * 50:
            raise RuntimeError(f"{got} rows after {commits} commits of 50")
        return times

    try:
        times = run(n, True, tmp / "maintained")
        base_n = max(100, n // 10)
        base = run(base_n, False, tmp / "unmaintained")
    finally:
        COMMITS.policy = saved
    row.commits = n
    row.commit_ms_first = statistics.median(times[:10])
    row.commit_ms_last = statistics.median(times[-10:])
    row.events_in = row.events_out = n * 50
    def files(sub: str) -> int:
        return sum(len(fs) for d, _, fs in os.walk(tmp / "maintained") if f"/{sub}" in d)

    meta, data = files("metadata"), files("data")
    # the files left unreferenced in the run go once their grace has passed (it is longer
    # than the run): what stays is what the table references
    from features.offline.maintenance import maintain

    table = OfflineTables.open(tmp / "maintained").table("blocks")
    later = int(time.time() * 1000)
    for _ in range(2):  # the first run notes the files the run left, the next deletes them
        later += policy.grace_ms + 1
        maintain(table, policy, now_ms=later)
    row.recovery_s = 0.0
    row.note(f"maintained: median commit {row.commit_ms_first:.1f} ms at commits 1-10, "
             f"{row.commit_ms_last:.1f} ms at commits {n - 9}-{n}; mean of the last 500 "
             f"(maintenance runs included) {statistics.mean(times[-500:]):.1f} ms; "
             f"{len(table.metadata.snapshots)} snapshots and "
             f"{len(list(table.scan().plan_files()))} data files live at the end; files on "
             f"disk {meta} metadata + {data} data at the end of the run (the grace, "
             f"{policy.grace_ms // 60_000} min, keeps every file unreferenced for less), "
             f"{files('metadata')} + {files('data')} once it has passed")
    row.note(f"unmaintained (no merging, no expiry, no compaction): median "
             f"{statistics.median(base[:10]):.1f} ms at commits 1-10, "
             f"{statistics.median(base[-10:]):.1f} ms at commits {base_n - 9}-{base_n}")
    row.passed = row.commit_ms_last <= 2 * row.commit_ms_first
    return row


SCENARIOS: dict[str, Callable[[Path, Sizes], Row]] = {
    "kill9_blocks": kill9_blocks,
    "kill9_sequences": kill9_sequences,
    "kill9_archive": kill9_archive,
    "kill9_labels": kill9_labels,
    "kill_in_commit": kill_in_commit,
    "duplicate_events": duplicate_events,
    "duplicates_after_restart": duplicates_after_restart,
    "sigstop_broker": sigstop_broker,
    "broker_restart": broker_restart,
    "broker_bounce": broker_bounce,
    "store_unavailable": store_unavailable,
    "aerospike_restart": aerospike_restart,
    "corrupt_model": corrupt_model,
    "spool_disk_full": spool_disk_full,
    "warehouse_disk_full": warehouse_disk_full,
    "commit_cost": commit_cost,
}


def run_scenario(name: str, tmp: Path, sz: Sizes) -> Row:
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        row = SCENARIOS[name](tmp, sz)
    except Exception as exc:  # a crashed scenario is a failed one, with its cause
        row = Row(name, "(scenario crashed)")
        row.note(f"{type(exc).__name__}: {str(exc)[:400]}")
        row.note(traceback.format_exc(limit=3).replace("\n", " | ")[-600:])
    row.note(f"scenario wall time {time.monotonic() - t0:.1f}s")
    return row


def table(rows: list[Row]) -> str:
    head = ("| scenario | fault | recovery (s) | events in | events out | lost | "
            "double counted | physical duplicates | passed |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|:---:|\n")
    lines = []
    for r in rows:
        rec = f"{r.recovery_s:.1f}" if r.recovery_s is not None else "never"
        lines.append(f"| {r.scenario} | {r.fault} | {rec} | {r.events_in} | {r.events_out} | "
                     f"{r.lost} | {r.double_counted} | {r.physical_duplicates} | "
                     f"{'yes' if r.passed else '**NO**'} |")
    return head + "\n".join(lines) + "\n"


def result_line(rows: list[Row]) -> str:
    line = (f"RESULT faults scenarios={len(rows)} passed={sum(r.passed for r in rows)} "
            f"events_lost={sum(r.lost for r in rows)} "
            f"double_counted={sum(r.double_counted for r in rows)} "
            f"physical_duplicates={sum(r.physical_duplicates for r in rows)}")
    for r in rows:
        if r.commit_ms_first is not None and r.commit_ms_last is not None:
            line += (f" commit_ms_first={r.commit_ms_first:.1f} "
                     f"commit_ms_{r.commits}={r.commit_ms_last:.1f}")
    return line


EXPLAIN = {
    "kill9_blocks": "The blocks worker (`tessera worker blocks --recovery-dir --warehouse`) is "
    "killed with SIGKILL once it has written blocks and taken snapshots, then restarted on the "
    "same recovery directory. Every feature's blocks in the store are compared with the "
    "brute-force oracle (`tests/dataflows/flowcheck.py`); the sealed blocks in the Iceberg "
    "`blocks` table with the oracle too, and the late events in `late_events` with the "
    "reference late rule, both counted as stored (physical copies). events in/out are the "
    "`item_views` counts plus the late events. recovery = restart until the bounded run is "
    "caught up. Guarantee: no loss, no double count, one row on disk per block and event.",
    "kill_in_commit": "The blocks worker is SIGKILLed inside its own Iceberg commits "
    "(`bench/killpoint.py` wraps the catalog's commit): at a sealed-block commit and at a "
    "late-event commit, once after the catalog moved (the commit landed, the worker never "
    "returned from it, so its snapshot does not know) and once with the files written but the "
    "catalog not moved; restarted from the recovery directory each time, then run to the end. "
    "Checked as kill9_blocks: the store against the oracle, every sealed block and late event "
    "on disk exactly once.",
    "kill9_sequences": "The sequences worker is killed mid-stream and restarted from its "
    "recovery directory; with max-len above any user's activity every view and engagement "
    "must be in its user's sequence exactly once (event id by event id). Writes are "
    "idempotent on event id, so a replay cannot double count.",
    "kill9_archive": "The archive worker is killed after its first Iceberg commits and "
    "restarted; it resumes from the Kafka offsets stored in each table's snapshot. Every "
    "event id must be in its raw table exactly once.",
    "kill9_labels": "The label-join worker is killed after its first training-table commits "
    "and restarted from its recovery directory. The training examples are compared with "
    "`join_reference` over the on-time events: every matured impression once, with the same "
    "labels (a double-counted engagement would change a label), and the rows are counted as "
    "stored: a replay must not append again the rows of the commits its snapshot does not "
    "know about (physical duplicates).",
    "sigstop_broker": "A producer thread writes the world in 40 slices while a tail blocks "
    "worker consumes; the broker process is frozen with SIGSTOP mid-way (the producer keeps "
    "producing into its local buffer), then resumed with SIGCONT. recovery = SIGCONT until the "
    "store equals the oracle over everything produced.",
    "broker_restart": "With serving and a tail blocks worker running, the broker is stopped "
    "and started again empty on the same port (the embedded broker keeps data in memory only, "
    "so what it held is gone by design; the raw archive is the durable copy). What must "
    "survive: every feed request is answered during the outage; impressions of those pages "
    "spool to disk and reach the new broker exactly once; the worker keeps running and "
    "consumes events produced after the topics are recreated; the store keeps its state. "
    "An archive worker runs beside them: the impressions Kafka acknowledged before the stop "
    "must be in the raw archive (their only durable copy with a memory-only broker; the "
    "broker is stopped once they are there), each once as stored, and the archive must take "
    "every outage impression from the new log (the recreated topic has its declared 2 "
    "partitions: the platform's producers never auto-create a topic). events in/out are the "
    "acknowledged and the outage impressions. "
    "recovery = restart until all arrived.",
    "broker_bounce": "A tail blocks worker reads `views`; the broker is stopped and started "
    "again empty on the same port five times in a row, each restart right after the previous "
    "one's log was produced (so it lands inside the worker's poll loop, with fetches in "
    "flight). The worker must survive every restart, notice each log reset, and count the "
    "first and the last log exactly once; no log may be counted twice. recovery = first "
    "restart until the last log is counted.",
    "store_unavailable": "Every online-store call of the server raises "
    "`StoreUnavailableError` (the LMDB memory map cannot fail from outside, so the fault is "
    "injected at the store interface, as a lost Aerospike cluster would surface). Each feed "
    "request must still answer 200 with items ranked by popularity and "
    "`degraded: [\"store_unavailable\"]`, and `tessera_degraded_total{reason=\"store_"
    "unavailable\"}` must rise; events in/out are requests; lost = pages not served degraded. "
    "recovery = fault cleared until a page is served undegraded.",
    "aerospike_restart": "The same serving stack and a tail blocks worker run on a real "
    "Aerospike server (`tessera.aerospike_local`, the namespace backed by a file as a "
    "production node is by its device). A producer sends single-event views of new items, 50 "
    "a second, while the server is stopped for the pause and started again. Every feed request "
    "during the outage must answer 200 with items and `degraded: [\"store_unavailable\"]`; "
    "the worker must stay up, retrying its writes (`store.unavailable` in its log) with the "
    "source stalled behind them; after the restart the store must count every produced view "
    "once and keep the blocks written before the outage. recovery = server start until "
    "caught up and a page is served undegraded.",
    "corrupt_model": "A real tiny ONNX L2 is published and served; then a version whose "
    ".onnx is garbage (manifest hash right, the load probe fails) and a version whose file "
    "is changed after publishing (hash mismatch) are promoted. Serving must keep answering "
    "with the good version (checked in `model_versions` of every page), and then pick up the "
    "next good version. lost = pages not served by the good version during the bad ones.",
    "spool_disk_full": "The broker is down so every impression is spooled; the spool lives "
    "on a 64 KiB tmpfs that fills up. Then the tmpfs is grown and the broker started: every "
    "impression `log()` accepted must reach Kafka exactly once, and no torn or garbage "
    "message may be sent.",
    "duplicate_events": "Every views and engagements message is produced twice in a row, "
    "as a producer retrying after a lost acknowledgement does (same event id, a new offset). "
    "The blocks worker with the default `features.yaml` (`deduplicate:` views, engagements "
    "and impressions within 10 minutes) must equal the oracle of the events produced once; "
    "the same run with `deduplicate` removed is the baseline and must double count. "
    "double counted = item_views counted above the oracle.",
    "duplicates_after_restart": "The blocks worker (`deduplicate:` views at 30 days, past the "
    "world's span) is killed with SIGKILL mid-stream; a producer then sends every views "
    "message again (same event ids, new offsets), and the worker restarts from its recovery "
    "directory. The ids are not in the snapshot: the resumed source reads its log again from "
    "the oldest remembered id's offset, admitting ids without emitting events, and must drop "
    "every copy. Checked as kill9_blocks (store, sealed blocks, late events as stored against "
    "the oracle of the events sent once), and the worker's duplicates dropped = copies sent.",
    "commit_cost": "One writer commits small appends to the blocks table, as the blocks "
    "flow's sealed blocks, the archive and the label join do every few seconds for as long "
    "as they run. With the table maintenance every writer runs (`features/offline/"
    "maintenance.py`: manifest merging, old metadata deleted on commit, small files "
    "compacted, superseded snapshots expired, orphan files removed) the commit time must "
    "stay within 2x of the first commits'; the same writer without maintenance is the "
    "baseline. Every row must read back once.",
    "warehouse_disk_full": "The archive worker writes to a warehouse on a 512 KiB tmpfs: it "
    "must stop with an error naming the full disk, and after the disk is grown a restart "
    "must archive every event exactly once (no corrupt table, no duplicate commit).",
}


def write_doc(rows: list[Row], path: Path, quick: bool, wall_s: float) -> None:
    parts = ["# Reliability: fault injection on the real stack\n",
             "Produced by `python bench/faults.py" + (" --quick" if quick else "") + "` "
             f"({wall_s:.0f} s on {os.cpu_count()} cores). Each scenario injects one fault into "
             "real processes (embedded broker, `tessera worker` processes, uvicorn serving, "
             "LMDB, Iceberg), clears it, and checks the output against an oracle. "
             "*recovery* is the time from the fault being cleared to the system being caught "
             "up or healthy again; *lost* and *double counted* are against the oracle "
             "(the aim: zero).\n",
             table(rows),
             "\n## Scenarios and guarantees\n"]
    for r in rows:
        parts.append(f"\n### {r.scenario}\n\n{EXPLAIN.get(r.scenario, '')}\n\n"
                     + "".join(f"- {n}\n" for n in r.notes))
    parts.append(f"\n```\n{result_line(rows)}\n```\n")
    # sections measured by other runs (the commit-cost run, the soak) stay as they are
    old = path.read_text() if path.exists() else ""
    if KEPT_MARK in old:
        parts.append("\n" + old[old.index(KEPT_MARK):])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts))


#: in docs/reliability.md, everything from this line on is kept when the scenarios are re-run
KEPT_MARK = "<!-- sections below: measured by other runs, kept when bench/faults.py rewrites this file -->"


def run_isolated(name: str, tmp: Path, sz: Sizes, quick: bool) -> Row:
    """Run one scenario in a child process: a crash (e.g. a segfault) fails only it."""
    import json

    out = tmp / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--scenario", name,
           "--json", str(out), "--tmp", str(tmp / name)] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode == 0 and out.exists():
        data = json.loads(out.read_text())
        return Row(**data)
    row = Row(name, "(scenario process crashed)")
    how = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
           else f"exit code {proc.returncode}")
    row.note(f"the scenario's process died ({how}) before reporting; see its output above")
    return row


def main(argv: list[str] | None = None) -> int:
    import dataclasses
    import json
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--only", default="", help="comma-separated scenario names")
    ap.add_argument("--doc", default=None,
                    help="where to write the results (default: docs/reliability.md for a run "
                    "of every scenario; a --only run writes none unless given)")
    ap.add_argument("--no-doc", action="store_true", help="do not write the doc")
    ap.add_argument("--scenario", help=argparse.SUPPRESS)  # child mode: one scenario
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    sz = Sizes.of(args.quick)
    if args.scenario:
        row = run_scenario(args.scenario, Path(args.tmp), sz)
        Path(args.json).write_text(json.dumps(dataclasses.asdict(row)))
        return 0
    names = [n for n in args.only.split(",") if n] or list(SCENARIOS)
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    rows: list[Row] = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tessera-faults-") as d:
        for name in names:
            print(f"... {name}", flush=True)
            row = run_isolated(name, Path(d), sz, args.quick)
            rows.append(row)
            rec = f"{row.recovery_s:.1f}s" if row.recovery_s is not None else "never"
            print(f"    {'PASS' if row.passed else 'FAIL'} recovery={rec} in={row.events_in} "
                  f"out={row.events_out} lost={row.lost} double={row.double_counted}",
                  flush=True)
            for n in row.notes:
                print(f"      - {n}", flush=True)
    wall = time.monotonic() - t0
    print()
    print(table(rows))
    doc = args.doc or (None if args.only else str(ROOT / "docs" / "reliability.md"))
    if not args.no_doc and doc:
        write_doc(rows, Path(doc), args.quick, wall)
        print(f"wrote {doc}")
    elif not args.no_doc:
        print("a --only run: docs/reliability.md left as it is (pass --doc to write one)")
    print(result_line(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
