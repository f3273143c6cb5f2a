"""Serving configuration: frozen, validated at definition."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from models.devices import DEVICES


@dataclass(frozen=True, kw_only=True)
class ServingConfig:
    """Everything ``tessera serve`` needs; defaults are the embedded platform's.

    Attributes:
        host, port: bind address (127.0.0.1 unless told otherwise).
        store_url: online store the features are read from (read-only).
        features_path: feature definitions.
        registry_dir: model registry watched for new versions.
        bootstrap: Kafka for the forward log, engagements and the item catalog
            (None: no Kafka; impressions go to the spool only).
        spool_dir: where impressions wait while Kafka is unreachable.
        max_in_flight: feed requests admitted at once (running or waiting for a feed
            thread); beyond it, 503 with Retry-After.
        feed_threads: feed requests computed at once (default: the CPU count, at least 2).
            The pipeline is CPU-bound under the GIL: more threads add no throughput, and
            starve the event loop that parses requests and answers 503s.
        candidate_limits: per generator, how many candidates it may return.
        l1_keep: candidates kept after L1 for L2.
        max_limit: largest page a client may ask for.
        candidate_cache_ttl_ms: TTL of the (user, feed type) candidate cache.
        author_cap: at most this many items of one author per page.
        max_body_bytes: request size limit.
        api_keys: {key: role} with roles ``read`` (feed, features), ``write`` (events),
            ``admin`` (reload); empty means no authentication (local use).
        refresh_interval_s: how often the trending/fresh/topic lists are recomputed.
        feature_snapshot: hold every item's item and author features at the current window
            end in memory (``serving.snapshots``), so hydration is a gather; off: every
            request reads the store.
        snapshot_interval_s: how often the snapshot's end is checked against the store's.
        watermark_ttl_ms: how long the store's watermarks are reused between reads (a
            request's end moves only at block boundaries; this delays it by at most that).
        gil_switch_ms: the interpreter's switch interval while serving
            (``sys.setswitchinterval``). A request thread that releases the GIL in numpy or
            ONNX Runtime waits up to this long to get it back from a busy thread (the other
            request thread, the impression logger); Python's default of 5 ms put that wait
            into every stage. ``bench/serving.py --quick``: p99 51.6 ms at 100 requests/s
            with 5 ms, 17.1 ms with 1 ms.
        device: where the ONNX models run: ``auto`` (CUDA when offered), ``cpu``, or
            ``cuda`` (refuses to start without a CUDA provider).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    store_url: str = "lmdb://.tessera/store"
    features_path: Path = Path("features.yaml")
    registry_dir: Path = Path(".tessera/registry")
    bootstrap: str | None = None
    spool_dir: Path = Path(".tessera/spool")
    max_in_flight: int = 32
    feed_threads: int = field(default_factory=lambda: max(2, os.cpu_count() or 2))
    retry_after_s: int = 1
    candidate_limits: dict[str, int] = field(default_factory=lambda: {
        "ann": 1000, "trending": 500, "fresh": 300, "topics": 500})
    l1_keep: int = 500
    max_limit: int = 100
    default_limit: int = 20
    candidate_cache_ttl_ms: int = 30_000
    author_cap: int = 2
    max_body_bytes: int = 1_000_000
    api_keys: dict[str, str] = field(default_factory=dict)
    refresh_interval_s: float = 30.0
    feature_snapshot: bool = True
    snapshot_interval_s: float = 1.0
    watermark_ttl_ms: int = 50
    gil_switch_ms: float = 1.0
    device: str = "auto"

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1..65535, got {self.port}")
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")
        if not 0 < self.gil_switch_ms <= 100:
            raise ValueError(f"gil_switch_ms must be in (0, 100], got {self.gil_switch_ms}")
        if self.watermark_ttl_ms < 0:
            raise ValueError(f"watermark_ttl_ms must be >= 0, got {self.watermark_ttl_ms}")
        if self.feed_threads < 1:
            raise ValueError(f"feed_threads must be >= 1, got {self.feed_threads}")
        if not 1 <= self.default_limit <= self.max_limit:
            raise ValueError(f"default_limit must be 1..max_limit ({self.max_limit}), "
                             f"got {self.default_limit}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be {', '.join(DEVICES[:-1])} or {DEVICES[-1]}, "
                             f"got {self.device!r}")
        bad = {k: v for k, v in self.api_keys.items() if v not in ("read", "write", "admin")}
        if bad:
            raise ValueError(f"api key roles must be read, write or admin; got {bad}")
