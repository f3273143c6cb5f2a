"""How a flow worker's process uses memory: freed memory back to the system, page size.

A large store write allocates and frees hundreds of MB of short-lived arrays (a flush's
rows, the merged records). glibc's allocator and Arrow's pool keep much of that freed
memory mapped for reuse, so a worker's resident size would follow its largest write, not
the blocks it holds. ``release_free_memory`` returns it after such a write.

Those arrays live for one numpy call each. numpy asks the kernel for transparent huge pages
for every array of 4 MB or more, and each first touch of a huge page zeroes 2 MB in the
kernel. On the blocks flow (1M events in-process) system time was 6.7 s of 32 s of CPU
with the advice and 3.3-4.3 s without it, and the events/s rose 8-17%. ``use_small_pages``
turns the advice off for the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

import pyarrow as pa

from tessera.logs import get_logger

log = get_logger("dataflows.memory")

HUGEPAGE_ENV = "NUMPY_MADVISE_HUGEPAGE"
"""numpy's own switch; when the user sets it, their choice stands."""


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> None:
    """Return freed heap memory (glibc) and Arrow's unused pool memory to the system.

    Only memory already freed is returned; nothing live is touched. Costs a walk of the
    heap (milliseconds for a GB), so call it after large writes, not per batch.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    pa.default_memory_pool().release_unused()


def use_small_pages() -> bool:
    """Stop numpy from advising huge pages for new arrays; return whether it now does not.

    Does nothing when ``NUMPY_MADVISE_HUGEPAGE`` is set (numpy applied the user's choice at
    import) or this numpy has no switch. Arrays already allocated keep their pages.
    """
    if os.environ.get(HUGEPAGE_ENV) is not None:
        return os.environ[HUGEPAGE_ENV] == "0"
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # numpy 1.x
        try:
            from numpy.core.multiarray import _set_madvise_hugepage
        except ImportError:
            log.info("small_pages_unavailable", reason="numpy has no madvise switch")
            return False
    _set_madvise_hugepage(False)
    return True
