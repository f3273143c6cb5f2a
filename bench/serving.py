"""Benchmark: the full feed-serving stack under open-loop load, against Feast.

One run, one machine (the load generator, the server, the broker and the workers share the
same cores):

1. A seeded world (>= 100,000 items) goes to the embedded broker; the real blocks and
   sequences flows (bounded, with a recovery directory) fill an LMDB store; the pre-assembly
   job writes the hot item and author values.
2. L1 and L2 rankers with the architecture and feature schema ``tessera train`` produces are
   trained for one epoch on a small synthetic labelled table (random feature values; model
   quality is not the point, inference cost is), exported to ONNX and published to a registry.
3. Tessera: ``uvicorn serving.app:app_from_env`` in its own process, with candidate limits
   giving ~2,000 candidates per request to L1 and ``l1_keep=500``; the blocks and sequences
   workers keep tailing the broker (resumed from the bounded runs' snapshots; the blocks
   worker aggregates the impressions the server logs). Item and author hydration reads the
   in-memory feature snapshot (``--no-snapshot``: the store).
4. Peer, Feast (``bench/feast_serving_peer.py``): the same serving stack (same config, same
   candidates, same ONNX models from the same registry, same Kafka forward log) in its own
   process, run by the Feast venv's interpreter with Tessera on ``PYTHONPATH``, except that
   the ``hydrate`` stage (every candidate's item and author features) is one in-process
   ``FeatureStore.get_online_features(...).to_dict()`` over Feast's SQLite online store,
   loaded at startup (``write_to_online_store``) with the values Tessera serves at the
   request end. No IPC hop: Feast runs inside the serving process. The user's features,
   sequence and the request end still come from Tessera's store.
5. Check: for a sample of users (``--check-users``), both servers (up at once) must return
   the same 20 items with the same scores and the same watermark, in the same order up to
   exactly tied scores, before the peer's ladder runs (no RESULT line otherwise). Both
   servers run with one ``PYTHONHASHSEED`` and the ``items`` topic has one partition: the
   catalog breaks popularity ties in set iteration order, which otherwise differs per
   process and gives the servers different trending candidates at the 2,000 cut.
6. A separate load-generating process drives ``POST /v1/feed`` open-loop from scheduled send
   times (latency counted from each request's scheduled send time, so a slow server cannot
   slow the offered load) up the rate ladder 10, 25, 50, 75, 100, 125, 150, 200, 250, 300,
   400, ... requests/s, each step at least ``--step-s`` (20) seconds and ``--min-requests``
   (1,000) requests, after a warm-up; it stops after the first step whose p99 reaches 50 ms
   or that has an error (503 included). The peer's ladder starts lower (1, 2, 5 requests/s,
   ``--step-s`` each, then the same ladder) and runs on until its p99 reaches
   ``--feast-stop-p99-ms`` (its max rate is still counted at 50 ms), to show where it
   saturates. ``hydrate_p99_ms`` is the server's hydrate stage p99 during the step at
   Tessera's max rate (the upper bound of the stage histogram's bucket: 0.5, 1, 2, 5 ... ms),
   from ``/metrics`` scraped before and after each step.
7. Optional (``--naive``): the naive baseline of earlier versions, a single-threaded
   ``http.server`` reading dict-encoded JSON blocks from LMDB, Python window assembly, torch
   eager and a synchronous Kafka flush per request (steps of ``--step-s`` without the
   1,000-request floor).

Feast 0.67 pins ``prometheus_client<0.25`` and ``tenacity<9``, older than the project's lock,
so it lives in its own venv (``--feast-python``, ``TESSERA_FEAST_PYTHON``, default
``~/.venvs/tessera-feast/bin/python``; see ``bench/online.py``), which also needs the
serving dependencies listed in ``bench/feast_serving_peer.py``. ``--skip-feast``: no peer.

Time (2 cores, quiet): ``--quick`` (20k items, 3 s steps) ~1.5 minutes; the full run ~6-10
minutes (~1.5 of setup, 100 s for the 10 requests/s step alone, ~1.5 for the peer).

Usage: python bench/serving.py [--quick] [--feast-python PATH] [--skip-feast] [--naive]
Last line: RESULT serving max_rps_p99_under_50ms=<n> p50_ms=<a> p99_ms=<b> feast_max_rps=<m>
ratio=<n/m> hydrate_p99_ms=<c> ...
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == REPO / "bench":
    sys.path[0] = str(REPO)  # bench/models.py would shadow the models package
SLO_MS = 50.0
N_CANDIDATES = 2_000
L1_KEEP = 500
# topics=0 still lets each of the user's top 3 topics add its first item
CANDIDATE_LIMITS = {"ann": 0, "topics": 0, "fresh": 0, "trending": N_CANDIDATES}


# ---------------------------------------------------------------------------- the stack

def build_store(tmp: Path, n_items: int, views: int, n_users: int):
    """World -> broker -> bounded blocks + sequences flows -> LMDB; pre-assemble items."""
    from dataflows.blocks import BlocksFlowConfig, build_blocks_flow
    from dataflows.runner import run_flow
    from dataflows.sequences import SequencesFlowConfig, build_sequences_flow
    from features.preassembled import refresh_preassembled
    from features.spec_loader import load_features
    from features.store import open_store
    from tessera.synth import WorldConfig, write_to_kafka

    fs = load_features(REPO / "features.yaml")
    url = f"lmdb://{tmp}/store"
    # the world ends 3 days ago: its engagements trail its views by up to ~2 days, and no
    # feature watermark may be ahead of the wall clock (reads are "now")
    now = int(time.time() * 1000) // 60_000 * 60_000 - 3 * 86_400_000
    world = WorldConfig(seed=21, n_users=n_users, n_items=n_items, n_authors=max(500, n_items // 20),
                        total_views=views, start_ts=now - 2 * 86_400_000,
                        duration_ms=2 * 86_400_000, zipf_exponent=0.8,
                        preexisting_item_fraction=1.0, late_fraction=0.0)
    t = time.perf_counter()
    summary = write_to_kafka(world, BOOTSTRAP, batch_events=1000)
    print(f"produced {sum(summary.counts.values()):,} events in {time.perf_counter() - t:.1f}s",
          flush=True)
    t = time.perf_counter()
    run_flow(build_blocks_flow(BlocksFlowConfig(bootstrap=BOOTSTRAP, store_url=url, features=fs,
                                                bounded=True, shards=4)),
             recovery_dir=tmp / "recovery-blocks")
    run_flow(build_sequences_flow(SequencesFlowConfig(bootstrap=BOOTSTRAP, store_url=url,
                                                      bounded=True)),
             recovery_dir=tmp / "recovery-sequences")
    print(f"blocks + sequences flows done in {time.perf_counter() - t:.1f}s", flush=True)
    with open_store(url) as store:
        t = time.perf_counter()
        rep = refresh_preassembled(store, fs, "item")
        refresh_preassembled(store, fs, "author")  # serving reads author values per candidate
        print(f"pre-assembled {rep.entities:,} items x {len(rep.columns)} values in "
              f"{time.perf_counter() - t:.1f}s", flush=True)
    return url, fs


def train_and_publish(tmp: Path, registry_dir: Path, items: list[str], users: list[str]) -> None:
    """Train L1 and L2 one epoch on synthetic rows; export to ONNX; publish; keep torch copies."""
    import pyarrow as pa
    import torch

    from features.offline.training import LABEL_ACTIONS, label_column
    from models.data import ArrowExamples, TimeRange
    from models.onnx_export import export_result
    from models.publish import publish_result
    from models.registry import ModelRegistry
    from models.train import (
        DEFAULT_L1_FEATURES,
        DEFAULT_L2_FEATURES,
        TrainConfig,
        train_l1,
        train_l2,
    )

    rng = np.random.default_rng(3)
    n = 6_000
    dense = sorted(set(DEFAULT_L1_FEATURES.dense) | set(DEFAULT_L2_FEATURES.dense))
    cols: dict[str, object] = {}
    for name in dense:
        cols[f"feature_{name}"] = (rng.uniform(0, 0.2, n) if "ctr" in name
                                   else rng.lognormal(2.0, 1.5, n).round())
    logit = 8 * (cols["feature_item_ctr_1d"] - 0.1) + 0.2 * np.log1p(cols["feature_item_views_1d"])
    rates = {"click": 0.0, "like": -1.5, "share": -3.0, "save": -2.5, "hide": -3.0}
    for a in LABEL_ACTIONS:
        p = 1 / (1 + np.exp(-(logit - 1.5 + rates[a])))
        cols[label_column(a)] = (rng.random(n) < p).astype(np.int32)
    it = rng.choice(items, n)
    cols.update(
        impression_id=[f"imp-{k}" for k in range(n)], request_id=[f"r-{k // 10}" for k in range(n)],
        user_id=list(rng.choice(users, n)), item_id=list(it),
        author_id=[f"a{k % 500}" for k in range(n)], topic=[f"t{k % 16}" for k in range(n)],
        event_ts=np.arange(n, dtype=np.int64) * 1_000, position=np.arange(n) % 10,
        user_recent_items_1d=[list(rng.choice(items, 20)) for _ in range(n)])
    source = ArrowExamples(pa.table(cols))
    train, ev = TimeRange(0, 4_800_000), TimeRange(4_800_000, n * 1_000)
    registry = ModelRegistry(registry_dir)
    cfg = TrainConfig(epochs=1, batch_size=512)
    for kind, fn in (("l1", train_l1), ("l2", train_l2)):
        t = time.perf_counter()
        result = fn(source, train, ev, config=cfg)
        reports = export_result(result, tmp / "onnx")
        publish_result(registry, result, {k: r.path for k, r in reports.items()})
        torch.save(result.model, tmp / f"{kind}.pt")
        (tmp / f"{kind}.json").write_text(json.dumps({
            "schema": result.schema.to_dict(), "tasks": list(result.tasks),
            "task_weights": dict(result.task_weights)}))
        print(f"trained + published {kind} ({len(result.schema.dense)} dense features, tasks "
              f"{list(result.tasks)}) in {time.perf_counter() - t:.1f}s", flush=True)


def wait_http(url: str, timeout_s: float, method: str = "GET", body: bytes | None = None,
              check=None, proc: subprocess.Popen | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{url}: the server process exited with {proc.returncode}")
        try:
            r = httpx.request(method, url, content=body, timeout=5,
                              headers={"content-type": "application/json"})
            if r.status_code == 200 and (check is None or check(r)):
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.3)
    raise SystemExit(f"{url} not ready after {timeout_s}s: {last}")


def metric_means(text: str, metric: str, label: str) -> dict[str, float]:
    """Mean of each labelled series of a Prometheus histogram (sum / count)."""
    sums, counts = {}, {}
    pat = re.compile(rf'^{metric}_(sum|count)\{{[^}}]*{label}="([^"]+)"[^}}]*\}} (\S+)$', re.M)
    for kind, key, value in pat.findall(text):
        (sums if kind == "sum" else counts)[key] = float(value)
    return {k: sums[k] / counts[k] for k in sums if counts.get(k)}


def stage_buckets(text: str, stage: str,
                  metric: str = "tessera_stage_seconds") -> list[tuple[float, float]]:
    """Cumulative ``(le, count)`` buckets of one stage of the stage histogram."""
    buckets = []
    for labels, value in re.findall(rf"^{metric}_bucket\{{([^}}]*)\}} (\S+)$", text, re.M):
        le = re.search(r'le="([^"]+)"', labels)
        if f'stage="{stage}"' in labels and le:
            buckets.append((float(le.group(1)), float(value)))
    return sorted(buckets)


def bucket_delta(after: list[tuple[float, float]],
                 before: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The buckets of the observations between two scrapes."""
    prev = dict(before)
    return [(le, v - prev.get(le, 0.0)) for le, v in after]


def bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Upper bound of the bucket holding quantile ``q`` (NaN when empty)."""
    if not buckets or not buckets[-1][1]:
        return float("nan")
    total = buckets[-1][1]
    return next(le for le, v in buckets if v >= q * total)


def stage_mean_delta(before: str, after: str, stage: str) -> float:
    """Mean seconds of one stage between two scrapes (NaN when no observation)."""
    def sum_count(text: str) -> tuple[float, float]:
        out = [0.0, 0.0]
        for kind, labels, value in re.findall(
                r"^tessera_stage_seconds_(sum|count)\{([^}]*)\} (\S+)$", text, re.M):
            if f'stage="{stage}"' in labels:
                out[kind == "count"] = float(value)
        return out[0], out[1]

    s0, c0 = sum_count(before)
    s1, c1 = sum_count(after)
    return (s1 - s0) / (c1 - c0) if c1 > c0 else float("nan")


def metric_total(text: str, metric: str, labels: str) -> float:
    """Sum of the counter series whose labels contain ``labels`` (e.g. 'result="hit"')."""
    return sum(float(v) for lab, v in re.findall(rf'^{metric}\{{([^}}]*)\}} (\S+)$', text, re.M)
               if all(part in lab for part in labels.split(",")))


# ---------------------------------------------------------------------------- naive server

def build_naive_docs(path: Path, store_url: str, fs, ids_by_type: dict[str, list[str]]):
    """Copy the blocks of these entities into one dict-per-block JSON document per entity."""
    import lmdb

    from features.aggregations import build_aggregation
    from features.store import open_store

    env = lmdb.open(str(path), map_size=1 << 34, max_dbs=2)
    specs = {f.key: f for f in fs.features}
    with open_store(store_url, readonly=True) as store, env.begin(write=True) as txn:
        for etype, ids in ids_by_type.items():
            docs: dict[str, dict] = {e: {} for e in ids}
            for family in sorted({f.source for f in fs.features}):
                for e, table in zip(ids, store.get_block_tables(etype, family, ids)):
                    if table is None:
                        continue
                    for fk, start, size, rep in table.to_rows():
                        agg = build_aggregation(specs[fk])
                        if agg.rep_dtype is None:
                            continue  # sketches/lists: the naive store keeps numeric reps only
                        r = agg.from_bytes(rep)
                        docs[e].setdefault(fk, []).append(
                            {"start": start, "size": size,
                             "rep": list(r) if isinstance(r, tuple) else r})
            for e, doc in docs.items():
                txn.put(f"{etype}:{e}".encode(), json.dumps(doc).encode())
    return env


def naive_server(port: int, store_url: str, bootstrap: str, tmp: str, users: list[str],
                 ready: mp.Event) -> None:
    """The baseline: one thread, JSON blocks, Python assembly, torch eager, sync logging."""
    import importlib.util
    import time as _t
    import uuid
    from collections import Counter
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import torch
    from confluent_kafka import Producer

    spec = importlib.util.spec_from_file_location("bench_online", REPO / "bench" / "online.py")
    online = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(online)
    naive_read = online.naive_read

    from features.client import FeatureClient
    from features.expressions import parse_derived
    from features.spec_loader import load_features
    from features.store import open_store
    from models.features import FeatureSchema, categorical_matrix, dense_matrix, sequence_matrix
    from schemas.codec import encode
    from serving.catalog import CatalogFollower, ItemCatalog, popularity_from_store
    from tessera.logs import configure_logging
    from tessera.topics import producer_config

    configure_logging(level="WARNING")
    torch.set_num_threads(1)  # the ONNX sessions run on one thread too
    tmp_p = Path(tmp)
    fs = load_features(REPO / "features.yaml")
    store = open_store(store_url, readonly=True)
    client = FeatureClient(store, fs)
    catalog = ItemCatalog()
    follower = CatalogFollower(bootstrap, catalog).start()
    follower.caught_up.wait(120)
    follower.stop()
    ids = list(dict.fromkeys([*catalog._meta, *store.list_entity_ids("item", "views")]))
    snap = catalog.rebuild(popularity_from_store(store, ids))
    item_set = list(dict.fromkeys([*snap.trending[:N_CANDIDATES],
                                   *(v[0] for v in snap.by_topic.values() if v)]))
    authors = sorted({a for a in catalog.authors(item_set) if a})
    env = build_naive_docs(tmp_p / "naive", store_url, fs,
                           {"item": item_set, "user": users, "author": authors})

    models = {}
    for kind in ("l1", "l2"):
        meta = json.loads((tmp_p / f"{kind}.json").read_text())
        model = torch.load(tmp_p / f"{kind}.pt", weights_only=False)
        model.eval()
        models[kind] = (model, FeatureSchema.from_dict(meta["schema"]), meta)
    windows = {f.window_name(w): f.entity_type for f in fs.features for w in f.windows}
    derived = {d.name: (d, parse_derived(d.expression)) for d in fs.derived}
    needed: dict[str, set[str]] = {"item": set(), "user": set(), "author": set()}
    wanted_derived: list[str] = []
    for _, schema, _ in models.values():
        for d in schema.dense:
            if d.name in windows:
                needed[windows[d.name]].add(d.name)
            elif d.name in derived:
                spec, _ = derived[d.name]
                wanted_derived.append(d.name)
                for inp in spec.inputs:
                    needed[spec.entity_type].add(inp)
    needed_l = {k: sorted(v) for k, v in needed.items()}
    wanted_derived = list(dict.fromkeys(wanted_derived))
    end = client.get_features("item", item_set[:1], needed_l["item"][:1]).watermark
    producer = Producer(producer_config(bootstrap))

    def feed(user: str, limit: int) -> dict:
        request_id = f"r-{uuid.uuid4().hex}"
        seq = client.get_sequences([user], max_len=50)
        seq_items = list(seq.item_ids[0, :int(seq.lengths[0])])
        out: dict[str, str] = {}
        for topic, _ in Counter(t for t in catalog.topics(seq_items) if t).most_common(3):
            for i in snap.by_topic.get(topic, ())[:1]:
                out.setdefault(i, "topics")
        for i in snap.trending[:N_CANDIDATES]:
            out.setdefault(i, "trending")
        seen = set(seq_items)
        cands = [i for i in out if i not in seen]
        cand_authors = catalog.authors(cands)
        cand_topics = catalog.topics(cands)
        item_m = naive_read(env, fs, "item", cands, needed_l["item"], end)
        user_m = naive_read(env, fs, "user", [user], needed_l["user"], end)
        author_m = naive_read(env, fs, "author", cand_authors, needed_l["author"], end)
        user_row = dict(zip(needed_l["user"], user_m[0].tolist()))
        rows = []
        for k, item in enumerate(cands):
            row = dict(zip(needed_l["item"], item_m[k].tolist()))
            row.update(zip(needed_l["author"], author_m[k].tolist()))
            row.update(user_row)
            for name in wanted_derived:
                spec, expr = derived[name]
                row[name] = expr.evaluate_row(row, default=spec.default)
            row.update(item_id=item, author_id=cand_authors[k], topic=cand_topics[k],
                       user_id=user, user_recent_items_1d=seq_items)
            rows.append(row)
        m1, s1, _ = models["l1"]
        with torch.no_grad():
            l1 = m1(torch.from_numpy(dense_matrix(rows, s1))).numpy().reshape(-1)
        keep = np.argsort(-l1, kind="stable")[:L1_KEEP].tolist()
        sub = [rows[k] for k in keep]
        m2, s2, meta2 = models["l2"]
        with torch.no_grad():
            probs = m2(torch.from_numpy(dense_matrix(sub, s2)),
                       torch.from_numpy(categorical_matrix(sub, s2)),
                       torch.from_numpy(sequence_matrix(sub, s2))).numpy()
        w = np.array([meta2["task_weights"].get(t, 0.0) for t in meta2["tasks"]], dtype=np.float32)
        l2 = probs.reshape(len(sub), -1) @ w if probs.ndim == 2 and probs.shape[1] > 1 \
            else probs.reshape(-1)
        per_author: Counter = Counter()
        items = []
        now = int(_t.time() * 1000)
        for j in np.argsort(-l2, kind="stable").tolist():
            row = sub[j]
            if row["author_id"] and per_author[row["author_id"]] >= 2:
                continue
            per_author[row["author_id"]] += 1
            imp = f"imp-{uuid.uuid4().hex}"
            pos = len(items)
            items.append({"item_id": row["item_id"], "author_id": row["author_id"],
                          "score": float(l2[j]), "source": out[row["item_id"]],
                          "position": pos, "impression_id": imp})
            feats = {n: float(row[n]) for n in s2.dense_names
                     if isinstance(row.get(n), float) and row[n] == row[n]}
            rec = {"impression_id": imp, "event_id": imp, "event_ts": now,
                   "request_id": request_id, "user_id": user, "item_id": row["item_id"],
                   "author_id": row["author_id"], "topic": row["topic"], "position": pos,
                   "feed_type": "EXPLORE", "source": out[row["item_id"]],
                   "model_versions": {"l1": "naive", "l2": "naive"},
                   "scores": {"l1": float(l1[keep[j]]), "l2": float(l2[j])},
                   "features": feats, "feature_watermark": int(end)}
            producer.produce("impressions", encode("impressions", rec), key=user.encode())
            if len(items) >= limit:
                break
        producer.flush()
        return {"request_id": request_id, "items": items}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args) -> None:
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._send(200, {"status": "ok"})

        def do_POST(self) -> None:
            try:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                self._send(200, feed(body["user_id"], int(body.get("limit", 20))))
            except Exception as exc:  # the baseline answers 500 with the reason
                self._send(500, {"error": repr(exc)[:300]})

    feed(users[0], 20)  # warm up
    server = HTTPServer(("127.0.0.1", port), Handler)
    ready.set()
    server.serve_forever()


# ---------------------------------------------------------------------------- load generator

def step_requests(rate: float, plan: dict) -> int:
    """Requests of one step: ``step_s`` worth, and at least ``min_requests`` from
    ``floor_from_rps`` up (the peers' extra low steps last ``step_s`` only)."""
    n = max(1, int(np.ceil(rate * plan["step_s"])))
    return max(n, plan["min_requests"]) if rate >= plan["floor_from_rps"] else n


def proc_cpu(pid: int | None) -> float:
    """CPU seconds a process and its descendants (``--workers``, the snapshot builder) used
    so far; 0 without a pid."""
    if not pid:
        return 0.0
    return cpu_by_role({"server": [pid]})["server"]


def loadgen(plan: dict, conn: mp.connection.Connection) -> None:
    """Open-loop rate ladder; stop after the first rate with p99 >= ``stop_p99_ms`` or any
    failure. Scrapes the server's stage histogram before and after each step."""
    import asyncio

    import httpx

    url, users, metrics_url = plan["url"], plan["users"], plan.get("metrics_url")

    async def scrape(client: httpx.AsyncClient) -> str:
        if not metrics_url:
            return ""
        try:
            return (await client.get(metrics_url)).text
        except httpx.HTTPError:
            return ""

    async def step(client: httpx.AsyncClient, rate: float, n: int, seed: int) -> dict:
        rng = np.random.default_rng(seed)
        bodies = [json.dumps({"user_id": u, "feed_type": "EXPLORE", "limit": 20}).encode()
                  for u in rng.choice(users, n)]
        before = await scrape(client)
        cpu0 = proc_cpu(plan.get("server_pid"))
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.05
        wall0 = time.time() + 0.05  # the step's start on the wall clock (server logs)
        lat: list[float] = []
        slow: list[float] = []  # scheduled send (s into the step) of requests over the SLO
        errors: dict[str, int] = {}
        done_at = [t0]

        async def one(i: int) -> None:
            sched = t0 + i / rate
            delay = sched - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                r = await client.post(url, content=bodies[i],
                                      headers={"content-type": "application/json"})
                if r.status_code != 200:
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            now = loop.time()
            lat.append((now - sched) * 1000)  # from the scheduled send: no coordinated omission
            if lat[-1] >= SLO_MS:
                slow.append(sched - t0)
            done_at[0] = max(done_at[0], now)

        await asyncio.gather(*(one(i) for i in range(n)))
        cpu = proc_cpu(plan.get("server_pid")) - cpu0
        wall = max(done_at[0] - t0, 1e-9)
        after = await scrape(client)
        arr = np.asarray(lat)
        ok = n - sum(errors.values())
        hyd = bucket_delta(stage_buckets(after, "hydrate"), stage_buckets(before, "hydrate"))
        return {"rate": rate, "requests": n, "duration_s": n / rate,
                "achieved": ok / wall, "server_cores": cpu / wall,
                "server_cpu_ms": cpu / n * 1000,
                "p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)),
                "max": float(arr.max()), "errors": errors, "start": wall0,
                "slow_at": sorted(slow),
                "hydrate_p99_ms": bucket_quantile(hyd, 0.99) * 1000,
                "hydrate_le_1ms": (dict(hyd).get(0.001, 0.0) / hyd[-1][1]
                                   if hyd and hyd[-1][1] else float("nan")),
                "hydrate_mean_ms": stage_mean_delta(before, after, "hydrate") * 1000}

    async def main() -> list[dict]:
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
        async with httpx.AsyncClient(limits=limits, timeout=10.0) as client:
            wr, ws = plan["warmup_rps"], plan["warmup_s"]
            await step(client, wr, max(1, int(wr * ws)), 0)  # warm-up, not recorded
            out = []
            for k, rate in enumerate(plan["rates"]):
                res = await step(client, rate, step_requests(rate, plan), k + 1)
                out.append(res)
                print(f"  {plan['name']}: {rate:g} rps, {res['requests']} requests: p50 "
                      f"{res['p50']:.1f} ms, p99 {res['p99']:.1f} ms, errors "
                      f"{res['errors'] or '-'}", flush=True)
                if res["p99"] >= plan["stop_p99_ms"] or res["errors"]:
                    break
                await asyncio.sleep(1.0)
            return out

    conn.send(asyncio.run(main()))
    conn.close()


def run_ladder(plan: dict, roles: dict[str, list[int]] | None = None) -> list[dict]:
    """Run the ladder in its own process; print the cores each role used meanwhile."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=loadgen, args=(plan, child))
    p.start()
    child.close()
    roles = {**(roles or {}), "load generator": [p.pid], "bench": [os.getpid()]}
    t, c0 = time.perf_counter(), cpu_by_role(roles)
    res = parent.recv()
    c1 = cpu_by_role(roles)
    print(f"  cores used during the {plan['name']} ladder (warm-up included): "
          f"{cpu_line(c0, c1, time.perf_counter() - t)}", flush=True)
    p.join()
    return res


def hydrate_bound(ms: float) -> str:
    """A stage p99 bucket bound as text: '<= 2', '> 2000' (past the last bucket), '-'."""
    if ms != ms:
        return "-"
    return f"> {STAGE_TOP_MS:g}" if ms == float("inf") else f"<= {ms:g}"


STAGE_TOP_MS = 2_000.0  # serving.metrics.STAGE_BUCKETS ends at 2 s


def summarize(name: str, steps: list[dict]) -> tuple[float, dict | None]:
    """Print the ladder; the highest rate with p99 < SLO and no error, and its step."""
    print(f"\n{name}")
    print(f"{'offered rps':>11} {'achieved':>9} {'requests':>9} {'secs':>5} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'max ms':>8} {'hydrate p99':>11} {'mean':>6} {'srv cores':>9} "
          f"{'cpu/req':>7}  errors")
    best, best_step = 0.0, None
    for s in steps:
        hp = s["hydrate_p99_ms"]
        print(f"{s['rate']:>11g} {s['achieved']:>9.1f} {s['requests']:>9} "
              f"{s['duration_s']:>5.0f} {s['p50']:>8.1f} {s['p99']:>8.1f} {s['max']:>8.1f} "
              f"{hydrate_bound(hp):>11} "
              f"{s['hydrate_mean_ms']:>6.2f} {s['server_cores']:>9.2f} "
              f"{s['server_cpu_ms']:>7.1f}  {s['errors'] or '-'}")
        if s["p99"] < SLO_MS and not s["errors"]:
            best, best_step = s["rate"], s
    for s in steps:  # where the slow requests fell (stalls show as short runs)
        if s["slow_at"] and len(s["slow_at"]) <= s["requests"] // 2:
            print(f"  {s['rate']:g} requests/s: {len(s['slow_at'])} requests over {SLO_MS:g} ms, "
                  f"sent at (s into the step) {clusters(s['slow_at'])}")
    return best, best_step


def clusters(times: list[float], gap: float = 0.5) -> str:
    """Sorted times as runs: '3.1-3.4 (5), 33.0 (1)'; at most 12 runs."""
    runs: list[list[float]] = []
    for t in times:
        if runs and t - runs[-1][-1] <= gap:
            runs[-1].append(t)
        else:
            runs.append([t])
    out = [f"{r[0]:.1f}" + (f"-{r[-1]:.1f}" if len(r) > 1 else "") + f" ({len(r)})"
           for r in runs[:12]]
    return ", ".join(out) + (f", ... ({len(runs) - 12} more runs)" if len(runs) > 12 else "")


def snapshot_builds(log_path: Path, steps: list[dict]) -> str:
    """The server's feature snapshot builds (INFO log), placed in the ladder's steps."""
    from datetime import datetime

    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        if "feature_snapshot_built" not in line:
            continue
        ts = re.search(r"(\d{4}-\d\d-\d\dT[\d:.]+Z)", line)
        build = re.search(r"build_s=([\d.]+)", line)
        if not ts:
            continue
        t = datetime.fromisoformat(ts.group(1).replace("Z", "+00:00")).timestamp()
        where = "before the ladder"
        for st in steps:
            if t >= st["start"]:
                where = f"{st['rate']:g} requests/s step +{t - st['start']:.1f} s"
        out.append(f"{where} ({build.group(1) if build else '?'} s)")
    return "; ".join(out) or "none logged"


# ---------------------------------------------------------------------------- Feast peer

def feast_python(arg: str | None) -> str | None:
    """The Feast interpreter, found as ``bench/online.py`` finds it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_online", REPO / "bench" / "online.py")
    online = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(online)
    return online.find_feast_python(arg)


def check_feast_python(py: str) -> None:
    """The peer imports Feast and Tessera's serving stack in one interpreter."""
    probe = ("import feast, onnxruntime, serving.app, serving.models, features.store; "
             "from models.onnx_runtime import check_runtime; check_runtime()")
    r = subprocess.run([py, "-c", probe], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=120)
    if r.returncode:
        raise SystemExit(f"{py} cannot run the Feast peer (Feast + Tessera's serving imports): "
                         f"{r.stderr.strip().splitlines()[-1:]}; see bench/feast_serving_peer.py "
                         "for the packages to install into the Feast venv, or pass --skip-feast")


def feed_top(base: str, user: str) -> dict:
    import httpx

    r = httpx.post(f"{base}/v1/feed", json={"user_id": user, "feed_type": "EXPLORE",
                                            "limit": 20}, timeout=30)
    r.raise_for_status()
    return r.json()


def tie_groups(items: list[dict]) -> list[tuple[float, set[str]]]:
    """A page as runs of equal scores: (score, its items), best first."""
    out: list[tuple[float, set[str]]] = []
    for it in items:
        if out and out[-1][0] == it["score"]:
            out[-1][1].add(it["item_id"])
        else:
            out.append((it["score"], {it["item_id"]}))
    return out


def same_page(a: list[dict], b: list[dict]) -> bool:
    """The same items with the same scores, up to the order of exactly tied scores (the
    ranking keeps candidate order among ties, and the catalog orders popularity ties by
    set iteration order, per process); the last run may be cut by the page size, so only
    its size must match there."""
    ga, gb = tie_groups(a), tie_groups(b)
    if len(ga) != len(gb) or not ga:
        return False
    for k, ((sa, ia), (sb, ib)) in enumerate(zip(ga, gb)):
        if sa != sb or len(ia) != len(ib) or (ia != ib and k < len(ga) - 1):
            return False
    return True


def same_top_items(a: str, b: str, users: list[str]) -> tuple[int, int, list[str]]:
    """Ask both servers for each user's page: (users with the same page and watermark, of
    them in exactly the same order, descriptions of the first mismatches)."""
    same, exact, bad = 0, 0, []
    for u in users:
        ra, rb = feed_top(a, u), feed_top(b, u)
        ia = [i["item_id"] for i in ra["items"]]
        ib = [i["item_id"] for i in rb["items"]]
        ok = ra["feature_watermark"] == rb["feature_watermark"] and not ra.get("degraded") \
            and not rb.get("degraded")
        if ok and same_page(ra["items"], rb["items"]):
            same += 1
            exact += ia == ib and [i["score"] for i in ra["items"]] == \
                [i["score"] for i in rb["items"]]
        elif len(bad) < 3:
            k = next((j for j, (x, y) in enumerate(zip(ia, ib)) if x != y), None)
            if k is None:  # the same items in the same order: where do the scores differ?
                k = next((j for j, (x, y) in enumerate(zip(ra["items"], rb["items"]))
                          if x["score"] != y["score"]), min(len(ia), len(ib)))
            sa = [round(i["score"], 9) for i in ra["items"][k:k + 3]]
            sb = [round(i["score"], 9) for i in rb["items"][k:k + 3]]
            bad.append(f"user {u}: first difference at position {k} (tessera {ia[k:k + 3]} "
                       f"{sa} wm {ra['feature_watermark']} {ra.get('degraded', '')}; feast "
                       f"{ib[k:k + 3]} {sb} wm {rb['feature_watermark']} "
                       f"{rb.get('degraded', '')}; {len(set(ia) & set(ib))} items in common)")
    return same, exact, bad


def stop(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def ready_models(base: str, user: str, timeout_s: float, proc: subprocess.Popen) -> dict:
    """Wait for /readyz and a feed ranked by the registry's models, not degraded."""
    import httpx

    wait_http(f"{base}/readyz", timeout_s, proc=proc)
    probe = json.dumps({"user_id": user}).encode()
    wait_http(f"{base}/v1/feed", 90, "POST", probe, proc=proc,
              check=lambda r: "popularity" not in r.json()["model_versions"].values()
              and not r.json().get("degraded"))
    return httpx.post(f"{base}/v1/feed", content=probe).json()["model_versions"]


# ---------------------------------------------------------------------------- CPU use

def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds so far) of every process (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()
        out[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_by_role(roles: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far of each role's processes and their descendants (``bench``: that
    process alone), and of the machine (``machine``: every core's busy time, other work on
    it included)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out = {}
    for role, pids in roles.items():
        todo, seen = list(pids), set()
        while todo:
            p = todo.pop()
            if p in seen or p not in table:
                continue
            seen.add(p)
            if role != "bench":  # the bench's children are the other roles
                todo.extend(children.get(p, ()))
        out[role] = sum(table[p][1] for p in seen)
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    busy = sum(int(v) for v in cpu[:8]) - int(cpu[3]) - int(cpu[4])  # less idle, iowait
    out["machine"] = busy / os.sysconf("SC_CLK_TCK")
    return out


def cpu_line(before: dict[str, float], after: dict[str, float], wall: float) -> str:
    """Cores used per role between two ``cpu_by_role`` readings."""
    used = {k: (after[k] - before.get(k, 0.0)) / wall for k in after}
    ours = sum(v for k, v in used.items() if k != "machine")
    parts = ", ".join(f"{k} {v:.2f}" for k, v in used.items() if k != "machine")
    return (f"{parts}; all of these {ours:.2f}; the machine {used['machine']:.2f} of "
            f"{os.cpu_count()} (other work {max(0.0, used['machine'] - ours):.2f})")


# ---------------------------------------------------------------------------- main

BOOTSTRAP = ""


def main() -> None:
    global BOOTSTRAP
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20k items, 3 s steps")
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--views", type=int, default=600_000)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--step-s", type=float, default=20.0, help="seconds per step (at least)")
    ap.add_argument("--min-requests", type=int, default=1_000,
                    help="requests per step (at least), from 10 requests/s up")
    ap.add_argument("--warmup-s", type=float, default=15.0,
                    help="Tessera's warm-up at 10 requests/s before the ladder (the item "
                         "snapshot rebuilds once the catalog has caught up: <= 10 s)")
    ap.add_argument("--rates", default="10,25,50,75,100,125,150,200,250,300,400,500,600,800")
    ap.add_argument("--feast-rates", default="1,2,5,10,25,50,75,100,125,150,200,250,300")
    ap.add_argument("--feast-stop-p99-ms", type=float, default=1_000.0,
                    help="the peer's ladder goes on past the SLO until its p99 reaches this")
    ap.add_argument("--check-users", type=int, default=100,
                    help="users whose pages both servers must agree on")
    ap.add_argument("--feast-python", default=None,
                    help="interpreter with Feast (default: see bench/online.py)")
    ap.add_argument("--skip-feast", action="store_true", help="no Feast peer (no RESULT line)")
    ap.add_argument("--workers", type=int, default=1,
                    help="serving processes on the port (tessera serve --workers); the stage "
                         "histograms (hydrate p99) then come from whichever one answers "
                         "/metrics")
    ap.add_argument("--keep-logs", default=None, metavar="DIR",
                    help="copy the server's and workers' logs and the steps there")
    ap.add_argument("--naive", action="store_true", help="also run the naive baseline")
    ap.add_argument("--naive-rates", default="1,2,5,10")
    ap.add_argument("--no-snapshot", action="store_true",
                    help="serve without the in-memory item feature snapshot (A/B)")
    args = ap.parse_args()
    if args.quick:
        args.items, args.views, args.users = 20_000, 150_000, 5_000
        args.step_s, args.min_requests, args.warmup_s = 3.0, 0, 12.0
        args.check_users = min(args.check_users, 20)
        args.naive_rates = "1,2,5"
    rates = [float(r) for r in args.rates.split(",")]
    feast_rates = [float(r) for r in args.feast_rates.split(",")]
    naive_rates = [float(r) for r in args.naive_rates.split(",")]
    feast_py = None if args.skip_feast else feast_python(args.feast_python)
    if not args.skip_feast:
        if feast_py is None:
            ap.error("no interpreter with Feast: pass --feast-python or --skip-feast")
        check_feast_python(feast_py)

    from features.store import open_store
    from tessera.broker import EmbeddedBroker, find_free_port
    from tessera.logs import configure_logging
    from tessera.topics import PLATFORM_TOPICS, create_topics

    configure_logging(level="WARNING")
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, shared by the load generator, the server, the "
          "embedded broker and the workers (numbers are for that shared setup); load average "
          f"at the start {load0:.2f}", flush=True)
    procs: list[subprocess.Popen] = []
    server = peer = None
    fsteps: list[dict] = []
    nsteps: list[dict] = []
    fmetrics, finfo, check = "", {}, None
    with tempfile.TemporaryDirectory() as d, EmbeddedBroker(state_dir=Path(d) / "broker") as info:
        tmp = Path(d)
        BOOTSTRAP = info.bootstrap
        # items: one partition, so every server's catalog reads the items in the same order
        # (with one hash seed, the catalog then breaks popularity ties the same way: both
        # servers get the same trending candidates; see same_page)
        create_topics(BOOTSTRAP, ["items"], partitions=1)
        create_topics(BOOTSTRAP, PLATFORM_TOPICS, partitions=2)
        url, fs = build_store(tmp, args.items, args.views, args.users)
        with open_store(url, readonly=True) as store:
            items = list(store.list_entity_ids("item", "views"))
            all_users = list(store.list_entity_ids("user", "views"))
        print(f"store: {len(items):,} of {args.items:,} items with blocks, "
              f"{len(all_users):,} users", flush=True)
        rng = np.random.default_rng(7)
        users = [str(u) for u in rng.choice(all_users, min(2_000, len(all_users)), replace=False)]
        registry = tmp / "registry"
        train_and_publish(tmp, registry, items, users)
        try:
            # both servers: the catalog orders popularity ties by set iteration order, which
            # depends on the string hash seed; one seed gives both the same trending list
            env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "0"}
            for kind, rec in (("blocks", "recovery-blocks"), ("sequences", "recovery-sequences")):
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "tessera.cli", "--log-level", "WARNING", "worker", kind,
                     "--bootstrap", BOOTSTRAP, "--store", url, "--recovery-dir", str(tmp / rec),
                     "--tail"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                    stderr=open(tmp / f"worker-{kind}.log", "wb")))
            port = find_free_port()
            cfg = {"host": "127.0.0.1", "port": port, "store_url": url,
                   "features_path": str(REPO / "features.yaml"), "registry_dir": str(registry),
                   "bootstrap": BOOTSTRAP, "spool_dir": str(tmp / "spool"),
                   "candidate_limits": CANDIDATE_LIMITS, "l1_keep": L1_KEEP,
                   "feature_snapshot": not args.no_snapshot}
            server = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "serving.app:app_from_env", "--factory",
                 "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                 "--no-access-log", "--workers", str(args.workers)], cwd=REPO,
                env={**env, "TESSERA_SERVE_CONFIG": json.dumps(cfg),
                     "TESSERA_LOG_LEVEL": "INFO"},  # no per-request INFO lines
                stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "wb"))
            base = f"http://127.0.0.1:{port}"
            versions = ready_models(base, users[0], 180, server)
            print(f"server ready (models {versions}); setup took "
                  f"{time.perf_counter() - t_start:.0f}s", flush=True)
            for p in procs[:2]:
                if p.poll() is not None:
                    raise SystemExit(f"a worker exited: {(tmp / 'worker-blocks.log').read_text()[-2000:]}")

            plan = {"name": "tessera", "url": f"{base}/v1/feed", "metrics_url": f"{base}/metrics",
                    "users": users, "rates": rates, "step_s": args.step_s,
                    "min_requests": args.min_requests, "floor_from_rps": 10.0,
                    "stop_p99_ms": SLO_MS, "warmup_rps": 10.0, "warmup_s": args.warmup_s,
                    "server_pid": server.pid}
            broker_pid = [int((tmp / "broker" / "broker.pid").read_text().split()[0])] \
                if (tmp / "broker" / "broker.pid").exists() else []
            roles = {"server": [server.pid], "blocks worker": [procs[0].pid],
                     "sequences worker": [procs[1].pid], "broker": broker_pid}
            steps = run_ladder(plan, roles)
            metrics = httpx_get(f"{base}/metrics")
            builds = snapshot_builds(tmp / "server.log", steps)
            if args.keep_logs:
                import shutil
                keep = Path(args.keep_logs)
                keep.mkdir(parents=True, exist_ok=True)
                for log_file in tmp.glob("*.log"):
                    shutil.copy(log_file, keep / log_file.name)
                (keep / "steps.json").write_text(json.dumps(steps, default=str))

            if feast_py is not None:
                fport = find_free_port()
                fcfg = {**cfg, "port": fport, "spool_dir": str(tmp / "spool-feast"),
                        "feature_snapshot": False}
                t = time.perf_counter()
                peer = subprocess.Popen(
                    [feast_py, str(REPO / "bench" / "feast_serving_peer.py"), str(tmp / "feast"),
                     str(fport)], cwd=REPO,
                    env={**env, "TESSERA_SERVE_CONFIG": json.dumps(fcfg),
                         "TESSERA_LOG_LEVEL": "WARNING"},
                    stdout=(plog := open(tmp / "feast-peer.log", "wb")), stderr=plog)
                fbase = f"http://127.0.0.1:{fport}"
                try:
                    ready_models(fbase, users[0], 900, peer)
                except SystemExit:
                    print((tmp / "feast-peer.log").read_text()[-3000:])
                    raise
                finfo = json.loads((tmp / "feast" / "info.json").read_text())
                print(f"feast peer ready in {time.perf_counter() - t:.0f}s: Feast "
                      f"{finfo['feast']}, {finfo['items']:,} items x {len(finfo['item_names'])} "
                      f"+ {finfo['authors']:,} authors x {len(finfo['author_names'])} values "
                      f"written to its SQLite online store in {finfo['write_s']}s", flush=True)
                sample = [str(u) for u in
                          np.random.default_rng(11).choice(users, args.check_users, replace=False)]
                same, exact, bad = same_top_items(base, fbase, sample)
                check = (same, len(sample), exact)
                print(f"check: {same}/{len(sample)} users get the same page (20 items, same "
                      f"scores, same watermark) from both servers; {exact} of them in exactly "
                      "the same order, the others up to the order of exactly tied scores",
                      flush=True)
                if same != len(sample):
                    print("the servers disagree (no RESULT line): " + "; ".join(bad), flush=True)
            stop(server)  # the peer's ladder runs alone
            if feast_py is not None:
                fplan = {**plan, "name": "feast", "url": f"{fbase}/v1/feed",
                         "metrics_url": f"{fbase}/metrics", "rates": feast_rates,
                         "stop_p99_ms": max(SLO_MS, args.feast_stop_p99_ms),
                         "warmup_rps": 1.0, "warmup_s": 5.0, "server_pid": peer.pid}
                fsteps = run_ladder(fplan, {**roles, "server": [peer.pid]})
                fmetrics = httpx_get(f"{fbase}/metrics")
                stop(peer)
            for p in procs[:2]:
                if p.poll() is not None:
                    print(f"warning: a worker exited during the run (rc {p.returncode})")

            if args.naive:
                nport = find_free_port()
                ctx = mp.get_context("spawn")
                ready = ctx.Event()
                t = time.perf_counter()
                naive = ctx.Process(target=naive_server,
                                    args=(nport, url, BOOTSTRAP, str(tmp), users, ready))
                naive.start()
                if not ready.wait(600):
                    raise SystemExit("the naive server did not start")
                print(f"naive server ready in {time.perf_counter() - t:.0f}s (JSON docs built)",
                      flush=True)
                nsteps = run_ladder({**plan, "name": "naive", "metrics_url": None,
                                     "server_pid": naive.pid,
                                     "url": f"http://127.0.0.1:{nport}/v1/feed",
                                     "rates": naive_rates, "min_requests": 0,
                                     "warmup_rps": 1.0, "warmup_s": 3.0})
                naive.terminate()
                naive.join(10)
        finally:
            for p in (server, peer, *procs):
                if p is not None and p.poll() is None:
                    p.send_signal(signal.SIGINT)
            for p in (server, peer, *procs):
                if p is None:
                    continue
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()

    cands = metric_means(metrics, "tessera_candidates", "stage")
    degraded = metric_total(metrics, "tessera_degraded_total", "")
    stages = metric_means(metrics, "tessera_stage_seconds", "stage")
    best, bs = summarize("tessera (uvicorn + FeedPipeline: in-memory item snapshot, ONNX, "
                         "async log)" if not args.no_snapshot else
                         "tessera (uvicorn + FeedPipeline: store reads, ONNX, async log)", steps)
    fbest, fbs = summarize("feast peer (the same uvicorn + FeedPipeline; hydrate = Feast "
                           "get_online_features over SQLite, in process)", fsteps) \
        if fsteps else (0.0, None)
    nbest, nbs = summarize("naive (sync http.server: JSON blocks, Python assembly, torch eager, "
                           "sync Kafka flush)", nsteps) if nsteps else (0.0, None)
    print("\nladder: " + ", ".join(f"{r:g}" for r in rates) + f" requests/s; steps of >= "
          f"{args.step_s:g} s and >= {args.min_requests:,} requests (the peer's 1, 2, 5 "
          f"requests/s steps: {args.step_s:g} s); warm-up {args.warmup_s:g} s at 10 requests/s "
          "(the peer: 5 s at 1 request/s); a ladder stops after the first step with p99 >= "
          f"{SLO_MS:g} ms or an error (the peer's at p99 >= "
          f"{max(SLO_MS, args.feast_stop_p99_ms):g} ms)")
    print("candidates per request (server histogram means): "
          + ", ".join(f"{k}={v:.0f}" for k, v in cands.items()))
    print("tessera stage means over the run (ms): "
          + ", ".join(f"{k}={v * 1000:.2f}" for k, v in stages.items()))
    if fmetrics:
        fstages = metric_means(fmetrics, "tessera_stage_seconds", "stage")
        print("feast peer stage means over the run (ms): "
              + ", ".join(f"{k}={v * 1000:.2f}" for k, v in fstages.items()))
        via = metric_total(fmetrics, "bench_feast_hydrate_total", 'result="feast"')
        older = metric_total(fmetrics, "bench_feast_hydrate_total", 'result="feast_older_end"')
        fell = metric_total(fmetrics, "bench_feast_hydrate_total", 'result="fallback"')
        print(f"feast peer hydrations: {via + older:g} through Feast ({older:g} of them while "
              f"the store's end had moved past the one Feast was loaded at), {fell:g} fell "
              "back to Tessera's store (models read other names); degraded requests "
              f"{metric_total(fmetrics, 'tessera_degraded_total', ''):g}")
    print(f"latency is client-side, from each request's scheduled send time; the load "
          f"generator, server, broker and blocks/sequences workers share {os.cpu_count()} cores "
          f"(load average at the start {load0:.2f}, at the end {os.getloadavg()[0]:.2f}); "
          "rankers: trained 1 epoch on synthetic rows (inference cost only)")
    hydrate_all = bucket_quantile(stage_buckets(metrics, "hydrate"), 0.99) * 1000
    snap_hits = metric_total(metrics, "tessera_cache_total", 'cache="snapshot",result="hit"')
    snap_miss = metric_total(metrics, "tessera_cache_total", 'cache="snapshot",result="miss"')
    print(f"tessera: degraded requests {degraded:g}; hydrate p99 over the whole run (warm-up "
          f"included) {hydrate_bound(hydrate_all)} ms; feature snapshot "
          f"{'off' if args.no_snapshot else 'on'}: {snap_hits:g} hits, {snap_miss:g} misses")
    print(f"tessera feature snapshot builds (build seconds): {builds}")
    print(f"total run time {time.perf_counter() - t_start:.0f}s")
    # p50/p99 at the highest passing rate, else at the lowest rate tried (at_rps says which)
    ref = bs or steps[0]
    hydrate_p99 = ref["hydrate_p99_ms"]
    print(f"tessera at {ref['rate']:g} requests/s: hydrate p99 {hydrate_bound(hydrate_p99)} ms (stage "
          f"histogram bucket bound), {ref['hydrate_le_1ms']:.1%} of the hydrations <= 1 ms, "
          f"mean {ref['hydrate_mean_ms']:.2f} ms")
    extra = ""
    if nsteps:
        nref = nbs or nsteps[0]
        extra = (f" naive_max_rps={nbest:g} naive_p50_ms={nref['p50']:.1f} "
                 f"naive_p99_ms={nref['p99']:.1f} naive_at_rps={nref['rate']:g}")
    if not fsteps:
        print(f"\n(no Feast peer: no RESULT line) tessera max_rps_p99_under_50ms={best:g} "
              f"p50_ms={ref['p50']:.1f} p99_ms={ref['p99']:.1f} at_rps={ref['rate']:g} "
              f"hydrate_p99_ms={hydrate_p99:g}{extra}")
        return
    if check is None or check[0] != check[1]:
        print(f"\n(no RESULT line: the servers disagreed on {check and check[1] - check[0]} of "
              f"{check and check[1]} users) tessera max_rps_p99_under_50ms={best:g} "
              f"hydrate_p99_ms={hydrate_p99:g} feast_max_rps={fbest:g}")
        return
    fref = fbs or fsteps[0]
    ratio = f"{best / fbest:.1f}" if fbest else ("inf" if best else "nan")
    print(f"\nRESULT serving max_rps_p99_under_50ms={best:g} p50_ms={ref['p50']:.1f} "
          f"p99_ms={ref['p99']:.1f} feast_max_rps={fbest:g} ratio={ratio} "
          f"hydrate_p99_ms={hydrate_p99:g} at_rps={ref['rate']:g} "
          f"feast_p50_ms={fref['p50']:.1f} feast_p99_ms={fref['p99']:.1f} "
          f"feast_at_rps={fref['rate']:g} feast_hydrate_p99_ms={fref['hydrate_p99_ms']:g} "
          f"checked={check[0]}/{check[1]} items={args.items} "
          f"candidates={cands.get('retrieved', 0):.0f} "
          f"snapshot={'off' if args.no_snapshot else 'on'}{extra}")


def httpx_get(url: str) -> str:
    import httpx

    return httpx.get(url, timeout=30).text


if __name__ == "__main__":
    main()
