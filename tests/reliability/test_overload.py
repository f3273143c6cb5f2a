"""Overload over real HTTP: a real server process (uvicorn, LMDB store, Kafka forward log) with a
small ``max_in_flight`` is driven open-loop at several times its measured capacity by the
load generator of ``bench/overload.py`` (its own process, raw keep-alive sockets).

Checked: the excess is shed with 503 + Retry-After (and counted in ``tessera_shed_total``),
every response is a 200 or a 503 (no other status, no connection error), the server's RSS
stays bounded, and once the load drops every request succeeds again. No latency is
asserted: speed is measured by ``bench/overload.py``.

The soak variant (``pytest -m soak tests/reliability/test_overload.py``, deselected by
default) repeats overload bursts for ``TESSERA_SOAK_S`` seconds (default 600).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_PATH = Path(__file__).resolve().parents[2] / "bench" / "overload.py"
_spec = importlib.util.spec_from_file_location("tessera_bench_overload", _PATH)
ovl = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ovl  # dataclasses resolve their module by name
_spec.loader.exec_module(ovl)

MAX_IN_FLIGHT = 2
OVERLOAD_X = 5.0
RSS_GROWTH_MB = 150.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tessera.broker import EmbeddedBroker
    from tessera.topics import PLATFORM_TOPICS, create_topics

    tmp = tmp_path_factory.mktemp("overload")
    broker = EmbeddedBroker(state_dir=tmp / "broker")
    bootstrap = broker.start(timeout_s=30).bootstrap
    try:
        create_topics(bootstrap, PLATFORM_TOPICS, partitions=2)
        url, users = ovl.build_store(tmp, bootstrap, n_items=1_500, views=8_000, n_users=300)
        assert users
        yield tmp, bootstrap, url, users
    finally:
        broker.stop(timeout_s=1)


def _statuses(records: list[list]) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in records:
        out[r[2]] = out.get(r[2], 0) + 1
    return out


def _wait_idle(base: str, timeout_s: float = 120.0) -> None:
    """Until the server has no feed request in flight (the backlog of the burst is served)."""
    deadline = time.monotonic() + timeout_s
    while ovl.scrape(base, "tessera_in_flight") > 0:
        assert time.monotonic() < deadline, "requests still in flight long after the burst"
        time.sleep(0.2)


def _recovered(base: str, users: list[str]) -> None:
    """Below the limit (one client, back to back) every request succeeds again."""
    _wait_idle(base)
    res = ovl.drive(base, {"mode": "closed", "users": users, "concurrency": [1], "step_s": 2.0})
    codes = _statuses(res["steps"][0]["records"])
    assert set(codes) == {200}, f"after the load dropped: {codes}"


def _burst(base: str, users: list[str], rate: float, seconds: float) -> list[list]:
    res = ovl.drive(base, {"mode": "open", "users": users, "timeout_s": 60.0,
                           "phases": [{"name": "overload", "rate": rate,
                                       "duration_s": seconds}]})
    return res["phases"][0]["records"]


def _run(world, *, bursts: int, burst_s: float, until: float | None = None) -> None:
    tmp, bootstrap, url, users = world
    server, base = ovl.start_server(tmp, url, bootstrap, max_in_flight=MAX_IN_FLIGHT,
                                    candidates=500)
    try:
        with ovl.RssSampler(server.pid, interval_s=0.5) as sampler:
            # capacity, closed loop at the limit: nothing may be refused there
            closed = ovl.drive(base, {"mode": "closed", "users": users,
                                      "concurrency": [MAX_IN_FLIGHT], "step_s": 2.0})
            step = closed["steps"][0]
            assert set(_statuses(step["records"])) == {200}, _statuses(step["records"])
            capacity = len(step["records"]) / step["elapsed_s"]
            rss_start = ovl.rss_mb(server.pid)
            seen_503 = 0
            k = 0
            while k < bursts or (until is not None and time.monotonic() < until):
                # the capacity was measured on a shared machine: should a burst at 5x shed
                # nothing (the machine was busier then), it is repeated at twice the rate
                shed, rate_x = 0, OVERLOAD_X
                for _ in range(4):
                    records = _burst(base, users, capacity * rate_x, burst_s)
                    codes = _statuses(records)
                    assert set(codes) <= {200, 503}, \
                        f"burst {k}: statuses other than 200/503 (0 = connection error): {codes}"
                    no_retry = sum(1 for r in records if r[2] == 503 and not r[3])
                    assert no_retry == 0, f"burst {k}: {no_retry} 503s without Retry-After"
                    assert codes.get(200, 0) > 0, f"burst {k}: nothing admitted: {codes}"
                    shed = codes.get(503, 0)
                    seen_503 += shed
                    _recovered(base, users)
                    if shed:
                        break
                    rate_x *= 2
                assert shed > 0, f"burst {k}: nothing shed up to {rate_x / 2:g}x capacity"
                k += 1
            rss = [v for _, v in sampler.samples]
        assert ovl.scrape(base, "tessera_shed_total") == seen_503
        assert rss_start is not None and rss, "no RSS samples of the server"
        growth = max(rss) - rss_start
        assert growth < RSS_GROWTH_MB, \
            f"server RSS grew {growth:.0f} MiB under overload ({rss_start:.0f} -> {max(rss):.0f})"
        assert server.poll() is None, "the server died"
    finally:
        ovl.stop_server(server)


def test_overload_is_shed_with_503_memory_stays_bounded_and_it_recovers(world):
    _run(world, bursts=2, burst_s=4.0)


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_overload_soak(world):
    """Bursts of 30 s at 5x capacity, each followed by a recovery check, for TESSERA_SOAK_S."""
    soak_s = float(os.environ.get("TESSERA_SOAK_S", "600"))
    _run(world, bursts=1, burst_s=30.0, until=time.monotonic() + soak_s)
