"""A user's own event log, end to end: a declared source, a shuffled headerless TSV in unix
seconds, ``tessera import`` (sorted by event time), the blocks worker, online reads and a
``--spine`` backfill, every value against a brute-force oracle of the window rule."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from features.client import FeatureClient
from features.spec_loader import load_features
from features.store import open_store
from features.tiling import tail_hop
from tessera.cli import cli
from tessera.topics import create_topics

FEATURES = """\
sources:
  - name: ratings
    fields: {user_id: string, item_id: string, rating: double}
    event_time: {field: ts, unit: s}
features:
  - name: item_ratings
    source: ratings
    entity: item_id
    aggregation: count
    windows: [1d, 30d]
  - name: item_rating_mean
    source: ratings
    entity: item_id
    aggregation: mean
    value: rating
    windows: [30d]
  - name: user_rated
    source: ratings
    entity: user_id
    aggregation: count
    windows: [7d]
  - name: user_recent_rated
    source: ratings
    entity: user_id
    aggregation: last_n
    value: item_id
    params: {n: 5}
    windows: [30d]
"""
T0 = 1_700_000_000  # unix seconds
MIN5 = 300_000


def _ratings(n: int, seed: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # distinct seconds: no two events tie, so "the last 5" has one answer
    ts = T0 + rng.choice(12 * 86_400, size=n, replace=False)
    return {"user_id": np.array([f"u{k}" for k in rng.integers(0, 40, n)]),
            "item_id": np.array([f"i{k}" for k in rng.integers(0, 60, n)]),
            "rating": rng.integers(1, 6, n).astype(float), "ts_ms": ts * 1000}


def _oracle(data: dict, key: str, entity: str, end: int, window: int, sizes) -> tuple:
    """(count, mean rating, last 5 items newest first) of ``entity`` in the window ending
    at ``end`` (the README's rule: start = align_down(end - W, hop(W)))."""
    hop = tail_hop(window, sizes)
    start = (end - window) - (end - window) % hop
    sel = (data[key] == entity) & (data["ts_ms"] >= start) & (data["ts_ms"] < end)
    order = np.argsort(-data["ts_ms"][sel])
    mean = float(data["rating"][sel].mean()) if sel.any() else None
    return int(sel.sum()), mean, data["item_id"][sel][order][:5].tolist()


def test_declared_source_from_a_shuffled_headerless_tsv(fresh_broker: str, tmp_path: Path
                                                        ) -> None:
    features_file = tmp_path / "features.yaml"
    features_file.write_text(FEATURES)
    data = _ratings(3000)
    lines = [f"{u}\t{i}\t{r}\t{t // 1000}\n" for u, i, r, t in
             zip(data["user_id"], data["item_id"], data["rating"], data["ts_ms"])]
    (tmp_path / "ratings.tsv").write_text("".join(lines))  # shuffled: event times random
    create_topics(fresh_broker, ["ratings"], partitions=3)

    res = CliRunner().invoke(cli, [
        "import", "events", str(tmp_path / "ratings.tsv"), "--topic", "ratings",
        "--features", str(features_file), "--no-header",
        "--columns", "user_id,item_id,rating,ts", "--bootstrap", fresh_broker])
    assert res.exit_code == 0, res.output
    assert "produced  3000 events" in res.output
    assert "out of order" in res.output and "sorted by event time" in res.output

    store_url = f"lmdb://{tmp_path / 'store'}"
    warehouse = tmp_path / "warehouse"
    subprocess.run(
        [sys.executable, "-m", "tessera.cli", "--log-level", "WARNING", "worker", "blocks",
         "--bootstrap", fresh_broker, "--store", store_url, "--features", str(features_file),
         "--bounded", "--warehouse", str(warehouse)],
        check=True, timeout=300, capture_output=True)

    fs = load_features(features_file)
    sizes = fs.get("item_ratings").block_sizes
    # nothing dropped: every event is in the store (the 1d blocks add up to the input)
    with open_store(store_url, readonly=True) as store:
        client = FeatureClient(store, fs)
        items = sorted(set(data["item_id"].tolist()))
        users = sorted(set(data["user_id"].tolist()))
        item_res = client.get_features("item", items, ["item_ratings_30d", "item_ratings_1d",
                                                       "item_rating_mean_30d"])
        user_res = client.get_features("user", users, ["user_rated_7d",
                                                       "user_recent_rated_30d"])
    end = item_res.at - item_res.at % MIN5
    end = min(end, item_res.watermark - item_res.watermark % MIN5)
    for i, item in enumerate(items):
        count30, mean, _ = _oracle(data, "item_id", item, end, 30 * 86_400_000, sizes)
        count1, _, _ = _oracle(data, "item_id", item, end, 86_400_000, sizes)
        assert item_res.values[i, 0] == count30, item
        assert item_res.values[i, 1] == count1, item
        assert item_res.values[i, 2] == pytest.approx(mean, rel=1e-6), item
    for i, user in enumerate(users):
        count7, _, _ = _oracle(data, "user_id", user, end, 7 * 86_400_000, sizes)
        _, _, last5 = _oracle(data, "user_id", user, end, 30 * 86_400_000, sizes)
        assert user_res.values[i, 0] == count7, user
        assert user_res.lists["user_recent_rated_30d"][i] == last5, user

    # the sequences worker reads the declared source too; before the same end, its newest 5
    # are the last_n feature's list (one order for "the last N")
    subprocess.run(
        [sys.executable, "-m", "tessera.cli", "--log-level", "WARNING", "worker", "sequences",
         "--bootstrap", fresh_broker, "--store", store_url, "--features", str(features_file),
         "--bounded"],
        check=True, timeout=300, capture_output=True)
    res = CliRunner().invoke(cli, ["sequences", "get", "--user", ",".join(users), "--at",
                                   str(end), "--limit", "5", "--store", store_url, "--json"])
    assert res.exit_code == 0, res.output
    stored = json.loads(res.output)
    for i, user in enumerate(users):
        _, _, last5 = _oracle(data, "user_id", user, end, 30 * 86_400_000, sizes)
        assert [a["item_id"] for a in stored[user]] == last5, user
        assert {a["action"] for a in stored[user]} == {"ratings"}
        assert [a["item_id"] for a in stored[user]] == user_res.lists["user_recent_rated_30d"][i]

    # a spine of (user, item, time) rows, through the CLI, against the same oracle
    rng = np.random.default_rng(9)
    k = 200
    times = T0 * 1000 + rng.integers(86_400_000, end - T0 * 1000, k)
    spine = pa.table({"user_id": [users[j] for j in rng.integers(0, len(users), k)],
                      "item_id": [items[j] for j in rng.integers(0, len(items), k)] [:-1]
                      + ["never-rated"],
                      "when": times})
    pq.write_table(spine, tmp_path / "spine.parquet")
    res = CliRunner().invoke(cli, [
        "backfill", "--definitions", str(features_file), "--spine",
        str(tmp_path / "spine.parquet"), "--timestamp-column", "when",
        "--out", str(tmp_path / "out.parquet"), "--warehouse", str(warehouse),
        "--features", "item_ratings_30d,item_rating_mean,user_rated,user_recent_rated"])
    assert res.exit_code == 0, res.output
    out = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert len(out) == k
    for row in out:
        row_end = row["when"] - row["when"] % MIN5
        count30, mean, _ = _oracle(data, "item_id", row["item_id"], row_end, 30 * 86_400_000,
                                   sizes)
        count7, _, _ = _oracle(data, "user_id", row["user_id"], row_end, 7 * 86_400_000, sizes)
        _, _, last5 = _oracle(data, "user_id", row["user_id"], row_end, 30 * 86_400_000, sizes)
        assert row["item_ratings_30d"] == count30, row
        assert row["item_rating_mean_30d"] == (None if mean is None else pytest.approx(mean)), row
        assert row["user_rated_7d"] == count7, row
        assert row["user_recent_rated_30d"] == last5, row
    assert out[-1]["item_rating_mean_30d"] is None  # no data in the window: null

    # the other offline path: the raw archive, then batch blocks from it: the same rows
    raw_warehouse = tmp_path / "raw-warehouse"
    subprocess.run(
        [sys.executable, "-m", "tessera.cli", "--log-level", "WARNING", "worker", "archive",
         "--bootstrap", fresh_broker, "--features", str(features_file), "--bounded",
         "--warehouse", str(raw_warehouse)],
        check=True, timeout=300, capture_output=True)
    res = CliRunner().invoke(cli, [
        "batch", "blocks", "--features", str(features_file), "--warehouse", str(raw_warehouse),
        "--store", f"lmdb://{tmp_path / 'store-batch'}", "--from", "2023-11-01T00:00:00Z",
        "--to", "2023-12-01T00:00:00Z"])
    assert res.exit_code == 0, res.output
    assert "3,000 raw events" in res.output
    res = CliRunner().invoke(cli, [
        "backfill", "--definitions", str(features_file), "--spine",
        str(tmp_path / "spine.parquet"), "--timestamp-column", "when",
        "--out", str(tmp_path / "out-batch.parquet"), "--warehouse", str(raw_warehouse),
        "--features", "item_ratings_30d,item_rating_mean,user_rated,user_recent_rated"])
    assert res.exit_code == 0, res.output
    assert pq.read_table(tmp_path / "out-batch.parquet").to_pylist() == out

    # both jobs again on a local Ray cluster of 2 workers (the batch job replaces the range
    # with what it computes): the same values for the user's own topic
    try:
        import ray.data  # noqa: F401
    except ImportError:
        return
    ray_opts = ["--engine", "ray", "--ray-workers", "2"]
    res = CliRunner().invoke(cli, [
        "batch", "blocks", "--features", str(features_file), "--warehouse", str(raw_warehouse),
        "--store", f"lmdb://{tmp_path / 'store-ray'}", "--from", "2023-11-01T00:00:00Z",
        "--to", "2023-12-01T00:00:00Z", *ray_opts])
    assert res.exit_code == 0, res.output
    assert "3,000 raw events" in res.output and "ray: 2 CPUs" in res.output
    res = CliRunner().invoke(cli, [
        "backfill", "--definitions", str(features_file), "--spine",
        str(tmp_path / "spine.parquet"), "--timestamp-column", "when",
        "--out", str(tmp_path / "out-ray.parquet"), "--warehouse", str(raw_warehouse),
        "--features", "item_ratings_30d,item_rating_mean,user_rated,user_recent_rated",
        *ray_opts])
    assert res.exit_code == 0, res.output
    assert pq.read_table(tmp_path / "out-ray.parquet").to_pylist() == out


def test_spine_errors_name_the_column(tmp_path: Path) -> None:
    features_file = tmp_path / "features.yaml"
    features_file.write_text(FEATURES)
    runner = CliRunner()
    base = ["backfill", "--definitions", str(features_file), "--warehouse",
            str(tmp_path / "wh"), "--features", "item_ratings", "--out",
            str(tmp_path / "o.parquet"), "--spine"]
    (tmp_path / "a.csv").write_text("item_id,event_ts\ni1,2026-11-29T16:05:00Z\ni2,soon\n")
    res = runner.invoke(cli, [*base, str(tmp_path / "a.csv")])
    assert res.exit_code == 1
    assert "column 'event_ts', row 1: 'soon' is not a time" in res.output
    (tmp_path / "b.csv").write_text("user_id,event_ts\nu1,1\n")
    res = runner.invoke(cli, [*base, str(tmp_path / "b.csv")])
    assert res.exit_code == 1
    assert "no column 'item_id', the entity of 'item_ratings'" in res.output
    res = runner.invoke(cli, [*base, str(tmp_path / "b.csv"), "--timestamp-column", "t"])
    assert "the spine has no column 't'" in res.output
