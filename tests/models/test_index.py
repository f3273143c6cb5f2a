"""The HNSW item index against its exact, brute-force reference."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.errors import ModelError
from models.index import IDS_FILE, INDEX_FILE, ItemIndex, exact_search, recall_at_k

DIM = 32


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(rng: np.random.Generator, n: int, *, clusters: int = 200, spread: float = 0.35):
    """Unit vectors around random cluster centres: items of a catalog cluster by topic."""
    centres = _unit(rng.normal(size=(clusters, DIM)))
    noise = rng.normal(scale=spread / np.sqrt(DIM), size=(n, DIM))
    return _unit(centres[rng.integers(0, clusters, n)] + noise)


@pytest.fixture(scope="module")
def world() -> dict:
    """20,000 items in 200 topics; queries of users who mix two topics, and cold users."""
    rng = np.random.default_rng(20240601)
    centres = _unit(rng.normal(size=(200, DIM)))
    noise = rng.normal(scale=0.35 / np.sqrt(DIM), size=(20_000, DIM))
    vectors = _unit(centres[rng.integers(0, 200, 20_000)] + noise)
    a, b = rng.integers(0, 200, (2, 250))
    mixed = _unit(centres[a] + centres[b] + rng.normal(scale=0.5 / np.sqrt(DIM), size=(250, DIM)))
    cold = _unit(rng.normal(size=(250, DIM)))  # no history: directions between the topics
    ids = [f"item-{i}" for i in range(len(vectors))]
    index = ItemIndex.build(ids, vectors, M=32, ef_construction=200, ef=128)
    return {"ids": ids, "vectors": vectors, "queries": mixed, "cold": cold, "index": index}


def test_recall_at_100_against_exact_search(world: dict):
    index: ItemIndex = world["index"]
    assert len(index) == 20_000
    recall_mixed = recall_at_k(index, world["queries"], 100)
    recall_cold = recall_at_k(index, world["cold"], 100)
    print(f"recall@100: two-topic users {recall_mixed:.4f}, cold users {recall_cold:.4f}")
    assert recall_mixed >= 0.95
    assert recall_cold >= 0.95


def test_search_returns_ids_and_inner_products(world: dict):
    index: ItemIndex = world["index"]
    queries = world["queries"][:5]
    ids, scores = index.search(queries, 10)
    assert len(ids) == 5 and all(len(row) == 10 for row in ids)
    assert scores.shape == (5, 10)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    position = {item_id: i for i, item_id in enumerate(world["ids"])}
    for q, row, srow in zip(queries, ids, scores):
        expected = world["vectors"][[position[i] for i in row]] @ q
        np.testing.assert_allclose(srow, expected, atol=1e-5)
    one_ids, one_scores = index.search(queries[0], 3)  # a single query vector
    assert one_ids == [ids[0][:3]] and one_scores.shape == (1, 3)


def test_exact_search_is_brute_force():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(50, 4)).astype(np.float32)
    queries = rng.normal(size=(3, 4)).astype(np.float32)
    ids = [str(i) for i in range(50)]
    got_ids, got_scores = exact_search(ids, vectors, queries, 7, chunk=2)
    for q, row, srow in zip(queries, got_ids, got_scores):
        order = np.argsort(-(vectors @ q))[:7]
        assert row == [ids[i] for i in order]
        np.testing.assert_allclose(srow, (vectors @ q)[order], rtol=1e-6)
    all_ids, _ = exact_search(ids, vectors, queries, 500)
    assert all(len(row) == 50 for row in all_ids)


def test_incremental_add_update_and_delete():
    rng = np.random.default_rng(3)
    vectors = clustered(rng, 2_000)
    ids = [f"i{i}" for i in range(2_000)]
    index = ItemIndex.build(ids, vectors)

    # New items: each is found as its own nearest neighbour (forces a resize past 2048).
    new_vectors = clustered(np.random.default_rng(4), 300)
    new_ids = [f"new{i}" for i in range(300)]
    index.add(new_ids, new_vectors)
    assert len(index) == 2_300
    found, scores = index.search(new_vectors, 1)
    assert [row[0] for row in found] == new_ids
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)

    # Re-adding an id replaces its vector: search by the new vector finds it, the old does not.
    moved = -vectors[0]
    index.add(["i0"], moved[None, :])
    assert len(index) == 2_300
    assert index.search(moved, 1)[0] == [["i0"]]
    assert "i0" not in index.search(vectors[0], 50)[0][0]

    # Deleted items never come back, however many results are asked for.
    gone = [f"i{i}" for i in range(1, 101)] + ["new0", "unknown"]
    assert index.delete(gone) == 101
    assert len(index) == 2_199
    results, _ = index.search(np.concatenate([vectors[1:101], new_vectors[:1]]), 20)
    assert not set(gone) & {i for row in results for i in row}
    everything, _ = index.search(vectors[1], 5_000)
    assert len(everything[0]) == 2_199 and not set(gone) & set(everything[0])

    # Deleted slots are reused: churn does not grow the underlying index.
    slots = index._index.get_current_count()
    index.add([f"back{i}" for i in range(100)], vectors[1:101])
    assert index._index.get_current_count() == slots
    assert index.search(vectors[5], 1)[0] == [["back4"]]


def test_save_load_round_trip(tmp_path, world: dict):
    rng = np.random.default_rng(5)
    vectors = clustered(rng, 3_000)
    index = ItemIndex.build([f"i{i}" for i in range(3_000)], vectors, M=16, ef=64)
    index.delete(["i1", "i2"])
    index.add(["extra"], vectors[:1] * -1)
    index.save(tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == [IDS_FILE, INDEX_FILE]

    loaded = ItemIndex.load(tmp_path / "idx")
    assert len(loaded) == len(index) == 2_999
    assert loaded.params == index.params and loaded.dim == DIM
    queries = clustered(rng, 50)
    a_ids, a_scores = index.search(queries, 10)
    b_ids, b_scores = loaded.search(queries, 10)
    assert a_ids == b_ids
    np.testing.assert_allclose(a_scores, b_scores)
    results, _ = loaded.search(vectors[1:3], 10)
    assert not {"i1", "i2"} & {i for row in results for i in row}
    # The loaded index keeps growing without reusing a label.
    loaded.add(["later"], vectors[1:2])
    assert loaded.search(vectors[1], 1)[0] == [["later"]]
    assert "extra" in loaded and "i0" in loaded


def test_errors_name_the_problem(tmp_path):
    vectors = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(ModelError, match="item id 'a' appears more than once"):
        ItemIndex.build(["a", "b", "a"], vectors)
    with pytest.raises(ModelError, match=r"vectors must have shape \(2, 4\), got \(3, 4\)"):
        ItemIndex.build(["a", "b"], vectors)
    with pytest.raises(ModelError, match="index parameter M must be an integer between 2 and 512"):
        ItemIndex.build(["a", "b", "c"], vectors, M=1)
    bad = vectors.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ModelError, match="contain NaN or infinite values"):
        ItemIndex.build(["a", "b", "c"], bad)
    index = ItemIndex.build(["a", "b", "c"], vectors)
    with pytest.raises(ModelError, match=r"query vectors must have shape \(1, 4\), got \(1, 5\)"):
        index.search(np.ones((1, 5)), 1)
    with pytest.raises(ModelError, match="k must be an integer >= 1, got 0"):
        index.search(vectors, 0)
    with pytest.raises(ModelError, match="ids.json is missing"):
        ItemIndex.load(tmp_path)
    index.save(tmp_path / "x")
    meta = json.loads((tmp_path / "x" / IDS_FILE).read_text())
    (tmp_path / "x" / IDS_FILE).write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(ModelError, match="unsupported format 99"):
        ItemIndex.load(tmp_path / "x")
    index.delete(["a", "b", "c"])
    ids, scores = index.search(vectors[:2], 5)
    assert ids == [[], []] and scores.shape == (2, 0)
