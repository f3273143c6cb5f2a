"""Hand memory the worker freed back to the operating system.

A large store write allocates and frees hundreds of MB of short-lived arrays (a flush's
rows, the merged records). glibc's allocator and Arrow's pool keep much of that freed
memory mapped for reuse, so a worker's resident size would follow its largest write, not
the blocks it holds. ``release_free_memory`` returns it after such a write.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import pyarrow as pa


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
