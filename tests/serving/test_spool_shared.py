"""One spool directory shared by several serving processes (``tessera serve --workers N``):
a drain never takes a segment another process is still appending to or draining, and a dead
writer's segment is drained by whoever comes next."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from serving.forward_log import Spool


def test_a_drain_skips_the_segment_another_spool_is_writing(tmp_path):
    a, b = Spool(tmp_path), Spool(tmp_path)  # two open files: flock treats them as two processes
    a.append([b"a1"])
    b.append([b"b1"])
    taken = b.take_segments()
    assert [s.read() for s in taken] == [[b"b1"]]  # a's current segment is a's
    a.append([b"a2"])  # a keeps appending to it meanwhile
    mine = a.take_segments()  # closes a's segment; b's is locked by b's drain
    assert [s.read() for s in mine] == [[b"a1", b"a2"]]
    for s in taken + mine:
        s.remove()
    assert a.pending() == 0 and not list(tmp_path.glob("spool-*.bin"))


def test_a_segment_being_drained_is_not_taken_twice(tmp_path):
    a, b = Spool(tmp_path), Spool(tmp_path)
    a.append([b"x"])
    first = a.take_segments()
    assert len(first) == 1
    assert b.take_segments() == []  # a's drain holds it
    first[0].release()  # not acknowledged: kept for a later drain
    again = b.take_segments()
    assert [s.read() for s in again] == [[b"x"]]
    again[0].remove()
    assert b.take_segments() == [] and a.pending() == 0


def test_a_live_process_keeps_its_segment_and_a_dead_one_leaves_it_to_others(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from serving.forward_log import Spool
        s = Spool({str(tmp_path)!r})
        s.append([b"from-the-child"])
        print("ready", flush=True)
        sys.stdin.readline()  # hold the segment until told to exit
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        parent = Spool(tmp_path)
        assert parent.take_segments() == []  # the child is still writing it
        assert parent.pending() == 1
    finally:
        child.communicate("exit\n", timeout=30)
    taken = parent.take_segments()  # the child is gone: its lock went with it
    assert [s.read() for s in taken] == [[b"from-the-child"]]
    taken[0].remove()
