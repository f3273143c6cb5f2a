"""The operations dashboard: one self-contained page plus the JSON it polls.

Routes (``dashboard_routes(get_state)``):

* ``GET /dashboard``: the page (inline CSS and JS, charts drawn on canvas by our own code,
  nothing fetched from elsewhere). It polls ``/dashboard/data`` every 2 s.
* ``GET /dashboard/data``: every series the page draws (see ``DashboardSampler.data``).
* ``GET /dashboard/blocks?entity=item&id=...&family=views``: one entity's blocks per feature.

What is measured, honestly:

* events/s per topic is the growth of each topic's Kafka log-end offsets per second, i.e.
  *records*/s (a record may carry a batch of events), plus impressions logged by this
  server (its own counter, in events/s);
* latency quantiles are estimated from the stage histogram's buckets (linear inside a
  bucket, as Prometheus' ``histogram_quantile``) over the last minute, or since start when
  the last minute saw no request;
* history is sampled when the data endpoint is called (at most once a second), so series
  grow while someone is watching; there is no background thread.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from features.aggregations import build_aggregation
from features.errors import TesseraError
from serving.errors import BadRequest, ServingError
from serving.tracking import CtrTracker, DriftTracker
from tessera.logs import get_logger

log = get_logger("serving.dashboard")

ENTITY_TYPES = ("item", "user", "author")
HISTORY = 300  # samples kept (10 minutes at the page's 2 s poll)
LATENCY_WINDOW_S = 60.0


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY
                                 | orjson.OPT_NON_STR_KEYS),
                    status_code=status, media_type="application/json")


def trackers(state: Any) -> tuple[CtrTracker, DriftTracker]:
    """Return the state's ``ctr`` and ``drift`` trackers, attaching new ones if missing."""
    if getattr(state, "ctr", None) is None:
        state.ctr = CtrTracker()
    if getattr(state, "drift", None) is None:
        state.drift = DriftTracker()
    return state.ctr, state.drift


def histogram_quantile(q: float, bounds: list[float], cumulative: list[float]) -> float | None:
    """Estimate quantile ``q`` from cumulative bucket counts (last bound is +inf)."""
    total = cumulative[-1] if cumulative else 0
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in zip(bounds, cumulative):
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def _histogram(metric) -> dict[str, tuple[list[float], list[float], float]]:
    """``{label: (bounds, cumulative counts, sum)}`` of a labelled prometheus histogram."""
    out: dict[str, tuple[list[float], list[float], float]] = {}
    for fam in metric.collect():
        for s in fam.samples:
            label = next((v for k, v in s.labels.items() if k != "le"), "")
            bounds, counts, total = out.setdefault(label, ([], [], 0.0))
            if s.name.endswith("_bucket"):
                bounds.append(float(s.labels["le"]))
                counts.append(float(s.value))
            elif s.name.endswith("_sum"):
                out[label] = (bounds, counts, float(s.value))
    return out


def _counter_total(metric) -> float:
    return sum(s.value for fam in metric.collect() for s in fam.samples
               if s.name.endswith("_total"))


class DashboardSampler:
    """Samples the serving state into bounded history and shapes the page's JSON.

    Args:
        get_state: returns the live ``ServingState``.
        consistency_path: JSON of the latest ``ConsistencyReport.to_dict()``; None means
            ``<registry_dir>/../consistency.json`` (``.tessera/consistency.json``).
        clock: wall clock in seconds (tests pass their own).
    """

    def __init__(self, get_state: Callable[[], Any], *, consistency_path: Path | None = None,
                 clock: Callable[[], float] = time.time):
        self.get_state = get_state
        self.consistency_path = consistency_path
        self.clock = clock
        self.history: deque[dict] = deque(maxlen=HISTORY)
        self.moved: dict[str, tuple[int, float, bool]] = {}  # family -> (wm, since, seen_move)
        self._lock = threading.Lock()
        self._consumer = None
        self._topics: list[tuple[str, int]] = []
        self._topics_at = 0.0
        self._kafka_error: str | None = None
        self._report_cache: tuple[float, Any] | None = None
        self._examples: dict[str, str] = {}

    # ------------------------------------------------------------------ sampling
    def sample(self) -> None:
        """Take one sample unless the last one is less than a second old."""
        with self._lock:
            now = self.clock()
            if self.history and now - self.history[-1]["t"] < 1.0:
                return
            st = self.get_state()
            marks = st.store.get_watermarks("blocks/")
            families: dict[str, list[int]] = {}
            for key, wm in marks.items():
                parts = key.split("/")
                if len(parts) >= 3:
                    families.setdefault(f"{parts[1]}/{parts[2]}", []).append(int(wm))
            fam_wm = {f: min(v) for f, v in families.items()}
            for fam, wm in fam_wm.items():
                prev = self.moved.get(fam)
                if prev is None:
                    self.moved[fam] = (wm, now, False)
                elif wm != prev[0]:
                    self.moved[fam] = (wm, now, True)
            self.history.append({
                "t": now,
                "offsets": self._offsets(st),
                "impressions": _counter_total(st.metrics.impressions),
                "stages": _histogram(st.metrics.stage_seconds),
                "watermarks": fam_wm,
                "shards": {f: len(v) for f, v in families.items()},
            })

    def _offsets(self, st: Any) -> dict[str, int]:
        """Sum of log-end offsets per topic (empty without Kafka)."""
        bootstrap = getattr(st.config, "bootstrap", None)
        if not bootstrap:
            return {}
        try:
            from confluent_kafka import Consumer, TopicPartition

            from tessera.topics import consumer_config

            if self._consumer is None:
                self._consumer = Consumer(consumer_config(bootstrap, fast=False))
            if self.clock() - self._topics_at > 30 or not self._topics:
                meta = self._consumer.list_topics(timeout=2)
                self._topics = sorted((name, len(m.partitions)) for name, m in meta.topics.items()
                                      if not name.startswith("__"))
                self._topics_at = self.clock()
            out = {}
            for name, n in self._topics:
                out[name] = sum(self._consumer.get_watermark_offsets(
                    TopicPartition(name, p), timeout=2, cached=False)[1] for p in range(n))
            self._kafka_error = None
            return out
        except Exception as exc:  # an unreachable broker must not break the page
            self._kafka_error = str(exc)[:200]
            return {}

    # ------------------------------------------------------------------ shaping
    def data(self) -> dict[str, Any]:
        """Sample, then return every series of the page as JSON-ready data."""
        self.sample()
        st = self.get_state()
        ctr, drift = trackers(st)
        hist = list(self.history)
        now = hist[-1]["t"]
        return {
            "now": int(now * 1000),
            "events": self._events(hist),
            "freshness": self._freshness(hist[-1], now, _budgets(st)),
            "staleness": self._staleness(now),
            "latency": self._latency(hist),
            "survival": self._survival(st),
            "ctr": {"series": ctr.series(), "unattributed": ctr.unattributed,
                    "impressions": ctr.impressions_total, "engagements": ctr.engagements_total},
            "consistency": self._consistency(st),
            "drift": drift.report(),
            "entities": self._entities(st),
            "examples": self._example_ids(st),
        }

    def _events(self, hist: list[dict]) -> dict[str, Any]:
        series: dict[str, list] = {}
        for a, b in zip(hist, hist[1:]):
            dt = b["t"] - a["t"]
            if dt <= 0:
                continue
            t = int(b["t"] * 1000)
            for topic, end in b["offsets"].items():
                if topic in a["offsets"]:
                    rate = max(0.0, (end - a["offsets"][topic]) / dt)
                    series.setdefault(f"{topic} (Kafka records/s)", []).append([t, rate])
            series.setdefault("impressions logged by this server (events/s)", []).append(
                [t, max(0.0, (b["impressions"] - a["impressions"]) / dt)])
        return {"series": series, "kafka_error": self._kafka_error}

    @staticmethod
    def _freshness(last: dict, now: float, budgets: dict[str, float]) -> list[dict]:
        return [{"family": fam, "lag_s": max(0.0, now - wm / 1000), "watermark": wm,
                 "shards": last["shards"][fam], "budget_s": budgets.get(fam)}
                for fam, wm in sorted(last["watermarks"].items()) if wm >= 0]

    def _staleness(self, now: float) -> list[dict]:
        return [{"family": fam, "seconds": max(0.0, now - since), "seen_move": seen}
                for fam, (_, since, seen) in sorted(self.moved.items())]

    @staticmethod
    def _latency(hist: list[dict]) -> dict[str, Any]:
        last = hist[-1]
        base = next((h for h in hist if last["t"] - h["t"] <= LATENCY_WINDOW_S), hist[0])
        stages = []
        windowed = True
        for stage, (bounds, counts, _) in last["stages"].items():
            old = base["stages"].get(stage)
            diff = [c - o for c, o in zip(counts, old[1])] if old and base is not last else counts
            if not diff or diff[-1] <= 0:
                diff, windowed = counts, False
            stages.append({"stage": stage, "count": int(diff[-1]) if diff else 0,
                           "p50_ms": _ms(histogram_quantile(0.5, bounds, diff)),
                           "p99_ms": _ms(histogram_quantile(0.99, bounds, diff))})
        order = ["sequence", "candidates", "hydrate", "l1", "l2", "rules", "log"]
        stages.sort(key=lambda s: (order.index(s["stage"]) if s["stage"] in order else 99,
                                   s["stage"]))
        return {"stages": stages,
                "window": f"last {LATENCY_WINDOW_S:g} s" if windowed and base is not last
                else "since start"}

    @staticmethod
    def _survival(st: Any) -> list[dict]:
        gauges = {s.labels["stage"]: s.value for fam in st.metrics.survival.collect()
                  for s in fam.samples}
        means = {}
        for stage, (_, counts, total) in _histogram(st.metrics.candidates).items():
            if counts and counts[-1]:
                means[stage] = total / counts[-1]
        if not gauges and not means:
            return []
        out = [{"stage": "retrieved", "share": 1.0, "mean_candidates": means.get("retrieved")}]
        for stage in ("l1", "page"):
            if stage in gauges:
                out.append({"stage": stage, "share": gauges[stage],
                            "mean_candidates": means.get(stage)})
        return out

    def _consistency(self, st: Any) -> dict[str, Any]:
        path = self.consistency_path or Path(st.config.registry_dir).parent / "consistency.json"
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return {"path": str(path), "report": None,
                    "message": f"no report yet: write `tessera consistency --json` to {path}"}
        if self._report_cache is None or self._report_cache[0] != mtime:
            try:
                self._report_cache = (mtime, orjson.loads(path.read_bytes()))
            except (OSError, orjson.JSONDecodeError) as exc:
                return {"path": str(path), "report": None,
                        "message": f"the report at {path} is not readable JSON: {exc}"}
        return {"path": str(path), "report": self._report_cache[1], "message": None}

    @staticmethod
    def _entities(st: Any) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for f in st.features.features:
            fams = out.setdefault(f.entity_type, [])
            if f.source not in fams:
                fams.append(f.source)
        return out

    def _example_ids(self, st: Any) -> dict[str, str]:
        if not self._examples:
            for etype, fams in self._entities(st).items():
                for fam in fams:
                    try:
                        first = next(iter(st.store.list_entity_ids(etype, fam)), None)
                    except (NotImplementedError, TesseraError):
                        first = None
                    if first is not None:
                        self._examples[etype] = first
                        break
        return self._examples


def _budgets(st: Any) -> dict[str, float]:
    """Tightest freshness budget (s) of each ``topic/entity_field`` family."""
    out: dict[str, float] = {}
    for f in st.features.features:
        fam = f"{f.source}/{f.entity}"
        out[fam] = min(out.get(fam, math.inf), f.freshness / 1000)
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def entity_blocks(st: Any, entity: str, entity_id: str, family: str | None) -> dict[str, Any]:
    """Return one entity's blocks per feature, with decoded values for fixed-width reps."""
    specs = [f for f in st.features.features if f.entity_type == entity
             and (family is None or f.source == family)]
    if not specs:
        fams = sorted({f.source for f in st.features.features if f.entity_type == entity})
        raise BadRequest(f"no features of entity {entity!r} in family {family!r}; "
                         f"families: {', '.join(fams) or 'none'}", field="family")
    by_key = {f.key: f for f in specs}
    out = []
    for fam in dict.fromkeys(f.source for f in specs):
        table = st.store.get_block_tables(entity, fam, [entity_id])[0]
        if table is None:
            continue
        rows: dict[str, list] = {}
        for key, start, size, rep in table.to_rows():
            spec = by_key.get(key)
            if spec is None:
                continue  # an older version of the feature, or another entity field
            agg = build_aggregation(spec)
            value = None
            if agg.rep_dtype is not None:
                v = agg.finalize(agg.from_bytes(rep))
                value = None if v is None or (isinstance(v, float) and not math.isfinite(v)) \
                    else float(v)
            rows.setdefault(key, []).append({"start": start, "size": size, "value": value,
                                             "bytes": len(rep)})
        for key, blocks in rows.items():
            spec = by_key[key]
            out.append({"name": spec.name, "key": key, "family": fam,
                        "aggregation": spec.aggregation, "streaming_block": spec.streaming_block,
                        "blocks": sorted(blocks, key=lambda b: (b["size"], b["start"]))})
    return {"entity": entity, "id": entity_id, "family": family, "features": out}


def dashboard_routes(get_state: Callable[[], Any], *,
                     consistency_path: Path | None = None) -> list[Route]:
    """Return the dashboard's routes; ``get_state`` returns the live ``ServingState``."""
    sampler = DashboardSampler(get_state, consistency_path=consistency_path)

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE_HTML, headers={"Cache-Control": "no-store"})

    async def data(request: Request) -> Response:
        try:
            get_state().authorize(request, "read")
            return _json(await run_in_threadpool(sampler.data))
        except ServingError as exc:
            return _json({"error": exc.message, "field": exc.field}, exc.status)

    async def blocks(request: Request) -> Response:
        st = get_state()
        try:
            st.authorize(request, "read")
            q = request.query_params
            entity = q.get("entity")
            if entity not in ENTITY_TYPES:
                raise BadRequest("entity must be item, user or author", field="entity")
            entity_id = q.get("id")
            if not entity_id:
                raise BadRequest("id is required: the entity id to look up", field="id")
            try:
                result = await run_in_threadpool(entity_blocks, st, entity, entity_id,
                                                 q.get("family") or None)
            except TesseraError as exc:
                raise BadRequest(str(exc), field="id") from exc
            return _json(result)
        except ServingError as exc:
            return _json({"error": exc.message, "field": exc.field}, exc.status)

    routes = [
        Route("/dashboard", page, methods=["GET"]),
        Route("/dashboard/data", data, methods=["GET"]),
        Route("/dashboard/blocks", blocks, methods=["GET"]),
    ]
    return routes


def install_dashboard(app: Any, get_state: Callable[[], Any], *,
                      consistency_path: Path | None = None) -> None:
    """Append the dashboard's routes to a Starlette ``app`` (before or after it started)."""
    app.router.routes.extend(dashboard_routes(get_state, consistency_path=consistency_path))


PAGE_HTML = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Tessera dashboard</title>
<style>
:root{--bg:#f4f5f7;--card:#fff;--ink:#1f2933;--mute:#6b7280;--line:#e5e7eb;--accent:#2563eb}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif}
header{display:flex;align-items:center;gap:16px;padding:14px 24px;background:#111827;color:#fff}
header h1{font-size:18px;margin:0;font-weight:600}
header .sub{color:#9ca3af;font-size:13px}
#status{margin-left:auto;font-size:13px;padding:3px 10px;border-radius:12px;background:#374151}
#status.live{background:#065f46}#status.err{background:#991b1b}
main{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:16px;padding:16px 24px}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:12px 14px}
.card.wide{grid-column:1/-1}
.card h2{font-size:15px;margin:0;font-weight:600}
.card .note{color:var(--mute);font-size:12px;margin:2px 0 8px}
canvas{display:block;width:100%;height:220px}
form{display:flex;gap:8px;align-items:center;flex-wrap:wrap;margin-bottom:8px}
input,select,button{font:inherit;padding:4px 8px;border:1px solid #cbd5e1;border-radius:5px;background:#fff}
button{background:var(--accent);color:#fff;border-color:var(--accent);cursor:pointer}
.browser{display:grid;grid-template-columns:minmax(0,2fr) minmax(0,3fr);gap:16px}
table{border-collapse:collapse;width:100%;font-size:12.5px}
td,th{padding:3px 6px;border-bottom:1px solid var(--line);text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.missing td{color:var(--mute)}
#browser-msg{color:var(--mute);font-size:12px}
</style></head>
<body>
<header><h1>Tessera</h1><span class="sub">serving dashboard &middot; polls every 2 s</span>
<span id="status">connecting&hellip;</span></header>
<main>
<section class="card"><h2>Events per second, by topic</h2>
<div class="note">Kafka: growth of each topic's log-end offsets (records/s; one record may batch many events). Impressions: logged by this server.</div>
<canvas id="chart-events"></canvas></section>
<section class="card"><h2>CTR over time, by model version</h2>
<div class="note" id="ctr-note">Clicked share of the impressions served in each 10 s bucket, by the L2 model that ranked them.</div>
<canvas id="chart-ctr"></canvas></section>
<section class="card"><h2>Feed latency per stage</h2>
<div class="note" id="latency-note">p50 and p99 estimated from the stage histogram buckets.</div>
<canvas id="chart-latency"></canvas></section>
<section class="card"><h2>Candidate survival per stage</h2>
<div class="note">Share of retrieved candidates left after each stage (last request); mean candidates in brackets.</div>
<canvas id="chart-survival"></canvas></section>
<section class="card"><h2>Freshness lag per feature family</h2>
<div class="note">Now minus the family's trusted watermark (lowest over its shards). Red: beyond the family's freshness budget.</div>
<canvas id="chart-freshness"></canvas></section>
<section class="card"><h2>Pipeline staleness</h2>
<div class="note">Seconds since each family's watermark last moved (&ge;: has not moved since the dashboard started watching).</div>
<canvas id="chart-staleness"></canvas></section>
<section class="card"><h2>Feature drift (PSI vs training)</h2>
<div class="note">Population stability index of served values against the training distribution, 10 quantile bins. 0.1: watch, 0.25: drifted.</div>
<canvas id="chart-drift"></canvas></section>
<section class="card"><h2>Online / offline consistency</h2>
<div class="note" id="consistency-note">Share of logged values equal to the offline recomputation, per feature.</div>
<canvas id="chart-consistency"></canvas></section>
<section class="card wide"><h2>Feature browser</h2>
<form id="browser-form">
<select id="b-entity"><option>item</option><option>user</option><option>author</option></select>
<input id="b-id" placeholder="entity id" size="24">
<select id="b-family"><option value="">all families</option></select>
<button type="submit">Look up</button><span id="browser-msg"></span></form>
<div class="browser"><div><table id="b-table"><tbody></tbody></table></div>
<div><div class="note" id="blocks-note">Count features: each block drawn over its span at its count per hour.</div>
<canvas id="chart-blocks" style="height:260px"></canvas></div></div></section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const HDR = params.get("key") ? {"X-API-Key": params.get("key")} : {};
const COLORS = ["#2563eb","#dc2626","#16a34a","#d97706","#7c3aed","#0891b2","#db2777","#65a30d","#475569"];
const GREEN = "#16a34a", AMBER = "#d97706", RED = "#dc2626", BLUE = "#2563eb", GREY = "#9ca3af";

function setup(cv) {
  const dpr = window.devicePixelRatio || 1, w = cv.clientWidth, h = cv.clientHeight;
  cv.width = Math.round(w * dpr); cv.height = Math.round(h * dpr);
  const c = cv.getContext("2d");
  c.setTransform(dpr, 0, 0, dpr, 0, 0); c.clearRect(0, 0, w, h);
  c.font = "12px system-ui, sans-serif"; c.textBaseline = "middle";
  return [c, w, h];
}
function mark(cv, n, c, w, h, msg) {
  cv.dataset.points = String(n);
  cv.dataset.rendered = n > 0 ? "true" : "empty";
  if (n === 0) {
    c.fillStyle = "#9ca3af"; c.textAlign = "center"; c.font = "13px system-ui, sans-serif";
    c.fillText(msg || "no data yet", w / 2, h / 2); c.textAlign = "left";
  }
}
function niceMax(v) {
  if (!(v > 0)) return 1;
  const e = Math.pow(10, Math.floor(Math.log10(v))), m = v / e;
  return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 2.5 ? 2.5 : m <= 5 ? 5 : 10) * e;
}
function fmt(v) {
  if (v === null || v === undefined || !isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (a >= 1e4) return (v / 1e3).toFixed(0) + "k";
  if (a >= 100) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1);
  if (a >= 1) return v.toFixed(2);
  if (a === 0) return "0";
  return v.toPrecision(2);
}
const pct = (v) => (v === null || v === undefined) ? "–" : (v * 100).toFixed(v < 0.1 ? 2 : 1) + "%";
function dur(s) {
  if (s === null || s === undefined) return "–";
  if (s < 120) return s.toFixed(s < 10 ? 1 : 0) + " s";
  if (s < 7200) return (s / 60).toFixed(1) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}
function clock(t, span) {
  const d = new Date(t), p = (x) => String(x).padStart(2, "0");
  const hm = p(d.getHours()) + ":" + p(d.getMinutes());
  if (span > 2 * 86400000) return p(d.getMonth() + 1) + "-" + p(d.getDate()) + " " + hm;
  return span > 600000 ? hm : hm + ":" + p(d.getSeconds());
}
function legend(c, names, x, y, w) {
  let cx = x;
  names.forEach((n, i) => {
    const tw = c.measureText(n).width + 26;
    if (cx + tw > x + w && cx > x) { cx = x; y += 16; }
    c.fillStyle = COLORS[i % COLORS.length]; c.fillRect(cx, y - 5, 10, 10);
    c.fillStyle = "#374151"; c.fillText(n, cx + 14, y); cx += tw;
  });
  return y;
}
/* series: {name: [[t, v], ...]}; v null breaks the line. */
function lineChart(cv, series, o) {
  o = o || {};
  const [c, w, h] = setup(cv), names = Object.keys(series);
  let n = 0, tmin = Infinity, tmax = -Infinity, vmax = 0;
  names.forEach((k) => series[k].forEach(([t, v]) => {
    if (v === null || v === undefined) return;
    n++; tmin = Math.min(tmin, t); tmax = Math.max(tmax, t); vmax = Math.max(vmax, v);
  }));
  if (n === 0) return mark(cv, 0, c, w, h, o.empty);
  names.forEach((k) => series[k].forEach((p) => { if (p.length > 2 && p[1] !== null) tmax = Math.max(tmax, p[2]); }));
  if (tmax === tmin) { tmin -= 5000; tmax += 5000; }
  const ly = legend(c, names, 8, 10, w - 16);
  const L = 56, R = 14, T = ly + 14, B = 22, pw = w - L - R, ph = h - T - B;
  const ymax = o.max || niceMax(vmax * 1.05), yf = o.fmt || fmt;
  const X = (t) => L + (t - tmin) / (tmax - tmin) * pw, Y = (v) => T + ph - v / ymax * ph;
  c.strokeStyle = "#eef0f3"; c.fillStyle = "#6b7280"; c.lineWidth = 1; c.textAlign = "right";
  for (let i = 0; i <= 4; i++) {
    const v = ymax * i / 4, y = Math.round(Y(v)) + 0.5;
    c.beginPath(); c.moveTo(L, y); c.lineTo(L + pw, y); c.stroke(); c.fillText(yf(v), L - 6, y);
  }
  c.textAlign = "center";
  let prev = "";
  for (let i = 0; i <= 4; i++) {
    const t = tmin + (tmax - tmin) * i / 4, s = clock(t, tmax - tmin);
    if (s !== prev) c.fillText(s, Math.min(Math.max(X(t), L + 24), L + pw - 24), T + ph + 13);
    prev = s;
  }
  c.textAlign = "left";
  names.forEach((k, i) => {
    const col = COLORS[i % COLORS.length]; c.strokeStyle = col; c.fillStyle = col;
    c.lineWidth = o.segments ? 4 : 2;
    let open = false, pts = 0; c.beginPath();
    series[k].forEach(([t, v, t1]) => {
      if (v === null || v === undefined) { open = false; return; }
      const x = X(t), y = Y(v);
      if (o.segments) { c.moveTo(x, y); c.lineTo(Math.max(x + 3, X(t1)), y); pts++; return; }
      if (open) c.lineTo(x, y); else c.moveTo(x, y);
      open = true; pts++;
    });
    c.stroke();
    if (!o.segments && (pts <= 30 || o.dots)) series[k].forEach(([t, v]) => {
      if (v === null || v === undefined) return;
      c.beginPath(); c.arc(X(t), Y(v), 2.5, 0, 2 * Math.PI); c.fill();
    });
  });
  mark(cv, n, c, w, h);
}
/* rows: [{label, values: [..], colors?: [..], text?}]; o.series names the values. */
function barChart(cv, rows, o) {
  o = o || {};
  rows = rows.filter((r) => r.values.some((v) => v !== null && v !== undefined));
  const per = (o.series || [""]).length, rowH = per > 1 ? 11 * per + 10 : 22;
  const top = per > 1 ? 24 : 6;
  cv.style.height = Math.max(120, top + rows.length * rowH + 24) + "px";
  const [c, w, h] = setup(cv);
  if (rows.length === 0) return mark(cv, 0, c, w, h, o.empty);
  if (per > 1) legend(c, o.series, 8, 10, w - 16);
  let vmax = 0;
  rows.forEach((r) => r.values.forEach((v) => { if (v > vmax) vmax = v; }));
  (o.lines || []).forEach((l) => { vmax = Math.max(vmax, l.v); });
  const labW = Math.min(220, Math.max(...rows.map((r) => c.measureText(r.label).width)) + 12);
  const yf0 = o.fmt || fmt;
  const R = 14 + Math.max(40, ...rows.map((r) => c.measureText(r.text || yf0(Math.max(...r.values.map((v) => v || 0)))).width));
  const L = labW, pw = w - L - R, max = o.max || niceMax(vmax * 1.02);
  const X = (v) => L + Math.max(0, v) / max * pw, yf = o.fmt || fmt;
  rows.forEach((r, i) => {
    const y0 = top + i * rowH;
    c.fillStyle = "#374151"; c.textAlign = "right";
    c.fillText(r.label, L - 8, y0 + rowH / 2 - 1); c.textAlign = "left";
    r.values.forEach((v, j) => {
      if (v === null || v === undefined) return;
      const bh = per > 1 ? 10 : 14, y = y0 + (per > 1 ? 4 + j * 11 : (rowH - bh) / 2);
      c.fillStyle = (r.colors && r.colors[j]) || COLORS[j % COLORS.length];
      c.fillRect(L, y, Math.max(1.5, X(v) - L), bh);
      c.fillStyle = "#374151";
      c.fillText(j === 0 && r.text ? r.text : yf(v), X(v) + 5, y + bh / 2);
    });
  });
  const bottom = top + rows.length * rowH;
  c.strokeStyle = "#d1d5db"; c.beginPath(); c.moveTo(L + 0.5, top - 2); c.lineTo(L + 0.5, bottom); c.stroke();
  c.fillStyle = "#6b7280"; c.textAlign = "center";
  for (let i = 0; i <= 4; i++) c.fillText(yf(max * i / 4), L + pw * i / 4, bottom + 12);
  (o.lines || []).forEach((l) => {
    const x = Math.round(X(l.v)) + 0.5; c.strokeStyle = l.color; c.setLineDash([4, 3]);
    c.beginPath(); c.moveTo(x, top - 2); c.lineTo(x, bottom); c.stroke(); c.setLineDash([]);
  });
  c.textAlign = "left";
  mark(cv, rows.reduce((a, r) => a + r.values.filter((v) => v !== null && v !== undefined).length, 0), c, w, h);
}

function render(d) {
  lineChart($("chart-events"), d.events.series, {
    empty: d.events.kafka_error ? "Kafka unreachable: " + d.events.kafka_error.slice(0, 60) : "collecting samples…"});
  const ctr = {};
  Object.entries(d.ctr.series).forEach(([v, pts]) => { ctr[v] = pts.map((p) => [p.t, p.ctr]); });
  lineChart($("chart-ctr"), ctr, {fmt: pct, dots: true, empty: "no impressions recorded yet"});
  $("ctr-note").textContent = "Clicked share of the impressions served in each 10 s bucket, by the L2 model that ranked them. "
    + d.ctr.impressions + " impressions, " + d.ctr.engagements + " engagements (" + d.ctr.unattributed + " not attributable).";
  barChart($("chart-latency"), d.latency.stages.map((s) => ({label: s.stage, values: [s.p50_ms, s.p99_ms]})),
    {series: ["p50 (ms)", "p99 (ms)"], fmt: (v) => fmt(v) + " ms", empty: "no feed requests yet"});
  $("latency-note").textContent = "p50 and p99 estimated from the stage histogram buckets, " + d.latency.window + ".";
  barChart($("chart-survival"), d.survival.map((s) => ({label: s.stage, values: [s.share],
    text: pct(s.share) + (s.mean_candidates ? " (" + fmt(s.mean_candidates) + ")" : "")})),
    {max: 1, fmt: pct, empty: "no feed requests yet"});
  barChart($("chart-freshness"), d.freshness.map((f) => ({label: f.family, values: [f.lag_s],
    colors: [f.budget_s && f.lag_s > f.budget_s ? RED : GREEN], text: dur(f.lag_s)})),
    {fmt: dur, empty: "no watermarks in the store yet"});
  barChart($("chart-staleness"), d.staleness.map((f) => ({label: f.family, values: [f.seconds],
    colors: [f.seen_move ? BLUE : GREY], text: (f.seen_move ? "" : "≥ ") + dur(f.seconds)})),
    {fmt: dur, empty: "no watermarks in the store yet"});
  const drift = d.drift.filter((r) => r.psi !== null);
  const waiting = d.drift.filter((r) => r.psi === null).length;
  barChart($("chart-drift"), drift.map((r) => ({label: r.name, values: [r.psi],
    colors: [r.psi >= 0.25 ? RED : r.psi >= 0.1 ? AMBER : GREEN]})),
    {lines: [{v: 0.1, color: AMBER}, {v: 0.25, color: RED}], fmt: (v) => v.toFixed(v < 1 ? 3 : 1),
     empty: d.drift.length ? waiting + " features waiting for a reference or served values" : "no served values observed yet"});
  const rep = d.consistency.report;
  if (rep && rep.rows > 0) {
    barChart($("chart-consistency"), rep.features.map((f) => ({label: f.name, values: [f.matched_share],
      colors: [(f.unexplained || 0) > 0 ? RED : f.matched_share >= 0.99 ? GREEN : AMBER]})), {max: 1, fmt: pct});
    $("consistency-note").textContent = "Share of logged values equal to the offline recomputation, per feature: "
      + rep.rows.toLocaleString() + " values of " + rep.sampled + " impressions compared, "
      + pct(rep.matched_share) + " matched, " + (rep.unexplained ?? "?") + " unexplained (not late data).";
  } else if (rep) {
    barChart($("chart-consistency"), [], {empty: "no logged values compared yet (" + rep.sampled + " impressions in the range)"});
  } else {
    barChart($("chart-consistency"), [], {empty: d.consistency.message || "no report yet"});
  }
  const fams = d.entities[$("b-entity").value] || [], sel = $("b-family");
  if (sel.dataset.entity !== $("b-entity").value) {
    sel.dataset.entity = $("b-entity").value;
    sel.innerHTML = '<option value="">all families</option>' + fams.map((f) => "<option>" + f + "</option>").join("");
  }
  if (!$("b-id").value && d.examples[$("b-entity").value] && !browserTried) {
    $("b-id").value = d.examples[$("b-entity").value]; lookup();
  }
}

let browserTried = false;
async function lookup(ev) {
  if (ev) ev.preventDefault();
  browserTried = true;
  const entity = $("b-entity").value, id = $("b-id").value.trim(), family = $("b-family").value;
  if (!id) return;
  $("browser-msg").textContent = "loading…";
  try {
    const q = "entity=" + encodeURIComponent(entity) + "&ids=" + encodeURIComponent(id);
    const [fr, br] = await Promise.all([
      fetch("/v1/features?" + q, {headers: HDR}),
      fetch("/dashboard/blocks?entity=" + encodeURIComponent(entity) + "&id=" + encodeURIComponent(id)
        + (family ? "&family=" + encodeURIComponent(family) : ""), {headers: HDR})]);
    const f = await fr.json(), b = await br.json();
    if (!fr.ok) throw new Error(f.error || fr.statusText);
    const row = f.rows[0], missing = new Set(row.missing);
    $("b-table").tBodies[0].innerHTML = "<tr><th>feature</th><th>value</th></tr>" +
      Object.entries(row.values).map(([k, v]) => "<tr class='" + (missing.has(k) ? "missing" : "") + "'><td>" + k
        + "</td><td class='num'>" + (Array.isArray(v) ? v.length + " entries" : fmt(v))
        + (missing.has(k) ? " (default)" : "") + "</td></tr>").join("");
    const series = {};
    let nblocks = 0;
    (b.features || []).forEach((feat) => {
      nblocks += feat.blocks.length;
      if (feat.aggregation !== "count") return;
      series[feat.name] = feat.blocks.filter((x) => x.value !== null)
        .map((x) => [x.start, x.value * 3600000 / x.size, x.start + x.size]);
    });
    lineChart($("chart-blocks"), series, {segments: true, empty: br.ok ? "no count blocks for this entity" : b.error});
    $("blocks-note").textContent = "Count features: each block drawn over its span at its count per hour ("
      + nblocks + " blocks of " + (b.features || []).length + " features; 5 m, 1 h and 1 d blocks).";
    $("browser-msg").textContent = entity + " " + id + ": " + f.rows.length + " row, watermark "
      + new Date(f.watermark).toLocaleString();
  } catch (e) {
    $("browser-msg").textContent = "lookup failed: " + e.message;
  }
}
$("browser-form").addEventListener("submit", lookup);
$("b-entity").addEventListener("change", () => { $("b-family").dataset.entity = ""; });
if (params.get("entity")) $("b-entity").value = params.get("entity");
if (params.get("id")) { $("b-id").value = params.get("id"); }

let last = null;
async function poll() {
  try {
    const r = await fetch("/dashboard/data", {headers: HDR, cache: "no-store"});
    const d = await r.json();
    if (!r.ok) throw new Error(d.error || r.statusText);
    last = d; render(d);
    if (!browserTried && $("b-id").value) lookup();
    $("status").className = "live";
    $("status").textContent = "live · " + new Date(d.now).toLocaleTimeString();
  } catch (e) {
    $("status").className = "err"; $("status").textContent = "error: " + e.message;
  }
}
poll(); setInterval(poll, 2000);
window.addEventListener("resize", () => { if (last) render(last); });
</script>
</body></html>
"""
