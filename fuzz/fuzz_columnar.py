"""Fuzz the columnar decoder the flows use on every Kafka message (``decode_message``).

Input: one byte choosing the topic (views, engagements, impressions, items), then the raw
message value: a single event (schema id of the topic) or a columnar batch (schema id 100).

Property:
* only ``SchemaError`` may escape (``decode_message`` documents ``DecodeError``; the Kafka
  source dead-letters ``SchemaError`` and ``ValueError``, anything else stops the flow);
* decoded columns are consistent: every column has ``n`` values, the topic is the one asked
  for, and the events re-encode as a batch that decodes to the same columns (a batch the
  decoder accepts never breaks the aggregation code downstream with a bad column).

Usage: python fuzz/fuzz_columnar.py [-atheris_runs=N] [libFuzzer flags] [corpus dirs or crash files]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz._harness import Violation, main
from fuzz._samples import EVENT_TOPICS, RECORDS

decode_message = encode_batch = SchemaError = None


def load() -> None:
    global decode_message, encode_batch, SchemaError
    from schemas.columnar import decode_message, encode_batch
    from schemas.errors import SchemaError


def seeds() -> list[bytes]:
    load()
    from schemas.codec import encode
    from schemas.columnar import records_to_columns

    out = []
    for i, topic in enumerate(EVENT_TOPICS):
        recs = RECORDS[topic]
        out += [bytes([i]) + encode(topic, r) for r in recs]
        out.append(bytes([i]) + encode_batch(records_to_columns(topic, recs)))
        out.append(bytes([i]) + encode_batch(records_to_columns(topic, [])))
    return out


def test_one_input(data: bytes) -> None:
    if decode_message is None:
        load()
    if not data:
        return
    topic = EVENT_TOPICS[data[0] % len(EVENT_TOPICS)]
    try:
        cols = decode_message(data[1:], topic)
    except SchemaError:
        return
    if cols.topic != topic:
        raise Violation(f"asked for {topic!r}, got columns of {cols.topic!r}")
    for name, col in cols.columns.items():
        if len(col) != cols.n:
            raise Violation(f"column {name!r} has {len(col)} values, n={cols.n}")
    try:
        again = encode_batch(cols)
    except SchemaError as exc:
        raise Violation(f"decoded columns do not re-encode: {exc}") from exc
    # compared as bytes: NaN values in map columns make EventColumns.equals() false
    if encode_batch(decode_message(again, topic)) != again:
        raise Violation("decode -> encode_batch -> decode changed the columns")


KNOWN_BUGS: list = []  # open bugs tolerated by the fuzz runs (see fuzz/_harness.py)

if __name__ == "__main__":
    main(load, seeds, test_one_input, known_bugs=KNOWN_BUGS,
         defaults={"-max_len": "4096", "-dict": str(Path(__file__).parent / "dicts" / "avro.dict")})
