"""Fuzz feature-spec loading with hostile filter and derived expressions.

Input: one byte choosing the mode, then text (UTF-8, invalid bytes replaced):

* 0: ``parse_filter(text)``; 1: ``parse_derived(text)``. Only ``FilterSyntaxError`` may
  escape (as documented). An expression that parses is evaluated on rows built from the
  fields it names (nulls, NaN, zeros, negatives, huge and tiny numbers, strings) with
  ``evaluate_row`` and, on the same rows as columns, ``evaluate_columns``: neither may raise,
  a filter gives booleans, a derived expression with ``default`` a finite float, and the two
  agree row by row (as documented);
* 2: a features file whose filter is ``text``, 3: one whose derived expression is ``text``,
  4: ``text`` as the whole YAML file; all through ``load_features``: only
  ``FeatureSpecError`` may escape.

Nothing may be *run*: while the harness runs as a fuzzer, an audit hook records any
``exec``/``eval`` of a code object not loaded from a file, any process start and any
socket connection; one of those is a crash.

Usage: python fuzz/fuzz_spec.py [-atheris_runs=N] [libFuzzer flags] [corpus or crash files]
"""

from __future__ import annotations

import atexit
import json
import math
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from fuzz._harness import Violation, main

parse_filter = parse_derived = load_features = FilterSyntaxError = FeatureSpecError = None

MODES = ("filter", "derived", "yaml_filter", "yaml_derived", "yaml")

HOSTILE = [
    "__import__('os').system('touch /tmp/tessera-fuzz-pwned')",
    "().__class__.__bases__[0].__subclasses__()",
    "open('/etc/passwd').read()",
    "eval('1+1')",
    "exec('import os')",
    "compile('1', 'x', 'eval')",
    "globals()",
    "getattr(dwell_ms, '__class__')",
    "(lambda: 1)()",
    "[x for x in range(10**9)]",
    "'a' * 10**9",
    "9**9**9",
    "dwell_ms ** 1000",
    "dwell_ms.__class__",
    "action[0] == 'c'",
    "f'{action}' == 'click'",
    "(x := 1) == 1",
    "action == 'click' if dwell_ms else True",
    "__builtins__",
    "_private == 1",
    "dwell_ms > 0 and " * 20 + "True",
    "(" * 200 + "1" + ")" * 200,
    "-" * 500 + "1",
    "not " * 300 + "True",
    "dwell_ms in [1, 2, 3]",
    "dwell_ms not in (1.5, -2)",
    "action in ['click', 'like']",
    "surface == 'explore' and dwell_ms > 0",
    "request_id == null or request_id != 'r'",
    "dwell_ms / 0 > 1",
    "1e999 > dwell_ms",
    "position * 1e308 * 10 > 0",
    "dwell_ms > " + "9" * 400,
    "b'bytes' == action",
    "...",
    "1j == 1j",
    "dwell_ms = 1",
    "await x",
    "yield 1",
    "\x00",
    "a\nb",
    "# comment",
    "dwell_ms > 0\n",
]
HOSTILE_DERIVED = [
    "(item_clicks_1d + 1) / (item_impressions_1d + 20)",
    "log1p(item_views_1d) - sqrt(item_views_7d)",
    "min(item_views_1d, item_views_7d, 3) / max(item_views_1d, 0)",
    "-item_views_1d * 1e308 * 10",
    "1" + "0" * 400,
    "-(" + "1" * 400 + ")",
    "log1p(-1)",
    "sqrt(-item_views_1d)",
    "min(item_views_1d)",
    "log1p(x=1)",
    "__import__('os')",
    "item_views_1d.real",
    "pow(2, 10)",
    "True + 1",
]
VALUES_NUM = [None, math.nan, 0, -1, 1, 0.5, -0.0, 2**53 + 1, 2**62, -(2**63), 1e300, -1e300,
              5e-324, math.inf, True]
VALUES_STR = [None, "", "click", "explore", "a" * 200, "é", "\x00"]

warnings.filterwarnings("ignore", category=SyntaxWarning)  # "invalid decimal literal" etc.

_ALARMS: list[str] = []
_YAML: list[Path] = []  # the scratch features file, made on first use


def load() -> None:
    global parse_filter, parse_derived, load_features, FilterSyntaxError, FeatureSpecError
    from features.errors import FeatureSpecError, FilterSyntaxError
    from features.expressions import parse_derived, parse_filter
    from features.spec_loader import load_features


def seeds() -> list[bytes]:
    out = [bytes([m]) + t.encode() for m in (0, 2) for t in HOSTILE]
    out += [bytes([m]) + t.encode() for m in (1, 3) for t in HOSTILE_DERIVED]
    out.append(bytes([4]) + (Path(__file__).resolve().parent.parent / "features.yaml")
               .read_bytes()[:4000])
    return out


def _audit(event: str, args: tuple) -> None:
    if event == "exec":
        code = args[0] if args else None
        filename = getattr(code, "co_filename", "")
        if filename.startswith("<") or not Path(filename).is_file():
            _ALARMS.append(f"exec of a code object from {filename!r}")
    elif event in ("os.system", "subprocess.Popen", "os.posix_spawn", "os.exec", "os.spawn",
                   "os.fork", "os.forkpty", "socket.connect", "ctypes.dlopen"):
        _ALARMS.append(f"{event} {args!r:.200}")


def _arm_tripwire() -> None:
    sys.addaudithook(_audit)


def _rows(expr, text: str, numeric_only: bool) -> tuple[list[dict], dict[str, np.ndarray], int]:
    """Rows over the expression's fields, and the same rows as columns (one type per field)."""
    names = sorted(expr.fields)
    h = sum(text.encode())  # spread the value choices over inputs, deterministically
    rows: list[dict] = [{} for _ in range(4)]
    cols: dict[str, np.ndarray] = {}
    for j, name in enumerate(names):
        is_str = not numeric_only and (h + j) % 3 == 0
        pool = VALUES_STR if is_str else VALUES_NUM
        vals = [pool[(h + 7 * j + 3 * i) % len(pool)] for i in range(4)]
        if is_str:
            col = np.empty(4, dtype=object)
            col[:] = vals
        else:
            # a float column: null is NaN there, so the rows hold NaN too
            vals = [math.nan if v is None else float(v) for v in vals]
            col = np.asarray(vals, dtype=np.float64)
        cols[name] = col
        for i, v in enumerate(vals):
            rows[i][name] = v
    return rows, cols, 4


def _evaluate(expr, text: str, derived: bool) -> None:
    rows, cols, n = _rows(expr, text, numeric_only=derived)
    if derived:
        by_row = [expr.evaluate_row(r, default=-7.0) for r in rows]
        by_col = expr.evaluate_columns(cols, n, default=-7.0)
        if not all(isinstance(v, float) and math.isfinite(v) for v in by_row):
            raise Violation(f"derived {text!r} gave {by_row} despite default=-7.0")
        if not np.allclose(by_col, by_row, rtol=1e-9, atol=0.0):
            raise Violation(f"derived {text!r}: rows {by_row} != columns {by_col.tolist()}")
    else:
        by_row = [expr.evaluate_row(r) for r in rows]
        by_col = expr.evaluate_columns(cols, n)
        if not all(isinstance(v, bool) for v in by_row):
            raise Violation(f"filter {text!r} gave non-booleans {by_row}")
        if by_col.dtype != bool or by_col.tolist() != by_row:
            raise Violation(f"filter {text!r}: rows {by_row} != columns {by_col.tolist()}"
                            f" on {rows}")


def _yaml_file(mode: str, text: str) -> str:
    q = json.dumps(text)  # a JSON string is a YAML double-quoted scalar
    if mode == "yaml":
        return text
    lines = ["features:",
             "  - {name: item_views, source: views, entity: item_id, aggregation: count,",
             "     windows: [1h, 1d]}",
             "  - {name: item_clicks, source: engagements, entity: item_id,",
             "     aggregation: count, windows: [1d],"]
    flt = q if mode == "yaml_filter" else json.dumps("action == 'click'")
    lines.append(f"     filter: {flt}}}")
    if mode == "yaml_derived":
        lines += ["derived:", f"  - {{name: d, entity: item, expression: {q}}}"]
    return "\n".join(lines) + "\n"


def test_one_input(data: bytes) -> None:
    if parse_filter is None:
        load()
    if not data:
        return
    mode = MODES[data[0] % len(MODES)]
    text = data[1:].decode("utf-8", "replace")
    del _ALARMS[:]
    try:
        if mode in ("filter", "derived"):
            try:
                expr = (parse_filter if mode == "filter" else parse_derived)(text)
            except FilterSyntaxError:
                return
            _evaluate(expr, text, derived=mode == "derived")
        else:
            if not _YAML:
                scratch = tempfile.mkdtemp(prefix="tessera-fuzz-spec-")
                atexit.register(shutil.rmtree, scratch, True)
                _YAML.append(Path(scratch) / "f.yaml")
            _YAML[0].write_text(_yaml_file(mode, text), "utf-8")
            try:
                load_features(_YAML[0])
            except FeatureSpecError:
                return
    finally:
        if _ALARMS:
            raise Violation(f"{mode} {text[:80]!r} ran something: {_ALARMS}")


KNOWN_BUGS: list = []  # open bugs tolerated by the fuzz runs (see fuzz/_harness.py)

if __name__ == "__main__":
    main(load, seeds, test_one_input, defaults={"-max_len": "2048"},
         before_fuzz=_arm_tripwire, known_bugs=KNOWN_BUGS)
