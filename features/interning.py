"""Strings to dense integer codes, in bulk: stable 64-bit string hashes and an interner.

The streaming state keys blocks by entity and keeps ``last_n`` string values; both need each
string of a batch's dictionary mapped to a code that is the same for the whole run. Doing that
with a Python dict costs a bytecode loop per string. Here every string of a batch is hashed at
once (FNV-1a over the UTF-8 bytes, column by column across strings, with a splitmix64 finish),
looked up in a ``KeyIndex`` and checked against the interned string (one vectorized object
comparison), so a hash collision can never merge two strings: on the first one the interner
falls back to an exact dict for good.
"""

from __future__ import annotations

import hashlib

import numpy as np

from features.keyindex import KeyIndex

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_LONG = 64  # strings longer than this (in characters) are hashed one by one (rare)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: every input bit affects every output bit."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def hash_strings(values: np.ndarray) -> np.ndarray:
    """Return a uint64 hash of each ``str`` in an object array, the same in every process.

    Strings of up to 64 characters are hashed together with numpy; longer ones one by one.
    Callers that need exactness still compare strings (64-bit hashes can collide).
    """
    values = np.asarray(values, dtype=object)
    n = len(values)
    out = np.empty(n, np.uint64)
    if n == 0:
        return out
    chars = np.fromiter(map(len, values), np.int64, n)
    if chars.max() <= _LONG:
        joined = "".join(values.tolist())
        if joined.isascii():  # one byte per character: hash straight from the joined bytes
            return _hash_ascii(np.frombuffer(joined.encode("ascii"), np.uint8), chars)
    long = chars > _LONG
    short = np.flatnonzero(~long)
    if len(short):
        sv = values if len(short) == n else values[short]
        enc = np.char.encode(sv.astype(str), "utf-8")
        width = enc.dtype.itemsize
        # true byte lengths (numpy's bytes dtype drops trailing NULs; those hash as zeros)
        lengths = np.fromiter((len(v.encode("utf-8", "surrogatepass")) for v in sv.tolist()),
                              np.int64, len(sv))
        if width < int(lengths.max(initial=0)):
            raw_w = np.zeros((len(sv), int(lengths.max())), np.uint8)
            raw_w[:, :width] = enc.view(np.uint8).reshape(len(sv), width) if width else 0
            enc, width = raw_w, raw_w.shape[1]
        h = np.full(len(sv), _FNV_OFFSET, np.uint64)
        if width:
            raw = enc if enc.dtype == np.uint8 else enc.view(np.uint8).reshape(len(sv), width)
            for j in range(width):  # bytes past a string's end (padding) leave it unchanged
                h = np.where(lengths > j, (h ^ raw[:, j]) * _FNV_PRIME, h)
        out[short] = _mix(h ^ lengths.astype(np.uint64))
    for i in np.flatnonzero(long).tolist():
        digest = hashlib.blake2b(values[i].encode("utf-8", "surrogatepass"), digest_size=8)
        out[i] = np.frombuffer(digest.digest(), np.uint64)[0]
    return out


def _hash_ascii(buf: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """FNV-1a + mix of strings stored back to back in ``buf`` (same result as the general path)."""
    starts = np.cumsum(lengths) - lengths
    h = np.full(len(lengths), _FNV_OFFSET, np.uint64)
    shortest = int(lengths.min())
    for j in range(int(lengths.max())):
        if j < shortest:
            h = (h ^ buf[starts + j]) * _FNV_PRIME
        else:
            live = np.flatnonzero(lengths > j)
            h[live] = (h[live] ^ buf[starts[live] + j]) * _FNV_PRIME
    return _mix(h ^ lengths.astype(np.uint64))


class StringInterner:
    """Assign each distinct string a dense code 0, 1, 2, ... in first-seen order.

    Also keeps the UTF-8 bytes of every interned string back to back (``utf8``), so columnar
    writers can gather the bytes of many codes without Python per value.
    """

    def __init__(self, values: list[str] | None = None) -> None:
        self._values = np.empty(0, dtype=object)
        self._n = 0
        self._index = KeyIndex()
        self._exact: dict[str, int] | None = None  # set after the first hash collision
        self._blob = np.zeros(0, np.uint8)
        self._blob_len = 0
        self._offsets = np.zeros(1, np.int64)
        if values:
            self.intern(np.asarray(values, dtype=object))

    def __len__(self) -> int:
        return self._n

    @property
    def values(self) -> np.ndarray:
        """The interned strings, index = code (an object array view; do not modify)."""
        return self._values[: self._n]

    def utf8(self) -> tuple[np.ndarray, np.ndarray]:
        """``(blob, offsets)``: code ``c``'s UTF-8 bytes are ``blob[offsets[c]:offsets[c+1]]``."""
        return self._blob[: self._blob_len], self._offsets[: self._n + 1]

    def intern(self, strings: np.ndarray) -> np.ndarray:
        """Return the code of each string (an object array of ``str``), adding new ones."""
        strings = np.asarray(strings, dtype=object)
        if not len(strings):
            return np.zeros(0, np.int64)
        if self._exact is not None:
            return self._intern_exact(strings)
        h = hash_strings(strings).view(np.int64)
        codes = self._index.lookup(h)
        hit = np.flatnonzero(codes >= 0)
        if len(hit) and not bool(np.all(self._values[codes[hit]] == strings[hit])):
            return self._collided(strings)
        miss = np.flatnonzero(codes < 0)
        if len(miss):
            uh, first, inv = np.unique(h[miss], return_index=True, return_inverse=True)
            # a batch dictionary may repeat a value; two different strings may not share a hash
            if not bool(np.all(strings[miss[first]][inv] == strings[miss])):
                return self._collided(strings)
            seen = np.argsort(first, kind="stable")  # codes in first-seen order
            new_codes = np.empty(len(uh), np.int64)
            new_codes[seen] = self._append(strings[miss[first[seen]]])
            self._index.insert(uh, new_codes)
            codes[miss] = new_codes[inv]
        return codes

    def _append(self, new: np.ndarray) -> np.ndarray:
        start, k = self._n, len(new)
        if start + k > len(self._values):
            grown = np.empty(max(start + k, 2 * len(self._values), 1024), dtype=object)
            grown[:start] = self._values[:start]
            self._values = grown
            offs = np.zeros(len(grown) + 1, np.int64)
            offs[: start + 1] = self._offsets[: start + 1]
            self._offsets = offs
        self._values[start:start + k] = new
        encoded = [s.encode("utf-8", "surrogatepass") for s in new.tolist()]
        lengths = np.fromiter(map(len, encoded), np.int64, k)
        raw = np.frombuffer(b"".join(encoded), np.uint8)
        need = self._blob_len + len(raw)
        if need > len(self._blob):
            grown_blob = np.zeros(max(need, 2 * len(self._blob), 1 << 16), np.uint8)
            grown_blob[: self._blob_len] = self._blob[: self._blob_len]
            self._blob = grown_blob
        self._blob[self._blob_len:need] = raw
        self._blob_len = need
        self._offsets[start + 1:start + k + 1] = self._offsets[start] + np.cumsum(lengths)
        self._n = start + k
        return np.arange(start, start + k, dtype=np.int64)

    def _collided(self, strings: np.ndarray) -> np.ndarray:
        self._exact = {s: i for i, s in enumerate(self._values[: self._n].tolist())}
        return self._intern_exact(strings)

    def _intern_exact(self, strings: np.ndarray) -> np.ndarray:
        exact = self._exact
        assert exact is not None
        out = np.empty(len(strings), np.int64)
        for i, s in enumerate(strings.tolist()):
            c = exact.get(s)
            if c is None:
                c = int(self._append(np.asarray([s], dtype=object))[0])
                exact[s] = c
            out[i] = c
        return out
