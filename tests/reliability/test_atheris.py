"""Coverage-guided fuzzing (atheris / libFuzzer) of the input boundaries, bounded for CI.

Each harness in ``fuzz/`` runs in its own process for a fixed number of inputs from a fixed
libFuzzer seed (reproducible: the same inputs every run) and must exit 0: no exception type
the code under test does not document, no broken invariant (see each harness's docstring).
Longer runs: ``python fuzz/fuzz_<name>.py -atheris_runs=1000000`` (README, "Fuzzing").

Without atheris (it ships wheels for x86-64 Linux only) the fuzz runs are skipped; the
in-process checks below (seeds, fixed crashes, open bugs) run everywhere.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz import fuzz_codec, fuzz_columnar, fuzz_jsoncodec, fuzz_spec
from fuzz._harness import tolerate

REPO = Path(__file__).resolve().parents[2]
HARNESSES = {"codec": fuzz_codec, "columnar": fuzz_columnar, "jsoncodec": fuzz_jsoncodec,
             "spec": fuzz_spec}
# inputs per harness: ~2-6 s each on one core (spec loading writes and parses a YAML file)
RUNS = {"codec": 20_000, "columnar": 20_000, "jsoncodec": 20_000, "spec": 4_000}
HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None
needs_atheris = pytest.mark.skipif(
    not HAVE_ATHERIS, reason="atheris is not installed (pip install atheris; wheels for "
    "x86-64 Linux only): the coverage-guided fuzz runs are skipped")


def _fuzz(script: str, tmp_path: Path, *args: str, code: str | None = None,
          env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a harness (or ``code`` that calls one) with artifacts under ``tmp_path``."""
    flags = ["-seed=1", "-timeout=30", "-rss_limit_mb=2048", f"-artifact_prefix={tmp_path}/",
             *args]
    cmd = [sys.executable, str(REPO / "fuzz" / f"{script}.py"), *flags] if code is None \
        else [sys.executable, "-c", code, *flags]
    return subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(REPO),
             "TMPDIR": str(tmp_path), **(env or {})})  # the seed corpus goes under tmp_path


@needs_atheris
@pytest.mark.parametrize("name", list(HARNESSES))
def test_fuzz_harness_finds_no_crash(name, tmp_path):
    res = _fuzz(f"fuzz_{name}", tmp_path, f"-atheris_runs={RUNS[name]}")
    tail = (res.stdout + res.stderr)[-6000:]
    assert res.returncode == 0, f"fuzz_{name} crashed (input in {tmp_path}):\n{tail}"
    assert f"Done {RUNS[name]}" in res.stderr, tail
    assert not list(tmp_path.glob("crash-*")), tail


@needs_atheris
def test_fuzz_run_fails_and_keeps_the_input_when_the_decoder_breaks(tmp_path):
    """The harness can fail: a decoder that raises an undocumented error is a crash."""
    code = (
        "import sys\n"
        "sys.argv[0] = 'fuzz_codec'\n"
        "from fuzz import _harness, fuzz_codec as h\n"
        "def load():\n"
        "    h.load()\n"
        "    import schemas.codec as c\n"
        "    real = c.read_body\n"
        "    def broken(ts, data, *, topic=None):\n"
        "        rec = real(ts, data, topic=topic)\n"
        "        if rec.get('position') == 4:\n"
        "            raise IndexError('simulated decoder bug')\n"
        "        return rec\n"
        "    c.read_body = broken\n"
        "    h.decode = lambda data, topic=None: (c.read_header(data), "
        "broken(c.schema_named(c.topic_for_schema_id(c.read_header(data))), data, topic=topic))\n"
        "_harness.main(load, lambda: [b'\\0'], h.test_one_input)\n"
    )
    seed_dir = tmp_path / "corpus"
    seed_dir.mkdir()
    for i, seed in enumerate(fuzz_codec.seeds()):
        (seed_dir / f"s{i}").write_bytes(seed)
    res = _fuzz("", tmp_path, "-atheris_runs=2000", str(seed_dir), code=code)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert "simulated decoder bug" in out, out[-3000:]
    assert list(tmp_path.glob("crash-*")), out[-3000:]


# ----------------------------------------------------------------- in process, no atheris

@pytest.mark.parametrize("name", list(HARNESSES))
def test_seeds_pass_the_harness(name):
    """Every seed passes, open bugs aside (as in the fuzz runs; tested on their own below)."""
    harness = HARNESSES[name]
    target = tolerate(harness.test_one_input, harness.KNOWN_BUGS)
    for seed in harness.seeds():
        target(seed)


def _overlong_position_view() -> bytes:
    from schemas.codec import encode

    rec = {**fuzz_columnar.RECORDS["views"][1], "position": 0, "request_id": None}
    framed = encode("views", rec)
    assert framed.endswith(b"\x00\x00")  # position 0, then the union's null branch
    return framed[:-2] + b"\xff" * 9 + b"\x01" + b"\x00"


# Inputs the fuzzers found, fixed in schemas/: each must now pass its harness.
FIXED = {
    # Avro 'int' as a 10-byte varint: fastavro read it as -2**63, decode() accepted a dead
    # letter with partition=-2**63 (now DecodeError: int outside 32 bits)
    "codec-overlong-int-varint": (
        fuzz_codec,
        base64.b64decode("AAAAAAUAAP///////////////////////////////////////////////////////"
                         "////////////////////////////////////////////wAAAAAAAA==")),
    # a non-ASCII character in a base64 bytes field: base64 raised a bare ValueError out of
    # from_json (now DecodeError naming the field)
    "jsoncodec-non-ascii-base64": (
        fuzz_jsoncodec,
        b"\x04" + b'{"failed_ts":1700000000999,"topic":"views","partition":3,"offset":1,'
        b'"reason":"r","stage":"decode","key":"dTE=","payload":"eyJub3\xd7\xaeiYXZybyJ9"}'),
}


@pytest.mark.parametrize("case", list(FIXED))
def test_fixed_crash_stays_fixed(case):
    harness, data = FIXED[case]
    harness.test_one_input(data)


def test_overlong_int_in_a_view_is_a_decode_error_naming_the_field():
    """The columnar path (what the flows dead-letter) rejected it too, but as "cannot encode"
    from records_to_columns; the reason now says what is wrong with the message."""
    from schemas.columnar import decode_message
    from schemas.errors import DecodeError

    with pytest.raises(DecodeError, match="outside the 32-bit range") as info:
        decode_message(_overlong_position_view(), "views")
    assert info.value.field == "position"


# Bugs outside schemas/ the fuzzers found, fixed: a huge dwell_ms was an HTTP 500 from
# /v1/events (now a 4xx naming the field), and an int literal beyond 64 bits parsed, then
# failed every evaluation (now rejected when the spec loads).
def test_fixed_events_dwell_ms_past_int64_is_a_bad_request():
    from serving.errors import BadRequest
    from serving.requests import parse_engagements

    body = (b'{"impression_id":"i","user_id":"u","item_id":"x","action":"click",'
            b'"dwell_ms":9223372036854775808}')
    fuzz_jsoncodec.test_one_input(bytes([fuzz_jsoncodec.EVENTS]) + body)
    with pytest.raises(BadRequest) as info:
        parse_engagements(json.loads(body))
    assert info.value.field == "dwell_ms"


def test_fixed_int_literal_beyond_64_bits_is_rejected_at_load():
    from features.errors import FilterSyntaxError
    from features.expressions import parse_derived

    fuzz_spec.test_one_input(b"\x01" + b"1" + b"0" * 400)
    with pytest.raises(FilterSyntaxError, match="64 bits"):
        parse_derived("x + 1" + "0" * 400)
