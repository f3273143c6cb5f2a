"""Benchmark: the online feature read for a feed request, against a naive baseline.

One run, one machine:

1. A seeded world (>= 100,000 items) goes to the embedded broker; the real blocks flow
   (every feature of features.yaml, windows up to 30d) fills an LMDB store; the
   pre-assembly job writes the hot item values.
2. Tessera: each request reads 1 user's features (assembled from blocks) and 2,000 random
   items x 10 windowed item features (pre-assembled values, exact for the logged watermark)
   with ``FeatureClient.get_features``; no cache, so every request goes to the store.
3. Naive baseline, same data: each entity's blocks stored as one JSON document of
   ``{feature: [{"start", "size", "rep": {...}}]}`` in the same LMDB; per request, a read and
   a ``json.loads`` per entity and the window assembled in Python loops.
4. Both return the same values (checked on every naive request).

Usage: python bench/online.py [--quick] [--requests N]
Last line: RESULT online p50_ms=<a> p99_ms=<b> naive_p99_ms=<c> ratio=<r> ...
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lmdb
import numpy as np

REPO = Path(__file__).resolve().parent.parent
ITEM_NAMES = [
    "item_views_1h", "item_views_6h", "item_views_1d", "item_views_7d", "item_views_30d",
    "item_impressions_1d", "item_clicks_1d", "item_clicks_7d", "item_dwell_mean_1d",
    "item_likes_7d",
]


def build_store(tmp: Path, n_items: int, views: int):
    """World -> broker -> blocks flow -> LMDB store; then pre-assemble items."""
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
    with EmbeddedBroker(state_dir=tmp / "broker") as info:
        create_topics(info.bootstrap, PLATFORM_TOPICS, partitions=4)
        world = WorldConfig(seed=21, n_users=50_000, n_items=n_items, n_authors=5_000,
                            total_views=views, duration_ms=2 * 86_400_000, zipf_exponent=0.8,
                            preexisting_item_fraction=1.0, late_fraction=0.0)
        t = time.perf_counter()
        summary = write_to_kafka(world, info.bootstrap, batch_events=1000)
        print(f"produced {sum(summary.counts.values()):,} events in {time.perf_counter() - t:.1f}s")
        t = time.perf_counter()
        run_flow(build_blocks_flow(BlocksFlowConfig(
            bootstrap=info.bootstrap, store_url=url, features=fs, bounded=True, shards=4)))
        print(f"blocks flow (all features) done in {time.perf_counter() - t:.1f}s")
    with open_store(url) as store:
        t = time.perf_counter()
        rep = refresh_preassembled(store, fs, "item")
        print(f"pre-assembled {rep.entities:,} items x {len(rep.columns)} values in "
              f"{time.perf_counter() - t:.1f}s")
    return url, fs


def build_naive(tmp: Path, store_url: str, fs, items: list[str], user: str) -> lmdb.Environment:
    """Copy the blocks into a dict-per-block JSON document per entity."""
    from features.aggregations import build_aggregation
    from features.store import open_store

    env = lmdb.open(str(tmp / "naive"), map_size=1 << 36, max_dbs=2)
    specs = {f.key: f for f in fs.features}
    with open_store(store_url, readonly=True) as store, env.begin(write=True) as txn:
        for etype, ids in (("item", items), ("user", [user])):
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


def percentiles(samples: list[float]) -> tuple[float, float]:
    arr = np.asarray(samples) * 1e3
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20k items, 200 requests")
    ap.add_argument("--requests", type=int, default=1_000)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--views", type=int, default=1_000_000)
    ap.add_argument("--naive-requests", type=int, default=30)
    args = ap.parse_args()
    if args.quick:
        args.items, args.views, args.requests, args.naive_requests = 20_000, 150_000, 200, 10

    from features.client import FeatureClient
    from features.store import open_store
    from tessera.logs import configure_logging

    configure_logging(level="WARNING")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        url, fs = build_store(tmp, args.items, args.views)
        store = open_store(url, readonly=True)
        client = FeatureClient(store, fs)
        items = list(store.list_entity_ids("item", "views"))
        users = list(store.list_entity_ids("user", "views"))
        user_names = [n for n in client.names_for("user")]
        print(f"store: {len(items):,} items with blocks, {len(users):,} users")
        rng = np.random.default_rng(5)

        def request(ids, user):
            u = client.get_features("user", [user], user_names)
            r = client.get_features("item", ids, ITEM_NAMES)
            return u, r

        # warm up (imports, page cache)
        for _ in range(20):
            request(list(rng.choice(items, 2_000)), users[rng.integers(len(users))])
        samples, sources = [], {"preassembled": 0, "blocks": 0}
        for _ in range(args.requests):
            ids = list(rng.choice(items, 2_000))
            user = users[rng.integers(len(users))]
            t = time.perf_counter()
            _, r = request(ids, user)
            samples.append(time.perf_counter() - t)
            for k in sources:
                sources[k] += r.sources[k]
        p50, p99 = percentiles(samples)

        # same reads assembled from blocks (no pre-assembled values), for context
        blk = []
        for _ in range(max(20, args.requests // 10)):
            ids = list(rng.choice(items, 2_000))
            t = time.perf_counter()
            client.get_features("item", ids, ITEM_NAMES, use_preassembled=False)
            blk.append(time.perf_counter() - t)
        b50, b99 = percentiles(blk)

        # naive baseline on a sample of the same items
        sample_items = list(dict.fromkeys(rng.choice(items, 2_000 * args.naive_requests)))
        user = users[0]
        env = build_naive(tmp, url, fs, sample_items, user)
        naive = []
        for k in range(args.naive_requests):
            ids = sample_items[k * 1_500:(k * 1_500) + 2_000] or sample_items[:2_000]
            end = client.get_features("item", ids[:1], ITEM_NAMES[:1]).watermark
            t = time.perf_counter()
            naive_read(env, fs, "user", [user], ["user_views_1d", "user_clicks_7d"], end)
            got = naive_read(env, fs, "item", ids, ITEM_NAMES, end)
            naive.append(time.perf_counter() - t)
            ref = client.get_features("item", ids, ITEM_NAMES, use_preassembled=False,
                                      at=end)
            if not np.allclose(got, ref.values, rtol=1e-5):
                raise SystemExit("naive and Tessera values differ")
        n50, n99 = percentiles(naive)
        store.close()

    print(f"\n{'path':<52} {'p50 ms':>8} {'p99 ms':>8}")
    print(f"{'tessera: 1 user + 2,000 items x 10 (pre-assembled)':<52} {p50:>8.2f} {p99:>8.2f}")
    print(f"{'tessera: 2,000 items x 10 assembled from blocks':<52} {b50:>8.2f} {b99:>8.2f}")
    print(f"{'naive: per-entity JSON blocks, Python assembly':<52} {n50:>8.2f} {n99:>8.2f}")
    print(f"requests: {args.requests} (naive {args.naive_requests}); item rows from "
          f"pre-assembled {sources['preassembled']:,}, from blocks {sources['blocks']:,}; "
          "naive values checked equal to Tessera's")
    print(f"\nRESULT online p50_ms={p50:.2f} p99_ms={p99:.2f} naive_p99_ms={n99:.2f} "
          f"ratio={n99 / p99:.1f} blocks_p99_ms={b99:.2f} items={args.items}")


if __name__ == "__main__":
    main()
