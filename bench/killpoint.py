"""Run a ``tessera`` command that kills itself (SIGKILL) inside an Iceberg commit.

Usage: ``python bench/killpoint.py TABLE N WHEN -- tessera-args...``

The ``N``-th commit to the Iceberg table named ``TABLE`` (``blocks``, ``late_events``,
``training``, ...) of this process SIGKILLs the process:

* ``WHEN=before``: the commit's data and manifest files are written, the catalog has not
  moved to the new metadata yet (a crash in the middle of the commit: the table must not
  see it, and the replay must write the rows once);
* ``WHEN=after``: the catalog has moved, the caller has not returned (a crash between the
  commit and the worker's snapshot: the replay must not write the rows again).

A fault-injection harness for ``bench/faults.py`` (the kill is a real SIGKILL of the real
worker); the product code has no hook for it.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def install(table: str, nth: int, when: str) -> None:
    """Patch the SQL catalog's commit to SIGKILL this process at the ``nth`` commit to
    ``table`` (``when``: ``before`` or ``after`` the catalog moves)."""
    from pyiceberg.catalog.sql import SqlCatalog

    if when not in ("before", "after"):
        raise SystemExit(f"WHEN must be 'before' or 'after', got {when!r}")
    original = SqlCatalog.commit_table
    seen = [0]

    def commit_table(self, tbl, requirements, updates):
        hit = tbl.name()[-1] == table and (seen.__setitem__(0, seen[0] + 1) or seen[0] == nth)
        if hit and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        out = original(self, tbl, requirements, updates)
        if hit:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    SqlCatalog.commit_table = commit_table


def main(argv: list[str]) -> None:
    if len(argv) < 4 or argv[3] != "--":
        raise SystemExit(__doc__.split("\n\n")[1])
    table, nth, when = argv[0], int(argv[1]), argv[2]
    install(table, nth, when)
    from tessera.cli import cli

    cli(args=argv[4:], prog_name="tessera")


if __name__ == "__main__":
    main(sys.argv[1:])
