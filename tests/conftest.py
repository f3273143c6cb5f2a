"""Shared fixtures: a real embedded broker for the session, and throw-away topics on it.

Set ``TESSERA_TEST_BOOTSTRAP=host:port`` to run the broker tests against an existing
Kafka cluster instead of starting the embedded one.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator

import pytest

from tessera.broker import EmbeddedBroker
from tessera.errors import TopicError
from tessera.topics import create_topics, delete_topics


@pytest.fixture(scope="session", autouse=True)
def _tessera_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Local state of commands run by the tests (the late events a blocks worker keeps, the
    default store) under a temporary home, never in the checkout's ``.tessera``."""
    if os.environ.get("TESSERA_HOME"):
        yield
        return
    os.environ["TESSERA_HOME"] = str(tmp_path_factory.mktemp("tessera-home"))
    try:
        yield
    finally:
        os.environ.pop("TESSERA_HOME", None)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start an embedded broker on a free port for the whole session; yield its bootstrap."""
    external = os.environ.get("TESSERA_TEST_BOOTSTRAP")
    if external:
        yield external
        return
    embedded = EmbeddedBroker(state_dir=tmp_path_factory.mktemp("broker"))
    info = embedded.start(timeout_s=30)
    try:
        yield info.bootstrap
    finally:
        # Memory-only data: no need to wait out Tansu's 5 s drain of connections still open.
        embedded.stop(timeout_s=1)


@pytest.fixture
def topic_factory(broker: str) -> Iterator[Callable[..., str]]:
    """Return ``make(partitions=1, prefix="t") -> name``: a new, uniquely named topic.

    The topics are deleted when the test ends.
    """
    made: list[str] = []

    def make(partitions: int = 1, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        create_topics(broker, [name], partitions=partitions)
        made.append(name)
        return name

    yield make
    # Cleanup only; a failure here must not hide the test's own result.
    with contextlib.suppress(TopicError):
        delete_topics(broker, made)


@pytest.fixture
def fresh_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A broker of the test's own with the platform topics (3 partitions each) created.

    The dataflows read the real topic names (``views``, ...), so tests that run them get a
    broker to themselves instead of uniquely named topics.
    """
    from tessera.topics import PLATFORM_TOPICS

    embedded = EmbeddedBroker(state_dir=tmp_path_factory.mktemp("fresh-broker"))
    info = embedded.start(timeout_s=30)
    try:
        create_topics(info.bootstrap, PLATFORM_TOPICS, partitions=3)
        yield info.bootstrap
    finally:
        embedded.stop(timeout_s=1)
