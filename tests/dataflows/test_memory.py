"""``release_free_memory`` hands freed heap memory back without touching live data."""

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
