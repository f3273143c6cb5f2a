"""The snapshot builder's child process: clear errors, and no orphan when serving dies."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from features.errors import TesseraError
from features.snapshot_process import SnapshotBuilder
from features.store import open_store
from tessera.broker import _pid_running

REPO = Path(__file__).resolve().parents[2]


def test_an_unopenable_store_raises_its_own_error(tmp_path):
    builder = SnapshotBuilder(f"lmdb://{tmp_path}/missing", REPO / "features.yaml")
    try:
        with pytest.raises(TesseraError, match="no LMDB store"):
            builder.build("item", ["i1"], ("item_views_1d",), 0)
    finally:
        builder.close()


def test_the_child_exits_when_the_serving_process_is_killed(tmp_path):
    open_store(f"lmdb://{tmp_path}/store").close()
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from features.snapshot_process import SnapshotBuilder
        if __name__ == "__main__":
            b = SnapshotBuilder({f"lmdb://{tmp_path}/store"!r}, {str(REPO / "features.yaml")!r})
            b.build("item", ["i1"], ("item_views_1d",), 0)
            print(" ".join(str(p.pid) for p in b._pool._processes.values()), flush=True)
            time.sleep(60)
    """)
    (tmp_path / "serve.py").write_text(script)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "serve.py")],
                            stdout=subprocess.PIPE, text=True)
    try:
        children = [int(p) for p in proc.stdout.readline().split()]
        assert children and all(_pid_running(c) for c in children)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while any(_pid_running(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_pid_running(c) for c in children)
    finally:
        proc.kill()


def test_jobs_cross_through_files_that_are_removed(tmp_path):
    """Arguments and results go through files of one private directory (not the pool's
    pipe); each file is gone once read, and the directory once the builder closes."""
    import numpy as np

    builder = SnapshotBuilder(f"lmdb://{tmp_path}/store", REPO / "features.yaml")
    try:
        got = builder.run(np.arange, 3_000_000)  # 24 MB: hundreds of pipe-sized chunks
        np.testing.assert_array_equal(got, np.arange(3_000_000))
        handoff = Path(builder._handoff)
        assert handoff.is_dir() and list(handoff.iterdir()) == []
        with pytest.raises(ValueError):  # the child's error, raised here as it was there
            builder.run(int, "not a number")
        assert list(handoff.iterdir()) == []
    finally:
        builder.close()
    assert not handoff.exists()


def test_the_handoff_directory_of_a_dead_process_is_removed():
    from features.snapshot_process import _HANDOFF_PREFIX, handoff_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = Path(handoff_dir())
    try:
        left = mine.parent / f"{_HANDOFF_PREFIX}{dead.pid}-left"
        left.mkdir()
        (left / "x.pickle").write_bytes(b"x")
        second = Path(handoff_dir())
        assert not left.exists() and mine.exists()  # a live process's directory is kept
        second.rmdir()
    finally:
        mine.rmdir()
