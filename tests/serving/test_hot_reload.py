"""Hot reload: new L2 versions published while requests run are swapped in without a single
failed request; a broken version is refused and the previous one keeps serving."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the train extra (torch) builds the test models")

from models.features import CategoricalField, DenseFeature, FeatureSchema  # noqa: E402
from models.onnx_export import export_onnx  # noqa: E402
from models.publish import publish_model  # noqa: E402
from models.rankers import L2Ranker  # noqa: E402
from models.registry import ModelRegistry  # noqa: E402
from serving.config import ServingConfig  # noqa: E402
from tessera.broker import find_free_port  # noqa: E402
from tests.serving.conftest import start_server  # noqa: E402

pytestmark = pytest.mark.integration
DENSE = ("item_views_1d", "item_ctr_1d", "user_views_1d", "author_views_7d")
TASKS = ("click", "like")


def _publish_l2(registry: ModelRegistry, tmp, seed: int) -> str:
    torch.manual_seed(seed)
    schema = FeatureSchema(
        dense=tuple(DenseFeature(n, log1p=True) for n in DENSE),
        categorical=(CategoricalField("item_id", 1000), CategoricalField("author_id", 100)),
        sequence="user_recent_items_1d", sequence_length=5, sequence_buckets=1000)
    model = L2Ranker(n_dense=len(DENSE), id_buckets=[1000, 100], seq_buckets=1000, tasks=TASKS,
                     item_field=0)
    model.eval()
    rng = np.random.default_rng(seed)
    inputs = {"dense": rng.normal(size=(16, len(DENSE))).astype(np.float32),
              "ids": rng.integers(0, 100, size=(16, 2)).astype(np.int64),
              "seq": rng.integers(0, 1000, size=(16, 5)).astype(np.int64)}
    path = tmp / f"l2-{seed}.onnx"
    export_onnx(model, inputs, path, ["dense", "ids", "seq"], ["probs"])
    info = publish_model(registry, "l2", {"l2": path}, schema, {"auc_click": 0.5},
                         {"train": {"from": 0, "to": 1}},
                         extra_manifest={"tasks": list(TASKS),
                                         "task_weights": {"click": 1.0, "like": 2.0}})
    return info.version


def test_reload_under_concurrent_requests_and_broken_version_refused(stack, tmp_path):
    registry = ModelRegistry(tmp_path / "registry")
    first = _publish_l2(registry, tmp_path, 1)
    port = find_free_port()
    server = start_server(ServingConfig(port=port, store_url=stack.store_url,
                                        bootstrap=stack.bootstrap, spool_dir=tmp_path / "spool",
                                        registry_dir=tmp_path / "registry"))
    url = f"http://127.0.0.1:{port}/v1/feed"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            v = httpx.post(url, json={"user_id": "u1"}, timeout=30).json()["model_versions"]
            if v["l2"] == first:
                break
            time.sleep(0.3)
        assert v["l2"] == first

        stop = threading.Event()
        codes: list[int] = []
        seen: set[str] = set()

        def hammer() -> None:
            with httpx.Client(timeout=30) as client:
                while not stop.is_set():
                    r = client.post(url, json={"user_id": "u2", "limit": 10})
                    codes.append(r.status_code)
                    if r.status_code == 200:
                        seen.add(r.json()["model_versions"]["l2"])

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        published = [first]
        for seed in (2, 3, 4):
            published.append(_publish_l2(registry, tmp_path, seed))
            time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert codes and set(codes) == {200}, sorted(set(codes))
        assert published[-1] in seen and len(seen & set(published)) >= 2

        # a broken version: its ONNX file is garbage (the hash check passes: it is what was
        # published); loading it fails, so it is refused and the last good one keeps serving
        bad = registry.publish("l2", {"l2.onnx": b"not an onnx model"},
                               {"feature_schema": FeatureSchema().to_dict(), "tasks": ["click"]})
        time.sleep(3)
        r = httpx.post(url, json={"user_id": "u3"}, timeout=30)
        assert r.status_code == 200
        assert r.json()["model_versions"]["l2"] == published[-1] != bad.version
    finally:
        server.should_exit = True
        time.sleep(0.3)
