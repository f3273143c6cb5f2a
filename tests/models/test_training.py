"""Training on a generated world: data streaming, metrics, and models that learn.

The world is small (a few hundred users, ~20k impressions over three days); its clicks
depend on the affinity between a user's latent topic interests and the item's topic, and
on position. The fixture joins impressions with engagements (``join_reference``) and logs,
with each impression, features known at impression time (computed here with plain
Python over the event history):

* ``user_topic_frac``: the user's past views of this item's topic / past views (smoothed),
* ``user_topic_dwell``: the user's mean log dwell on this topic above their overall mean,
  shrunk towards 0 for few views (dwell grows with affinity),
* ``user_topic_clicks``: the user's past clicks on this topic,
* ``user_views``, ``item_impressions``, ``item_clicks``, ``item_ctr``, ``position``,
* ``user_recent_items``: the user's 20 most recent viewed items, most recent first.

The popularity baselines score an impression by the item's past impressions or its
smoothed past click-through rate.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict, deque
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from features.labeljoin import join_reference
from features.offline.training import examples_to_arrow
from models import metrics as M
from models.data import (
    ArrowExamples,
    IcebergExamples,
    TimeRange,
    TrainingDataError,
    decode_batch,
    time_split,
)
from models.features import (
    CategoricalField,
    DenseFeature,
    FeatureSchema,
    FeatureSchemaError,
    dense_matrix,
    hash_ids,
    sequence_matrix,
)
from models.rankers import combine_scores
from models.train import (
    RankerFeatures,
    RetrievalFeatures,
    TrainConfig,
    train_l1,
    train_l2,
    train_retrieval,
)
from tessera.synth import WorldConfig, generate_records
from tessera.synth.world import DAY, HOUR

N_TOPICS = 8
SEQ_LEN = 20
DENSE = (
    "user_topic_frac",
    "user_topic_dwell",
    "user_topic_clicks",
    "user_views",
    "item_impressions",
    "item_clicks",
    "item_ctr",
    "position",
)
LOG1P = ("user_topic_clicks", "user_views", "item_impressions", "item_clicks")
START = WorldConfig().start_ts
DURATION = 3 * DAY


def _features(records: dict[str, list[dict[str, Any]]]) -> None:
    """Set each impression's ``features`` to values known strictly before its time."""
    events: list[tuple[int, int, dict[str, Any]]] = []
    for kind, name in ((0, "views"), (1, "engagements"), (2, "impressions")):
        # at equal times, impressions (2) see only earlier-kind events of strictly earlier ts
        events += [(r["event_ts"], kind, r) for r in records[name]]
    events.sort(key=lambda e: (e[0], -e[1]))
    user_views: dict[str, int] = defaultdict(int)
    user_topic_views: dict[tuple[str, str], int] = defaultdict(int)
    user_topic_clicks: dict[tuple[str, str], int] = defaultdict(int)
    user_dwell: dict[str, float] = defaultdict(float)
    user_topic_dwell: dict[tuple[str, str], float] = defaultdict(float)
    item_imps: dict[str, int] = defaultdict(int)
    item_clicks: dict[str, int] = defaultdict(int)
    recent: dict[str, deque[str]] = defaultdict(lambda: deque(maxlen=SEQ_LEN))
    pending: list[tuple[int, dict[str, Any]]] = []
    last_ts = None
    for ts, kind, r in events:
        if ts != last_ts:  # impressions of this instant are counted after it
            for _, imp in pending:
                item_imps[imp["item_id"]] += 1
            pending, last_ts = [], ts
        if kind == 0:
            user_views[r["user_id"]] += 1
            user_topic_views[r["user_id"], r["topic"]] += 1
            log_dwell = math.log1p(r["dwell_ms"] / 1000.0)
            user_dwell[r["user_id"]] += log_dwell
            user_topic_dwell[r["user_id"], r["topic"]] += log_dwell
            recent[r["user_id"]].appendleft(r["item_id"])
        elif kind == 1:
            if r["action"] == "click":
                user_topic_clicks[r["user_id"], r["topic"]] += 1
                item_clicks[r["item_id"]] += 1
        else:
            u, i, t = r["user_id"], r["item_id"], r["topic"]
            seen = user_views[u]
            r["features"] = {
                "user_topic_frac": (user_topic_views[u, t] + 1) / (seen + N_TOPICS),
                # mean log dwell on this topic above the user's mean (shrunk to 0 when unseen)
                "user_topic_dwell": (
                    user_topic_dwell[u, t] - user_topic_views[u, t] * user_dwell[u] / max(seen, 1)
                )
                / (user_topic_views[u, t] + 2),
                "user_topic_clicks": user_topic_clicks[u, t],
                "user_views": seen,
                "item_impressions": item_imps[i],
                "item_clicks": item_clicks[i],
                "item_ctr": (item_clicks[i] + 1) / (item_imps[i] + 20),
                "position": r["position"],
                "user_recent_items": list(recent[u]),
            }
            pending.append((ts, r))


@lru_cache(maxsize=4)
def world_table(seed: int = 7, views: int = 24_000) -> pa.Table:
    """Return the labelled, featured training rows of a small generated world."""
    config = WorldConfig(
        seed=seed,
        n_users=400,
        n_items=1_500,
        n_authors=150,
        n_topics=N_TOPICS,
        duration_ms=DURATION,
        total_views=views,
        late_fraction=0.0,
        interest_concentration=0.2,
    )
    records = generate_records(config)
    _features(records)
    # join per user shard: join_reference is quadratic in its inputs
    shards = 32
    imps: dict[int, list] = defaultdict(list)
    engs: dict[int, list] = defaultdict(list)
    for r in records["impressions"]:
        imps[zlib.crc32(r["user_id"].encode()) % shards].append(r)
    for r in records["engagements"]:
        engs[zlib.crc32(r["user_id"].encode()) % shards].append(r)
    rows: list[dict[str, Any]] = []
    for k in sorted(imps):
        rows += join_reference(imps[k], engs.get(k, []), HOUR)
    rows.sort(key=lambda r: (r["event_ts"], r["impression_id"]))
    for r in rows:  # as if the streaming join emitted each once its window closed
        r["matured_at"] = r["event_ts"] + HOUR
    table = examples_to_arrow(rows)
    return table.append_column("version", pa.array(["v1"] * table.num_rows))


# ---------------------------------------------------------------- shared with test_onnx

BUCKETS = {"user_id": 1_009, "item_id": 4_001, "author_id": 503, "topic": 31}
L2_FEATURES = RankerFeatures(
    dense=DENSE,
    log1p=LOG1P,
    categorical=BUCKETS,
    sequence="user_recent_items",
    sequence_length=SEQ_LEN,
)
L1_FEATURES = RankerFeatures(
    dense=("user_topic_dwell", "user_topic_frac", "item_ctr", "position"),
    categorical={},
    sequence=None,
)
RETRIEVAL_FEATURES = RetrievalFeatures(
    user_dense=("user_views",),
    item_dense=("item_impressions", "item_ctr"),
    log1p=("user_views", "item_impressions"),
    item_buckets=4_001,
    author_buckets=503,
    topic_buckets=31,
    sequence="user_recent_items",
    sequence_length=SEQ_LEN,
    dim=16,
)


def ranges() -> tuple[TimeRange, TimeRange]:
    """Train on the first 80% of the world's time, evaluate on the last 20%."""
    return time_split(START, START + DURATION)


def source(batch_rows: int = 4_096) -> ArrowExamples:
    """The world's rows as an in-memory source."""
    return ArrowExamples(world_table(), batch_rows=batch_rows)


# ---------------------------------------------------------------- metrics


def test_auc_hand_computed() -> None:
    # pairs (pos, neg): (0.8,0.1) (0.8,0.4) (0.35,0.1) (0.35,0.4) -> 1 + 1 + 1 + 0 = 3 of 4
    assert M.auc([1, 0, 1, 0], [0.8, 0.1, 0.35, 0.4]) == pytest.approx(0.75)
    assert M.auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts half
    assert M.auc([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1]) == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    assert np.isnan(M.auc([1, 1], [0.2, 0.3]))


def test_auc_matches_pairwise_reference() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    s = np.round(rng.random(300), 1)  # many ties
    pos, neg = s[y], s[~y]
    ref = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert M.auc(y, s) == pytest.approx(ref)


def test_log_loss_and_nce_hand_computed() -> None:
    y, p = [1, 0], [0.8, 0.4]
    expected = -(np.log(0.8) + np.log(0.6)) / 2
    assert M.log_loss(y, p) == pytest.approx(expected)
    base = -(np.log(0.5) + np.log(0.5)) / 2  # base rate 0.5
    assert M.normalized_cross_entropy(y, p) == pytest.approx(expected / base)
    assert M.normalized_cross_entropy(y, [0.5, 0.5]) == pytest.approx(1.0)
    assert np.isnan(M.normalized_cross_entropy([0, 0], [0.1, 0.2]))


def test_recall_and_ndcg_hand_computed() -> None:
    assert M.recall_at_k(
        [{"a", "b"}, {"c"}, set()], [["a", "x"], ["y", "z"], ["a"]], 2
    ) == pytest.approx((0.5 + 0.0) / 2)
    # gains [0, 1, 1] scored [3, 2, 1]: DCG = 1/log2(3) + 1/log2(4); ideal = 1 + 1/log2(3)
    dcg = 1 / np.log2(3) + 1 / np.log2(4)
    ideal = 1 + 1 / np.log2(3)
    assert M.ndcg_at_k([0, 1, 1], [3, 2, 1], 3) == pytest.approx(dcg / ideal)
    assert M.ndcg_at_k([0, 1, 1], [3, 2, 1], 1) == pytest.approx(0.0)
    # two requests: one perfect (1.0), one all-zero gains (skipped)
    assert M.grouped_ndcg_at_k(["r1", "r1", "r2"], [1, 0, 0], [0.9, 0.1, 0.5], 10) == 1.0


# ---------------------------------------------------------------- features


def test_hash_ids_is_stable_crc32_with_padding_zero() -> None:
    got = hash_ids(["i1", "i1", None, "", "u7"], 1_000)
    assert got.dtype == np.int64
    assert got[0] == got[1] == 1 + zlib.crc32(b"i1") % 999
    assert got[2] == got[3] == 0
    assert ((got[[0, 1, 4]] >= 1) & (got[[0, 1, 4]] < 1_000)).all()
    with pytest.raises(FeatureSchemaError, match="buckets must be an int >= 2"):
        hash_ids(["a"], 1)


def test_schema_json_round_trip_and_matrices() -> None:
    schema = FeatureSchema(
        dense=(
            DenseFeature("views", log1p=True, mean=1.0, std=2.0),
            DenseFeature("ctr", mean=0.5, std=0.25, default=0.5),
        ),
        categorical=(CategoricalField("item_id", 101),),
        sequence="recent",
        sequence_length=3,
        sequence_buckets=101,
    )
    again = FeatureSchema.from_json(schema.to_json())
    assert again == schema
    assert again.feature_names == ["views", "ctr", "item_id", "recent"]
    rows = [
        {"views": np.e - 1, "ctr": None, "recent": ["a", "b", "c", "d"]},
        {"views": 0.0, "ctr": 1.0, "recent": None},
    ]
    x = dense_matrix(rows, schema)
    assert x.dtype == np.float32 and x.shape == (2, 2)
    np.testing.assert_allclose(x, [[0.0, 0.0], [-0.5, 2.0]], atol=1e-6)
    seq = sequence_matrix(rows, schema)
    np.testing.assert_array_equal(seq[0], hash_ids(["a", "b", "c"], 101))
    np.testing.assert_array_equal(seq[1], [0, 0, 0])
    with pytest.raises(FeatureSchemaError, match="format 9 is not supported"):
        FeatureSchema.from_dict({"format": 9})


def test_combine_scores_weights_tasks() -> None:
    probs = {"click": np.array([0.5, 0.1]), "hide": np.array([0.1, 0.0])}
    np.testing.assert_allclose(combine_scores(probs, {"click": 1.0, "hide": -2.0}), [0.3, 0.1])
    with pytest.raises(FeatureSchemaError, match=r"task\(s\) \['like'\]"):
        combine_scores(probs, {"like": 1.0})


# ---------------------------------------------------------------- data


def test_time_split_and_errors() -> None:
    train, ev = time_split(0, 1_000)
    assert (train.start, train.end, ev.start, ev.end) == (0, 800, 800, 1_000)
    assert time_split(0, 1_000, 300)[1] == TimeRange(300, 1_000)
    with pytest.raises(TrainingDataError, match="strictly inside"):
        time_split(0, 1_000, 1_000)


def test_arrow_source_streams_batches_and_dedupes() -> None:
    table = world_table()
    doubled = pa.concat_tables([table, table.slice(0, 100)])
    src = ArrowExamples(doubled, batch_rows=1_000)
    train, _ = ranges()
    sizes = [b.num_rows for b in src.batches(train, ["event_ts"])]
    assert max(sizes) <= 1_000
    ts = table.column("event_ts").to_numpy()
    assert sum(sizes) == int(((ts >= train.start) & (ts < train.end)).sum())


def test_decode_prefers_backfilled_columns() -> None:
    batch = pa.record_batch(
        {
            "event_ts": [1, 2],
            "features": ['{"a": 1.0, "b": 5}', '{"a": 2.0}'],
            "feature_a": pa.array([10.0, None]),
        }
    )
    out = decode_batch(batch, ["a", "b"])
    np.testing.assert_allclose(out["a"], [10.0, np.nan])
    assert out["b"] == [5, None]


@pytest.mark.slow
def test_iceberg_source_streams_and_trains(tmp_path) -> None:
    from features.offline.training import TrainingTables

    training = TrainingTables.open(tmp_path / "warehouse")
    table = world_table().drop_columns(["version"])
    training.append_examples(table, "v1")
    training.append_examples(table.slice(0, 50), "v1")  # an at-least-once duplicate
    src = IcebergExamples(training, "v1", batch_rows=2_000)
    train, ev = ranges()
    seen = []
    for b in src.batches(train, ["event_ts", "impression_id"]):
        assert b.num_rows <= 2_000
        seen += b.column("impression_id").to_pylist()
    assert len(seen) == len(set(seen))
    assert len(seen) == training.scan_examples("v1", train.start, train.end).num_rows
    result = train_l1(src, train, ev, features=L1_FEATURES, config=TrainConfig(epochs=1))
    assert result.metrics["auc_click"] > 0.55


# ---------------------------------------------------------------- models learn


@pytest.mark.slow
def test_l2_beats_popularity_baseline() -> None:
    train, ev = ranges()
    result = train_l2(
        source(), train, ev, features=L2_FEATURES, config=TrainConfig(epochs=3, seed=0)
    )
    eval_rows = world_table().filter(pc.greater_equal(world_table().column("event_ts"), ev.start))
    cols = decode_batch(eval_rows.combine_chunks().to_batches()[0], DENSE)
    y = np.asarray(cols["label_click"])
    baselines = {
        f: M.auc(y, np.asarray(cols[f], dtype=float))
        for f in ("item_impressions", "item_clicks", "item_ctr")
    }
    model_auc = result.metrics["auc_click"]
    assert result.tasks[0] == "click" and "like" in result.tasks
    assert model_auc > max(baselines.values()) + 0.05, (model_auc, baselines)
    assert result.metrics["nce_click"] < 1.0  # better than predicting the base rate
    assert 0 < result.metrics["ndcg@10"] <= 1


def test_training_is_deterministic() -> None:
    train, ev = ranges()
    a = train_l1(source(), train, ev, features=L1_FEATURES, config=TrainConfig(epochs=1, seed=3))
    b = train_l1(source(), train, ev, features=L1_FEATURES, config=TrainConfig(epochs=1, seed=3))
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name
    assert a.metrics == b.metrics


@pytest.mark.slow
def test_retrieval_learns_and_reports_recall() -> None:
    train, ev = ranges()
    result = train_retrieval(
        source(),
        train,
        ev,
        features=RETRIEVAL_FEATURES,
        config=TrainConfig(epochs=2, batch_size=128),
    )
    m = result.metrics
    assert m["eval_users"] > 50
    chance = 100 / m["catalog_items"]
    assert m["recall@100"] > 2 * chance
    assert result.history[-1] < result.history[0]
    assert result.catalog is not None and len(result.catalog.ids) == m["catalog_items"]


def test_no_rows_is_a_clear_error() -> None:
    empty = TimeRange(START - 10 * DAY, START - 9 * DAY)
    with pytest.raises(TrainingDataError, match="no training rows for l1"):
        train_l1(source(), empty, empty, features=L1_FEATURES)


def test_hash_ids_gives_the_same_buckets_from_its_cache_whatever_was_hashed_before() -> None:
    """Ids hashed once are looked up afterwards; the answer never depends on the order of
    calls, nor on equal keys of other types (1, 1.0 and True hash as different strings)."""
    ids = ["i1", "u7", "", None, "i1"]
    first = hash_ids(ids, 1_000)
    again = hash_ids(ids, 1_000)
    assert first.tolist() == again.tolist()
    mixed = [1, 1.0, True, "1", np.str_("i1"), float("nan")]
    want = [1 + zlib.crc32(str(v).encode()) % 999 for v in mixed[:5]] + [0]
    assert hash_ids(mixed, 1_000).tolist() == want
    assert hash_ids(["1", 1.0], 1_000).tolist() == [want[3], want[1]]
    assert hash_ids(ids, 7).tolist() == [1 + zlib.crc32(b"i1") % 6, 1 + zlib.crc32(b"u7") % 6,
                                         0, 0, 1 + zlib.crc32(b"i1") % 6]
