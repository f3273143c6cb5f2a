"""Security and robustness of the HTTP layer: API keys by role, request size limits, and a
schemathesis run over the OpenAPI schema that finds no 5xx."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import httpx
import pytest

from serving.config import ServingConfig
from tessera.broker import find_free_port
from tests.serving.conftest import start_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def secured(stack):
    port = find_free_port()
    config = ServingConfig(port=port, store_url=stack.store_url, bootstrap=stack.bootstrap,
                           spool_dir=stack.tmp / "spool-sec", registry_dir=stack.tmp / "registry",
                           api_keys={"reader": "read", "writer": "write"}, max_body_bytes=2_000)
    server = start_server(config)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    time.sleep(0.3)


def test_keys_are_checked_by_role(secured):
    feed = {"user_id": "u1", "limit": 5}
    r = httpx.post(f"{secured}/v1/feed", json=feed)
    assert r.status_code == 401 and r.json()["field"] == "X-API-Key"
    assert httpx.post(f"{secured}/v1/feed", json=feed,
                      headers={"X-API-Key": "reader"}).status_code == 200
    ev = {"impression_id": "i", "user_id": "u1", "item_id": "x", "action": "click"}
    r = httpx.post(f"{secured}/v1/events", json=ev, headers={"X-API-Key": "reader"})
    assert r.status_code == 401 and "needs 'write'" in r.json()["error"]
    assert httpx.post(f"{secured}/v1/events", json=ev,
                      headers={"X-API-Key": "writer"}).status_code == 202


def test_oversized_bodies_are_refused(secured):
    big = [{"impression_id": "i", "user_id": "u1", "item_id": "x", "action": "click"}] * 200
    r = httpx.post(f"{secured}/v1/events", json=big, headers={"X-API-Key": "writer"})
    assert r.status_code == 413 and r.json()["field"] == "body"
    assert "larger than 2000 bytes" in r.json()["error"]


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors(stack):
    if shutil.which("schemathesis", path=str(__import__("pathlib").Path(sys.executable).parent)) is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    cli = str(__import__("pathlib").Path(sys.executable).parent / "schemathesis")
    proc = subprocess.run(
        [cli, "run", f"{stack.base_url}/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "40", "--seed", "1"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
