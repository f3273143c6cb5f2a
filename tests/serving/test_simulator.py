"""The closed-loop simulator: its accounting against a fake server (httpx.MockTransport, no
network), and a short run against the real serving stack whose views and engagements must
reach Kafka."""

from __future__ import annotations

import json
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from schemas.codec import decode, read_header
from schemas.columnar import columns_to_records, decode_message
from schemas.registry import BATCH_SCHEMA_ID
from tessera.sim import (
    SimReport,
    Simulator,
    SimulatorConfig,
    SimulatorConfigError,
    Stats,
    arm_of,
    item_index,
)
from tessera.sim.simulator import Outcome
from tessera.synth.world import ACTIONS, EngagementRates, WorldConfig
from tessera.topics import read_to_end

SMALL_WORLD = WorldConfig(seed=5, n_users=50, n_items=300, n_authors=20, n_topics=6,
                          total_views=100)


class ListSink:
    """Collects view records instead of producing them to Kafka."""

    def __init__(self):
        self.records: list[dict] = []

    def send(self, records):
        self.records.extend(records)

    def flush(self, timeout_s):
        return len(self.records)

    def close(self):
        pass


class FakeServer:
    """A feed server in memory: ``page`` items per request (``i<k>`` ids plus one unknown id),
    ``l2`` version ``popularity`` when asked for the baseline, else ``l2-v7``."""

    def __init__(self, *, page: int = 6, fail_users: frozenset[str] = frozenset(),
                 timeout_users: frozenset[str] = frozenset()):
        self.page = page
        self.fail_users = fail_users
        self.timeout_users = timeout_users
        self.feeds: list[dict] = []
        self.events: list[dict] = []
        self.attempts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._n = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if request.url.path == "/v1/events":
            with self._lock:
                self.events.extend(body)
            return httpx.Response(202, json={"accepted": len(body)})
        user = body["user_id"]
        with self._lock:
            self.attempts[user] = self.attempts.get(user, 0) + 1
        if user in self.timeout_users:
            raise httpx.ReadTimeout("too slow", request=request)
        if user in self.fail_users:
            return httpx.Response(503, json={"error": "at capacity", "field": None})
        ranker = request.headers.get("x-tessera-ranker")
        with self._lock:
            self._n += 1
            rid = f"r{self._n}"
        ids = [f"i{(self._n * 7 + k) % 300}" for k in range(self.page - 1)] + ["x-unknown"]
        items = [{"item_id": i, "author_id": "a1", "score": 1.0 - p / 10, "source": "trending",
                  "position": p, "impression_id": f"imp-{rid}-{p}"} for p, i in enumerate(ids)]
        version = "popularity" if ranker == "popularity" else "l2-v7"
        with self._lock:
            self.feeds.append({"user_id": user, "ranker": ranker, "request_id": rid,
                               "n": len(items), "version": version})
        return httpx.Response(200, json={"request_id": rid, "items": items,
                                         "model_versions": {"l1": "l1-v3", "l2": version},
                                         "feature_watermark": 0})


def _config(**kw) -> SimulatorConfig:
    base = dict(base_url="http://sim.test", world=SMALL_WORLD, users_per_tick=8, tick_s=0.001,
                seed=11, max_requests=40, concurrency=3, popularity_share=0.5)
    base.update(kw)
    return SimulatorConfig(**base)


def _run(server: FakeServer, **kw) -> tuple[SimReport, ListSink]:
    sink = ListSink()
    with Simulator(_config(**kw), transport=httpx.MockTransport(server), view_sink=sink) as sim:
        return sim.run(), sink


# ---------------------------------------------------------------- unit: accounting


def test_counts_match_what_was_served_and_posted():
    server = FakeServer()
    report, sink = _run(server)
    total = report.total
    assert total.requests == len(server.feeds) == 40 and total.errors == 0

    # impressions per arm and per version = sum of the page sizes served to it
    for arm in ("model", "baseline"):
        served = [f for f in server.feeds if arm_of(f["user_id"], 0.5) == arm]
        assert report.by_arm[arm].requests == len(served)
        assert report.by_arm[arm].impressions == sum(f["n"] for f in served)
    for version, stats in report.by_version.items():
        served = [f for f in server.feeds if f["version"] == version]
        assert stats.requests == len(served)
        assert stats.impressions == sum(f["n"] for f in served)
    assert set(report.by_version) == {"popularity", "l2-v7"}
    assert report.model_versions["l2-v7"] == {"l1": "l1-v3", "l2": "l2-v7"}

    # every counted action was posted once, to the impression it was served under
    posted = {a: sum(e["action"] == a for e in server.events) for a in ACTIONS}
    assert posted == total.actions and total.engagements_sent == len(server.events)
    assert len({e["event_id"] for e in server.events}) == len(server.events)
    assert all(e["impression_id"].startswith("imp-r") for e in server.events)
    assert not any(e["item_id"] == "x-unknown" for e in server.events)  # viewed, never engaged
    hidden = {e["impression_id"] for e in server.events if e["action"] == "hide"}
    assert not any(e["impression_id"] in hidden for e in server.events if e["action"] != "hide")

    # CTR = clicks / impressions, per group
    for stats in [*report.by_arm.values(), *report.by_version.values(), total]:
        if stats.impressions:
            assert stats.ctr == stats.actions["click"] / stats.impressions
    by_rid = {f["request_id"]: f for f in server.feeds}
    for version, stats in report.by_version.items():
        clicks = sum(e["action"] == "click" and
                     by_rid[e["impression_id"].split("-")[1]]["version"] == version
                     for e in server.events)
        assert stats.clicks == clicks

    # one view per impression, with the served position and request
    assert len(sink.records) == total.impressions == report.views_sent == report.views_delivered
    v = sink.records[0]
    assert v["request_id"] in by_rid and v["event_id"].startswith("sv-")
    assert v["dwell_ms"] >= 150 and v["surface"] in ("explore", "follow", "nearby")
    unknown = [r for r in sink.records if r["item_id"] == "x-unknown"]
    assert unknown and all(r["topic"] == "" for r in unknown)
    assert all(r["topic"].startswith("t") for r in sink.records if r["item_id"] != "x-unknown")


def test_baseline_users_ask_for_the_popularity_ranker():
    server = FakeServer()
    _run(server, popularity_share=0.3)
    for f in server.feeds:
        expect = "popularity" if zlib.crc32(f["user_id"].encode()) % 100 < 30 else None
        assert f["ranker"] == expect
    assert {f["ranker"] for f in server.feeds} == {"popularity", None}


@pytest.mark.parametrize(
    ("share", "user", "arm"),
    [
        (0.0, "u1", "model"),          # nobody in the baseline
        (1.0, "u1", "baseline"),       # everybody
        (0.5, "u3", arm_of("u3", 0.5)),
    ],
)
def test_arm_assignment_is_deterministic(share, user, arm):
    assert arm_of(user, share) == arm == arm_of(user, share)
    bucket = zlib.crc32(user.encode()) % 100
    assert arm_of(user, share) == ("baseline" if bucket < share * 100 else "model")


def test_arm_shares_follow_the_setting():
    users = [f"u{k}" for k in range(5000)]
    share = sum(arm_of(u, 0.2) == "baseline" for u in users) / len(users)
    assert 0.17 < share < 0.23


def test_same_seed_same_run():
    (a, views_a), (b, views_b) = (_run(FakeServer(), concurrency=1) for _ in range(2))
    assert a.total.impressions == b.total.impressions and a.total.actions == b.total.actions
    assert [(v["user_id"], v["dwell_ms"]) for v in views_a.records] == [
        (v["user_id"], v["dwell_ms"]) for v in views_b.records
    ]
    _, views_c = _run(FakeServer(), concurrency=1, seed=12)
    assert [v["user_id"] for v in views_c.records] != [v["user_id"] for v in views_a.records]


def test_errors_and_timeouts_are_counted_per_arm_and_not_per_version():
    probe = FakeServer()
    _run(probe, max_requests=20)
    users = sorted({f["user_id"] for f in probe.feeds})
    fail, slow = frozenset(users[:1]), frozenset(users[1:2])
    server = FakeServer(fail_users=fail, timeout_users=slow)
    report, _ = _run(server, max_requests=20)
    total = report.total
    failed = sum(server.attempts[u] for u in fail)
    timed_out = sum(server.attempts[u] for u in slow)
    assert total.requests == 20 and failed > 0 and timed_out > 0
    assert total.errors == failed + timed_out == total.requests - len(server.feeds)
    assert total.timeouts == timed_out
    assert total.impressions == sum(f["n"] for f in server.feeds)
    assert sum(s.requests for s in report.by_version.values()) == len(server.feeds)
    assert any("503" in e or "timeout" in e for e in report.error_samples)


def test_engagement_rates_follow_affinity_and_position():
    """With many impressions the click rate is the world's probability, on average."""
    world = WorldConfig(seed=5, n_users=50, n_items=300, n_authors=20, n_topics=6,
                        total_views=100, engagement=EngagementRates(click=0.3))
    server = FakeServer(page=20)
    report, sink = _run(server, world=world, max_requests=300, users_per_tick=50,
                        popularity_share=0.0, concurrency=1)
    from tessera.synth.world import World

    w = World(world)
    users = {u: k for k, u in enumerate(w.user_ids.tolist())}
    known = [r for r in sink.records if r["item_id"] != "x-unknown"]
    aff = w.affinity(np.array([users[r["user_id"]] for r in known]),
                     np.array([item_index(r["item_id"], 300) for r in known]))
    pos = np.array([r["position"] for r in known])
    p = w.engagement_probabilities(aff, pos)
    p_click = p[:, 0] * (1 - p[:, ACTIONS.index("hide")])  # a hide cancels the click
    expected = p_click.sum()
    clicks = report.total.clicks
    assert abs(clicks - expected) < 4 * np.sqrt(expected)


def test_item_index_maps_world_ids_only():
    assert item_index("i0", 10) == 0 and item_index("i9", 10) == 9
    assert item_index("i10", 10) is None and item_index("i01", 10) is None
    assert item_index("x1", 10) is None and item_index("i", 10) is None


def test_stats_with_nothing_served_have_no_rates():
    s = Stats()
    assert s.ctr is None and s.latency_ms(50) is None
    assert s.to_dict()["ctr"] is None


def test_report_table_and_dict():
    r = SimReport()
    r.add(Outcome("u1", "model", True, 12.0, version="v1", impressions=10,
                  actions={**dict.fromkeys(ACTIONS, 0), "click": 2}))
    r.add(Outcome("u2", "baseline", False, 50.0, error="feed 503: busy"))
    d = r.to_dict()
    assert d["by_arm"]["model"]["ctr"] == 0.2 and d["by_arm"]["baseline"]["errors"] == 1
    assert d["by_version"] == {"v1": d["by_arm"]["model"]}
    table = r.table()
    assert "arm=model" in table and "l2=v1" in table and "0.2000" in table
    json.dumps(d)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"base_url": "localhost:8000"},
         "SimulatorConfig.base_url must be an http(s) URL, got 'localhost:8000'; "
         "use e.g. http://127.0.0.1:8000"),
        ({"popularity_share": 1.5},
         "SimulatorConfig.popularity_share must be a number in [0, 1], got 1.5; "
         "0.5 sends half of the users to the popularity baseline"),
        ({"users_per_tick": 0}, "SimulatorConfig.users_per_tick must be an integer >= 1, got 0"),
        ({"tick_s": 0}, "SimulatorConfig.tick_s must be a finite number > 0, got 0"),
        ({"max_requests": 0},
         "SimulatorConfig.max_requests must be None or an integer >= 1, got 0"),
    ],
)
def test_config_errors_name_the_parameter(kw, message):
    with pytest.raises(SimulatorConfigError) as exc:
        _config(**kw)
    assert str(exc.value) == message


def test_stop_event_and_progress():
    stop = threading.Event()
    ticks = []

    def progress(t):
        ticks.append(t)
        if len(ticks) == 3:
            stop.set()

    sink = ListSink()
    with Simulator(_config(max_requests=None), transport=httpx.MockTransport(FakeServer()),
                   view_sink=sink) as sim:
        report = sim.run(stop_event=stop, progress=progress)
    assert len(ticks) == report.ticks == 3
    assert sum(t.requests for t in ticks) == report.total.requests == 24
    assert sum(t.impressions for t in ticks) == report.total.impressions


# ---------------------------------------------------------------- integration: real stack


class RecordingTransport(httpx.HTTPTransport):
    """The real network transport, keeping every feed response and its ranker header."""

    def __init__(self):
        super().__init__()
        self.feeds: list[tuple[str | None, dict]] = []
        self._lock = threading.Lock()

    def handle_request(self, request):
        response = super().handle_request(request)
        if request.url.path == "/v1/feed" and response.status_code == 200:
            response.read()
            with self._lock:
                self.feeds.append((request.headers.get("x-tessera-ranker"),
                                   json.loads(request.content) | response.json()))
        return response


def _sim_events(bootstrap: str, topic: str, prefix: str) -> list[dict]:
    out = []
    for m in read_to_end(bootstrap, topic):
        value = m.value()
        if topic == "engagements" and read_header(value) != BATCH_SCHEMA_ID:
            out.append(decode(value)[1])  # single events, as /v1/events produces them
        else:
            out.extend(columns_to_records(decode_message(value, topic)))
    return [r for r in out if r["event_id"].startswith(prefix)]


@pytest.mark.integration
def test_closed_loop_against_the_real_stack(stack):
    transport = RecordingTransport()
    config = SimulatorConfig(base_url=stack.base_url, bootstrap=stack.bootstrap,
                             world=stack.world, users_per_tick=10, tick_s=0.01, limit=12,
                             popularity_share=0.5, seed=4, max_requests=30, concurrency=3,
                             request_timeout_s=30)
    with Simulator(config, transport=transport) as sim:
        report = sim.run()
    total = report.total
    assert total.requests == 30 and total.errors == 0, report.error_samples
    assert len(transport.feeds) == 30
    assert total.impressions == sum(len(f["items"]) for _, f in transport.feeds) > 0
    for ranker, f in transport.feeds:
        assert ranker == ("popularity" if arm_of(f["user_id"], 0.5) == "baseline" else None)
    assert report.by_arm["model"].requests and report.by_arm["baseline"].requests
    for version, stats in report.by_version.items():
        served = [f for _, f in transport.feeds
                  if f["model_versions"].get("l2", "unknown") == version]
        assert stats.requests == len(served)
        assert stats.impressions == sum(len(f["items"]) for f in served)
        assert stats.ctr == (stats.clicks / stats.impressions if stats.impressions else None)
    assert report.by_version["popularity"].requests >= report.by_arm["baseline"].requests

    # views: batch envelopes on the views topic, one per impression
    assert report.views_delivered == report.views_sent == total.impressions
    views = _sim_events(stack.bootstrap, "views", "sv-")
    assert len(views) == total.impressions
    served = {(f["request_id"], it["item_id"], it["position"])
              for _, f in transport.feeds for it in f["items"]}
    assert {(v["request_id"], v["item_id"], v["position"]) for v in views} == served

    # engagements: through /v1/events, single Avro events on the engagements topic
    assert total.engagement_errors == 0 and total.engagements_sent == sum(total.actions.values())
    assert total.engagements_sent > 0
    impressions = {it["impression_id"] for _, f in transport.feeds for it in f["items"]}
    deadline = time.monotonic() + 20
    engaged: list[dict] = []
    while time.monotonic() < deadline:
        engaged = _sim_events(stack.bootstrap, "engagements", "se-")
        if len(engaged) >= total.engagements_sent:
            break
        time.sleep(0.3)
    assert len(engaged) == total.engagements_sent
    assert {e["impression_id"] for e in engaged} <= impressions
    assert {a: sum(e["action"] == a for e in engaged) for a in ACTIONS} == total.actions


@pytest.mark.integration
def test_cli_against_the_real_stack(stack):
    from tessera.cli import cli

    w = stack.world
    result = CliRunner().invoke(cli, [
        "simulate", "--url", stack.base_url, "--bootstrap", stack.bootstrap,
        "--seed", str(w.seed), "--users", str(w.n_users), "--items", str(w.n_items),
        "--authors", str(w.n_authors), "--topics", str(w.n_topics),
        "--world-start", str(w.start_ts), "--world-days", "1",
        "--rate", "50", "--max-requests", "6", "--popularity-share", "1", "--json",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["total"]["requests"] == 6 and report["total"]["errors"] == 0
    assert set(report["by_arm"]) == {"baseline"}
    assert report["by_version"]["popularity"]["impressions"] == report["total"]["impressions"]
