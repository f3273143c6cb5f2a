"""The HTTP layer's error contract: a 4xx names the field, a bug is a JSON 500, both counted."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from serving.app import create_app
from serving.config import ServingConfig
from tessera.broker import find_free_port


@pytest.fixture
def client(stack, tmp_path):
    config = ServingConfig(port=find_free_port(), store_url=stack.store_url, bootstrap=None,
                           spool_dir=tmp_path / "spool", registry_dir=tmp_path / "registry")
    with TestClient(create_app(config), raise_server_exceptions=False) as c:
        yield c


def _count(client, route: str, status: str) -> float:
    text = client.get("/metrics").text
    for line in text.splitlines():
        if line.startswith("tessera_requests_total{") and f'route="{route}"' in line \
                and f'status="{status}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_bad_requests_name_the_field_and_are_counted(client):
    r = client.post("/v1/feed", content=b"{not json")
    assert r.status_code == 422 and r.json()["field"] == "body"
    r = client.post("/v1/feed", json={"user_id": "u1"}, headers={"X-Tessera-Ranker": "magic"})
    assert r.status_code == 422 and r.json()["field"] == "X-Tessera-Ranker"
    r = client.get("/v1/features", params={"entity": "planet", "ids": "x"})
    assert r.status_code == 422 and r.json()["field"] == "entity"
    r = client.post("/v1/events", json=[])
    assert r.status_code >= 400 and r.json()["error"]
    assert _count(client, "feed", "422") == 2


def test_a_bug_is_a_json_500_counted_not_a_dropped_connection(client, monkeypatch):
    st = client.app.state.serving

    def broken(*_a, **_k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(st.pipeline, "feed", broken)
    r = client.post("/v1/feed", json={"user_id": "u1"})
    assert r.status_code == 500
    assert r.json() == {"error": "internal error; see the server log", "field": None}
    assert _count(client, "feed", "500") == 1
    assert st.in_flight == 0  # the slot is given back


def test_trackers_are_the_pipelines_own(client):
    st = client.app.state.serving
    assert st.pipeline.ctr is st.ctr and st.pipeline.drift is st.drift
