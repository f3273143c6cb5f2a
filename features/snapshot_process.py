"""Builds feature snapshots (and other background reads) in a process of their own, off
the serving interpreter.

A snapshot of 100,000 items x 22 values costs 1-2 s of CPU each time the window end moves.
Built on a thread of the serving process it holds that process's interpreter lock the whole
time: requests queued behind it for seconds (bench/serving.py saw 503s and a p99 near 1 s at
60 requests/s around every build). ``SnapshotBuilder`` runs ``build_snapshot`` in one
long-lived child process (``spawn``) that opens the store read-only and loads the features
file once; only the finished arrays (a few MB) cross back. ``run`` hands the same child
any other picklable job (serving's catalog lists), so one process does all of them.

Arguments and results cross through a file (in ``/dev/shm`` where there is one), not
through the pool's pipe. A pipe moves a few MB in 64 KB chunks, and the serving thread
that reads them takes the interpreter lock back after each one: about 130 hand-overs per
catalog refresh, each forcing a request thread to yield for up to the switch interval.
``bench/serving.py`` saw every 30 s refresh put up to 38 requests over 50 ms at 100
requests/s, at about 1.5 of the 2 cores busy. One ``write`` and one ``read`` of the whole
pickle (protocol 5) release the lock once each.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import shutil
import tempfile
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


#: where the pickles that cross between the processes are written: memory where Linux has it
_HANDOFF_ROOT = "/dev/shm"
_HANDOFF_PREFIX = "tessera-handoff-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, another user's
        return True
    return True


def handoff_dir() -> str:
    """A new private directory for the pickles crossing to and from the child: under
    ``/dev/shm`` when it is a writable directory, else the system's temporary directory.

    Its name carries this process's id; the directories of processes that are gone (a
    server killed before it could remove its own) are removed here, so they never pile up.
    """
    root = _HANDOFF_ROOT if os.access(_HANDOFF_ROOT, os.W_OK | os.X_OK) \
        else tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            owner = entry.name.split("-")[2:3] if entry.name.startswith(_HANDOFF_PREFIX) else []
            if owner and owner[0].isdigit() and not _pid_alive(int(owner[0])):
                shutil.rmtree(entry.path, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{_HANDOFF_PREFIX}{os.getpid()}-", dir=root)


def write_pickle(obj: Any, directory: str) -> str:
    """Pickle ``obj`` into a new file of ``directory`` in one write; its path."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    fd, path = tempfile.mkstemp(suffix=".pickle", dir=directory)
    try:
        view = memoryview(data)
        while view:  # one write for anything a pipe or tmpfs takes whole
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    return path


def take_pickle(path: str) -> Any:
    """Unpickle the file at ``path`` (one read) and remove it."""
    try:
        with open(path, "rb", buffering=0) as f:
            data = f.read()
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return pickle.loads(data)


def _run_via_files(args_path: str) -> str:
    """Child side of ``SnapshotBuilder.run``: the job and its arguments from one file, the
    result into another of the same directory; that file's path."""
    fn, args = take_pickle(args_path)
    return write_pickle(fn(*args), os.path.dirname(args_path))


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
        self._handoff: str | None = None  # the directory the pickles cross through

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
        """``fn(*args)`` in the child (a module-level function; one job at a time).

        ``fn``, ``args`` and the result cross through files of one private directory, not
        the pool's pipe (see the module docstring)."""
        if self._handoff is None or not os.path.isdir(self._handoff):
            self._handoff = handoff_dir()
        args_path = write_pickle((fn, args), self._handoff)
        try:
            result_path = self._executor().submit(_run_via_files, args_path).result()
        except BrokenProcessPool as exc:
            self.close()
            raise TesseraError(f"the snapshot builder process died: {exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                os.unlink(args_path)  # left there when the child failed before reading it
        return take_pickle(result_path)

    def close(self) -> None:
        """Stop the child process (a later build starts a new one) and remove the hand-off
        directory."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        handoff, self._handoff = self._handoff, None
        if handoff is not None:
            shutil.rmtree(handoff, ignore_errors=True)
