"""User x topic cross features: training (backfilled JSON lists, one per row) and serving
(the user's hydrated lists broadcast to every candidate) must produce the same model inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.features import (
    DenseFeature,
    FeatureSchema,
    FeatureSchemaError,
    KeyRate,
    KeyShare,
    cross_from_dict,
    dense_matrix,
    key_share,
)

SHARE = KeyShare("topic_share_viewed_7d", key="topic", values="user_recent_topics_7d")
RATE = KeyRate("topic_long_view_rate_7d", key="topic", hits="user_long_view_topics_7d",
               trials="user_recent_topics_7d", prior_hits=0.5, prior_trials=5.0)


def test_key_share_counts_the_share_of_each_rows_key():
    lists = [["a", "a", "b", "c"], '["a", "b"]', None, [], ["z"]]
    keys = ["a", "b", "a", "a", "z"]
    np.testing.assert_allclose(key_share(keys, lists), [0.5, 0.5, 0.0, 0.0, 1.0])


def test_key_rate_is_smoothed_hits_over_trials_per_key():
    batch = {"topic": ["a", "b", "c"],
             RATE.hits: [["a", "a"], ["a", "a"], None],
             RATE.trials: [["a", "a", "a", "b"], ["a", "a", "a", "b"], ["c"]]}
    np.testing.assert_allclose(RATE.compute(batch, 3),
                               [(2 + 0.5) / (3 + 5), 0.5 / (1 + 5), 0.5 / (1 + 5)])


def test_training_rows_and_broadcast_serving_rows_give_the_same_inputs():
    schema = FeatureSchema(
        dense=(DenseFeature("item_ctr_1d"), DenseFeature(SHARE.name, mean=0.2, std=0.3),
               DenseFeature(RATE.name)),
        crosses=(SHARE, RATE))
    recent = ["t1", "t2", "t1", "t3", "t1"]
    long_views = ["t1", "t3"]
    topics = ["t1", "t2", "t9", "t3"]
    ctr = np.array([0.1, 0.2, 0.3, 0.4])
    # training: one backfilled JSON string per example row
    train = dense_matrix({"item_ctr_1d": ctr, "topic": topics,
                          SHARE.values: [json.dumps(recent) for _ in topics],
                          RATE.hits: [json.dumps(long_views) for _ in topics]}, schema)
    # serving: the user's hydrated lists, the same objects for every candidate
    serve = dense_matrix({"item_ctr_1d": ctr, "topic": topics,
                          SHARE.values: [recent] * 4, RATE.hits: [long_views] * 4}, schema)
    np.testing.assert_array_equal(train, serve)
    np.testing.assert_allclose(train[:, 1], (np.array([0.6, 0.2, 0.0, 0.2]) - 0.2) / 0.3,
                               rtol=1e-6)
    np.testing.assert_allclose(train[:, 2], [1.5 / 8, 0.5 / 6, 0.5 / 5, 1.5 / 6], rtol=1e-6)


def test_schema_round_trips_its_crosses_through_json():
    schema = FeatureSchema(dense=(DenseFeature(SHARE.name), DenseFeature(RATE.name)),
                           crosses=(SHARE, RATE))
    assert FeatureSchema.from_json(schema.to_json()) == schema
    with pytest.raises(FeatureSchemaError, match="unknown cross feature kind"):
        cross_from_dict({"kind": "eval", "name": "x"})


def test_ranker_features_require_crosses_among_the_dense_inputs():
    from models.train import RankerFeatures

    with pytest.raises(ValueError, match="topic_share_viewed_7d"):
        RankerFeatures(dense=("item_ctr_1d",), crosses=(SHARE,))
    feats = RankerFeatures(dense=("item_ctr_1d", SHARE.name, RATE.name), crosses=(SHARE, RATE))
    assert feats.columns == ["item_ctr_1d", SHARE.values, RATE.hits]


def test_dictionary_encoded_columns_give_the_inputs_of_plain_ones():
    """Serving passes candidates' ids and topics as codes into catalog tables
    (``CodedColumn``); the dense, hashed and cross inputs equal those of plain lists, with
    small tables (every value counted) and large ones (only the codes used)."""
    from models.features import CategoricalField, CodedColumn, CodeTable, categorical_matrix

    rng = np.random.default_rng(3)
    schema = FeatureSchema(
        dense=(DenseFeature("item_ctr_1d"), DenseFeature(SHARE.name), DenseFeature(RATE.name)),
        categorical=(CategoricalField("item_id", 1_000), CategoricalField("topic", 50),
                     CategoricalField("user_id", 100)),
        crosses=(SHARE, RATE))
    for n_topics in (4, 5_000):  # a table smaller and larger than 4x the rows
        topic_table = CodeTable([f"t{k}" for k in range(n_topics)] + [""])
        item_table = CodeTable([f"i{k}" for k in range(300)])
        n = 200
        topics = CodedColumn(rng.integers(0, len(topic_table), n), topic_table)
        items = CodedColumn(rng.integers(0, len(item_table), n), item_table)
        users = CodedColumn.repeat("u7", n)
        recent = [f"t{k}" for k in rng.integers(0, 4, 12)]
        long_views = recent[:3]
        common = {"item_ctr_1d": rng.random(n), SHARE.values: [recent] * n,
                  RATE.hits: [long_views] * n}
        coded = {**common, "topic": topics, "item_id": items, "user_id": users}
        plain = {**common, "topic": list(topics), "item_id": list(items), "user_id": ["u7"] * n}
        assert list(topics) == topics.values().tolist() == [topics[i] for i in range(n)]
        np.testing.assert_array_equal(dense_matrix(coded, schema), dense_matrix(plain, schema))
        np.testing.assert_array_equal(categorical_matrix(coded, schema),
                                      categorical_matrix(plain, schema))
        kept = np.array([5, 0, 199])
        assert list(topics.take(kept)) == [topics[5], topics[0], topics[199]]
        np.testing.assert_array_equal(topic_table.codes_of(["t1", "nope", ""]),
                                      [1, -1, n_topics])
