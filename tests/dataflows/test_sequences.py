"""The sequences flow on a real (dedicated) embedded broker against a brute-force oracle.

The broker is this module's own: ``decode_message`` checks each message's schema id
against its topic, so the topics must carry their real names (``views``, ``engagements``),
which the shared session broker's uniquely named topics cannot.

    produce A ─▶ run ─▶ produce B ─▶ run (replays A) ─▶ == oracle(A+B) ─▶ run again ─▶ unchanged
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from confluent_kafka import Producer

from dataflows.runner import run_flow
from dataflows.sequences import (
    SequencesFlowConfig,
    build_sequences_flow,
    columns_to_rows,
)
from features.store import open_store
from schemas.codec import DeadLetter
from schemas.columnar import encode_batch, records_to_columns
from tessera.broker import EmbeddedBroker
from tessera.synth import WorldConfig
from tessera.synth.sinks import generate_records
from tessera.topics import create_topics, producer_config, read_to_end

MAX_LEN = 15
PARTITIONS = 2
FEATURES_FILE = Path(__file__).resolve().parents[2] / "features.yaml"


@pytest.fixture(scope="module")
def seq_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A broker of this module only, with the real ``views``/``engagements`` topics."""
    embedded = EmbeddedBroker(state_dir=tmp_path_factory.mktemp("seq-broker"))
    info = embedded.start(timeout_s=30)
    try:
        create_topics(info.bootstrap, ["views", "engagements", "deadletter"], partitions=PARTITIONS)
        yield info.bootstrap
    finally:
        embedded.stop(timeout_s=1)


def _world() -> dict[str, list[dict]]:
    recs = generate_records(
        WorldConfig(
            seed=7,
            n_users=40,
            n_items=300,
            n_authors=20,
            n_topics=5,
            total_views=2500,
            duration_ms=6 * 3_600_000,
            late_fraction=0.1,
            id_namespace="seq",
        )
    )
    return {"views": recs["views"], "engagements": recs["engagements"]}


def _produce(
    bootstrap: str, records: dict[str, list[dict]], seed: int, extra: list[tuple[str, bytes]] = ()
) -> None:
    """Produce batch envelopes of up to 97 events to random partitions (users interleave)."""
    rng = np.random.default_rng(seed)
    producer = Producer(producer_config(bootstrap))
    for topic, recs in records.items():
        for i in range(0, len(recs), 97):
            chunk = recs[i : i + 97]
            producer.produce(
                topic,
                encode_batch(records_to_columns(topic, chunk)),
                partition=int(rng.integers(0, PARTITIONS)),
            )
    for topic, payload in extra:
        producer.produce(topic, payload, partition=0)
    assert producer.flush(30) == 0


def _oracle(records: dict[str, list[dict]], max_len: int) -> dict[str, list[tuple]]:
    """Each user's newest ``max_len`` actions by (ts, item_id, event_id), most recent first
    (the tie order of ``last_n`` blocks)."""
    by_user: dict[str, dict[str, tuple]] = defaultdict(dict)
    for topic, recs in records.items():
        for r in recs:
            action = "view" if topic == "views" else r["action"]
            by_user[r["user_id"]][r["event_id"]] = (
                r["event_ts"],
                r["event_id"],
                r["item_id"],
                action,
                r["dwell_ms"],
            )
    return {u: sorted(evs.values(), key=lambda r: (r[0], r[2], r[1]), reverse=True)[:max_len]
            for u, evs in by_user.items()}


def _store_sequences(url: str, users: list[str]) -> dict[str, list[tuple]]:
    with open_store(url) as store:
        seqs = store.get_sequences("user", users)
    return {
        u: [
            (t, e, i, a, d)
            for t, e, i, a, d in zip(
                s.ts.tolist(),
                s.event_ids.tolist(),
                s.item_ids.tolist(),
                s.actions.tolist(),
                s.dwell_ms.tolist(),
            )
        ]
        for u, s in zip(users, seqs)
    }


def _run(bootstrap: str, url: str, workers: int = 1) -> None:
    config = SequencesFlowConfig(
        bootstrap=bootstrap, store_url=url, max_len=MAX_LEN, bounded=True, batch_messages=7
    )
    run_flow(build_sequences_flow(config), workers=workers, epoch_interval_s=0.5)


def test_sequences_match_oracle_and_replay_is_idempotent(seq_broker, tmp_path):
    url = f"lmdb://{tmp_path / 'store'}"
    world = _world()
    assert len(world["views"]) == 2500 and world["engagements"]
    half = {t: recs[: len(recs) // 2] for t, recs in world.items()}
    rest = {t: recs[len(recs) // 2 :] for t, recs in world.items()}
    bad_user = dict(world["views"][0], event_id="seq-bad-user", user_id="")

    _produce(seq_broker, half, seed=1, extra=[("views", b"\x00garbage")])
    _run(seq_broker, url)
    first = _oracle(half, MAX_LEN)
    assert _store_sequences(url, sorted(first)) == first

    # The second run replays the first half (no recovery dir) and adds the rest.
    _produce(
        seq_broker,
        rest,
        seed=2,
        extra=[("views", encode_batch(records_to_columns("views", [bad_user])))],
    )
    _run(seq_broker, url, workers=2)
    oracle = _oracle(world, MAX_LEN)
    users = sorted(oracle)
    assert len(users) > 20
    assert all(len(oracle[u]) == MAX_LEN for u in users[:5])  # trimming is exercised
    got = _store_sequences(url, users)
    assert got == oracle

    # A full replay, through the command line this time, changes nothing.
    from tessera.cli import cli

    result = CliRunner().invoke(
        cli,
        [
            "worker",
            "sequences",
            "--bootstrap",
            seq_broker,
            "--store",
            url,
            "--bounded",
            "--max-len",
            str(MAX_LEN),
            "--epoch-interval",
            "0.5",
        ],
    )
    assert result.exit_code == 0, result.output
    assert _store_sequences(url, users) == got

    # Every run dead-letters the garbage again (at least once); runs 2 and 3 the bad user.
    dead = [
        DeadLetter.decode(m.value())
        for m in read_to_end(seq_broker, "deadletter", idle_timeout_s=5)
    ]
    assert sorted(d.stage for d in dead) == ["decode"] * 3 + ["validate"] * 2
    assert all(d.topic == "views" for d in dead)
    assert any("user_id ''" in d.reason for d in dead)


def test_columns_to_rows_maps_actions_and_rejects_unkeyable_ids():
    views = records_to_columns(
        "views",
        [
            {
                "event_id": "v1",
                "event_ts": 5,
                "user_id": "u1",
                "item_id": "i1",
                "author_id": "a",
                "topic": "t",
                "dwell_ms": 300,
            },
            {
                "event_id": "v2",
                "event_ts": 6,
                "user_id": "",
                "item_id": "i2",
                "author_id": "a",
                "topic": "t",
                "dwell_ms": 1,
            },
        ],
    )
    rows, bad = columns_to_rows(views)
    assert rows == [("u1", 5, "i1", "view", 300, "v1")]
    assert bad.tolist() == [False, True]
    eng = records_to_columns(
        "engagements",
        [
            {
                "event_id": "e1",
                "event_ts": 9,
                "impression_id": "p",
                "user_id": "u1",
                "item_id": "i1",
                "action": "like",
                "dwell_ms": 0,
            },
        ],
    )
    assert columns_to_rows(eng)[0] == [("u1", 9, "i1", "like", 0, "e1")]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"topics": ("items",)}, "topics ['items'] carry no user actions"),
        ({"topics": ()}, "topics must name at least one"),
        ({"max_len": 0}, "max_len must be an int >= 1, got 0"),
    ],
)
def test_config_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SequencesFlowConfig(bootstrap="x:1", store_url="lmdb://s", **kwargs)


def test_worker_cli_help():
    from tessera.cli import cli

    runner = CliRunner()
    top = runner.invoke(cli, ["worker", "--help"])
    assert top.exit_code == 0, top.output
    assert "blocks" in top.output and "sequences" in top.output
    blocks = runner.invoke(cli, ["worker", "blocks", "--help"])
    assert blocks.exit_code == 0, blocks.output
    for opt in (
        "--bootstrap",
        "--store",
        "--recovery-dir",
        "--workers",
        "--process-id",
        "--addresses",
        "--bounded / --tail",
        "--epoch-interval",
        "--features",
        "--topics",
        "--shards",
        "--lateness",
        "--flush-interval",
        "--warehouse",
        "-i 1",
    ):
        assert opt in blocks.output, opt
    seqs = runner.invoke(cli, ["worker", "sequences", "--help"])
    assert seqs.exit_code == 0 and "--max-len" in seqs.output


def test_worker_cli_reports_missing_topics(seq_broker, tmp_path):
    from tessera.cli import cli

    result = CliRunner().invoke(
        cli,
        [
            "worker",
            "blocks",
            "--bootstrap",
            seq_broker,
            "--store",
            f"lmdb://{tmp_path}/s",
            "--features",
            str(FEATURES_FILE),
            "--topics",
            "views,impressions",
            "--bounded",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "impressions" in result.output and "tessera topics create" in result.output
