"""Generated ``views`` events for the streaming bench, and their Kafka encodings.

:class:`Views` holds N events as numpy arrays. :func:`encode_views` turns them into what a
producer sends: one Confluent-framed Avro message per event (magic 0, schema id, Avro body
of ``schemas/avro/views.avsc``), the same bytes as ``schemas.codec.encode("views", record)``
(:func:`check_encoding` compares a sample), built for all events at once with numpy.
:func:`view_columns` gives the columns of a range of events for batch envelopes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

HOUR = 3_600_000
T0 = 1_761_955_200_000 + 22 * HOUR + HOUR // 2  # 2025-11-01T22:30:00Z
SPAN_MS = 3 * HOUR
"""Events run from ``T0`` to 01:30 the next day: 1d blocks of both days, the first closed."""
SURFACES = ("explore", "follow", "nearby")
TOPICS = 40
AUTHORS = 5000
EMPTY_TOPIC = 39
"""Items with ``item % TOPICS == EMPTY_TOPIC`` have the empty topic ``''`` (filters test it)."""


@dataclass(frozen=True)
class Views:
    """N views as plain arrays; ids are ``i<k>``, ``u<k>``, ``a<k>``, topics ``t<k>`` or ``''``."""

    ts: np.ndarray
    item: np.ndarray
    user: np.ndarray
    dwell: np.ndarray
    position: np.ndarray
    surface: np.ndarray

    def __len__(self) -> int:
        return len(self.ts)

    def head(self, n: int) -> Views:
        """Return the first ``n`` views."""
        return self.take(slice(0, n))

    def take(self, rows: Any) -> Views:
        """Return the views at ``rows`` (a slice, an index array or a mask)."""
        return Views(self.ts[rows], self.item[rows], self.user[rows], self.dwell[rows],
                     self.position[rows], self.surface[rows])

    @property
    def author(self) -> np.ndarray:
        """Author number of each view (a function of the item)."""
        return self.item % AUTHORS

    @property
    def topic(self) -> np.ndarray:
        """Topic number of each view (a function of the item; ``EMPTY_TOPIC`` is ``''``)."""
        return self.item % TOPICS

    def record(self, i: int, event_id: str | None = None) -> dict[str, Any]:
        """Event ``i`` as a ``views`` record (``event_id`` defaults to ``v<i>``)."""
        item = int(self.item[i])
        return {
            "event_id": event_id or f"v{i}", "event_ts": int(self.ts[i]),
            "user_id": f"u{int(self.user[i])}", "item_id": f"i{item}",
            "author_id": f"a{item % AUTHORS}", "topic": topic_name(item % TOPICS),
            "surface": SURFACES[int(self.surface[i])], "dwell_ms": int(self.dwell[i]),
            "position": int(self.position[i]), "request_id": None,
        }


def topic_name(k: int) -> str:
    """The topic string of topic number ``k``."""
    return "" if k == EMPTY_TOPIC else f"t{k}"


def make_views(n: int, *, items: int = 50_000, users: int = 500_000, span_ms: int = SPAN_MS,
               start: int = T0, seed: int = 11) -> Views:
    """Zipf item ids, uniform users, event time rising over ``span_ms`` with up to 5 s disorder.

    A fifth of the views have ``dwell_ms`` 0 (not seen); the rest 100 ms to 60 s.
    """
    rng = np.random.default_rng(seed)
    item = ((rng.zipf(1.2, size=n) - 1) % items).astype(np.int64)
    user = rng.integers(0, users, size=n, dtype=np.int64)
    ts = start + np.arange(n, dtype=np.int64) * span_ms // max(n, 1) - rng.integers(0, 5000, size=n)
    dwell = np.where(rng.random(n) < 0.2, 0, rng.integers(100, 60_000, size=n)).astype(np.int64)
    position = rng.integers(0, 50, size=n, dtype=np.int64)
    surface = rng.integers(0, len(SURFACES), size=n, dtype=np.int64)
    return Views(ts, item, user, dwell, position, surface)


# -- single-event Avro messages -----------------------------------------------------------


@dataclass(frozen=True)
class _Bytes:
    """Per event, the bytes ``blob[starts[i]:starts[i] + lengths[i]]`` of one field."""

    blob: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices ``starts[i] .. starts[i] + lengths[i] - 1`` for every ``i``, concatenated."""
    total = int(lengths.sum())
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(total, dtype=np.int64)


def _varints(values: np.ndarray) -> _Bytes:
    """Avro ``long``/``int`` encoding (zigzag, then base-128 varint) of each value."""
    v = np.asarray(values, dtype=np.int64)
    z = ((v << 1) ^ (v >> 63)).view(np.uint64)
    out = np.zeros((len(v), 10), dtype=np.uint8)
    lengths = np.ones(len(v), dtype=np.int64)
    for j in range(10):
        out[:, j] = (z & np.uint64(0x7F)).astype(np.uint8)
        z = z >> np.uint64(7)
        more = z > 0
        if not more.any():
            break
        out[more, j] |= 0x80
        lengths += more
    return _Bytes(out.ravel(), np.arange(len(v), dtype=np.int64) * 10, lengths)


def _strings(words: list[str], codes: np.ndarray) -> _Bytes:
    """Avro ``string`` encoding (length varint, UTF-8) of ``words[codes[i]]`` for each event."""
    raw = [w.encode() for w in words]
    lengths = np.fromiter(map(len, raw), np.int64, len(raw))
    body = _Bytes(np.frombuffer(b"".join(raw), dtype=np.uint8), np.cumsum(lengths) - lengths,
                  lengths)
    buf, off = _concat([_varints(lengths), body])
    return _Bytes(np.frombuffer(buf, dtype=np.uint8), off[:-1][codes], np.diff(off)[codes])


def _constant(data: bytes, n: int) -> _Bytes:
    return _Bytes(np.frombuffer(data, dtype=np.uint8), np.zeros(n, np.int64),
                  np.full(n, len(data), np.int64))


def _id_field(prefix: str, numbers: np.ndarray) -> _Bytes:
    uniq, codes = np.unique(numbers, return_inverse=True)
    return _strings([f"{prefix}{k}" for k in uniq.tolist()], codes)


def _concat(fields: list[_Bytes]) -> tuple[bytes, np.ndarray]:
    """Concatenate the fields of each event: ``(buffer, offsets)`` (event i is a slice)."""
    lengths = sum(f.lengths for f in fields)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    out = np.empty(int(offsets[-1]), dtype=np.uint8)
    pos = offsets[:-1].copy()
    for f in fields:
        out[_ranges(pos, f.lengths)] = f.blob[_ranges(f.starts, f.lengths)]
        pos += f.lengths
    return out.tobytes(), offsets


def encode_views(v: Views, first_id: int = 0) -> tuple[list[bytes], list[bytes]]:
    """Return ``(values, keys)``: each view as a framed Avro message, keyed by its item id.

    Event ids are ``v<first_id + i>``. The bytes equal ``schemas.codec.encode`` of
    ``v.record(i)`` (see :func:`check_encoding`).
    """
    from schemas.codec import frame
    from schemas.registry import schema_id_for_topic

    n = len(v)
    header = frame(schema_id_for_topic("views"), b"")
    topics = [topic_name(k) for k in range(TOPICS)]
    fields = [
        _constant(header, n),
        _strings([f"v{k}" for k in range(first_id, first_id + n)], np.arange(n)),
        _varints(v.ts),
        _id_field("u", v.user),
        _id_field("i", v.item),
        _id_field("a", v.author),
        _strings(topics, v.topic),
        _strings(list(SURFACES), v.surface),
        _varints(v.dwell),
        _varints(v.position),
        _constant(b"\x00", n),  # request_id: the null branch of the union
    ]
    buf, off = _concat(fields)
    values = [buf[a:b] for a, b in zip(off[:-1].tolist(), off[1:].tolist())]
    item_keys, codes = np.unique(v.item, return_inverse=True)
    names = [f"i{k}".encode() for k in item_keys.tolist()]
    return values, [names[c] for c in codes.tolist()]


def check_encoding(v: Views, values: list[bytes], sample: int = 500, seed: int = 3) -> None:
    """Raise unless a sample of ``values`` equals ``schemas.codec.encode`` of the records."""
    from schemas.codec import encode

    rng = np.random.default_rng(seed)
    rows = rng.choice(len(v), size=min(sample, len(v)), replace=False)
    for i in [0, len(v) - 1, *rows.tolist()]:
        want = encode("views", v.record(i))
        if values[i] != want:
            raise RuntimeError(f"view {i}: bulk Avro encoding {values[i]!r} differs from "
                               f"schemas.codec.encode {want!r}")


# -- batch envelopes ----------------------------------------------------------------------


def _dict_column(words: list[str], codes: np.ndarray) -> Any:
    from schemas.columnar import DictColumn

    return DictColumn(np.asarray(codes, dtype=np.int32), np.array(words, dtype=object))


def _id_column(prefix: str, numbers: np.ndarray) -> Any:
    uniq, codes = np.unique(numbers, return_inverse=True)
    return _dict_column([f"{prefix}{k}" for k in uniq.tolist()], codes)


def view_columns(v: Views, lo: int, hi: int) -> Any:
    """Columns (``schemas.columnar.EventColumns``) of views ``lo:hi``, event ids ``v<i>``."""
    from schemas.columnar import EventColumns

    part = v.take(slice(lo, hi))
    cols = {
        "event_id": _dict_column([f"v{k}" for k in range(lo, hi)], np.arange(hi - lo)),
        "event_ts": part.ts,
        "user_id": _id_column("u", part.user),
        "item_id": _id_column("i", part.item),
        "author_id": _id_column("a", part.author),
        "topic": _dict_column([topic_name(k) for k in range(TOPICS)], part.topic),
        "surface": _dict_column(list(SURFACES), part.surface),
        "dwell_ms": part.dwell,
        "position": part.position,
    }
    return EventColumns("views", hi - lo, cols)
