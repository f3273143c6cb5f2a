"""Load shedding: beyond max_in_flight, requests get 503 + Retry-After instead of queueing,
and the endpoint serves normally again once the load drops."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from serving.config import ServingConfig
from tessera.broker import find_free_port
from tests.serving.conftest import start_server

pytestmark = pytest.mark.integration


def test_overload_gets_fast_503_with_retry_after_then_recovers(stack):
    port = find_free_port()
    config = ServingConfig(port=port, store_url=stack.store_url, bootstrap=stack.bootstrap,
                           spool_dir=stack.tmp / "spool2", registry_dir=stack.tmp / "registry",
                           max_in_flight=2)
    server = start_server(config)
    state = server.config.app.state.serving  # the running app's state
    release = threading.Event()
    real_feed = state.pipeline.feed

    def slow_feed(req, **kwargs):
        release.wait(10)  # hold the slot until the test lets go
        return real_feed(req, **kwargs)

    state.pipeline.feed = slow_feed
    url = f"http://127.0.0.1:{port}/v1/feed"

    async def burst():
        async with httpx.AsyncClient(timeout=30) as client:
            tasks = [asyncio.create_task(client.post(url, json={"user_id": "u1"}))
                     for _ in range(12)]
            await asyncio.sleep(1.0)
            release.set()
            return await asyncio.gather(*tasks)

    try:
        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert codes.count(200) == 2, codes
        shed = [r for r in responses if r.status_code == 503]
        assert len(shed) == 10
        assert all(r.headers["retry-after"] == "1" and r.json()["error"] for r in shed)
        state.pipeline.feed = real_feed
        assert httpx.post(url, json={"user_id": "u1"}, timeout=30).status_code == 200
        assert "tessera_shed_total 10.0" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        release.set()
        server.should_exit = True
        time.sleep(0.3)
