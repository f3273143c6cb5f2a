"""Benchmark: point-in-time backfill from raw history vs Feast and vs a naive DuckDB rescan.

Generates 30 days of synthetic history (views, engagements, impressions; >= 10M events by
default) and takes impressions as the query rows ``(impression, item, user, event_ts,
feature_watermark)``; each impression's watermark is its time aligned down to 5m minus a
seeded lag of 0-10 minutes, as an online read logs it. Two features, each at 1h, 1d, 7d and
30d: ``item_views`` (count of views by item) and ``user_clicks`` (count of engagements with
``action == 'click'`` by user). Three engines, in the same run, from the same raw events:

* Tessera: ``compute_blocks`` (5m blocks and the 1h/1d roll-ups, the batch job's work) then
  ``point_in_time`` for every query row and window. Timed end to end from raw events.
* Feast 0.67 ``get_historical_features`` with its DuckDB offline store. Feast's local
  compute engine has no time-window aggregations, so a Feast user precomputes trailing
  counts per entity at a fixed step (``--feast-step``, default 1h; rows where every count is
  zero are left out, and the view's ttl of one step turns a missing row into 0) and writes
  them to Parquet; Feast returns the latest row at or before each impression's timestamp.
  Timed: the precompute, the Parquet write and the retrieval (``feast apply`` reported apart).
* DuckDB naive rescan: a SQL range join of the query rows with the raw events, counting the
  events in each window ``[start, end)`` computed in SQL (on a sample: its cost grows with
  the number of events per entity, and popular items have hundreds of thousands).

Checks: Tessera == DuckDB exactly on every window (same semantics). Feast has other
semantics (see ``FEAST_SEMANTICS``); it is checked against Tessera evaluated with Feast's
definition (window end = the step at or before ``event_ts``) where the two window
definitions coincide, and the share of rows where Feast equals the value the online read saw
is reported.

Usage: python bench/backfill.py [--quick] [--events N] [--impressions M] [--duckdb-sample K]
       [--feast-step MINUTES] [--skip-feast]
Last line: RESULT backfill rows_per_s=<n> feast_rows_per_s=<m> ratio_vs_feast=<r>
ratio_vs_duckdb=<s>
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/backfill.py` from a checkout
    sys.path.insert(0, str(REPO))

from features.batch import FeatureBlocksResult, compute_blocks  # noqa: E402
from features.pointintime import point_in_time, query_ends  # noqa: E402
from features.spec import FeatureSpec  # noqa: E402
from features.tiling import tail_hop  # noqa: E402
from features.timeutil import DAY, HOUR, MINUTE, format_duration  # noqa: E402
from schemas.columnar import DictColumn, EventColumns  # noqa: E402
from tessera.synth import World, WorldConfig, generate_events  # noqa: E402
from tessera.synth.world import ACTIONS  # noqa: E402

WINDOWS = (HOUR, DAY, 7 * DAY, 30 * DAY)
BLOCK = 5 * MINUTE

ITEM_VIEWS = FeatureSpec(name="item_views", source="views", entity="item_id",
                         aggregation="count", windows=WINDOWS)
USER_CLICKS = FeatureSpec(name="user_clicks", source="engagements", entity="user_id",
                          aggregation="count", windows=WINDOWS, filter="action == 'click'")
FEATURES = (ITEM_VIEWS, USER_CLICKS)

FEAST_SEMANTICS = """\
How Feast's semantics differ from Tessera's:
  * Feast has no window aggregation here (0.67's local compute engine refuses time-window
    aggregations; only Spark and Ray have them), so the windows are precomputed trailing
    counts at a fixed step S: the row at step s holds count over [s - W, s).
  * Feast returns the latest row at or before the impression's event_ts: the window ends at
    align_down(event_ts, S). Tessera's window ends at the impression's logged watermark,
    align_down(min(watermark, event_ts), 5m): what the online read actually saw.
  * Feast's window is exactly W long; Tessera's oldest edge is aligned to the tail hop
    (5m below 12h, 1h below 12d, 1d above), so it reaches back up to one hop further.
  * Feast's DuckDB store returns NULL where no row is in the ttl (filled with 0 here); its
    dask (file) store instead silently drops those entity rows.
So the check evaluates Tessera with Feast's window end (align_down(event_ts, S)) and compares
the rows where the two window starts coincide (start = end - W is aligned to the tail hop)."""


# ------------------------------------------------------------------------------ history
@dataclass
class History:
    """Raw events needed by the features, and the query rows, as numpy columns."""

    world: World
    n_events: int
    n_impressions: int
    v_ts: np.ndarray  # views
    v_item: np.ndarray
    e_ts: np.ndarray  # engagements
    e_user: np.ndarray
    e_action: np.ndarray
    q_ts: np.ndarray  # query rows (sampled impressions), sorted by time
    q_item: np.ndarray
    q_user: np.ndarray
    q_wm: np.ndarray
    seconds: float


def _numbers(col: DictColumn, prefix: str) -> np.ndarray:
    """Entity numbers (``"i123" -> 123``) of a generated id column."""
    lookup = np.fromiter((int(s[len(prefix):]) for s in col.dictionary.tolist()),
                         dtype=np.int32, count=len(col.dictionary))
    return lookup[col.codes]


def generate_history(total_views: int, days: int, n_items: int, n_users: int,
                     n_queries: int, seed: int) -> History:
    """Generate the world's events and keep only the columns the benchmark needs."""
    t0 = time.perf_counter()
    config = WorldConfig(seed=seed, n_items=n_items, n_users=n_users, n_authors=n_items // 20,
                         duration_ms=days * DAY, total_views=total_views)
    world = World(config)
    parts: dict[str, list] = {k: [] for k in ("v_ts", "v_item", "e_ts", "e_user", "e_action",
                                              "i_ts", "i_item", "i_user")}
    n_events = 0
    for chunk in generate_events(config, world=world):
        n_events += chunk.n_events
        v, e, i = (chunk.columns[t] for t in ("views", "engagements", "impressions"))
        if v.n:
            parts["v_ts"].append(np.asarray(v.columns["event_ts"], np.int64))
            parts["v_item"].append(_numbers(v.columns["item_id"], "i"))
        if e.n:
            parts["e_ts"].append(np.asarray(e.columns["event_ts"], np.int64))
            parts["e_user"].append(_numbers(e.columns["user_id"], "u"))
            act = e.columns["action"]
            parts["e_action"].append(np.asarray(act.codes, np.int8))
            if tuple(act.dictionary.tolist()) != ACTIONS:
                raise RuntimeError("unexpected action dictionary")
        if i.n:
            parts["i_ts"].append(np.asarray(i.columns["event_ts"], np.int64))
            parts["i_item"].append(_numbers(i.columns["item_id"], "i"))
            parts["i_user"].append(_numbers(i.columns["user_id"], "u"))
        del chunk, v, e, i
    cat = {k: np.concatenate(p) for k, p in parts.items()}
    del parts
    gc.collect()
    n_imp = len(cat["i_ts"])
    rng = np.random.default_rng(seed + 1)
    pick = np.sort(rng.choice(n_imp, size=min(n_queries, n_imp), replace=False))
    q_ts = cat["i_ts"][pick]
    lag = rng.integers(0, 11, size=len(pick)) * MINUTE  # store lag: 0-10 minutes
    q_wm = q_ts - q_ts % BLOCK - lag
    order = np.argsort(q_ts, kind="stable")
    return History(world, n_events, n_imp, cat["v_ts"], cat["v_item"], cat["e_ts"],
                   cat["e_user"], cat["e_action"], q_ts[order], cat["i_item"][pick][order],
                   cat["i_user"][pick][order], q_wm[order], time.perf_counter() - t0)


def feature_inputs(h: History, spec: FeatureSpec):
    """``(EventColumns of the source, query entity numbers, entity id strings)`` of ``spec``."""
    if spec is ITEM_VIEWS:
        cols = EventColumns("views", len(h.v_ts), {
            "event_ts": h.v_ts, "item_id": DictColumn(h.v_item, h.world.item_ids)})
        return cols, h.q_item, h.world.item_ids
    cols = EventColumns("engagements", len(h.e_ts), {
        "event_ts": h.e_ts, "user_id": DictColumn(h.e_user, h.world.user_ids),
        "action": DictColumn(h.e_action.astype(np.int32), np.array(ACTIONS, dtype=object))})
    return cols, h.q_user, h.world.user_ids


def source_events(h: History, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray]:
    """``(entity numbers, event_ts)`` of the events ``spec`` counts (filter applied)."""
    if spec is ITEM_VIEWS:
        return h.v_item, h.v_ts
    click = h.e_action == ACTIONS.index("click")
    return h.e_user[click], h.e_ts[click]


# ------------------------------------------------------------------------------ Tessera
def blocks_table(res: FeatureBlocksResult) -> pa.Table:
    """The ``point_in_time`` input (entity_id, start_ms, size_ms, rep) of computed blocks."""
    return res.to_arrow()


def run_tessera(h: History, lo: int, hi: int):
    """Blocks from raw events, then every window of every query row; returns values, timings."""
    ids = {}
    for spec in FEATURES:  # query input (not timed): entity id strings of each row
        _, q_num, names = feature_inputs(h, spec)
        ids[spec.name] = names[q_num]
    timing = {"blocks": 0.0, "point_in_time": 0.0}
    values: dict[str, np.ndarray] = {}
    tables: dict[str, pa.Table] = {}
    n_blocks = 0
    for spec in FEATURES:
        cols, _, _ = feature_inputs(h, spec)
        t0 = time.perf_counter()
        res = compute_blocks(spec, cols, lo, hi)
        blocks = blocks_table(res)
        t1 = time.perf_counter()
        ends = query_ends(h.q_ts, h.q_wm, spec.streaming_block)
        # rows in time order, as the training table gives them (point_in_time orders its
        # block lookups itself)
        for wv in point_in_time(spec, WINDOWS, ids[spec.name], ends, blocks):
            values[wv.name] = wv.values
        t2 = time.perf_counter()
        timing["blocks"] += t1 - t0
        timing["point_in_time"] += t2 - t1
        tables[spec.name] = blocks
        n_blocks += blocks.num_rows
    timing["total"] = timing["blocks"] + timing["point_in_time"]
    return values, timing, tables, ids, n_blocks


# ------------------------------------------------------------------------------ Ray
def _event_columns(topic: str, n: int, given: dict) -> EventColumns:
    """``given`` columns plus a constant for every other field of ``topic``'s schema (the
    raw tables hold whole events; the two benchmark features read only ``given``)."""
    from schemas.registry import topic_schema

    cols: dict = {}
    for f in topic_schema(topic).fields:
        if f.name in given:
            cols[f.name] = given[f.name]
        elif f.kind in ("string", "enum"):
            cols[f.name] = DictColumn(np.zeros(n, np.int32),
                                      np.array([(f.symbols or ("x",))[0]], dtype=object))
        elif f.kind in ("double", "float"):
            cols[f.name] = np.zeros(n, np.float64)
        else:
            cols[f.name] = np.zeros(n, np.int64)
    return EventColumns(topic, n, cols)


def write_raw(h: History, path: Path, chunk: int = 2_000_000):
    """The views and engagements of ``h`` as raw Iceberg tables (several commits, so several
    data files); return the ``RawTables``."""
    from features.offline.raw import RawTables

    raw = RawTables.open(path)
    for spec in FEATURES:
        cols, _, _ = feature_inputs(h, spec)
        n = len(cols)
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            given = {k: (DictColumn(v.codes[lo:hi], v.dictionary) if isinstance(v, DictColumn)
                         else v[lo:hi]) for k, v in cols.columns.items()}
            raw.append(spec.source, _event_columns(spec.source, hi - lo, given),
                       np.zeros(hi - lo, np.int64), np.arange(lo, hi, dtype=np.int64), {0: hi})
    return raw


def run_engines(h: History, lo: int, hi: int, workdir: Path, worker_counts=(1, 2)):
    """The batch blocks job and the backfill over Iceberg, on the local engine and on a local
    Ray cluster of each worker count: ``{label: (seconds, values, timing)}``."""
    from features.backfill import backfill_columns
    from features.batch import run_batch_blocks
    from features.ray_engine import RayBackfillEngine, RayBlocksEngine, ray_runtime
    from features.spec import FeatureSet

    t0 = time.perf_counter()
    raw = write_raw(h, workdir / "warehouse")
    print(f"  raw tables written in {time.perf_counter() - t0:.1f}s", flush=True)
    fs = FeatureSet(features=FEATURES)
    names = [f.name for f in FEATURES]
    _, q_item, item_ids = feature_inputs(h, ITEM_VIEWS)
    _, q_user, user_ids = feature_inputs(h, USER_CLICKS)
    rows = pa.table({"item_id": item_ids[q_item].tolist(), "user_id": user_ids[q_user].tolist(),
                     "event_ts": h.q_ts, "feature_watermark": h.q_wm})
    out = {}

    def one(label: str, blocks_engine, backfill_engine) -> None:
        t = time.perf_counter()
        run_batch_blocks(raw, raw.offline, None, fs, lo, hi, sealed_only=False,
                         engine=blocks_engine)
        t_blocks = time.perf_counter() - t
        values = backfill_columns(rows, fs, names, raw.offline.scan_blocks, backfill_engine)
        total = time.perf_counter() - t
        out[label] = (total, values, {"blocks": t_blocks, "backfill": total - t_blocks})
        print(f"  {label}: batch blocks {t_blocks:.1f}s + backfill {total - t_blocks:.1f}s "
              f"= {total:.1f}s ({rate(len(rows), total):,.0f} rows/s)", flush=True)

    one("local", None, None)
    for workers in worker_counts:
        t = time.perf_counter()
        with ray_runtime(workers=workers):
            print(f"  ray with {workers} worker(s) started in {time.perf_counter() - t:.1f}s",
                  flush=True)
            one(f"ray{workers}", RayBlocksEngine(raw), RayBackfillEngine(raw.offline))
    return out


# ------------------------------------------------------------------------------ Feast
def feast_precompute(h: History, spec: FeatureSpec, step: int, t_lo: int, t_hi: int,
                     path: Path) -> int:
    """Trailing counts over each window at every step ``s`` in ``(t_lo, t_hi]``, to Parquet.

    What a Feast user writes: a row ``(entity, event_timestamp=s, <name>_<W>=count over
    [s - W, s))`` per entity and step, leaving out the rows where every count is 0 and was
    already 0 at the step before (the view's ttl of one step then makes a missing row 0).
    """
    ent, ts = source_events(h, spec)
    n_ent = len(h.world.item_ids if spec is ITEM_VIEWS else h.world.user_ids)
    n_steps = (t_hi - t_lo) // step
    keep = (ts >= t_lo) & (ts < t_hi)
    slot = (ts[keep] - t_lo) // step
    grid = np.bincount(ent[keep].astype(np.int64) * n_steps + slot, minlength=n_ent * n_steps)
    cum = np.zeros((n_ent, n_steps + 1), np.int64)
    np.cumsum(grid.reshape(n_ent, n_steps), axis=1, out=cum[:, 1:])
    del grid
    k = np.arange(1, n_steps + 1)
    counts = {}
    for w in WINDOWS:
        back = np.maximum(k - w // step, 0)
        counts[w] = cum[:, k] - cum[:, back]  # events in [s - W, s), s = t_lo + k * step
    # rows where a count is nonzero, plus the first all-zero step after one (so that with a
    # ttl of one step, the latest row in (t - step, t] or an empty result means the truth)
    live = counts[max(WINDOWS)] > 0
    live[:, 1:] |= live[:, :-1]
    nz = np.nonzero(live)
    names = h.world.item_ids if spec is ITEM_VIEWS else h.world.user_ids
    cols = {
        spec.entity: pa.DictionaryArray.from_arrays(
            pa.array(nz[0].astype(np.int32)), pa.array(names.tolist(), pa.string())),
        "event_timestamp": pa.array(t_lo + (nz[1] + 1) * step, pa.timestamp("ms", tz="UTC")),
    }
    for w in WINDOWS:
        cols[spec.window_name(w)] = pa.array(counts[w][nz])
    table = pa.table(cols)
    pq.write_table(table, path)
    return table.num_rows


def feast_repo(root: Path, paths: dict[str, Path], step: int):
    """A Feast repo with the DuckDB offline store and one feature view per feature."""
    from feast import Entity, FeatureView, Field, FileSource
    from feast.types import Int64
    from feast.value_type import ValueType

    from bench.feast_repo import open_feature_store

    store = open_feature_store(root, "tessera_bench", cache_registry=False)
    objects = []
    for spec in FEATURES:
        entity = Entity(name=spec.entity_type, join_keys=[spec.entity],
                        value_type=ValueType.STRING)
        source = FileSource(name=f"{spec.name}_src", path=str(paths[spec.name]),
                            timestamp_field="event_timestamp")
        view = FeatureView(
            name=spec.name, entities=[entity], source=source,
            # ttl of one step: a row older than the last step is never returned
            ttl=timedelta(milliseconds=step),
            schema=[Field(name=spec.window_name(w), dtype=Int64) for w in WINDOWS])
        objects += [entity, view]
    store.apply(objects)
    return store


def run_feast(h: History, step: int, workdir: Path):
    """Precompute + Feast get_historical_features; returns values, timings, row counts."""
    import pandas as pd

    entity_df = pd.DataFrame({  # query input (not timed)
        "qid": np.arange(len(h.q_ts)),
        "item_id": h.world.item_ids[h.q_item],
        "user_id": h.world.user_ids[h.q_user],
        "event_timestamp": pd.to_datetime(h.q_ts, unit="ms", utc=True),
    })
    t_lo = int(min(h.v_ts.min(), h.e_ts.min()))
    t_lo -= t_lo % step
    t_hi = int(h.q_ts.max()) + step
    t_hi -= t_hi % step
    paths = {s.name: workdir / f"{s.name}.parquet" for s in FEATURES}
    t0 = time.perf_counter()
    rows = {s.name: feast_precompute(h, s, step, t_lo, t_hi, paths[s.name]) for s in FEATURES}
    t1 = time.perf_counter()
    store = feast_repo(workdir / "repo", paths, step)
    t2 = time.perf_counter()
    refs = [f"{s.name}:{s.window_name(w)}" for s in FEATURES for w in WINDOWS]
    with warnings.catch_warnings():  # ibis inside Feast uses a deprecated DuckDB call
        warnings.simplefilter("ignore", DeprecationWarning)
        out = store.get_historical_features(entity_df=entity_df, features=refs).to_arrow()
    t3 = time.perf_counter()
    qid = out.column("qid").to_numpy()
    values = {}
    for s in FEATURES:
        for w in WINDOWS:
            col = out.column(s.window_name(w)).to_numpy(zero_copy_only=False)
            v = np.zeros(len(h.q_ts))
            v[qid] = np.nan_to_num(col.astype(np.float64), nan=0.0)  # NULL: no row = 0
            values[s.window_name(w)] = v
    timing = {"precompute": t1 - t0, "apply": t2 - t1, "get_historical_features": t3 - t2}
    timing["total"] = timing["precompute"] + timing["get_historical_features"]
    return values, timing, rows, out.num_rows


# ------------------------------------------------------------------------------ DuckDB
def run_duckdb(h: History, sample: np.ndarray):
    """Naive rescan: for each sampled query row, count the raw events in each window in SQL."""
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET threads={os.cpu_count() or 1}")
    con.register("views", pa.table({"item": h.v_item, "ts": h.v_ts}))
    con.register("engagements", pa.table({
        "usr": h.e_user, "ts": h.e_ts,
        "action": pa.DictionaryArray.from_arrays(pa.array(h.e_action.astype(np.int32)),
                                                 pa.array(list(ACTIONS)))}))
    con.register("q", pa.table({"qid": sample, "item": h.q_item[sample],
                                "usr": h.q_user[sample], "ts": h.q_ts[sample],
                                "wm": h.q_wm[sample]}))

    def starts() -> str:
        out = []
        for w in WINDOWS:
            hop = tail_hop(w, ITEM_VIEWS.block_sizes)
            out.append(f"((e - {w}) // {hop}) * {hop} AS s_{format_duration(w)}")
        return ", ".join(out)

    def query(key: str, table: str, where: str) -> str:
        counts = ", ".join(f"count(x.ts) FILTER (WHERE x.ts >= b.s_{format_duration(w)}) "
                           f"AS c_{format_duration(w)}" for w in WINDOWS)
        oldest = f"s_{format_duration(max(WINDOWS))}"
        return (f"WITH a AS (SELECT qid, {key}, (least(wm, ts) // {BLOCK}) * {BLOCK} AS e FROM q), "
                f"b AS (SELECT *, {starts()} FROM a) "
                f"SELECT b.qid, {counts} FROM b LEFT JOIN (SELECT * FROM {table} {where}) x "
                f"ON x.{key} = b.{key} AND x.ts >= b.{oldest} AND x.ts < b.e "
                f"GROUP BY b.qid ORDER BY b.qid")

    t0 = time.perf_counter()
    res = {
        ITEM_VIEWS.name: con.sql(query("item", "views", "")).to_arrow_table(),
        USER_CLICKS.name: con.sql(
            query("usr", "engagements", "WHERE action = 'click'")).to_arrow_table(),
    }
    seconds = time.perf_counter() - t0
    values = {}
    for spec in FEATURES:
        t = res[spec.name]
        if not np.array_equal(t.column("qid").to_numpy(), sample):
            raise RuntimeError("DuckDB result rows do not match the sample")
        for w in WINDOWS:
            values[spec.window_name(w)] = t.column(f"c_{format_duration(w)}").to_numpy()
    return values, seconds


# ------------------------------------------------------------------------------ main
def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1M events, 100k query impressions")
    ap.add_argument("--events", type=int, default=None,
                    help="target number of generated events (default 10,000,000)")
    ap.add_argument("--impressions", type=int, default=None,
                    help="query impressions sampled from the history (default 1,000,000)")
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--duckdb-sample", type=int, default=None,
                    help="query rows for the naive DuckDB rescan (default 20,000)")
    ap.add_argument("--feast-step", type=int, default=60,
                    help="minutes between Feast's precomputed rows (divides 60; default 60)")
    ap.add_argument("--skip-feast", action="store_true")
    ap.add_argument("--skip-ray", action="store_true",
                    help="leave out the Iceberg runs (local engine, Ray with 1 and 2 workers)")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    if not args.skip_ray:
        try:
            import ray.data
        except ImportError:
            ap.error("the Ray runs need Ray Data: pip install -e '.[ray]' (or --skip-ray)")
        del ray
    events = args.events or (1_000_000 if args.quick else 10_000_000)
    n_queries = args.impressions or (100_000 if args.quick else 1_000_000)
    n_sample = args.duckdb_sample or (5_000 if args.quick else 20_000)
    step = args.feast_step * MINUTE
    if step <= 0 or HOUR % step or step % BLOCK:
        ap.error(f"--feast-step must be a multiple of 5 that divides 60, got {args.feast_step}")

    # views, impressions (one per view) and engagements (~0.065 per view): ~2.07 events per view
    total_views = -(-events // 2)
    print(f"generating {args.days} days: {total_views:,} views, {args.items:,} items, "
          f"{args.users:,} users ...", flush=True)
    h = generate_history(total_views, args.days, args.items, args.users, n_queries, args.seed)
    n = len(h.q_ts)
    print(f"  {h.n_events:,} events ({len(h.v_ts):,} views, {len(h.e_ts):,} engagements, "
          f"{h.n_impressions:,} impressions) in {h.seconds:.1f}s; {n:,} query impressions; "
          f"watermark lag 0-10 min", flush=True)
    if not args.quick and args.events is None and (h.n_events < 10_000_000 or n < 1_000_000):
        print("WARNING: fewer than 10M events or 1M query impressions", file=sys.stderr)

    lo = int(min(h.v_ts.min(), h.e_ts.min()))
    lo -= lo % DAY
    hi = int(max(h.v_ts.max(), h.e_ts.max())) + DAY
    hi -= hi % DAY

    # ---- Tessera
    print("tessera: compute_blocks + point_in_time ...", flush=True)
    t_vals, t_time, tables, ids, n_blocks = run_tessera(h, lo, hi)
    t_rps = rate(n, t_time["total"])
    print(f"  {n_blocks:,} blocks; {t_time['total']:.2f}s", flush=True)

    # ---- Feast
    f_rps = float("nan")
    if not args.skip_feast:
        print(f"feast: precompute (step {format_duration(step)}) + get_historical_features "
              "(DuckDB offline store) ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="tessera-bench-feast-") as tmp:
            f_vals, f_time, f_rows, f_out_rows = run_feast(h, step, Path(tmp))
        f_rps = rate(n, f_time["total"])
        print(f"  {sum(f_rows.values()):,} precomputed rows; {f_time['total']:.2f}s", flush=True)

    # ---- the jobs over Iceberg: local engine, Ray with 1 and 2 workers
    engines = {}
    if not args.skip_ray:
        print("iceberg: batch blocks + backfill on the local engine and on Ray (1, 2 "
              "workers) ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="tessera-bench-ray-") as tmp:
            engines = run_engines(h, lo, hi, Path(tmp))

    # ---- DuckDB naive
    rng = np.random.default_rng(args.seed + 2)
    sample = np.sort(rng.choice(n, size=min(n_sample, n), replace=False))
    print(f"duckdb: naive rescan of {len(sample):,} sampled query rows ...", flush=True)
    d_vals, d_sec = run_duckdb(h, sample)
    d_rps = rate(len(sample), d_sec)

    # ---- checks
    print()
    print(f"{'engine':<34}{'rows':>11}{'seconds':>10}{'rows/s':>13}")
    print(f"{'tessera blocks (compute_blocks)':<34}{'':>11}{t_time['blocks']:>10.2f}")
    print(f"{'tessera point_in_time':<34}{'':>11}{t_time['point_in_time']:>10.2f}")
    print(f"{'tessera total (from raw events)':<34}{n:>11,}{t_time['total']:>10.2f}{t_rps:>13,.0f}")
    if not args.skip_feast:
        print(f"{'feast precompute + parquet':<34}{'':>11}{f_time['precompute']:>10.2f}")
        print(f"{'feast get_historical_features':<34}{'':>11}"
              f"{f_time['get_historical_features']:>10.2f}")
        print(f"{'feast total':<34}{n:>11,}{f_time['total']:>10.2f}{f_rps:>13,.0f}")
        print(f"{'(feast apply, not counted)':<34}{'':>11}{f_time['apply']:>10.2f}")
    print(f"{'duckdb naive rescan (sample)':<34}{len(sample):>11,}{d_sec:>10.2f}{d_rps:>13,.0f}")
    for label, (sec, _, timing) in engines.items():
        what = {"local": "iceberg, local engine"}.get(label, f"iceberg, ray {label[3:]} worker(s)")
        print(f"{what:<34}{n:>11,}{sec:>10.2f}{rate(n, sec):>13,.0f}   (batch blocks "
              f"{timing['blocks']:.1f}s, backfill {timing['backfill']:.1f}s)")
    print(f"\nper window: {len(WINDOWS) * len(FEATURES)} window values per row; the engines "
          "compute all windows of a feature in one pass, so rows/s is per row, all windows")

    print("\nagreement")
    print(f"{'window value':<20}{'tessera=duckdb':>16}{'feast=tessera(S)':>22}"
          f"{'feast=online':>16}{'mean value':>12}")
    all_exact = True
    feast_ok = True
    s_end = h.q_ts - h.q_ts % step  # Feast's window end
    matched: dict[str, np.ndarray] = {}
    if not args.skip_feast:
        for spec in FEATURES:
            for wv in point_in_time(spec, WINDOWS, ids[spec.name], s_end, tables[spec.name]):
                matched[wv.name] = wv.values
    for spec in FEATURES:
        for w in WINDOWS:
            name = spec.window_name(w)
            eq_d = np.array_equal(t_vals[name][sample], d_vals[name].astype(np.float64))
            all_exact &= eq_d
            cells = [f"{'yes' if eq_d else 'NO'} ({len(sample):,})"]
            if not args.skip_feast:
                hop = tail_hop(w, spec.block_sizes)
                same_def = (s_end - w) % hop == 0
                m = int(same_def.sum())
                agree = int((f_vals[name][same_def] == matched[name][same_def]).sum())
                feast_ok &= agree == m
                online = float((f_vals[name] == t_vals[name]).mean())
                cells += [f"{agree:,}/{m:,}", f"{online:.1%}"]
            else:
                cells += ["-", "-"]
            print(f"{name:<20}{cells[0]:>16}{cells[1]:>22}{cells[2]:>16}"
                  f"{t_vals[name].mean():>12.1f}")
    print("\n  tessera=duckdb: exact equality on the sampled rows, every window "
          "(same semantics: window ends at the logged watermark).")
    if not args.skip_feast:
        print(f"  feast=tessera(S): Feast vs Tessera evaluated at Feast's window end "
              f"align_down(event_ts, {format_duration(step)}), on the rows where both window "
              "starts coincide: end - W aligned to W's tail hop (with a 1h step: every row for 1h, "
              "1d and 7d; for 30d, whose hop is 1d, the rows whose end is midnight).")
        print("  feast=online: share of all rows where Feast's value equals what the online "
              "read saw (Tessera at the logged watermark).\n")
        print(FEAST_SEMANTICS)
    engines_equal = True
    for label, (_, values, _) in engines.items():
        differ = [name for name in t_vals if not np.array_equal(values[name], t_vals[name])]
        engines_equal &= not differ
        print(f"  {label} over Iceberg = in-memory Tessera on every row and window: "
              f"{'yes' if not differ else 'NO: ' + ', '.join(differ)}")
    all_exact &= engines_equal
    status = "all checks passed" if all_exact and feast_ok else "CHECKS FAILED"
    print(f"\n{status}")
    ratio_f = t_rps / f_rps if f_rps == f_rps else float("nan")
    if not (all_exact and feast_ok):
        sys.exit(1)
    ray = ""
    if engines:
        r1, r2 = (rate(n, engines[k][0]) for k in ("ray1", "ray2"))
        ray = (f" ray_rows_per_s={r2:.0f} ray_scaling={r2 / r1:.2f} ray1_rows_per_s={r1:.0f} "
               f"iceberg_local_rows_per_s={rate(n, engines['local'][0]):.0f}")
    print(f"\nRESULT backfill rows_per_s={t_rps:.0f} feast_rows_per_s={f_rps:.0f} "
          f"ratio_vs_feast={ratio_f:.1f} ratio_vs_duckdb={t_rps / d_rps:.1f}{ray} equal=1")


if __name__ == "__main__":
    main()
