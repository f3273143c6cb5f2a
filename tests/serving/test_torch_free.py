"""Serving installs and runs without torch: a server in a process where importing torch
fails loads a published ONNX L2 model and serves feeds with it."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("torch", reason="the train extra (torch) builds the test model")

from models.registry import ModelRegistry
from tessera.broker import find_free_port
from tests.serving.test_hot_reload import _publish_l2

pytestmark = pytest.mark.integration

NO_TORCH = """
import sys

class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed in this process (test)")

sys.meta_path.insert(0, _NoTorch())
from tessera.cli import main
sys.argv = ["tessera", *sys.argv[1:]]
main()
"""


def test_serving_loads_and_serves_learned_models_without_torch(stack, tmp_path):
    registry = ModelRegistry(tmp_path / "registry")
    version = _publish_l2(registry, tmp_path, 3)
    port = find_free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-c", NO_TORCH, "serve", "--port", str(port), "--store", stack.store_url,
         "--registry", str(tmp_path / "registry"), "--bootstrap", stack.bootstrap,
         "--spool", str(tmp_path / "spool")],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"{url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                pass
            if ready:
                break
            time.sleep(0.3)
        assert ready, (tmp_path / "serve.log").read_text()[-3000:]
        r = httpx.post(f"{url}/v1/feed", json={"user_id": "t-u1", "limit": 10}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_versions"]["l2"] == version
        assert body["items"]
        assert "torch" not in (tmp_path / "serve.log").read_text().lower()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
