"""Prometheus metrics of the serving endpoint (one registry per process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class ServingMetrics:
    """Latency per stage, cache hit rates, candidate survival, model versions, shedding."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tessera_requests_total", "Requests by route and status",
                                ["route", "status"], registry=r)
        self.stage_seconds = Histogram("tessera_stage_seconds", "Feed latency per stage",
                                       ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.candidates = Histogram("tessera_candidates", "Candidates entering each stage",
                                    ["stage"], buckets=(1, 10, 50, 100, 200, 500, 1000, 2000,
                                                        5000), registry=r)
        self.survival = Gauge("tessera_candidate_survival_ratio",
                              "Last request's share of candidates surviving each stage",
                              ["stage"], registry=r)
        self.cache = Counter("tessera_cache_total", "Cache lookups", ["cache", "result"],
                             registry=r)
        self.model_version = Gauge("tessera_model_version_info", "Loaded model versions",
                                   ["kind", "version"], registry=r)
        self.shed = Counter("tessera_shed_total", "Requests refused at capacity", registry=r)
        self.in_flight = Gauge("tessera_in_flight", "Feed requests being served", registry=r)
        self.impressions = Counter("tessera_impressions_total", "Impressions logged",
                                   ["outcome"], registry=r)
        self.engagements = Counter("tessera_engagements_total",
                                   "Engagements posted to /v1/events, by what became of them",
                                   ["outcome"], registry=r)
        self.degraded = Counter("tessera_degraded_total", "Requests served in a degraded mode",
                                ["reason"], registry=r)
        self.gc_pause = Histogram("tessera_gc_pause_seconds",
                                  "Garbage-collector pauses by generation", ["generation"],
                                  buckets=STAGE_BUCKETS, registry=r)
        self.feature_lag = Gauge("tessera_feature_lag_seconds",
                                 "Lag of the feature watermark behind request time", registry=r)
