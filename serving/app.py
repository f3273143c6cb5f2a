"""The HTTP layer: a Starlette app over ``FeedPipeline`` (JSON via orjson, OpenAPI schema).

Why Starlette + uvicorn: the ASGI layer costs a few microseconds per request (no per-request
validation framework, no dependency injection); the work is numpy, LMDB and ONNX Runtime in a
thread pool, so the event loop only parses, sheds load and serializes. Load shedding is an
in-flight counter checked before any work: beyond ``max_in_flight`` a request gets 503 with
``Retry-After`` at once instead of queueing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from features.cache import FeatureCache
from features.client import FeatureClient, HistoricalReadError, UnknownFeatureError
from features.errors import TesseraError
from features.snapshot_process import SnapshotBuilder
from features.spec_loader import load_features
from features.store import open_store
from serving.catalog import CatalogFollower, ItemCatalog, refresh_lists
from serving.catalog_builder import CatalogBuilder
from serving.config import ServingConfig
from serving.errors import BadRequest, Overloaded, PayloadTooLarge, ServingError, Unauthorized
from serving.forward_log import EngagementForwarder, ImpressionLogger
from serving.gcpause import GcFreezer, GcPauses
from serving.metrics import ServingMetrics
from serving.openapi import OPENAPI
from serving.pipeline import FeedPipeline, FeedResult
from serving.requests import FeedRequest, parse_engagements, parse_feed
from tessera.logs import get_logger

log = get_logger("serving.app")
_ROLE_RANK = {"read": 0, "write": 1, "admin": 2}
#: the first catalog build waits at most this long for this process's reader of ``items``
CATALOG_CATCH_UP_S = 60.0


def json_response(data: Any, status: int = 200, headers: dict | None = None) -> Response:
    """Serialize with orjson (numpy-aware)."""
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json", headers=headers)


def error_response(exc: ServingError, headers: dict | None = None) -> Response:
    return json_response({"error": exc.message, "field": exc.field}, exc.status, headers)


class ServingState:
    """Process-wide state: store, clients, catalog, logger, background threads."""

    def __init__(self, config: ServingConfig):
        self.config = config
        self.metrics = ServingMetrics()
        self.gc_pauses = GcPauses(self.metrics.gc_pause).install()
        # how long a thread may hold the interpreter while others wait (process-wide)
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(config.gil_switch_ms / 1000)
        self.gc_freezer = GcFreezer()
        self.features = load_features(config.features_path)
        self.store = open_store(config.store_url, readonly=True)
        self.client = FeatureClient(self.store, self.features, cache=FeatureCache(),
                                    watermark_ttl_ms=config.watermark_ttl_ms)
        self.catalog = ItemCatalog()
        self.logger = ImpressionLogger(config.bootstrap, config.spool_dir, metrics=self.metrics)
        from serving.tracking import CtrTracker, DriftTracker

        self.ctr = CtrTracker()
        self.drift = DriftTracker()
        self.snapshots = None
        # one child process for the background reads: feature snapshots, catalog lists
        self.background = SnapshotBuilder(config.store_url, config.features_path) \
            if config.feature_snapshot or config.bootstrap else None
        if config.feature_snapshot:
            from serving.snapshots import SnapshotKeeper

            self.snapshots = SnapshotKeeper(
                self.client, self.catalog, self._snapshot_names,
                interval_s=config.snapshot_interval_s, builder=self.background)
        # with Kafka, the lists are built in the child (it follows ``items`` itself)
        self.catalog_builder = CatalogBuilder(self.background, config.bootstrap) \
            if config.bootstrap and self.background is not None else None
        self._catalog_built = threading.Event()
        self.pipeline = FeedPipeline(config, self.client, self.catalog, self.logger, self.metrics,
                                     ctr=self.ctr, drift=self.drift, snapshots=self.snapshots)
        self.follower = CatalogFollower(config.bootstrap, self.catalog).start() \
            if config.bootstrap else None
        # engagements posted to /v1/events: spooled like impressions when Kafka is away
        self.engagements = EngagementForwarder(
            config.bootstrap, config.spool_dir / "engagements", metrics=self.metrics) \
            if config.bootstrap else None
        self.in_flight = 0
        self._feed_limiter: anyio.CapacityLimiter | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.watcher = None
        self._refresher = threading.Thread(target=self._refresh_loop, name="catalog-refresh",
                                           daemon=True)
        if self.catalog_builder is None:
            self.refresh_catalog()  # in this process: small catalogs, tests
        self._refresher.start()
        self._start_model_watch()
        if self.snapshots is not None:
            self.snapshots.start()
        self.gc_freezer.refreeze(full=True)  # the state just loaded: out of full collections

    # ------------------------------------------------------------------ background
    def _snapshot_names(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Item and author features the loaded models read (the bundle swaps on reload)."""
        models = self.pipeline.models
        return models.item_feature_names(), models.author_feature_names()

    def refresh_catalog(self) -> None:
        """Recompute trending/fresh/topic lists from the store's pre-assembled values (in
        the background process when there is one: see ``serving.catalog_builder``)."""
        try:
            if self.catalog_builder is not None:
                version = self.catalog.version  # items changed after it get patched in
                snap, frame = self.catalog_builder.build()
                t0 = time.perf_counter()
                self.catalog.publish(snap, dataclasses.replace(frame, catalog_version=version))
                log.info("catalog_refreshed", items=len(snap.popularity),
                         trending=len(snap.trending), topics=len(snap.by_topic),
                         build_s=round(self.catalog_builder.last_build_s, 3),
                         publish_s=round(time.perf_counter() - t0, 4))
            else:
                self.catalog.publish(refresh_lists(self.catalog, self.store))
        except TesseraError as exc:
            log.warning("catalog_refresh_failed", error=str(exc)[:200])
        except Exception as exc:  # a bug must not stop the refresher thread for good
            log.exception("catalog_refresh_failed", error=str(exc)[:200])
        finally:
            self._catalog_built.set()  # tried once: readiness does not wait on a failure

    def _refresh_loop(self) -> None:
        if self.catalog_builder is not None:
            # the first lists, before /readyz answers 200, once this process has read the
            # items too: items changed after the build asked are patched into every
            # request's columns, so asking before the catalog loaded patches all of them
            if self.follower is not None:
                self.follower.caught_up.wait(CATALOG_CATCH_UP_S)
            self.refresh_catalog()
        while not self._stop.wait(self.config.refresh_interval_s):
            self.refresh_catalog()
            self.gc_freezer.refreeze()  # the rebuilt catalog (and any new model) joins it

    def _start_model_watch(self) -> None:
        try:
            from serving.models import start_model_watch
        except ImportError as exc:  # loud: feeds fall back to the popularity ranker
            log.error("learned_models_unavailable", error=str(exc)[:300],
                      fix="install an ONNX Runtime build: pip install -e '.[cpu]' (or '.[gpu]')",
                      serving_with="popularity baseline")
            return
        from models.onnx_runtime import check_runtime

        check_runtime()  # refuses to start with both the CPU and the GPU build installed
        self.watcher = start_model_watch(self)

    def feed_limiter(self) -> anyio.CapacityLimiter:
        """The threads feed requests are computed on (``config.feed_threads`` at once)."""
        if self._feed_limiter is None:  # made inside the event loop, on first use
            self._feed_limiter = anyio.CapacityLimiter(self.config.feed_threads)
        return self._feed_limiter

    def ready(self) -> tuple[bool, str]:
        """Ready when the item catalog was read to its end (or there is no Kafka)."""
        if self.follower is not None and not self.follower.caught_up.is_set():
            return False, "reading the item catalog"
        if not self._catalog_built.is_set():
            return False, "building the candidate lists"
        return True, "ok"

    def close(self) -> None:
        self._stop.set()
        sys.setswitchinterval(self._switch_interval)
        self.gc_pauses.uninstall()
        self.gc_freezer.release()
        if self.snapshots is not None:
            self.snapshots.stop()
        if self.background is not None:
            self.background.close()
        if self.watcher is not None:
            self.watcher.stop()
        if self.follower is not None:
            self.follower.stop()
        self.logger.close()
        if self.engagements is not None:
            self.engagements.close()
        self.store.close()

    # ------------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold one of ``max_in_flight`` feed slots; ``Overloaded`` (503) when none is free."""
        with self._lock:
            if self.in_flight >= self.config.max_in_flight:
                self.metrics.shed.inc()
                raise Overloaded("at capacity; retry shortly", field=None)
            self.in_flight += 1
            self.metrics.in_flight.set(self.in_flight)
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1
                self.metrics.in_flight.set(self.in_flight)

    def authorize(self, request: Request, role: str) -> None:
        keys = self.config.api_keys
        if not keys:
            return
        got = keys.get(request.headers.get("x-api-key", ""))
        if got is None:
            raise Unauthorized("missing or unknown API key (header X-API-Key)", field="X-API-Key")
        if _ROLE_RANK[got] < _ROLE_RANK[role]:
            raise Unauthorized(f"this key is '{got}'; the endpoint needs '{role}'",
                               field="X-API-Key")

    async def body_json(self, request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and int(length) > self.config.max_body_bytes:
            raise PayloadTooLarge(f"the body is larger than {self.config.max_body_bytes} bytes",
                                  field="body")
        raw = await request.body()
        if len(raw) > self.config.max_body_bytes:
            raise PayloadTooLarge(f"the body is larger than {self.config.max_body_bytes} bytes",
                                  field="body")
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"the body is not valid JSON: {exc}", field="body") from exc


def create_app(config: ServingConfig) -> Starlette:
    """Build the ASGI app; background threads start with it and stop at shutdown."""
    holder: dict[str, ServingState] = {}

    def state() -> ServingState:
        return holder["state"]

    async def feed(request: Request) -> Response:
        st = state()
        with st.admitted():
            st.authorize(request, "read")
            req, ranker = await _parse_feed(st, request)
            compute = functools.partial(st.pipeline.feed, req, ranker=ranker)
            result = await anyio.to_thread.run_sync(compute, limiter=st.feed_limiter())
        st.metrics.requests.labels(route="feed", status="200").inc()
        return json_response(_feed_payload(result))

    async def events(request: Request) -> Response:
        st = state()
        st.authorize(request, "write")
        records = parse_engagements(await st.body_json(request))
        if st.engagements is None:
            raise ServingError("no Kafka configured for engagements (start with --bootstrap)",
                               field=None)
        _produce_engagements(st, records)
        st.metrics.requests.labels(route="events", status="202").inc()
        return json_response({"accepted": len(records),
                              "event_ids": [r["event_id"] for r in records]}, 202)

    async def features(request: Request) -> Response:
        st = state()
        st.authorize(request, "read")
        q = request.query_params
        entity = q.get("entity")
        known = st.client.entity_types()
        if entity not in known:
            raise BadRequest(f"entity must be one of {', '.join(known)}", field="entity")
        ids = [i for i in (q.get("ids") or "").split(",") if i]
        if not ids or len(ids) > 1000:
            raise BadRequest("ids must list 1 to 1000 comma-separated ids", field="ids")
        names = [n for n in (q.get("names") or "").split(",") if n] or \
            st.client.names_for(entity)
        at = q.get("at")
        if at is not None and not at.isdigit():
            raise BadRequest("at must be epoch milliseconds", field="at")
        try:
            res = await run_in_threadpool(st.client.get_features, entity, ids, names,
                                          at=int(at) if at else None)
        except UnknownFeatureError as exc:
            raise BadRequest(str(exc), field="names") from exc
        except HistoricalReadError as exc:
            raise BadRequest(str(exc), field="at") from exc
        rows = [{"id": e, "values": res.row(i),
                 "missing": [n for j, n in enumerate(res.names) if res.missing[i, j]]}
                for i, e in enumerate(res.ids)]
        return json_response({"entity": entity, "watermark": res.watermark,
                              "stale": list(res.stale), "rows": rows})

    async def healthz(request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(request: Request) -> Response:
        ok, why = state().ready()
        return json_response({"ready": ok, "reason": why}, 200 if ok else 503)

    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(state().metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi(request: Request) -> Response:
        return json_response(OPENAPI)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        holder["state"] = ServingState(config)
        app.state.serving = holder["state"]
        log.info("serving_started", host=config.host, port=config.port, store=config.store_url)
        try:
            yield
        finally:
            holder["state"].close()

    routes = [
        Route("/v1/feed", feed, methods=["POST"]),
        Route("/v1/events", events, methods=["POST"]),
        Route("/v1/features", features, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    from serving.dashboard import dashboard_routes

    routes += dashboard_routes(state)

    async def serving_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServingError)
        st = holder.get("state")
        route = _COUNTED_ROUTES.get(request.url.path)
        headers = None
        if st is not None:
            if route:
                st.metrics.requests.labels(route=route, status=str(exc.status)).inc()
            if isinstance(exc, Overloaded):
                headers = {"Retry-After": str(st.config.retry_after_s)}
        return error_response(exc, headers)

    async def internal_error(request: Request, exc: Exception) -> Response:
        # a bug must give a JSON 500, logged, not a dropped connection
        # (Starlette hands the exception on to the server afterwards: its log has the trace)
        log.error("request_failed", path=request.url.path, error=repr(exc)[:300])
        st = holder.get("state")
        route = _COUNTED_ROUTES.get(request.url.path)
        if st is not None and route:
            st.metrics.requests.labels(route=route, status="500").inc()
        return error_response(ServingError("internal error; see the server log"))

    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={ServingError: serving_error, Exception: internal_error})


#: request counts by route and status (``tessera_requests_total``)
_COUNTED_ROUTES = {"/v1/feed": "feed", "/v1/events": "events"}


async def _parse_feed(st: ServingState, request: Request) -> tuple[FeedRequest, str | None]:
    """The feed request and the ranker forced by ``X-Tessera-Ranker`` (None: the model)."""
    body = await st.body_json(request)
    req = parse_feed(body, default_limit=st.config.default_limit, max_limit=st.config.max_limit)
    ranker = request.headers.get("x-tessera-ranker")
    if ranker not in (None, "", "model", "popularity"):
        raise BadRequest("X-Tessera-Ranker must be 'model' or 'popularity'",
                         field="X-Tessera-Ranker")
    return req, "popularity" if ranker == "popularity" else None


def _feed_payload(result: FeedResult) -> dict[str, Any]:
    """The JSON body of a served feed."""
    payload = {"request_id": result.request_id, "items": result.items,
               "model_versions": result.model_versions,
               "feature_watermark": result.feature_watermark}
    if result.degraded:
        payload["degraded"] = result.degraded
    return payload


def _produce_engagements(st: ServingState, records: list[dict[str, Any]]) -> None:
    """Send engagements to Kafka, enriched with the item's author and topic (per-topic
    features read them), and record them for the dashboard's CTR."""
    from schemas.codec import encode

    catalog = st.pipeline.catalog
    for rec in records:
        rec["author_id"], rec["topic"], _ = catalog.meta(rec["item_id"]) or ("", "", 0)
        st.engagements.send(rec["user_id"].encode(), encode("engagements", rec))
        st.ctr.record_engagement(rec["impression_id"], rec["action"], rec["event_ts"])


def app_from_env() -> Starlette:
    """Factory for ``uvicorn --factory`` workers: config from TESSERA_SERVE_CONFIG (JSON)."""
    import json
    import os

    raw = json.loads(os.environ["TESSERA_SERVE_CONFIG"])
    for key in ("features_path", "registry_dir", "spool_dir"):
        if key in raw:
            raw[key] = Path(raw[key])
    return create_app(ServingConfig(**raw))


