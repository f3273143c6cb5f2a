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
            "freshness": self._freshness(hist[-1], now),
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
    def _freshness(last: dict, now: float) -> list[dict]:
        return [{"family": fam, "lag_s": max(0.0, now - wm / 1000), "watermark": wm,
                 "shards": last["shards"][fam]}
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
