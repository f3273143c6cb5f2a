"""Shared runner of the atheris harnesses: instrumentation, seed corpus, default flags.

A harness module defines ``load()`` (imports the code under test into the module's globals),
``seeds()`` (the starting corpus) and ``test_one_input(data)``. ``main`` imports the project
modules under ``atheris.instrument_imports`` (so libFuzzer sees their branch coverage), writes
the seeds to a fresh corpus directory unless one is given on the command line, and runs
libFuzzer. Any exception escaping ``test_one_input`` is a crash: atheris prints it, libFuzzer
writes the input to ``<artifact_prefix>crash-<sha1>`` and the process exits non-zero.

Reproduce a crash with ``python fuzz/fuzz_<name>.py path/to/crash-<sha1>``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PROJECT_PACKAGES = ("schemas", "features", "serving")
"""Packages instrumented for coverage (the code under test; libraries are not)."""


KnownBug = tuple[type[BaseException], str, str]
"""(exception type, a substring of its message, where it is reported): an open bug."""


def tolerate(test_one_input: Callable[[bytes], None],
             known_bugs: Sequence[KnownBug]) -> Callable[[bytes], None]:
    """Wrap ``test_one_input`` so the listed open bugs are reported once, not a crash.

    Only while a bug is open and has its own failing regression test (an ``xfail(strict=True)``
    in ``tests/reliability/test_atheris.py``, which turns red once the bug is fixed so its
    entry gets removed). ``TESSERA_FUZZ_STRICT=1`` tolerates nothing.
    """
    if not known_bugs or os.environ.get("TESSERA_FUZZ_STRICT") == "1":
        return test_one_input
    seen: set[str] = set()

    def guarded(data: bytes) -> None:
        try:
            test_one_input(data)
        except BaseException as exc:
            for typ, needle, where in known_bugs:
                if isinstance(exc, typ) and needle in str(exc):
                    if where not in seen:
                        seen.add(where)
                        print(f"KNOWN BUG (tolerated; TESSERA_FUZZ_STRICT=1 fails on it): "
                              f"{where}: {type(exc).__name__}: {str(exc)[:200]}",
                              file=sys.stderr, flush=True)
                    return
            raise

    return guarded


def main(
    load: Callable[[], None],
    seeds: Callable[[], Iterable[bytes]],
    test_one_input: Callable[[bytes], None],
    *,
    argv: list[str] | None = None,
    defaults: dict[str, str] | None = None,
    before_fuzz: Callable[[], None] | None = None,
    known_bugs: Sequence[KnownBug] = (),
) -> None:
    """Instrument, seed and fuzz; never returns (libFuzzer exits the process)."""
    import atheris

    with atheris.instrument_imports(include=list(PROJECT_PACKAGES)):
        load()
    args = list(sys.argv if argv is None else argv)
    flags = {a.split("=", 1)[0] for a in args[1:] if a.startswith("-")}
    for flag, value in (defaults or {}).items():
        if flag not in flags:
            args.insert(1, f"{flag}={value}")
    if not any(not a.startswith("-") for a in args[1:]):
        corpus = Path(tempfile.mkdtemp(prefix="tessera-fuzz-corpus-"))
        for i, seed in enumerate(seeds()):
            (corpus / f"seed-{i:04d}").write_bytes(seed)
        args.append(str(corpus))
        print(f"corpus (seeds, then what the run adds): {corpus}", file=sys.stderr, flush=True)
    target = tolerate(test_one_input, known_bugs)
    # warm up on the seeds: lazy imports and caches happen here, not inside the fuzz loop
    for seed in seeds():
        target(seed)
    if before_fuzz is not None:
        before_fuzz()
    atheris.Setup(args, target)
    atheris.Fuzz()


class Violation(AssertionError):
    """An invariant of the code under test does not hold for this input."""
