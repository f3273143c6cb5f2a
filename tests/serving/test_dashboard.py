"""The dashboard: CTR and drift trackers, bucket quantiles, and the page in a real browser.

The browser test loads ``/dashboard`` from a running server in headless Chromium (Debian's
``chromium`` package, installed by ``.ci/run``), reads the DOM after the page's scripts ran,
and checks every key chart was drawn from live data; it saves a screenshot.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from features.consistency import ConsistencyReport, FeatureConsistency
from serving.dashboard import histogram_quantile, trackers
from serving.tracking import BUCKET_MS, CtrTracker, DriftTracker, psi, version_label

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACT = Path(__file__).resolve().parents[2] / ".tessera-artifacts" / "dashboard.png"


# ---------------------------------------------------------------------------- CTR tracker

def test_ctr_credits_clicks_to_the_bucket_and_version_that_served():
    ctr = CtrTracker()
    t0 = 1_700_000_000_000 - 1_700_000_000_000 % BUCKET_MS
    ctr.record_impressions("v1", ["a", "b", "c", "d"], t0 + 1)
    ctr.record_impressions("v2", ["e", "f"], t0 + BUCKET_MS + 5)
    assert ctr.record_engagement("a", "click", t0 + 50_000)
    assert ctr.record_engagement("a", "click")          # a second click counts once
    assert ctr.record_engagement("b", "like")           # engagement, not a click
    assert ctr.record_engagement("e", "click")
    assert not ctr.record_engagement("zzz", "click")    # never served here
    s = ctr.series()
    assert s["v1"] == [{"t": t0, "impressions": 4, "clicks": 1, "engagements": 3, "ctr": 0.25}]
    assert s["v2"][0]["t"] == t0 + BUCKET_MS and s["v2"][0]["ctr"] == 0.5
    assert ctr.unattributed == 1 and ctr.impressions_total == 6


def test_ctr_memory_is_bounded():
    ctr = CtrTracker(max_impressions=3, max_buckets=2)
    for i in range(5):
        ctr.record_impressions("v", [f"i{i}"], i * BUCKET_MS)
    assert len(ctr._imps) == 3
    assert [p["t"] for p in ctr.series()["v"]] == [3 * BUCKET_MS, 4 * BUCKET_MS]
    assert not ctr.record_engagement("i0", "click")     # evicted from the LRU
    assert not ctr.record_engagement("i2", "click")     # its bucket was dropped
    assert ctr.record_engagement("i4", "click")


def test_version_label():
    assert version_label({"l1": "a", "l2": "b"}) == "b"
    assert version_label({"retrieval": "r"}) == "retrieval=r"


# ---------------------------------------------------------------------------- drift tracker

def test_psi_of_identical_distributions_is_about_zero():
    rng = np.random.default_rng(0)
    drift = DriftTracker(window=50_000)
    drift.set_reference("x", rng.normal(size=50_000))
    drift.observe("x", rng.normal(size=50_000))
    (row,) = drift.report()
    assert row["status"] == "ok" and row["psi"] < 0.01


def test_psi_of_shifted_distribution_is_large():
    rng = np.random.default_rng(1)
    drift = DriftTracker()
    drift.set_reference("x", rng.normal(size=20_000))
    drift.observe("x", rng.normal(loc=1.0, size=20_000))
    assert drift.report()[0]["psi"] > 0.2


def test_drift_window_rolls_and_reports_missing_parts():
    drift = DriftTracker(window=100, min_served=10)
    drift.set_reference("x", np.arange(1000.0))
    drift.observe("x", np.full(500, 2000.0))            # far outside: all in the top bin
    drift.observe("x", np.arange(0.0, 1000.0, 10.0))    # 100 values replace them all
    assert sorted(drift.served("x")) == list(np.arange(0.0, 1000.0, 10.0))
    assert drift.report()[0]["psi"] < 0.01
    drift.observe("y", [1.0, np.nan])
    drift.set_reference("z", [1.0, 2.0])
    status = {r["name"]: r["status"] for r in drift.report()}
    assert status == {"x": "ok", "y": "no_reference", "z": "too_few_served"}
    with pytest.raises(ValueError, match="no finite values"):
        drift.set_reference("w", [np.nan])


def test_psi_by_hand():
    e = np.array([0.5, 0.5])
    a = np.array([0.25, 0.75])
    assert psi(e, a) == pytest.approx(0.25 * np.log(0.5) * -1 + 0.25 * np.log(1.5))


# ---------------------------------------------------------------------------- quantiles

def test_histogram_quantile_interpolates_inside_a_bucket():
    bounds = [0.001, 0.01, 0.1, float("inf")]
    # 10 below 1 ms, 80 in (1, 10] ms, 10 in (10, 100] ms
    cum = [10.0, 90.0, 100.0, 100.0]
    assert histogram_quantile(0.5, bounds, cum) == pytest.approx(0.001 + 0.009 * 40 / 80)
    assert histogram_quantile(0.99, bounds, cum) == pytest.approx(0.01 + 0.09 * 9 / 10)
    assert histogram_quantile(0.5, bounds, [0.0] * 4) is None
    assert histogram_quantile(0.99, [0.1, float("inf")], [1.0, 10.0]) == 0.1


# ---------------------------------------------------------------------------- browser

def _chromium(url: str, *args: str, profile: Path) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--user-data-dir={profile}", "--virtual-time-budget=6000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _canvases(dom: str) -> dict[str, dict[str, str]]:
    out = {}
    for tag in re.findall(r"<canvas\b[^>]*>", dom):
        attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', tag))
        if "id" in attrs:
            out[attrs["id"]] = attrs
    return out


@pytest.mark.integration
@pytest.mark.skipif(not CHROMIUM.exists(),
                    reason="needs Debian's chromium at /usr/bin/chromium "
                           "(apt-get install -y chromium; .ci/run installs it)")
def test_dashboard_renders_live_data_in_a_browser(stack, tmp_path):
    app = stack.server.config.app  # serving installs the dashboard routes itself
    st = app.state.serving
    ctr, drift = trackers(st)
    base = stack.base_url

    # Live traffic: feed pages and a click.
    pages = []
    for user in ("u1", "u2", "u3", "u4"):
        r = httpx.post(f"{base}/v1/feed", json={"user_id": f"t-{user}", "limit": 20}, timeout=30)
        assert r.status_code == 200, r.text
        pages.append(r.json())
    if ctr.impressions_total == 0:  # serving does not call the hook yet: do it as it would
        for p in pages:
            ctr.record_impressions(version_label(p["model_versions"]),
                                   [i["impression_id"] for i in p["items"]],
                                   int(time.time() * 1000))
    first = pages[0]["items"][0]
    ev = {"impression_id": first["impression_id"], "user_id": "t-u1",
          "item_id": first["item_id"], "action": "click"}
    assert httpx.post(f"{base}/v1/events", json=ev, timeout=10).status_code == 202
    if ctr.engagements_total == 0:
        ctr.record_engagement(ev["impression_id"], "click", int(time.time() * 1000))

    # Drift: the reference is the whole item population (what training saw), the served
    # values are the hydrated features of the items the pages showed.
    names = [n for n in st.client.names_for("item") if not n.endswith("_last")][:8]
    all_items = list(st.store.list_entity_ids("item", "views"))
    ref = st.client.get_features("item", all_items, names)
    served = st.client.get_features("item", [i["item_id"] for p in pages for i in p["items"]],
                                    names)
    for j, n in enumerate(names):  # serving observes served values; references come from us
        drift.set_reference(n, ref.values[:, j])
        drift.observe(n, served.values[:, j])

    # A consistency report where the serving endpoint looks for one by default.
    report = ConsistencyReport(from_ts=0, to_ts=1, impressions=80, sampled=80, seed=0,
                               late_events=0, features=(
        FeatureConsistency("item_views_1d", 80, 80, {}),
        FeatureConsistency("item_clicks_1d", 80, 77, {"late": 3})))
    (Path(st.config.registry_dir).parent / "consistency.json").write_text(report.to_json())

    # A few samples a second apart, with traffic between them, so rates have points.
    for user in ("u5", "u6", "u7"):
        httpx.get(f"{base}/dashboard/data", timeout=10).raise_for_status()
        httpx.post(f"{base}/v1/feed", json={"user_id": f"t-{user}"}, timeout=30)
        time.sleep(1.05)
    data = httpx.get(f"{base}/dashboard/data", timeout=10).json()
    assert any(len(v) >= 2 for v in data["events"]["series"].values())
    assert data["freshness"] and all(f["lag_s"] >= 0 for f in data["freshness"])
    assert {s["stage"] for s in data["latency"]["stages"]} >= {"hydrate", "l1", "l2"}
    assert all(s["p99_ms"] >= s["p50_ms"] > 0 for s in data["latency"]["stages"])
    assert [s["stage"] for s in data["survival"]] == ["retrieved", "l1", "page"]
    assert sum(b["clicks"] for s in data["ctr"]["series"].values() for b in s) >= 1
    assert data["consistency"]["report"]["features"][1]["matched"] == 77
    assert any(r["psi"] is not None for r in data["drift"])

    item = data["examples"]["item"]
    blocks = httpx.get(f"{base}/dashboard/blocks",
                       params={"entity": "item", "id": item, "family": "views"}, timeout=10)
    assert blocks.status_code == 200, blocks.text
    views = next(f for f in blocks.json()["features"] if f["name"] == "item_views")
    # (old 5m blocks may already be gone by retention: any size counts)
    assert views["blocks"] and sum(b["value"] for b in views["blocks"]) >= 1
    bad = httpx.get(f"{base}/dashboard/blocks", params={"entity": "planet", "id": "x"})
    assert bad.status_code == 422 and bad.json()["field"] == "entity"

    # The page in a browser: charts drawn from the live data.
    url = f"{base}/dashboard?entity=item&id={item}"
    res = _chromium(url, "--dump-dom", profile=tmp_path / "profile-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    canvases = _canvases(res.stdout)
    for chart in ("events", "ctr", "latency", "survival", "freshness", "staleness", "drift",
                  "consistency", "blocks"):
        c = canvases.get(f"chart-{chart}")
        assert c is not None, f"no canvas chart-{chart} in the page"
        assert c.get("data-rendered") == "true", f"chart-{chart} not drawn: {c}"
        assert int(c.get("data-points", "0")) > 0, f"chart-{chart} has no points: {c}"
    assert 'class="live"' in res.stdout

    shot = tmp_path / "dashboard.png"
    res = _chromium(url, f"--screenshot={shot}", "--window-size=1400,1800",
                    profile=tmp_path / "profile-shot")
    assert res.returncode == 0 and shot.exists() and shot.stat().st_size > 10_000, res.stderr[-2000:]
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, ARTIFACT)
