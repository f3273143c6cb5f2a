"""Benchmark: the online feature read for a feed request, against Feast and a naive baseline.

One run, one machine:

1. A seeded world (>= 100,000 items) goes to the embedded broker; the real blocks flow
   (every feature of features.yaml, windows up to 30d) fills an LMDB store; the
   pre-assembly job writes the hot item values.
2. The requests: each is 1 user and 2,000 random items (drawn with replacement), the same
   requests (and warm-up requests) for every engine below.
3. Tessera, store path: each request reads 1 user's features (assembled from blocks) and the
   2,000 items x 10 windowed item features (pre-assembled values, exact for the logged
   watermark) with ``FeatureClient.get_features``; no cache, so every request goes to the
   store. This is ``p50_ms``/``p99_ms``.
4. Tessera, snapshot path: the serving process's in-memory item snapshot
   (``serving.snapshots.SnapshotKeeper`` over an ``ItemCatalog`` of every item, built at the
   snapshot end), read as ``serving.pipeline``'s ``_hydrate_items`` does on a hit:
   ``matching`` + ``rows_at`` (candidate positions in the catalog frame, as serving holds
   them, to rows) + the gather into the columns the ranker gets, for the same 2,000 items x
   10 features (items only: the pipeline reads the user from the store); also timed from
   the 2,000 id strings (ids -> positions first). Values checked equal to the store path's
   on every request.
4b. Tessera, store path on Aerospike: where a server build exists (``tessera.aerospike_local``,
   ``../shared/aerospike``), a local single-node server gets the same blocks flow over the
   same events and the same pre-assembly; the same requests are read through
   ``FeatureClient`` and checked equal to LMDB's on every request. Also printed: both flows'
   times and the server's bytes per record (data + primary index over its record count).
5. Feast (``bench/feast_online_peer.py``, in its own process, possibly another venv): a
   local-provider ``FeatureStore`` with a SQLite online store, an ``item_id`` feature view
   holding the same 10 values Tessera returns at its watermark for every item and a
   ``user_id`` view holding every user's features (7 numbers, 4 ``last_n`` string lists),
   written with ``write_to_online_store``; per request ``get_online_features(...).to_dict()``
   for the user (1 row) and for the items (2,000 rows). Values checked equal to Tessera's on
   every request.
6. Naive baseline, same data, on the first ``--naive-requests`` requests: each entity's
   blocks stored as one JSON document of ``{feature: [{"start", "size", "rep": {...}}]}`` in
   the same LMDB; per request, a read and a ``json.loads`` per entity and the window
   assembled in Python loops (values checked on every naive request).

Feast 0.67 pins ``prometheus_client<0.25`` and ``tenacity<9``, older than the project's
lock, so it may live in its own venv: ``--feast-python`` (or ``TESSERA_FEAST_PYTHON``) names
its interpreter; by default this one if it imports ``feast``, else
``~/.venvs/tessera-feast/bin/python`` (``python3.11 -m venv ~/.venvs/tessera-feast &&
~/.venvs/tessera-feast/bin/pip install 'feast[duckdb]'``). ``--skip-feast`` runs without it.

Time (2 cores): ``--quick`` ~1.5 minutes; the full run (100k items, 1M views, 1,000 requests)
~6 minutes, 4 of them Feast's reads (~0.25 s a request).

Usage: python bench/online.py [--quick] [--requests N] [--feast-python PATH] [--skip-feast]
Last line: RESULT online p50_ms=<a> p99_ms=<store path> snapshot_p99_ms=<b>
feast_p99_ms=<c> ratio_vs_feast=<c/p99> naive_p99_ms=<d> ratio=<d/p99> ...
aerospike_p99_ms=<store path on Aerospike> aerospike_bytes_per_record=<e>
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lmdb
import numpy as np

REPO = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == REPO / "bench":
    sys.path[0] = str(REPO)  # bench/serving.py would shadow the serving package
ITEM_NAMES = [
    "item_views_1h", "item_views_6h", "item_views_1d", "item_views_7d", "item_views_30d",
    "item_impressions_1d", "item_clicks_1d", "item_clicks_7d", "item_dwell_mean_1d",
    "item_likes_7d",
]


def build_store(tmp: Path, n_items: int, views: int, aerospike_url: str | None = None):
    """World -> broker -> blocks flow -> LMDB store; then pre-assemble items.

    With ``aerospike_url``, the same flow runs again over the same events into that store
    (and pre-assembles there): the two stores hold the same blocks and values. Returns the
    LMDB URL, the feature set and each store's flow seconds."""
    from dataflows.blocks import BlocksFlowConfig, build_blocks_flow
    from dataflows.runner import run_flow
    from features.preassembled import refresh_preassembled
    from features.spec_loader import load_features
    from features.store import open_store
    from tessera.broker import EmbeddedBroker
    from tessera.synth import WorldConfig, write_to_kafka
    from tessera.topics import PLATFORM_TOPICS, create_topics

    fs = load_features(REPO / "features.yaml")
    url = f"lmdb://{tmp}/store"
    urls = [url] + ([aerospike_url] if aerospike_url else [])
    flow_s: dict[str, float] = {}
    with EmbeddedBroker(state_dir=tmp / "broker") as info:
        create_topics(info.bootstrap, PLATFORM_TOPICS, partitions=4)
        world = WorldConfig(seed=21, n_users=50_000, n_items=n_items, n_authors=5_000,
                            total_views=views, duration_ms=2 * 86_400_000, zipf_exponent=0.8,
                            preexisting_item_fraction=1.0, late_fraction=0.0)
        t = time.perf_counter()
        summary = write_to_kafka(world, info.bootstrap, batch_events=1000)
        print(f"produced {sum(summary.counts.values()):,} events in {time.perf_counter() - t:.1f}s")
        for u in urls:
            t = time.perf_counter()
            run_flow(build_blocks_flow(BlocksFlowConfig(
                bootstrap=info.bootstrap, store_url=u, features=fs, bounded=True, shards=4)))
            flow_s[u] = time.perf_counter() - t
            print(f"blocks flow (all features) into {u.split(':')[0]} done in {flow_s[u]:.1f}s")
    for u in urls:
        with open_store(u) as store:
            t = time.perf_counter()
            rep = refresh_preassembled(store, fs, "item")
            print(f"pre-assembled {rep.entities:,} items x {len(rep.columns)} values in "
                  f"{u.split(':')[0]} in {time.perf_counter() - t:.1f}s")
    return url, fs, flow_s


def timed_requests(client, req_users, req_ids, user_names: list[str], warmup: int):
    """The store path of every request: read the user, then the 2,000 items.

    Yields ``(j, user vectors, item vectors, request s, items s)`` for each timed request
    (``j`` counts from 0 after the ``warmup`` ones, which are read but not yielded)."""
    for k in range(len(req_ids)):
        t = time.perf_counter()
        u = client.get_features("user", [str(req_users[k])], user_names)
        t1 = time.perf_counter()
        r = client.get_features("item", req_ids[k], ITEM_NAMES)
        t2 = time.perf_counter()
        if k >= warmup:
            yield k - warmup, u, r, t2 - t, t2 - t1


def read_aerospike(url: str, fs, req_users, req_ids, user_names, warmup: int,
                   store_vals: np.ndarray, user_vals: np.ndarray):
    """The store path on Aerospike: the same requests; values checked equal to LMDB's."""
    from features.client import FeatureClient
    from features.store import open_store

    store = open_store(url, readonly=True)
    samples, item_samples = [], []
    try:
        for j, u, r, total_s, items_s in timed_requests(FeatureClient(store, fs), req_users,
                                                         req_ids, user_names, warmup):
            samples.append(total_s)
            item_samples.append(items_s)
            if not (np.array_equal(r.values, store_vals[j])
                    and np.array_equal(u.values[0], user_vals[j], equal_nan=True)):
                raise SystemExit(f"request {j}: Aerospike values differ from LMDB's")
    finally:
        store.close()
    return percentiles(samples), percentiles(item_samples)


def build_naive(tmp: Path, store_url: str, fs, items: list[str],
                users: list[str]) -> lmdb.Environment:
    """Copy the blocks into a dict-per-block JSON document per entity."""
    from features.aggregations import build_aggregation
    from features.store import open_store

    env = lmdb.open(str(tmp / "naive"), map_size=1 << 36, max_dbs=2)
    specs = {f.key: f for f in fs.features}
    with open_store(store_url, readonly=True) as store, env.begin(write=True) as txn:
        for etype, ids in (("item", items), ("user", users)):
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


def naive_read(env, fs, etype: str, ids: list[str], names: list[str], end: int):
    """Per-entity JSON reads and Python-loop assembly (the baseline)."""
    from features.tiling import cover_window, window_bounds

    refs = {}
    for f in fs.features:
        for w in f.windows:
            refs[f.window_name(w)] = (f, w)
    covers = {}
    for n in names:
        f, w = refs[n]
        wb = window_bounds(end, w, end, f.block_sizes)
        covers[n] = set(cover_window(wb.start, wb.end, f.block_sizes).blocks())
    out = np.zeros((len(ids), len(names)))
    with env.begin() as txn:
        for i, e in enumerate(ids):
            raw = txn.get(f"{etype}:{e}".encode())
            doc = json.loads(raw) if raw else {}
            for j, n in enumerate(names):
                f, _ = refs[n]
                total, count, seen = 0.0, 0, False
                for block in doc.get(f.key, []):
                    if (block["start"], block["size"]) in covers[n]:
                        seen = True
                        rep = block["rep"]
                        if f.aggregation == "mean":
                            total += rep[0]
                            count += rep[1]
                        else:
                            total += rep
                if f.aggregation == "mean":
                    out[i, j] = total / count if count else f.default
                else:
                    out[i, j] = total if seen or doc else f.default
    return out


def percentiles(samples) -> tuple[float, float]:
    arr = np.asarray(samples) * 1e3
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def find_feast_python(arg: str | None) -> str | None:
    """The interpreter that runs the Feast peer (see the module docstring), or None."""
    if arg:
        return arg
    if os.environ.get("TESSERA_FEAST_PYTHON"):
        return os.environ["TESSERA_FEAST_PYTHON"]
    if importlib.util.find_spec("feast") is not None:
        return sys.executable
    default = Path.home() / ".venvs" / "tessera-feast" / "bin" / "python"
    return str(default) if default.exists() else None


def read_all(client, etype: str, ids: list[str], names: list[str], chunk: int = 10_000):
    """``get_features`` of every id (in chunks): (values, lists, watermark)."""
    vals, lists, marks = [], {}, set()
    for lo in range(0, len(ids), chunk):
        fv = client.get_features(etype, ids[lo:lo + chunk], names)
        vals.append(fv.values)
        for n, v in fv.lists.items():
            lists.setdefault(n, []).extend(v)
        marks.add(fv.watermark)
    if len(marks) != 1:
        raise SystemExit(f"{etype} watermark moved during the export: {sorted(marks)}")
    return np.concatenate(vals), lists, marks.pop()


def run_feast(feast_py: str, work: Path, client, items: list[str], users: list[str],
              user_names: list[str], item_wm: int, req_items: np.ndarray,
              req_users: np.ndarray, warmup: int) -> dict:
    """Export Tessera's values to Feast's input files, run the peer, load what it read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    work.mkdir()
    t = time.perf_counter()
    ivals, _, wm = read_all(client, "item", items, ITEM_NAMES)
    if wm != item_wm:
        raise SystemExit(f"item export read at {wm}, the requests at {item_wm}")
    ts = pa.array(np.full(len(items), wm, dtype=np.int64), pa.timestamp("ms", tz="UTC"))
    cols = {"item_id": pa.array(items, pa.string()), "event_timestamp": ts}
    cols.update({n: pa.array(ivals[:, j]) for j, n in enumerate(ITEM_NAMES)})
    pq.write_table(pa.table(cols), work / "items.parquet")

    numeric = [r.name for r in client.resolve("user", user_names) if r.numeric]
    list_names = [n for n in user_names if n not in numeric]
    uvals, ulists, uwm = read_all(client, "user", users, user_names)
    for n in list_names:
        if any(not isinstance(x, str) for lst in ulists[n] for x in lst):
            raise SystemExit(f"{n}: list elements are not strings; the Feast view has "
                             "Array(String)")
    ts = pa.array(np.full(len(users), uwm, dtype=np.int64), pa.timestamp("ms", tz="UTC"))
    cols = {"user_id": pa.array(users, pa.string()), "event_timestamp": ts}
    cols.update({n: pa.array(uvals[:, user_names.index(n)]) for n in numeric})
    cols.update({n: pa.array(ulists[n], pa.list_(pa.string())) for n in list_names})
    pq.write_table(pa.table(cols), work / "users.parquet")
    np.save(work / "request_items.npy", req_items)
    np.save(work / "request_users.npy", req_users)
    (work / "config.json").write_text(json.dumps({
        "items": ITEM_NAMES, "user_numeric": numeric, "user_lists": list_names,
        "warmup": warmup}))
    print(f"feast input: {len(items):,} items, {len(users):,} users exported in "
          f"{time.perf_counter() - t:.1f}s", flush=True)
    env = {**os.environ, "FEAST_USAGE": "False", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    subprocess.run([feast_py, str(REPO / "bench" / "feast_online_peer.py"), str(work)],
                   check=True, env=env)
    return {
        "timings": np.load(work / "timings.npy"),
        "items": np.load(work / "item_values.npy"),
        "user_values": np.load(work / "user_values.npy"),
        "user_lists": json.loads((work / "user_lists.json").read_text()),
        "numeric": numeric, "list_names": list_names,
        **json.loads((work / "info.json").read_text()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20k items, 200 requests")
    ap.add_argument("--requests", type=int, default=1_000)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--views", type=int, default=1_000_000)
    ap.add_argument("--naive-requests", type=int, default=30)
    ap.add_argument("--feast-python", default=None,
                    help="interpreter with Feast installed (default: see the docstring)")
    ap.add_argument("--skip-feast", action="store_true")
    ap.add_argument("--skip-aerospike", action="store_true",
                    help="no Aerospike store path (default: run it when a server build is "
                    "in ../shared/aerospike or $TESSERA_AEROSPIKE_DIR)")
    args = ap.parse_args()
    if args.quick:
        args.items, args.views, args.requests, args.naive_requests = 20_000, 150_000, 200, 10
    feast_py = None if args.skip_feast else find_feast_python(args.feast_python)
    if not args.skip_feast and feast_py is None:
        ap.error("no interpreter with Feast: pass --feast-python or --skip-feast")

    from features.client import FeatureClient
    from features.store import open_store
    from serving.catalog import ItemCatalog
    from serving.snapshots import SnapshotKeeper
    from tessera.logs import configure_logging

    configure_logging(level="WARNING")
    warmup, per_request = 20, 2_000
    load0 = os.getloadavg()[0]  # other work on the machine shows in the p99s
    from tessera import aerospike_local

    aero = None
    if not args.skip_aerospike and aerospike_local.available():
        aero = aerospike_local.LocalAerospike(Path(tempfile.mkdtemp(prefix="online-as-")),
                                              size_mb=4096).start()
        import atexit

        atexit.register(aero.stop)
    elif not args.skip_aerospike:
        print(f"no Aerospike server build at {aerospike_local.server_dir()}: store path on "
              "LMDB only")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        url, fs, flow_s = build_store(tmp, args.items, args.views,
                                      aero.store_url if aero else None)
        rss_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        store = open_store(url, readonly=True)
        client = FeatureClient(store, fs)
        items = list(store.list_entity_ids("item", "views"))
        users = list(store.list_entity_ids("user", "views"))
        user_names = list(client.names_for("user"))
        print(f"store: {len(items):,} items with blocks, {len(users):,} users")
        rng = np.random.default_rng(5)
        # the requests every engine reads: warm-up ones first, then the timed ones
        req_items = rng.choice(np.asarray(items), (warmup + args.requests, per_request))
        req_users = np.asarray(users)[rng.integers(len(users), size=warmup + args.requests)]
        req_ids = [row.tolist() for row in req_items]  # a request's ids: a list of str
        timed = range(warmup, warmup + args.requests)

        # --- Tessera, store path
        store_vals = np.zeros((args.requests, per_request, len(ITEM_NAMES)), dtype=np.float32)
        user_vals = np.zeros((args.requests, len(user_names)), dtype=np.float32)
        user_lists: list[dict] = []
        samples, item_samples, marks = [], [], set()
        sources = {"preassembled": 0, "blocks": 0}
        for j, u, r, total_s, items_s in timed_requests(client, req_users, req_ids,
                                                         user_names, warmup):
            samples.append(total_s)
            item_samples.append(items_s)
            store_vals[j], user_vals[j] = r.values, u.values[0]
            user_lists.append({n: v[0] for n, v in u.lists.items()})
            marks.add(r.watermark)
            for s in sources:
                sources[s] += r.sources[s]
        p50, p99 = percentiles(samples)
        i50, i99 = percentiles(item_samples)
        if len(marks) != 1:
            raise SystemExit(f"the item watermark moved during the run: {sorted(marks)}")
        item_wm = marks.pop()

        # --- Tessera, snapshot path (serving's in-memory item snapshot)
        catalog = ItemCatalog()
        for i in items:
            catalog.upsert(i, "", "", 0)
        catalog.publish(catalog.rebuild({}))  # the frame: every item at a position
        frame = catalog.frame
        names = tuple(ITEM_NAMES)
        keeper = SnapshotKeeper(client, catalog, lambda: (names, ()))
        t = time.perf_counter()
        snap = keeper.refresh()
        build_s = time.perf_counter() - t
        if snap is None or snap.features.end != item_wm:
            raise SystemExit(f"snapshot end {snap and snap.features.end} != the store path's "
                             f"watermark {item_wm}")
        end = snap.features.end
        print(f"snapshot: {len(snap.features.ids):,} items x {len(names)} at {end} built in "
              f"{build_s:.1f}s ({snap.features.nbytes / 2**20:.1f} MB)")
        snap_samples, by_id_samples = [], []
        # serving holds a request's candidates as positions in the catalog frame (its lists
        # are positions); the ids -> positions search is timed separately (by_id)
        req_pos = [frame.positions(ids) for ids in req_ids]
        for k in range(warmup + args.requests):
            t = time.perf_counter()
            hit = keeper.matching(end, names)
            rows = keeper.rows_at(hit, frame, req_pos[k])
            absent = np.flatnonzero(rows < 0)
            cols = hit.features.columns(rows) if not len(absent) else None
            dt = time.perf_counter() - t
            t = time.perf_counter()
            keeper.rows_at(hit, frame, frame.positions(req_ids[k]))
            if k >= warmup:
                by_id_samples.append(dt + time.perf_counter() - t)
            if cols is None:
                raise SystemExit(f"{len(absent)} request items are not in the snapshot")
            if k < warmup:
                continue
            snap_samples.append(dt)
            got = np.column_stack([cols[n] for n in ITEM_NAMES])
            if not np.array_equal(got, store_vals[k - warmup]):
                raise SystemExit(f"request {k - warmup}: snapshot and store values differ")
        s50, s99 = percentiles(snap_samples)
        bi50, bi99 = percentiles(by_id_samples)

        # same reads assembled from blocks (no pre-assembled values), for context
        blk = []
        for k in list(timed)[:max(20, args.requests // 10)]:
            t = time.perf_counter()
            client.get_features("item", req_ids[k], ITEM_NAMES, use_preassembled=False)
            blk.append(time.perf_counter() - t)
        b50, b99 = percentiles(blk)

        # --- Feast
        feast = None
        if feast_py is not None:
            feast = run_feast(feast_py, tmp / "feast", client, items, users, user_names,
                              item_wm, req_items, req_users, warmup)
            bad = np.flatnonzero(~np.all(feast["items"] == store_vals, axis=(1, 2)))
            if len(bad):
                raise SystemExit(f"Feast item values differ from Tessera's on {len(bad)} "
                                 f"requests (first: {bad[0]})")
            ucols = [user_names.index(n) for n in feast["numeric"]]
            if not np.array_equal(feast["user_values"], user_vals[:, ucols]):
                raise SystemExit("Feast user values differ from Tessera's")
            for j, lists in enumerate(feast["user_lists"]):
                if lists != [list(user_lists[j][n]) for n in feast["list_names"]]:
                    raise SystemExit(f"request {j}: Feast user lists differ from Tessera's")
            f50, f99 = percentiles(feast["timings"].sum(axis=1))
            fi50, fi99 = percentiles(feast["timings"][:, 1])

        # --- Tessera, store path on Aerospike (same data, same requests)
        if aero is not None:
            (a50, a99), (ai50, ai99) = read_aerospike(
                aero.store_url, fs, req_users, req_ids, user_names, warmup, store_vals,
                user_vals)
            stats = aero.namespace_stats()
            aero.stop()
            objects = int(stats.get("objects", 0))
            used = int(stats.get("data_used_bytes", 0)) + int(stats.get("index_used_bytes", 0))

        # --- naive baseline on the first requests
        nk = list(timed)[:args.naive_requests]
        env = build_naive(tmp, url, fs, list(dict.fromkeys(x for k in nk for x in req_ids[k])),
                          list(dict.fromkeys(str(req_users[k]) for k in nk)))
        naive = []
        for k in nk:
            ids = req_ids[k]
            end = client.get_features("item", ids[:1], ITEM_NAMES[:1]).watermark
            t = time.perf_counter()
            naive_read(env, fs, "user", [str(req_users[k])], ["user_views_1d", "user_clicks_7d"],
                       end)
            got = naive_read(env, fs, "item", ids, ITEM_NAMES, end)
            naive.append(time.perf_counter() - t)
            ref = client.get_features("item", ids, ITEM_NAMES, use_preassembled=False,
                                      at=end)
            if not np.allclose(got, ref.values, rtol=1e-5):
                raise SystemExit("naive and Tessera values differ")
        n50, n99 = percentiles(naive)
        env.close()
        store.close()

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n{'path':<56} {'p50 ms':>8} {'p99 ms':>8}")
    rows_out = [
        ("tessera store: 1 user + 2,000 items x 10 (pre-assembled)", p50, p99),
        ("tessera store: the 2,000 items x 10 alone", i50, i99),
        ("tessera snapshot: 2,000 items x 10 (positions, gather)", s50, s99),
        ("tessera snapshot: the same from 2,000 id strings", bi50, bi99),
        ("tessera store: 2,000 items x 10 assembled from blocks", b50, b99),
    ]
    if aero is not None:
        rows_out += [("tessera store on aerospike: 1 user + 2,000 items x 10", a50, a99),
                     ("tessera store on aerospike: the 2,000 items x 10 alone", ai50, ai99)]
    if feast is not None:
        rows_out += [("feast sqlite: 1 user + 2,000 items x 10", f50, f99),
                     ("feast sqlite: the 2,000 items x 10 alone", fi50, fi99)]
    rows_out.append(("naive: per-entity JSON blocks, Python assembly", n50, n99))
    for label, a, b in rows_out:
        print(f"{label:<56} {a:>8.2f} {b:>8.2f}")
    print(f"requests: {args.requests} (+{warmup} warm-up; naive {args.naive_requests}), the "
          f"same ids for every engine; item rows from pre-assembled "
          f"{sources['preassembled']:,}, from blocks {sources['blocks']:,}; snapshot"
          + (", Feast" if feast is not None else "") + " and naive values checked equal "
          "to Tessera's on every request")
    if aero is not None:
        print(f"aerospike (CE 8.1, one local node, in memory): {objects:,} records, "
              f"{used / 2**20:.0f} MB data + primary index, {used / max(objects, 1):.0f} "
              f"bytes a record; blocks flow (all features, same events) "
              f"{flow_s[aero.store_url]:.1f}s into Aerospike vs {flow_s[url]:.1f}s into LMDB; "
              "values checked equal to LMDB's on every request")
    if feast is not None:
        print(f"feast {feast['version']}: get_online_features(...).to_dict(), SQLite online "
              f"store written in {feast['write_s']:.1f}s; peak RSS {feast['peak_rss_mb']:.0f} MB")
    print(f"peak RSS (this process): {rss:.0f} MB ({rss_build:.0f} MB after the build, "
          "which generates the world and runs the blocks flow in this process); load average "
          f"at the start {load0:.2f}, at the end {os.getloadavg()[0]:.2f} (1 min; "
          f"{os.cpu_count()} CPUs)")
    fp99 = f"{f99:.2f}" if feast is not None else "nan"
    ap99 = f"{a99:.2f}" if aero is not None else "nan"
    per_rec = f"{used / max(objects, 1):.0f}" if aero is not None else "nan"
    fratio = f"{f99 / p99:.1f}" if feast is not None else "nan"
    print(f"\nRESULT online p50_ms={p50:.2f} p99_ms={p99:.2f} snapshot_p99_ms={s99:.3f} "
          f"feast_p99_ms={fp99} ratio_vs_feast={fratio} naive_p99_ms={n99:.2f} "
          f"ratio={n99 / p99:.1f} items_p99_ms={i99:.2f} blocks_p99_ms={b99:.2f} "
          f"snapshot_by_id_p99_ms={bi99:.3f} items={args.items} peak_rss_mb={rss:.0f} aerospike_p99_ms={ap99} "
          f"aerospike_bytes_per_record={per_rec}")


if __name__ == "__main__":
    main()
