"""Fuzz the single-event Avro decoder with Confluent framing (``schemas.codec.decode``).

Input: the raw Kafka message value. It is decoded without a topic (any known schema id) and
as a message of every topic (dead-letter topic included).

Property:
* only ``schemas.errors.SchemaError`` (``DecodeError``, as ``decode`` documents) may escape;
  the Kafka source turns those into dead letters, anything else would stop the flow;
* a message that decodes is a valid record of its schema: it re-encodes (``encode`` validates
  types and ranges) and re-decodes to the same bytes again (no value is silently changed).

Usage: python fuzz/fuzz_codec.py [-atheris_runs=N] [libFuzzer flags] [corpus dirs or crash files]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz._harness import Violation, main
from fuzz._samples import RECORDS

TOPICS = ("views", "engagements", "impressions", "items", "deadletter")

decode = encode = SchemaError = topic_for_schema_id = BATCH_SCHEMA_ID = None


def load() -> None:
    global decode, encode, SchemaError, topic_for_schema_id, BATCH_SCHEMA_ID
    from schemas.codec import decode, encode
    from schemas.errors import SchemaError
    from schemas.registry import BATCH_SCHEMA_ID, topic_for_schema_id


def seeds() -> list[bytes]:
    load()
    from schemas.columnar import encode_batch, records_to_columns

    out = [encode(t, r) for t, recs in RECORDS.items() for r in recs]
    out += [encode_batch(records_to_columns(t, RECORDS[t])) for t in TOPICS if t != "deadletter"]
    return out


def _check_decoded(schema_id: int, record: dict) -> None:
    if schema_id == BATCH_SCHEMA_ID:
        return  # the raw batch envelope: fuzz_columnar checks what it decodes to
    name = topic_for_schema_id(schema_id)
    try:
        again = encode(name, record)
    except SchemaError as exc:
        raise Violation(f"decode accepted a record that does not re-encode: {exc}") from exc
    sid, record2 = decode(again, topic=name)
    if sid != schema_id or encode(name, record2) != again:
        raise Violation(f"decode -> encode -> decode changed the {name} record")


def test_one_input(data: bytes) -> None:
    if decode is None:
        load()
    for topic in (None, *TOPICS):
        try:
            schema_id, record = decode(data, topic=topic)
        except SchemaError:
            continue
        _check_decoded(schema_id, record)


KNOWN_BUGS: list = []  # open bugs tolerated by the fuzz runs (see fuzz/_harness.py)

if __name__ == "__main__":
    main(load, seeds, test_one_input, known_bugs=KNOWN_BUGS,
         defaults={"-max_len": "4096", "-dict": str(Path(__file__).parent / "dicts" / "avro.dict")})
