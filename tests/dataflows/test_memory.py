"""``release_free_memory`` hands freed heap memory back without touching live data."""

import os
import platform

import numpy as np
import pyarrow as pa
import pytest

from dataflows import memory


def test_release_keeps_live_data_and_empties_arrows_unused_pool():
    live = np.arange(1_000_000, dtype=np.int64)
    garbage = [np.ones(50_000, np.int64) for _ in range(200)]  # heap blocks, then freed
    arrow = pa.array(np.arange(100_000))
    del garbage
    memory.release_free_memory()
    assert int(live.sum()) == 999_999 * 1_000_000 // 2
    assert arrow.to_numpy()[-1] == 99_999


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_glibc_trim_is_found():
    assert memory._malloc_trim() is not None


_PROBE = """
import sys
import numpy as np
if sys.argv[1] == "small":
    from dataflows.memory import use_small_pages
    assert use_small_pages()
a = np.ones(64 << 20, np.uint8)  # touched: every page is faulted in
# numpy advises the 2 MB-aligned part of the array, a mapping of its own: sum all that overlap
start, end, kb, inside = a.ctypes.data, a.ctypes.data + a.nbytes, 0, False
for line in open("/proc/self/smaps"):
    head = line.split()[0]
    if "-" in head and ":" not in head:
        lo, hi = (int(x, 16) for x in head.split("-"))
        inside = lo < end and start < hi
    elif inside and line.startswith("AnonHugePages:"):
        kb += int(line.split()[1])
print(kb)
"""


def _huge_kb(mode: str) -> int:
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != memory.HUGEPAGE_ENV}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True, env=env, cwd=Path(__file__).resolve().parents[2])
    return int(out.stdout.strip())


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return ""
    return text.split("[")[1].split("]")[0] if "[" in text else ""


@pytest.mark.skipif(_thp_mode() != "madvise", reason="huge pages only on numpy's advice here")
def test_small_pages_stop_numpys_huge_page_advice():
    control = _huge_kb("default")
    if control == 0:
        pytest.skip("the kernel gave no huge pages even when advised (memory fragmented)")
    assert _huge_kb("small") == 0


def test_small_pages_leave_the_users_numpy_setting(monkeypatch):
    monkeypatch.setenv(memory.HUGEPAGE_ENV, "1")
    assert memory.use_small_pages() is False
    monkeypatch.setenv(memory.HUGEPAGE_ENV, "0")
    assert memory.use_small_pages() is True
