"""Benchmark: the streaming step, Kafka -> event-time blocks in the store, against Quix Streams.

In one run, on a fresh embedded broker (Tansu) and one core's worth of worker each:

* Tessera throughput: N views are produced to ``views`` as columnar batch envelopes (1000
  events a message, the Tessera fast path); the blocks flow runs bounded in a subprocess
  with one Bytewax worker into a fresh LMDB store, twice: once with only ``item_views``
  (count per item, blocks 5m/1h/1d: the apples-to-apples peer of a tumbling count per
  item) and once with every ``views`` feature of ``features.yaml``. Wall time includes
  process start-up; the steady rate counts from the first decoded batch to the end.
* Peer: the same N views as one JSON message each (keyed by item_id, Quix's default JSON
  deserializer) on topic ``views_json``; a Quix Streams app counts per item in 5-minute
  tumbling windows on event time (``event_ts``; grace = Tessera's lateness), no changelog
  topics (Tessera runs without recovery here too). It stops when its
  ``on_message_processed`` callback has seen all N messages.
* Freshness: on a fresh broker and store each, the blocks flow tails ``views``
  (flush every 500 ms; item_views only, then every ``views`` feature) while a producer sends a steady rate with
  event time = now; each produced message carries one marker item id, and the store is
  polled (read-only LMDB) until the marker's block appears: freshness = seen - produced.

Usage: python bench/streaming.py [--quick] [--events N] [--rate R] [--seconds S]
Last line: RESULT streaming events_per_s=<n> quix_events_per_s=<m> ratio=<r>
           freshness_p99_ms=<f> all_features_events_per_s=<k> freshness_item_p99_ms=<g>
(events_per_s is the item_views run; freshness_p99_ms the all-features tail flow.)
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

import numpy as np

REPO = Path(__file__).resolve().parent.parent
T0 = 1_761_955_200_000  # 2025-11-01T00:00:00Z
MINUTE = 60_000
LATENESS_MS = 60_000
BATCH_EVENTS = 1000
PARTITIONS = 4
SURFACES = ("explore", "follow", "nearby")
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


# -- events ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Views:
    """N views as plain arrays; ids are ``i<k>``, ``u<k>``, ``a<k>``, topics ``t<k>``."""

    ts: np.ndarray
    item: np.ndarray
    user: np.ndarray
    dwell: np.ndarray
    position: np.ndarray
    surface: np.ndarray

    def __len__(self) -> int:
        return len(self.ts)

    def head(self, n: int) -> Views:
        """Return the first ``n`` views."""
        return Views(*(getattr(self, f)[:n] for f in
                       ("ts", "item", "user", "dwell", "position", "surface")))


def make_views(n: int, *, items: int = 50_000, users: int = 500_000, span_ms: int = 6 * 3_600_000,
               seed: int = 11) -> Views:
    """Zipf item ids, uniform users, event time rising over ``span_ms`` with up to 5 s disorder."""
    rng = np.random.default_rng(seed)
    item = ((rng.zipf(1.2, size=n) - 1) % items).astype(np.int64)
    user = rng.integers(0, users, size=n, dtype=np.int64)
    ts = T0 + np.arange(n, dtype=np.int64) * span_ms // max(n, 1) - rng.integers(0, 5000, size=n)
    dwell = np.where(rng.random(n) < 0.2, 0, rng.integers(100, 60_000, size=n)).astype(np.int64)
    position = rng.integers(0, 50, size=n, dtype=np.int64)
    surface = rng.integers(0, len(SURFACES), size=n, dtype=np.int64)
    return Views(ts, item, user, dwell, position, surface)


def _dict_column(prefix: str, ids: np.ndarray):
    from schemas.columnar import DictColumn

    uniq, codes = np.unique(ids, return_inverse=True)
    dictionary = np.array([f"{prefix}{k}" for k in uniq.tolist()], dtype=object)
    return DictColumn(codes.astype(np.int32), dictionary)


def view_columns(v: Views, lo: int, hi: int, *, ts: np.ndarray | None = None,
                 item_ids: list[str] | None = None):
    """Columns of views ``lo:hi`` (optionally with other event times or explicit item ids)."""
    from schemas.columnar import DictColumn, EventColumns

    n = hi - lo
    item = v.item[lo:hi]
    if item_ids is None:
        item_col = _dict_column("i", item)
    else:
        item_col = DictColumn(np.arange(n, dtype=np.int32), np.array(item_ids, dtype=object))
    cols = {
        "event_id": DictColumn(np.arange(n, dtype=np.int32),
                               np.array([f"v{k}" for k in range(lo, hi)], dtype=object)),
        "event_ts": v.ts[lo:hi] if ts is None else ts,
        "user_id": _dict_column("u", v.user[lo:hi]),
        "item_id": item_col,
        "author_id": _dict_column("a", item % 5000),
        "topic": _dict_column("t", item % 40),
        "surface": DictColumn(v.surface[lo:hi].astype(np.int32), np.array(SURFACES, dtype=object)),
        "dwell_ms": v.dwell[lo:hi],
        "position": v.position[lo:hi],
    }
    return EventColumns("views", n, cols)


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


def produce_envelopes(bootstrap: str, v: Views, topic: str = "views") -> float:
    """Produce all views as batch envelopes; return the seconds it took."""
    from schemas.columnar import encode_batch

    t = time.perf_counter()
    prod = _Producer(bootstrap)
    for lo in range(0, len(v), BATCH_EVENTS):
        prod.send(topic, encode_batch(view_columns(v, lo, min(lo + BATCH_EVENTS, len(v)))))
        prod.p.poll(0)
    prod.flush()
    return time.perf_counter() - t


def produce_json(bootstrap: str, v: Views, topic: str = "views_json") -> float:
    """Produce every view as one JSON message keyed by item id; return the seconds it took."""
    t = time.perf_counter()
    prod = _Producer(bootstrap)
    cols = (v.ts.tolist(), v.item.tolist(), v.user.tolist(), v.dwell.tolist(),
            v.position.tolist(), v.surface.tolist())
    for k, (ts, item, user, dwell, pos, surf) in enumerate(zip(*cols)):
        value = (f'{{"event_id":"v{k}","event_ts":{ts},"user_id":"u{user}","item_id":"i{item}",'
                 f'"author_id":"a{item % 5000}","topic":"t{item % 40}",'
                 f'"surface":"{SURFACES[surf]}","dwell_ms":{dwell},"position":{pos},'
                 f'"request_id":null}}')
        prod.send(topic, value.encode(), f"i{item}".encode())
        if k % 10_000 == 0:
            prod.p.poll(0)
    prod.flush()
    return time.perf_counter() - t


# -- workers (each runs in its own process) ----------------------------------------------


def _emit(result: dict) -> None:
    import resource

    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
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
    """Count views per item in 5-minute tumbling windows with Quix Streams until N are done."""
    t_proc = args["t_launch"]
    from datetime import timedelta

    from quixstreams import Application

    from tessera.topics import consumer_config

    n = args["n"]
    fast = {k: v for k, v in consumer_config(args["bootstrap"]).items()
            if k in ("fetch.min.bytes", "fetch.wait.max.ms", "queued.min.messages")}
    state = {"count": 0, "first": None}
    app: Application

    def on_processed(topic: str, partition: int, offset: int) -> None:
        if state["count"] == 0:
            state["first"] = time.time()
        state["count"] += 1
        if state["count"] >= n:
            app.stop()

    app = Application(
        broker_address=args["bootstrap"], consumer_group=f"bench-quix-{os.getpid()}",
        auto_offset_reset="earliest", state_dir=args["state_dir"], use_changelog_topics=False,
        consumer_extra_config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000, **fast},
        on_message_processed=on_processed, loglevel="WARNING",
    )
    topic = app.topic("views_json", value_deserializer="json",
                      timestamp_extractor=lambda value, headers, ts, ts_type: value["event_ts"])
    sdf = app.dataframe(topic)
    sdf = sdf.tumbling_window(timedelta(minutes=5), grace_ms=LATENESS_MS).count().final()
    t_ready = time.time()
    app.run()
    t_end = time.time()
    _emit({"startup_s": t_ready - t_proc,
           "first_data_s": (state["first"] - t_proc) if state["first"] else None,
           "wall_s": t_end - t_proc, "events": state["count"]})


def _launch(kind: str, args: dict, log_path: Path) -> subprocess.Popen:
    args = {**args, "t_launch": time.time()}
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--_worker", kind, json.dumps(args)],
        stdout=subprocess.PIPE, stderr=open(log_path, "w"), text=True, cwd=REPO,
    )


def _result(proc: subprocess.Popen, log_path: Path, timeout: float) -> dict:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise RuntimeError(f"worker timed out after {timeout:g}s; see {log_path}") from None
    for line in out.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line.split(" ", 1)[1])
    tail = log_path.read_text()[-3000:]
    raise RuntimeError(f"worker exited {proc.returncode} without a result:\n{tail}")


# -- phases ----------------------------------------------------------------------------


def count_total(store_url: str, v: Views, sample: int = 200) -> tuple[int, int]:
    """Sum the stored 1d item_views counts of the ``sample`` most viewed items vs the truth.

    1d blocks, because the store drops finer blocks no window reads any more (retention).
    """
    from features.aggregations import make_aggregation
    from features.store import open_store

    ids, counts = np.unique(v.item, return_counts=True)
    top = ids[np.argsort(-counts)[:sample]]
    expected = int(counts[np.argsort(-counts)[:sample]].sum())
    agg = make_aggregation("count")
    got = 0
    with open_store(store_url, readonly=True) as store:
        for table in store.get_block_tables("item", "views", [f"i{k}" for k in top.tolist()]):
            if table is None:
                continue
            key = next(f for f in table.features if f.startswith("item_views@"))
            fb = table.feature_blocks(key)
            reps = agg.unpack(fb.blob, fb.offsets)
            got += int(reps["n"][fb.sizes == 1440 * MINUTE].sum())
    return got, expected


def run_tessera(bootstrap: str, features: Path, tmp: Path, name: str, n: int) -> dict:
    store = tmp / f"store-{name}"
    proc = _launch("tessera", {"bootstrap": bootstrap, "store_url": f"lmdb://{store}",
                               "features": str(features), "bounded": True, "flush_ms": 1000},
                   tmp / f"tessera-{name}.log")
    res = _result(proc, tmp / f"tessera-{name}.log", timeout=1800)
    if res["events"] != n:
        raise RuntimeError(f"tessera ({name}) decoded {res['events']} events, produced {n}")
    res["store_url"] = f"lmdb://{store}"
    return res


def run_quix(bootstrap: str, tmp: Path, n: int) -> dict:
    proc = _launch("quix", {"bootstrap": bootstrap, "n": n, "state_dir": str(tmp / "quix-state")},
                   tmp / "quix.log")
    res = _result(proc, tmp / "quix.log", timeout=3600)
    if res["events"] != n:
        raise RuntimeError(f"quix processed {res['events']} messages, produced {n}")
    return res


def measure_freshness(tmp: Path, features: Path, name: str, rate: int, seconds: float,
                      per_msg: int = 500) -> dict:
    """Tail with the flow, produce ``rate`` events/s with one marker per message, poll the store.

    Each message carries the next ``per_msg`` views of a generated stream (fresh users and
    Zipf items, so flushes rewrite a realistic number of entities) with event time = now;
    the last view of each message has a unique item id, the marker.
    """
    from features.store import open_store
    from tessera.broker import EmbeddedBroker
    from tessera.topics import create_topics

    v = make_views(per_msg * (int(rate * seconds / per_msg) + 2), seed=5)
    store_dir = tmp / f"store-fresh-{name}"
    store_url = f"lmdb://{store_dir}"
    with EmbeddedBroker(state_dir=tmp / f"broker-fresh-{name}") as info:
        create_topics(info.bootstrap, ["views", "deadletter"], partitions=PARTITIONS)
        prod = _Producer(info.bootstrap)
        log_path = tmp / f"tessera-fresh-{name}.log"
        proc = _launch("tessera", {"bootstrap": info.bootstrap, "store_url": store_url,
                                   "features": str(features), "bounded": False, "flush_ms": 500},
                       log_path)
        sent: dict[str, float] = {}
        seen: dict[str, float] = {}
        store = None
        seq = [0]

        def send_marked(marker: str) -> None:
            from schemas.columnar import encode_batch

            lo = seq[0] * per_msg % (len(v) - per_msg + 1)
            ids = [f"i{k}" for k in v.item[lo:lo + per_msg - 1].tolist()] + [marker]
            now = int(time.time() * 1000)
            cols = view_columns(v, lo, lo + per_msg, ts=np.full(per_msg, now, np.int64),
                                item_ids=ids)
            payload = encode_batch(cols)
            sent[marker] = time.time()
            prod.send("views", payload)
            prod.p.poll(0)
            seq[0] += 1

        def poll() -> None:
            nonlocal store
            if store is None:
                if not (store_dir / "data.mdb").exists() and not any(store_dir.glob("*")):
                    return
                try:
                    store = open_store(store_url, readonly=True)
                except Exception:
                    return
            pending = [m for m in sent if m not in seen]
            if not pending:
                return
            now = time.time()
            for m, t in zip(pending, store.get_block_tables("item", "views", pending)):
                if t is not None:
                    seen[m] = now

        try:
            # warm-up: wait until the flow writes a first marker (consumer started, store open)
            deadline = time.time() + 120
            while "warm0" not in seen:
                if proc.poll() is not None:
                    raise RuntimeError(f"tail flow exited:\n{log_path.read_text()[-3000:]}")
                if time.time() > deadline:
                    raise RuntimeError(f"tail flow wrote nothing in 120s; see {log_path}")
                if "warm0" not in sent:
                    send_marked("warm0")
                time.sleep(0.05)
                poll()
            sent.clear()
            seen.clear()
            interval = per_msg / rate
            start = time.time()
            next_send = start
            next_poll = start
            k = 0
            while time.time() - start < seconds:
                now = time.time()
                if now >= next_send:
                    send_marked(f"m{k}")
                    k += 1
                    next_send += interval
                if now >= next_poll:
                    poll()
                    next_poll += 0.05
                time.sleep(max(0.0, min(next_send, next_poll) - time.time()))
            produced_s = time.time() - start
            drain = time.time() + 30
            while len(seen) < len(sent) and time.time() < drain:
                time.sleep(0.05)
                poll()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if store is not None:
                store.close()
    # a marker never seen counts with the time waited so far (a lower bound): no silent drops
    end = time.time()
    lat = np.array([(seen.get(m, end) - sent[m]) * 1000 for m in sent])
    return {
        "messages": len(sent), "seen": len(seen), "events": len(sent) * per_msg,
        "rate": len(sent) * per_msg / produced_s,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "max_ms": float(lat.max()) if len(lat) else float("nan"),
    }


# -- main ------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run (200k events, 5 s)")
    ap.add_argument("--events", type=int, default=None, help="events to produce (2,000,000)")
    ap.add_argument("--rate", type=int, default=20_000, help="freshness produce rate, events/s")
    ap.add_argument("--seconds", type=float, default=None, help="freshness produce time (20)")
    ap.add_argument("--all-events", type=int, default=None,
                    help="events for the all-features run (300,000; its memory grows fast)")
    ap.add_argument("--skip-quix", action="store_true", help="do not run the peer")
    ap.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._worker:
        kind, payload = a._worker
        (worker_tessera if kind == "tessera" else worker_quix)(json.loads(payload))
        return

    from tessera.broker import EmbeddedBroker
    from tessera.logs import configure_logging
    from tessera.topics import create_topics

    configure_logging(level="WARNING")
    n = a.events or (200_000 if a.quick else 2_000_000)
    seconds = a.seconds or (5.0 if a.quick else 20.0)
    all_features = REPO / "features.yaml"
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmpname:
        tmp = Path(tmpname)
        item_features = tmp / "item_views.yaml"
        item_features.write_text(ITEM_COUNT_YAML)
        t = time.perf_counter()
        v = make_views(n)
        gen_s = time.perf_counter() - t
        print(f"generated {n:,} views in {gen_s:.1f}s "
              f"({len(np.unique(v.item)):,} items, event time span 6h)", flush=True)
        with EmbeddedBroker(state_dir=tmp / "broker") as info:
            create_topics(info.bootstrap, ["views", "views_json", "deadletter"],
                          partitions=PARTITIONS)
            env_s = produce_envelopes(info.bootstrap, v)
            print(f"produced {n:,} views as {n // BATCH_EVENTS:,} batch envelopes in {env_s:.1f}s",
                  flush=True)
            if not a.skip_quix:
                json_s = produce_json(info.bootstrap, v)
                print(f"produced {n:,} views as JSON messages in {json_s:.1f}s", flush=True)
            item = run_tessera(info.bootstrap, item_features, tmp, "item", n)
            print(f"tessera item_views: {item['wall_s']:.1f}s", flush=True)
            got, expected = count_total(item["store_url"], v)
            if got != expected:
                raise RuntimeError(f"stored counts of the top items are {got}, expected {expected}")
            quix = run_quix(info.bootstrap, tmp, n) if not a.skip_quix else None
            if quix:
                print(f"quix tumbling count: {quix['wall_s']:.1f}s", flush=True)
        # Every views feature holds sketches and last-n lists per open block of ~all users:
        # memory grows by GBs per million events, so this run reads its own, shorter topic.
        n_all = min(n, a.all_events or (100_000 if a.quick else 300_000))
        with EmbeddedBroker(state_dir=tmp / "broker-all") as info:
            create_topics(info.bootstrap, ["views", "deadletter"], partitions=PARTITIONS)
            produce_envelopes(info.bootstrap, v.head(n_all))
            full = run_tessera(info.bootstrap, all_features, tmp, "all", n_all)
            print(f"tessera all views features ({n_all:,} events): {full['wall_s']:.1f}s",
                  flush=True)
        fresh_item = measure_freshness(tmp, item_features, "item", a.rate, seconds)
        print(f"freshness item_views: p99 {fresh_item['p99_ms']:.0f} ms", flush=True)
        fresh = measure_freshness(tmp, all_features, "all", a.rate, seconds)

    from features.spec_loader import load_features

    n_views_features = len(load_features(all_features).for_source("views"))

    def rates(r: dict) -> tuple[float, float]:
        m = r["events"]
        steady = m / (r["wall_s"] - r["first_data_s"]) if r.get("first_data_s") else float("nan")
        return m / r["wall_s"], steady

    item_rate, item_steady = rates(item)
    full_rate, full_steady = rates(full)
    quix_rate, quix_steady = rates(quix) if quix else (float("nan"), float("nan"))
    ratio = item_rate / quix_rate if quix else float("nan")
    print()
    print(f"events: {n:,} views, {PARTITIONS} partitions, one worker per engine, same broker")
    print(f"{'run':<44}{'events':>10}{'wall s':>8}{'startup s':>11}{'events/s':>11}"
          f"{'steady ev/s':>13}{'peak RSS MB':>13}")
    rows = [("tessera item_views (count, 5m/1h/1d blocks)", item, item_rate, item_steady),
            (f"tessera all {n_views_features} views features", full, full_rate, full_steady)]
    if quix:
        rows.append(("quix 5m tumbling count/item (JSON msgs)", quix, quix_rate, quix_steady))
    for label, r, rate, steady in rows:
        print(f"{label:<44}{r['events']:>10,}{r['wall_s']:>8.1f}{r['first_data_s']:>11.1f}"
              f"{rate:>11,.0f}{steady:>13,.0f}{r['peak_rss_mb']:>13,.0f}")
    print(f"ratio tessera item_views / quix (wall, startup included): {ratio:.1f}x; "
          f"steady: {item_steady / quix_steady:.1f}x")
    print(f"check: stored 1d counts of the top 200 items = {got:,} (expected {expected:,})")
    print(f"freshness (event produced -> block visible in LMDB), tail flow, flush 500 ms, "
          f"{a.rate:,} events/s target for {seconds:g}s, 500 events a message, 1 marker each:")
    for label, f in (("item_views", fresh_item), (f"all {n_views_features} views features", fresh)):
        print(f"  {label:<28} produced {f['rate']:>8,.0f} ev/s, {f['seen']}/{f['messages']} markers "
              f"seen: p50 {f['p50_ms']:.0f} ms, p99 {f['p99_ms']:.0f} ms, max {f['max_ms']:.0f} ms")
    print("notes: wall time counts from process launch (imports, topic metadata, group join "
          "for quix); 'startup s' is launch -> first data; Tessera reads 1000-event batch "
          "envelopes, Quix one JSON message per event (its default deserializer); Quix runs "
          "without changelog topics and discards window results; Tessera writes blocks to "
          "LMDB (sync on).")
    print(f"RESULT streaming events_per_s={item_rate:.0f} quix_events_per_s={quix_rate:.0f} "
          f"ratio={ratio:.2f} freshness_p99_ms={fresh['p99_ms']:.0f} "
          f"all_features_events_per_s={full_rate:.0f} "
          f"freshness_item_p99_ms={fresh_item['p99_ms']:.0f}")


if __name__ == "__main__":
    main()
