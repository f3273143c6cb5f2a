"""Builds feature snapshots (and other background reads) in a process of their own, off
the serving interpreter.

A snapshot of 100,000 items x 22 values costs 1-2 s of CPU each time the window end moves.
Built on a thread of the serving process it holds that process's interpreter lock the whole
time: requests queued behind it for seconds (bench/serving.py saw 503s and a p99 near 1 s at
60 requests/s around every build). ``SnapshotBuilder`` runs ``build_snapshot`` in one
long-lived child process (``spawn``) that opens the store read-only and loads the features
file once; only the finished arrays (a few MB) cross back. ``run`` hands the same child
any other picklable job (serving's catalog lists), so one process does all of them.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from features.errors import TesseraError
from features.snapshot import FeatureSnapshot, build_snapshot

T = TypeVar("T")
_CLIENTS: dict[tuple[str, str], object] = {}  # the child's FeatureClient per store and file


def _client(store_url: str, features_path: str):
    """The child's client, opened on first use (errors reach the caller as exceptions:
    an initializer's would only print in the child and break the pool)."""
    key = (store_url, features_path)
    if key not in _CLIENTS:
        from features.client import FeatureClient
        from features.spec_loader import load_features
        from features.store import open_store

        _CLIENTS[key] = FeatureClient(open_store(store_url, readonly=True),
                                      load_features(features_path))
    return _CLIENTS[key]


#: the child's scheduling priority offset: its builds yield the cores to request threads
CHILD_NICENESS = 10


def _child_init(parent: int) -> None:
    """Child initializer: run at a lower priority, and exit when the serving process is gone
    (a pool worker outlives a parent killed with SIGKILL otherwise: it holds its own
    queue's write end open).

    The priority matters where cores are few: a half-second build competing as an equal
    with the request threads for two cores put a 0.6 s stall into ``bench/serving.py``'s
    75 requests/s step; niced, it runs in the time they leave.
    """
    with contextlib.suppress(OSError):
        os.nice(CHILD_NICENESS)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _build(store_url: str, features_path: str, entity_type: str, ids: list[str],
           names: tuple[str, ...], end: int,
           joined: tuple[str, list[str], tuple[str, ...]] | None) -> FeatureSnapshot:
    client = _client(store_url, features_path)
    return build_snapshot(client, entity_type, ids, names, end, joined=joined, pause_s=0.0)


def _as_sequence(values: Sequence[str]) -> Sequence[str]:
    """What crosses to the child: a numpy array as it is (one buffer to pickle; a list of
    its 100,000 elements took seconds of the serving interpreter), anything else a list."""
    return values if isinstance(values, np.ndarray) else list(values)


class SnapshotBuilder:
    """``build_snapshot`` in a child process; same arguments, same result.

    The child starts on the first build and is reused; if it dies, the next build starts
    another. Errors raised by the build (an end the store cannot serve, unknown names) are
    raised here as they were there.
    """

    def __init__(self, store_url: str, features_path: str | Path):
        self.store_url = store_url
        self.features_path = str(features_path)
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                initializer=_child_init, initargs=(os.getpid(),))
        return self._pool

    def build(self, entity_type: str, ids: Sequence[str], names: Sequence[str], end: int, *,
              joined: tuple[str, Sequence[str], Sequence[str]] | None = None
              ) -> FeatureSnapshot:
        """Return ``build_snapshot(client, entity_type, ids, names, end, joined=joined)``."""
        args = (self.store_url, self.features_path, entity_type, _as_sequence(ids),
                tuple(names), int(end),
                None if joined is None else (joined[0], _as_sequence(joined[1]),
                                             tuple(joined[2])))
        return self.run(_build, *args)

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the child (a module-level function; one job at a time)."""
        try:
            return self._executor().submit(fn, *args).result()
        except BrokenProcessPool as exc:
            self.close()
            raise TesseraError(f"the snapshot builder process died: {exc}") from exc

    def close(self) -> None:
        """Stop the child process (a later build starts a new one)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
