"""Benchmark: the streaming step, Kafka -> event-time blocks in the store, against Quix Streams.

Both engines read the same bytes and compute the same features, one core's worth of worker
each, on a fresh embedded broker (Tansu):

* Input: N views (``--events``, 2,000,000; Zipf items, uniform users, event time over 3 h
  with up to 5 s disorder) produced once to ``views`` (4 partitions, keyed by item_id) as one
  Confluent-framed Avro message per event, what producers send: the bytes of
  ``schemas.codec.encode("views", record)`` (built for all events at once with numpy; a
  sample is checked against ``encode``).
* Tessera: the blocks flow (``dataflows.blocks``) runs bounded in a subprocess with one
  Bytewax worker into a fresh LMDB store, once with every ``views`` feature of
  ``features.yaml`` (13: counts, sum, mean, min, max, KLL quantile, HLL distinct counts,
  last-n lists; filters included; blocks 5m/1h/1d) and once with only ``item_views``.
* Peer: a Quix Streams application (``bench/quix_peer.py``) on the same topic, with the same
  features: a Confluent-Avro deserializer (fastavro), tumbling event-time windows per block
  size, ``group_by`` user_id / author_id (repartition topics), Quix's count/sum/mean/min/max,
  DataSketches HLL/KLL aggregators, last_n from ``Collect``; no changelog topics (Tessera
  runs without recovery here too), commits every 5 s; stopped once every message of
  ``views`` and of its repartition topics was processed. Again with only ``item_views``.
  Item windows close by partition time after Tessera's lateness (60 s); windows after a
  ``group_by`` get a grace of the whole replay (``REGROUP_GRACE_MS``), since replaying a
  backlog the consumer reads one partition far ahead of the others, and a shorter grace
  drops events that Tessera (lateness per source partition) counts.
* Rates are steady state: events / (end - first data), so process start, imports and the
  consumer group join are left out; wall time counts from launch. Peak RSS is the worker
  process's ``ru_maxrss``.
* Output check (before RESULT): Tessera's stored blocks of a sample of items, users and
  authors against the peer's windows of the same (entity, start, size): closed ones as
  emitted, still-open ones read from its state store at the end (``bench/streaming_check.py``:
  exact for count/sum/mean/min/max/last_n, within sketch error for HLL and KLL, every
  feature at every block size); the stored 1d ``item_views`` counts of all items must add up
  to N. If anything differs, the differences are printed and the bench exits 1 without a
  RESULT line.
* Aerospike (with a server build, ``tessera.aerospike_local``): the same per-event messages,
  every feature, into a fresh local single-node server; the stored 1d ``item_views`` must add
  up to N; bytes per record from the server's namespace statistics.
* Batched (secondary): the same N views as batch envelopes (1,000 events a message, the
  Tessera fast path) on a second broker, every ``views`` feature.
* Freshness: on a third broker, the flow tails ``views`` (every ``views`` feature, flush
  every 250 ms, ``FRESH_FLUSH_MS``) while single-event Avro messages arrive at ``--rate``
  events/s (20,000) with event time = now; every 10 ms burst carries one marker view of a
  new item, and the store is polled (read-only LMDB) until the marker's block appears: freshness = seen - produced.

Usage: python bench/streaming.py [--quick] [--events N] [--rate R] [--seconds S] [--skip-quix]
       [--quix-python PATH]  (the peer's own venv: Quix Streams pins an older confluent-kafka;
       python3.11 -m venv ~/.venvs/tessera-quix && ~/.venvs/tessera-quix/bin/pip install -e '.[quix]')
(--quick: 100,000 events, 5 s of freshness, about 2 minutes. The default run is dominated by
the peer, about 2,500 events/s with every feature: budget half an hour on 2 cores.)
Last line:
  RESULT streaming events_per_s=<Tessera, every views feature, per-event Avro, steady>
         ratio=<Tessera / Quix, same features and bytes, steady> freshness_p99_ms=<p99>
         rss_mb=<Tessera peak RSS, every feature> count_events_per_s=<Tessera, item_views>
         batched_events_per_s=<Tessera, every feature, envelopes>
         quix_events_per_s=<Quix, every feature> quix_count_events_per_s=<Quix, item_views>
         quix_rss_mb=<Quix peak RSS, every feature>
         anon_mb=<Tessera peak anonymous RSS: without the store's mapped file pages>
         quix_anon_mb=<Quix peak anonymous RSS>
         aerospike_events_per_s=<Tessera, every feature, into Aerospike> (with a server build)
         aerospike_bytes_per_record=<server data + index bytes / records>
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.streaming_data import (  # noqa: E402
    HOUR,
    SPAN_MS,
    Views,
    check_encoding,
    encode_views,
    make_views,
    view_columns,
)

LATENESS_MS = 60_000
#: grace of the peer's windows after a group_by. Replaying a backlog, Quix's consumer reads
#: one partition far ahead of the others (runs of ~20k messages on the embedded broker), so
#: a repartitioned key sees event time out of order by up to the whole replay; a shorter
#: grace drops events Tessera counts (Tessera decides lateness per source partition).
REGROUP_GRACE_MS = SPAN_MS + HOUR
BATCH_EVENTS = 1000
PARTITIONS = 4
FRESH_BURST_MS = 10
#: the tailing flow's flush interval in the freshness run (``tessera worker blocks
#: --flush-interval``): at 20k events/s with every views feature, p99 was 1.4 s at 250 ms and
#: 1.7-2.1 s at 500 ms (2 shared cores); the default of 1,000 ms writes less often
FRESH_FLUSH_MS = 250
MARKER_ITEM = 10_000_000  # marker views use items from here on (never in generated data)
ALL_FEATURES = REPO / "features.yaml"
ITEM_COUNT_YAML = """\
defaults:
  block_sizes: [5m, 1h, 1d]
  freshness: 15m
features:
  - name: item_views
    source: views
    entity: item_id
    aggregation: count
    windows: [1h]
"""


# -- producing ---------------------------------------------------------------------------


class _Producer:
    """A confluent producer that waits out a full local queue instead of failing."""

    def __init__(self, bootstrap: str):
        from confluent_kafka import Producer

        from tessera.topics import producer_config

        self.p = Producer(producer_config(bootstrap))

    def send(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        while True:
            try:
                self.p.produce(topic, value, key)
                return
            except BufferError:
                self.p.poll(0.05)

    def flush(self) -> None:
        left = self.p.flush(300)
        if left:
            raise RuntimeError(f"{left} messages were not delivered")


def produce_messages(bootstrap: str, values: list[bytes], keys: list[bytes],
                     topic: str = "views") -> float:
    """Produce one message per event; return the seconds it took."""
    t = time.perf_counter()
    prod = _Producer(bootstrap)
    for k, (value, key) in enumerate(zip(values, keys)):
        prod.send(topic, value, key)
        if k % 10_000 == 0:
            prod.p.poll(0)
    prod.flush()
    return time.perf_counter() - t


def produce_envelopes(bootstrap: str, v: Views, topic: str = "views") -> float:
    """Produce all views as batch envelopes of ``BATCH_EVENTS``; return the seconds it took."""
    from schemas.columnar import encode_batch

    t = time.perf_counter()
    prod = _Producer(bootstrap)
    for lo in range(0, len(v), BATCH_EVENTS):
        prod.send(topic, encode_batch(view_columns(v, lo, min(lo + BATCH_EVENTS, len(v)))))
        prod.p.poll(0)
    prod.flush()
    return time.perf_counter() - t


# -- workers (each runs in its own process) ----------------------------------------------


def _watch_anon(pid: int, peak: list[int]) -> None:
    """Track the peak anonymous RSS of process ``pid`` (its own memory, without the store's
    mapped file pages), from outside: a sampler inside the worker would compete for its GIL."""
    import threading

    def run() -> None:
        path = f"/proc/{pid}/status"
        while True:
            try:
                with open(path) as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            peak[0] = max(peak[0], int(line.split()[1]))
            except OSError:  # exited
                return
            time.sleep(0.2)

    threading.Thread(target=run, daemon=True).start()


def _emit(result: dict) -> None:
    import resource

    result.setdefault("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def worker_tessera(args: dict) -> None:
    """Run the blocks flow (bounded or tailing); report start-up, first-data and end times."""
    t_proc = args["t_launch"]
    from dataflows.blocks import BlocksFlowConfig, build_blocks_flow
    from dataflows.kafka_source import KafkaBatchSource
    from dataflows.runner import run_flow
    from features.spec_loader import load_features

    first: list[float] = []
    events = [0]
    orig_build_part = KafkaBatchSource.build_part

    def build_part(self, step_id, for_part, resume_state):  # count what the source decodes
        part = orig_build_part(self, step_id, for_part, resume_state)
        orig_next = part.next_batch

        def next_batch():
            out = orig_next()
            if out:
                if not first:
                    first.append(time.time())
                events[0] += sum(len(b.columns) for b in out)
            return out
        part.next_batch = next_batch
        return part

    KafkaBatchSource.build_part = build_part
    config = BlocksFlowConfig(
        bootstrap=args["bootstrap"], store_url=args["store_url"],
        features=load_features(args["features"]), topics=("views",), bounded=args["bounded"],
        lateness_ms=LATENESS_MS, flush_interval_ms=args["flush_ms"],
    )
    flow = build_blocks_flow(config)
    t_ready = time.time()
    try:
        run_flow(flow, workers=1)
    except KeyboardInterrupt:
        pass
    t_end = time.time()
    _emit({"startup_s": t_ready - t_proc, "first_data_s": (first[0] - t_proc) if first else None,
           "wall_s": t_end - t_proc, "events": events[0]})


def worker_quix(args: dict) -> None:
    """Run the Quix Streams peer until every message is processed."""
    from bench.quix_peer import run_worker

    _emit(run_worker(args))


def _launch(kind: str, args: dict, log_path: Path, python: str = sys.executable
            ) -> subprocess.Popen:
    args = {**args, "t_launch": time.time()}
    return subprocess.Popen(
        [python, str(Path(__file__).resolve()), "--_worker", kind, json.dumps(args)],
        stdout=subprocess.PIPE, stderr=open(log_path, "w"), text=True, cwd=REPO,
    )


def _result(proc: subprocess.Popen, log_path: Path, timeout: float) -> dict:
    anon_kb = [0]
    _watch_anon(proc.pid, anon_kb)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise RuntimeError(f"worker timed out after {timeout:g}s; see {log_path}") from None
    for line in out.splitlines():
        if line.startswith("BENCH_RESULT "):
            return {**json.loads(line.split(" ", 1)[1]), "peak_anon_mb": anon_kb[0] / 1024}
    tail = log_path.read_text()[-3000:]
    raise RuntimeError(f"worker exited {proc.returncode} without a result:\n{tail}")


# -- runs ------------------------------------------------------------------------------


def steady_rate(r: dict) -> float:
    """Events per second from the first data to the end (start-up and group join left out)."""
    first = r.get("first_data_s")
    return r["events"] / (r["wall_s"] - first) if first is not None else float("nan")


def run_tessera(bootstrap: str, features: Path, tmp: Path, name: str, n: int,
                store_url: str | None = None) -> dict:
    """Run the bounded blocks flow on ``views`` into a fresh store (a new LMDB unless
    ``store_url``); check it read all ``n``."""
    store_url = store_url or f"lmdb://{tmp / f'store-{name}'}"
    log_path = tmp / f"tessera-{name}.log"
    proc = _launch("tessera", {"bootstrap": bootstrap, "store_url": store_url,
                               "features": str(features), "bounded": True, "flush_ms": 1000},
                   log_path)
    res = _result(proc, log_path, timeout=1800)
    if res["events"] != n:
        raise RuntimeError(f"tessera ({name}) decoded {res['events']} events, produced {n}; "
                           f"see {log_path}")
    res["store_url"] = store_url
    print(f"tessera {name}: {steady_rate(res):,.0f} events/s steady, "
          f"wall {res['wall_s']:.1f}s", flush=True)
    return res


def run_quix(bootstrap: str, features: Path, tmp: Path, name: str, n: int,
             sample: dict[str, list[str]], python: str) -> dict:
    """Run the Quix peer on ``views``; its sampled windows go to ``res["windows_path"]``."""
    log_path = tmp / f"quix-{name}.log"
    out = tmp / f"quix-{name}-windows.json"
    proc = _launch("quix", {"bootstrap": bootstrap, "features": str(features), "n": n,
                            "state_dir": str(tmp / f"quix-state-{name}"), "out": str(out),
                            "sample": sample, "grace_ms": LATENESS_MS,
                            "regroup_grace_ms": REGROUP_GRACE_MS}, log_path, python)
    res = _result(proc, log_path, timeout=3600)
    if res["events"] != n:
        raise RuntimeError(f"quix ({name}) processed {res['events']} events, produced {n}; "
                           f"see {log_path}")
    res["windows_path"] = str(out)
    print(f"quix {name}: {steady_rate(res):,.0f} events/s steady, wall {res['wall_s']:.1f}s, "
          f"{res['late']} late drops", flush=True)
    return res


def check_outputs(v: Views, features: Path, tessera: dict, quix: dict,
                  sample: dict[str, list[str]], count_store: str) -> tuple[Any, int]:
    """Compare Tessera's stored blocks with the peer's windows; return (report, stored total).

    The stored 1d ``item_views`` counts must add up to every view in both Tessera stores:
    every feature's (``tessera``) and ``item_views`` only's (``count_store``).
    """
    from bench.peer_features import PeerFeature
    from bench.streaming_check import Truth, compare, count_total, read_blocks
    from features.spec_loader import load_features

    specs = load_features(features).for_source("views")
    windows = json.loads(Path(quix["windows_path"]).read_text())["windows"]
    blocks = read_blocks(tessera["store_url"], specs, sample)
    report = compare(blocks, windows, [PeerFeature.from_spec(s) for s in specs], specs,
                     Truth(v))
    if quix["late"]:
        report.problems.append(f"quix dropped {quix['late']} events as late (Tessera: none "
                               "is late); raise REGROUP_GRACE_MS")
    total = count_total(tessera["store_url"])
    for name, stored in (("every feature", total), ("item_views only", count_total(count_store))):
        if stored != len(v):
            report.problems.append(f"stored 1d item_views counts ({name}) add up to "
                                   f"{stored:,}, produced {len(v):,}")
    return report, total


# -- freshness ---------------------------------------------------------------------------


class _FreshnessProbe:
    """Sends marked bursts of single-event messages and polls the store for the markers."""

    def __init__(self, bootstrap: str, store_dir: Path, rate: int):
        self.prod = _Producer(bootstrap)
        self.store_dir = store_dir
        self.store: Any = None
        self.per_burst = max(1, rate * FRESH_BURST_MS // 1000)
        self.stream = make_views(self.per_burst * 4096, seed=5)
        self.sent: dict[str, float] = {}
        self.seen: dict[str, float] = {}
        self.bursts = 0

    def send_burst(self) -> None:
        """Send the next burst with event time = now; its last view is a new marker item."""
        k, b = self.bursts, self.per_burst
        lo = k * b % (len(self.stream) - b + 1)
        part = self.stream.take(slice(lo, lo + b))
        item = part.item.copy()
        item[-1] = MARKER_ITEM + k
        now = int(time.time() * 1000)
        burst = Views(np.full(b, now, np.int64), item, part.user, part.dwell, part.position,
                      part.surface)
        values, keys = encode_views(burst, first_id=k * b)
        self.sent[f"i{MARKER_ITEM + k}"] = time.time()
        for value, key in zip(values, keys):
            self.prod.send("views", value, key)
        self.prod.p.poll(0)
        self.bursts += 1

    def poll(self) -> None:
        """Record the markers whose block has become visible in the store."""
        from features.store import open_store

        if self.store is None:
            if not (self.store_dir / "data.mdb").exists():
                return
            try:
                self.store = open_store(f"lmdb://{self.store_dir}", readonly=True)
            except Exception:
                return
        pending = [m for m in self.sent if m not in self.seen]
        if not pending:
            return
        now = time.time()
        for m, t in zip(pending, self.store.get_block_tables("item", "views", pending)):
            if t is not None:
                self.seen[m] = now

    def reset(self) -> None:
        self.sent.clear()
        self.seen.clear()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _warm_up(probe: _FreshnessProbe, proc: subprocess.Popen, log_path: Path) -> None:
    """Send bursts until the tailing flow has written a first marker (consumer and store up)."""
    deadline = time.time() + 120
    while not probe.seen:
        if proc.poll() is not None:
            raise RuntimeError(f"tail flow exited:\n{log_path.read_text()[-3000:]}")
        if time.time() > deadline:
            raise RuntimeError(f"tail flow wrote nothing in 120s; see {log_path}")
        if not probe.sent or time.time() - max(probe.sent.values()) > 1.0:
            probe.send_burst()
        time.sleep(0.05)
        probe.poll()
    probe.reset()


def _drive(probe: _FreshnessProbe, seconds: float) -> float:
    """Send bursts every ``FRESH_BURST_MS`` and poll every 50 ms; return the seconds sent."""
    interval = FRESH_BURST_MS / 1000
    start = time.time()
    next_send = next_poll = start
    while time.time() - start < seconds:
        now = time.time()
        if now >= next_send:
            probe.send_burst()
            next_send += interval
        if now >= next_poll:
            probe.poll()
            next_poll += 0.05
        time.sleep(max(0.0, min(next_send, next_poll) - time.time()))
    produced_s = time.time() - start
    drain = time.time() + 30
    while len(probe.seen) < len(probe.sent) and time.time() < drain:
        time.sleep(0.05)
        probe.poll()
    return produced_s


def measure_freshness(tmp: Path, features: Path, rate: int, seconds: float,
                      flush_ms: int | None = None) -> dict:
    """Tail with the flow, produce ``rate`` single-event messages/s, time marker visibility."""
    flush_ms = FRESH_FLUSH_MS if flush_ms is None else flush_ms
    from tessera.broker import EmbeddedBroker
    from tessera.topics import create_topics

    store_dir = tmp / "store-fresh"
    with EmbeddedBroker(state_dir=tmp / "broker-fresh") as info:
        create_topics(info.bootstrap, ["views", "deadletter"], partitions=PARTITIONS)
        log_path = tmp / "tessera-fresh.log"
        proc = _launch("tessera", {"bootstrap": info.bootstrap, "store_url": f"lmdb://{store_dir}",
                                   "features": str(features), "bounded": False, "flush_ms": flush_ms},
                       log_path)
        probe = _FreshnessProbe(info.bootstrap, store_dir, rate)
        try:
            _warm_up(probe, proc, log_path)
            produced_s = _drive(probe, seconds)
        finally:
            _stop(proc)
            probe.close()
    # a marker never seen counts with the time waited so far (a lower bound): no silent drops
    end = time.time()
    lat = np.array([(probe.seen.get(m, end) - t) * 1000 for m, t in probe.sent.items()])
    return {
        "markers": len(probe.sent), "seen": len(probe.seen),
        "rate": len(probe.sent) * probe.per_burst / produced_s,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "max_ms": float(lat.max()) if len(lat) else float("nan"),
    }


# -- the whole run ---------------------------------------------------------------------


@dataclass
class Runs:
    """Every measurement of one bench run."""

    n: int
    full: dict
    count: dict
    batched: dict
    fresh: dict
    quix: dict | None = None
    quix_count: dict | None = None
    aerospike: dict | None = None  # every feature into a local Aerospike server
    check: Any = None  # streaming_check.CheckReport; None without a peer run
    stored_total: int = 0


def run_per_event(tmp: Path, v: Views, sample: dict[str, list[str]], quix_python: str | None
                  ) -> tuple[dict, dict, dict | None, dict | None, dict | None]:
    """Produce the views once as single-event Avro messages; run both engines on them
    (the peer with ``quix_python``; None skips it)."""
    from tessera.broker import EmbeddedBroker
    from tessera.topics import create_topics

    n = len(v)
    count_features = tmp / "item_views.yaml"
    count_features.write_text(ITEM_COUNT_YAML)
    t = time.perf_counter()
    values, keys = encode_views(v)
    check_encoding(v, values)
    print(f"encoded {n:,} views in {time.perf_counter() - t:.1f}s", flush=True)
    quix = quix_count = None
    with EmbeddedBroker(state_dir=tmp / "broker") as info:
        create_topics(info.bootstrap, ["views", "deadletter"], partitions=PARTITIONS)
        produce_s = produce_messages(info.bootstrap, values, keys)
        del values, keys
        print(f"produced {n:,} single-event Avro messages in {produce_s:.1f}s", flush=True)
        full = run_tessera(info.bootstrap, ALL_FEATURES, tmp, "full", n)
        count = run_tessera(info.bootstrap, count_features, tmp, "count", n)
        aero = run_aerospike(info.bootstrap, tmp, n)
        if quix_python is not None:
            quix = run_quix(info.bootstrap, ALL_FEATURES, tmp, "full", n, sample, quix_python)
            quix_count = run_quix(info.bootstrap, count_features, tmp, "count", n, {},
                                  quix_python)
    return full, count, quix, quix_count, aero


def run_aerospike(bootstrap: str, tmp: Path, n: int) -> dict | None:
    """Every feature, the same per-event messages, into a local Aerospike server (when a
    build exists): the store write path on the production store. The stored 1d item_views
    must add up to ``n``; the server's bytes per record come from its namespace stats."""
    from bench.streaming_check import count_total
    from tessera import aerospike_local

    if not aerospike_local.available():
        print(f"no Aerospike server build at {aerospike_local.server_dir()}: no Aerospike run")
        return None
    with aerospike_local.LocalAerospike(tmp / "aerospike", size_mb=8192) as server:
        res = run_tessera(bootstrap, ALL_FEATURES, tmp, "aerospike", n,
                          store_url=server.store_url)
        stats = server.namespace_stats()
        res["stored_total"] = count_total(server.store_url)
    res["records"] = int(stats.get("objects", 0))
    res["bytes"] = int(stats.get("data_used_bytes", 0)) + int(stats.get("index_used_bytes", 0))
    if res["stored_total"] != n:
        raise RuntimeError(f"Aerospike: stored 1d item_views add up to {res['stored_total']:,}, "
                           f"produced {n:,}")
    return res


def run_batched(tmp: Path, v: Views) -> dict:
    """Produce the views as batch envelopes on a fresh broker; run Tessera on them."""
    from tessera.broker import EmbeddedBroker
    from tessera.topics import create_topics

    with EmbeddedBroker(state_dir=tmp / "broker-batched") as info:
        create_topics(info.bootstrap, ["views", "deadletter"], partitions=PARTITIONS)
        produce_envelopes(info.bootstrap, v)
        return run_tessera(info.bootstrap, ALL_FEATURES, tmp, "batched", len(v))


def quiet_disk(tmp: Path) -> None:
    """Remove the finished runs' stores and state (checked already) and flush the page cache.

    The earlier runs leave gigabytes of LMDB and RocksDB files behind, much of it dirty in
    the page cache; its write-back would otherwise land in the freshness run's commits
    (each one an fsync), which measures the disk's backlog instead of the flow.
    """
    import shutil

    for path in [*tmp.glob("store-*"), *tmp.glob("quix-state-*")]:
        shutil.rmtree(path, ignore_errors=True)
    os.sync()


def run_all(n: int, rate: int, seconds: float, quix_python: str | None) -> Runs:
    """Generate the views and run every measurement and the output check."""
    from bench.streaming_check import pick_sample

    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmpname:
        tmp = Path(tmpname)
        v = make_views(n)
        print(f"generated {n:,} views ({len(np.unique(v.item)):,} items, event time "
              "2025-11-01 22:30 to 01:30 UTC)", flush=True)
        sample = pick_sample(v)
        full, count, quix, quix_count, aero = run_per_event(tmp, v, sample, quix_python)
        check, total = (check_outputs(v, ALL_FEATURES, full, quix, sample, count["store_url"])
                        if quix else (None, 0))
        if check is not None:
            verdict = "passed" if check.ok else f"FAILED ({len(check.problems)} differences)"
            print(f"output check: {verdict}", flush=True)
        batched = run_batched(tmp, v)
        quiet_disk(tmp)
        fresh = measure_freshness(tmp, ALL_FEATURES, rate, seconds)
    return Runs(n, full, count, batched, fresh, quix, quix_count, aero, check, total)


# -- report ------------------------------------------------------------------------------


def print_table(n: int, runs: list[tuple[str, dict | None]]) -> None:
    """One row per run: events, wall time, start-up, steady rate, peak RSS (and anonymous).

    Peak RSS counts the LMDB store's file pages the writer has mapped (page cache the kernel
    can drop); the anonymous peak is the process's own memory.
    """
    print()
    print(f"events: {n:,} views, {PARTITIONS} partitions, one worker per engine, same broker")
    print(f"{'run':<52}{'events':>10}{'wall s':>8}{'startup s':>11}{'steady ev/s':>13}"
          f"{'peak RSS MB':>13}{'anon MB':>9}")
    for label, r in runs:
        if r is None:
            continue
        print(f"{label:<52}{r['events']:>10,}{r['wall_s']:>8.1f}{r['first_data_s']:>11.1f}"
              f"{steady_rate(r):>13,.0f}{r['peak_rss_mb']:>13,.0f}"
              f"{r.get('peak_anon_mb', 0):>9,.0f}")


def print_check(report: Any, total: int, n: int) -> None:
    """Summarize the output check."""
    compared = sum(report.compared.values())
    per_size: dict[str, int] = {}
    for label, c in report.compared.items():
        size = label.rsplit("/", 1)[1]
        per_size[size] = per_size.get(size, 0) + c
    sizes = ", ".join(f"{s}: {c:,}" for s, c in per_size.items())
    print(f"check: {compared:,} (feature, block) values of the sample compared ({sizes}); "
          f"{len(report.compared)} feature x size pairs; max HLL difference "
          f"{report.max_hll_diff:.1%}; sketch pairs settled by the exact value: "
          f"{dict(report.sketch_fallbacks) or 0}")
    print(f"check: stored 1d item_views counts of all items = {total:,} (produced {n:,})")


def print_summary(r: Runs, rate: int, seconds: float) -> None:
    """The table, the ratios, freshness and notes."""
    n_views = len(load_views_features())
    print_table(r.n, [
        (f"tessera, all {n_views} views features", r.full),
        ("tessera, item_views count", r.count),
        (f"quix streams, all {n_views} views features", r.quix),
        ("quix streams, item_views count", r.quix_count),
        (f"tessera, all {n_views} features, 1000-event envelopes", r.batched),
        (f"tessera, all {n_views} features, Aerospike store", r.aerospike),
    ])
    if r.aerospike:
        a = r.aerospike
        print(f"aerospike (CE 8.1, one local node, in memory): {a['records']:,} records, "
              f"{a['bytes'] / 2**20:,.0f} MB data + primary index, "
              f"{a['bytes'] / max(a['records'], 1):,.0f} bytes a record; stored 1d item_views "
              f"add up to {a['stored_total']:,}")
    if r.quix and r.quix_count:
        print(f"ratio tessera / quix, steady: every views feature "
              f"{steady_rate(r.full) / steady_rate(r.quix):.2f}x, item_views count "
              f"{steady_rate(r.count) / steady_rate(r.quix_count):.2f}x")
    f = r.fresh
    print(f"freshness (event produced -> block visible in LMDB), tail flow, every views "
          f"feature, flush {FRESH_FLUSH_MS} ms: {f['rate']:,.0f} events/s offered as "
          f"single-event messages "
          f"for {seconds:g}s, {f['seen']}/{f['markers']} markers seen: p50 {f['p50_ms']:.0f} ms, "
          f"p99 {f['p99_ms']:.0f} ms, max {f['max_ms']:.0f} ms")
    print("notes: 'startup s' is launch -> first data (imports, topic metadata, group join); "
          "both engines read one Avro message per event; Quix runs without changelog topics, "
          f"its item windows close after {LATENESS_MS // 1000}s of grace, those after group_by "
          f"get {REGROUP_GRACE_MS // 60_000} min (the replay's reordering) and do not close "
          "during the run; Tessera writes blocks to LMDB.")


def load_views_features() -> tuple:
    """The ``views`` features of ``features.yaml``."""
    from features.spec_loader import load_features

    return load_features(ALL_FEATURES).for_source("views")


def result_line(r: Runs) -> str:
    """The RESULT line (call only after the output check passed)."""
    if r.quix is None or r.quix_count is None:
        raise ValueError("no RESULT line without the peer runs")
    return (f"RESULT streaming events_per_s={steady_rate(r.full):.0f} "
            f"ratio={steady_rate(r.full) / steady_rate(r.quix):.2f} "
            f"freshness_p99_ms={r.fresh['p99_ms']:.0f} rss_mb={r.full['peak_rss_mb']:.0f} "
            f"count_events_per_s={steady_rate(r.count):.0f} "
            f"batched_events_per_s={steady_rate(r.batched):.0f} "
            f"quix_events_per_s={steady_rate(r.quix):.0f} "
            f"quix_count_events_per_s={steady_rate(r.quix_count):.0f} "
            f"quix_rss_mb={r.quix['peak_rss_mb']:.0f} "
            f"anon_mb={r.full['peak_anon_mb']:.0f} quix_anon_mb={r.quix['peak_anon_mb']:.0f}"
            + (f" aerospike_events_per_s={steady_rate(r.aerospike):.0f} aerospike_bytes_per_record="
               f"{r.aerospike['bytes'] / max(r.aerospike['records'], 1):.0f}"
               if r.aerospike else ""))


def find_quix_python(arg: str | None) -> str:
    """The interpreter that runs the Quix peer; exits with what to install when none has it.

    Quix Streams 3.x pins ``confluent-kafka<2.13``: installed beside Tessera it downgrades
    librdkafka to 2.12, which segfaults in a tailing worker across broker restarts
    (``bench/faults.py broker_bounce``). So the peer lives in its own venv.
    """
    candidates = [arg] if arg else [os.environ.get("TESSERA_QUIX_PYTHON")]
    if not candidates[0]:
        candidates = [sys.executable, str(Path.home() / ".venvs" / "tessera-quix" / "bin" / "python")]
    for py in filter(None, candidates):
        try:
            probe = subprocess.run([py, "-c", "import quixstreams, datasketches, fastavro, yaml"],
                                   capture_output=True, cwd=REPO)
        except OSError:  # no such interpreter
            continue
        if probe.returncode == 0:
            return py
    sys.exit(f"no interpreter with Quix Streams (tried {', '.join(c for c in candidates if c)}). "
             "Make its venv: python3.11 -m venv ~/.venvs/tessera-quix && "
             "~/.venvs/tessera-quix/bin/pip install -e '.[quix]'  (or pass --skip-quix)")


# -- main ------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run (100k events, 5 s)")
    ap.add_argument("--events", type=int, default=None, help="events to produce (2,000,000)")
    ap.add_argument("--rate", type=int, default=20_000, help="freshness produce rate, events/s")
    ap.add_argument("--seconds", type=float, default=None, help="freshness produce time (20)")
    ap.add_argument("--skip-quix", action="store_true", help="do not run the peer (no RESULT)")
    ap.add_argument("--quix-python", default=None,
                    help="the interpreter of the Quix Streams venv (default: $TESSERA_QUIX_PYTHON, "
                    "this one if it imports quixstreams, else ~/.venvs/tessera-quix/bin/python)")
    ap.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._worker:
        kind, payload = a._worker
        (worker_tessera if kind == "tessera" else worker_quix)(json.loads(payload))
        return

    from tessera.logs import configure_logging

    configure_logging(level="WARNING")
    quix_python = None if a.skip_quix else find_quix_python(a.quix_python)
    n = a.events or (100_000 if a.quick else 2_000_000)
    seconds = a.seconds or (5.0 if a.quick else 20.0)
    runs = run_all(n, a.rate, seconds, quix_python)
    print_summary(runs, a.rate, seconds)
    if runs.check is None:
        print("no peer run (--skip-quix): no output check, no RESULT line")
        return
    print_check(runs.check, runs.stored_total, n)
    if not runs.check.ok:
        print(f"OUTPUT CHECK FAILED ({len(runs.check.problems)} differences):")
        for p in runs.check.problems[:40]:
            print(f"  {p}")
        sys.exit(1)
    print(result_line(runs))


if __name__ == "__main__":
    main()
