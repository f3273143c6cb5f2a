"""Online trackers the dashboard reads: CTR per model version, feature drift (PSI).

Both are fed by the serving process itself and keep bounded memory:

* ``CtrTracker``: the feed records each served impression with the model version that ranked
  it; the events endpoint records each engagement by impression id. A click is credited to
  the 10 s bucket in which its impression was *served*, so a bucket's CTR is "share of the
  impressions served then that were clicked (so far)". Impression ids live in an LRU of
  ``max_impressions``; engagements on an impression already evicted (or never served by
  this process) are counted as ``unattributed``.
* ``DriftTracker``: the population stability index of each served feature against its
  training distribution, over the last ``window`` served values, with 10 quantile bins
  of the reference.

Thread-safe: the feed runs in a thread pool.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

BUCKET_MS = 10_000
PSI_BINS = 10
PSI_EPS = 1e-4


def version_label(versions: Mapping[str, str]) -> str:
    """Return the version a feed page is attributed to: the L2 model's, else all joined."""
    if "l2" in versions:
        return str(versions["l2"])
    return ",".join(f"{k}={v}" for k, v in sorted(versions.items())) or "unknown"


@dataclass
class _Bucket:
    impressions: int = 0
    clicks: int = 0
    engagements: int = 0


class CtrTracker:
    """Impressions and clicks per model version in 10 s buckets (see the module docstring).

    Args:
        max_impressions: impression ids remembered for attributing engagements (LRU).
        max_buckets: buckets kept per version (360 x 10 s = one hour).
        click_actions: actions counted as clicks for the CTR.
    """

    def __init__(self, *, max_impressions: int = 200_000, max_buckets: int = 360,
                 click_actions: Iterable[str] = ("click",)):
        if max_impressions < 1 or max_buckets < 1:
            raise ValueError(f"max_impressions and max_buckets must be >= 1, got "
                             f"{max_impressions} and {max_buckets}")
        self.max_impressions = max_impressions
        self.max_buckets = max_buckets
        self.click_actions = frozenset(click_actions)
        # impression id -> [version, bucket start, clicked]
        self._imps: OrderedDict[str, list] = OrderedDict()
        self._buckets: dict[str, OrderedDict[int, _Bucket]] = {}
        self.unattributed = 0
        self.engagements_total = 0
        self.impressions_total = 0
        self._lock = threading.Lock()

    def record_impressions(self, model_version: str, impression_ids: Iterable[str],
                           ts: int) -> None:
        """Record impressions served at ``ts`` (epoch ms) by ``model_version``."""
        bucket = ts - ts % BUCKET_MS
        ids = list(impression_ids)
        if not ids:
            return
        with self._lock:
            b = self._bucket(model_version, bucket, create=True)
            for imp in ids:
                if imp in self._imps:
                    continue
                self._imps[imp] = [model_version, bucket, False]
                if b is not None:
                    b.impressions += 1
                self.impressions_total += 1
            while len(self._imps) > self.max_impressions:
                self._imps.popitem(last=False)

    def record_engagement(self, impression_id: str, action: str, ts: int | None = None) -> bool:
        """Record an engagement; return whether it was attributed to a served impression.

        ``ts`` is accepted for symmetry and ignored: the click is credited to the bucket in
        which its impression was served. A second click on one impression counts once.
        """
        with self._lock:
            self.engagements_total += 1
            entry = self._imps.get(impression_id)
            if entry is None:
                self.unattributed += 1
                return False
            self._imps.move_to_end(impression_id)
            version, bucket, clicked = entry
            b = self._bucket(version, bucket, create=False)
            if b is None:
                self.unattributed += 1
                return False
            b.engagements += 1
            if action in self.click_actions and not clicked:
                entry[2] = True
                b.clicks += 1
            return True

    def _bucket(self, version: str, bucket: int, *, create: bool) -> _Bucket | None:
        per = self._buckets.get(version)
        if per is None:
            if not create:
                return None
            per = self._buckets[version] = OrderedDict()
        b = per.get(bucket)
        if b is None and create:
            if per and bucket < next(iter(per)) and len(per) >= self.max_buckets:
                return None  # older than everything kept
            b = per[bucket] = _Bucket()
            if len(per) > 1 and bucket < next(reversed(per)):
                for k in sorted(per):  # keep buckets in time order
                    per.move_to_end(k)
            while len(per) > self.max_buckets:
                per.popitem(last=False)
        return b

    def series(self) -> dict[str, list[dict]]:
        """Return ``{version: [{t, impressions, clicks, engagements, ctr}, ...]}`` by time."""
        with self._lock:
            return {
                v: [{"t": t, "impressions": b.impressions, "clicks": b.clicks,
                     "engagements": b.engagements,
                     "ctr": b.clicks / b.impressions if b.impressions else None}
                    for t, b in per.items()]
                for v, per in self._buckets.items()
            }


def quantile_edges(reference: np.ndarray, bins: int = PSI_BINS) -> np.ndarray:
    """Return the inner edges of ``bins`` quantile bins of ``reference`` (ties merged)."""
    qs = np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1])
    return np.unique(qs)


def bin_shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Return the share of ``values`` in each bin ``(-inf, e0], (e0, e1], ..., (e_last, inf)``."""
    idx = np.searchsorted(edges, values, side="left")
    counts = np.bincount(idx, minlength=len(edges) + 1).astype(np.float64)
    return counts / max(1, len(values))


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index ``sum((a - e) * ln(a / e))``, shares floored at 1e-4."""
    e = np.maximum(expected, PSI_EPS)
    a = np.maximum(actual, PSI_EPS)
    return float(np.sum((a - e) * np.log(a / e)))


def _finite(values) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    return arr[np.isfinite(arr)]


class DriftTracker:
    """PSI of served feature values against their training distribution.

    Args:
        window: how many of the most recent served values per feature are compared.
        bins: quantile bins of the reference (10).
        min_served: fewer served values than this gives no PSI yet.
    """

    def __init__(self, *, window: int = 20_000, bins: int = PSI_BINS, min_served: int = 50):
        if window < 1 or bins < 2:
            raise ValueError(f"window must be >= 1 and bins >= 2, got {window} and {bins}")
        self.window = window
        self.bins = bins
        self.min_served = min_served
        self._ref: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
        self._ring: dict[str, np.ndarray] = {}
        self._pos: dict[str, int] = {}
        self._filled: dict[str, int] = {}
        self._lock = threading.Lock()

    def set_reference(self, name: str, values) -> None:
        """Set the training distribution of feature ``name`` (non-finite values dropped)."""
        ref = _finite(values)
        if not ref.size:
            raise ValueError(f"the reference of {name!r} has no finite values")
        edges = quantile_edges(ref, self.bins)
        with self._lock:
            self._ref[name] = (edges, bin_shares(ref, edges), int(ref.size))

    def observe(self, name: str, values) -> None:
        """Add served values of feature ``name`` to its rolling window."""
        arr = _finite(values)
        if not arr.size:
            return
        with self._lock:
            ring = self._ring.get(name)
            if ring is None:
                ring = self._ring[name] = np.empty(self.window, np.float64)
                self._pos[name] = self._filled[name] = 0
            arr = arr[-self.window:]
            pos = self._pos[name]
            first = min(arr.size, self.window - pos)
            ring[pos:pos + first] = arr[:first]
            ring[:arr.size - first] = arr[first:]
            self._pos[name] = (pos + arr.size) % self.window
            self._filled[name] = min(self.window, self._filled[name] + arr.size)

    def served(self, name: str) -> np.ndarray:
        """Return a copy of the served values in the window (no order promised)."""
        with self._lock:
            ring = self._ring.get(name)
            return np.zeros(0) if ring is None else ring[: self._filled[name]].copy()

    def report(self) -> list[dict]:
        """Return ``[{name, psi, served, reference, status}]`` for every known feature.

        ``status`` is ``ok`` (PSI computed), ``no_reference`` or ``too_few_served``.
        """
        with self._lock:
            names = sorted(set(self._ref) | set(self._ring))
        out = []
        for name in names:
            served = self.served(name)
            ref = self._ref.get(name)
            row = {"name": name, "psi": None, "served": int(served.size),
                   "reference": ref[2] if ref else 0}
            if ref is None:
                row["status"] = "no_reference"
            elif served.size < self.min_served:
                row["status"] = "too_few_served"
            else:
                edges, expected, _ = ref
                row["psi"] = psi(expected, bin_shares(served, edges))
                row["status"] = "ok"
            out.append(row)
        return out
