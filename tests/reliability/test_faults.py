"""Faults on the real stack (the cheaper scenarios of ``bench/faults.py``), each checked
against an oracle: nothing lost, nothing counted twice.

kill -9 of the blocks and archive workers is tested in ``tests/dataflows``; here:

* kill -9 of the sequences worker and of the label-join worker, restart from recovery;
* the blocks worker SIGKILLed inside its Iceberg commits: each sealed block and late event
  on disk once;
* every views and engagements message produced twice: counted once with ``deduplicate:``;
* the blocks worker SIGKILLed, then every views message sent again: the restarted worker
  drops every copy (its event-id memory rebuilt from the log);
* the broker frozen (SIGSTOP) under load, then resumed (SIGCONT);
* the online store unavailable: serving degrades to popularity and says so, then recovers;
* the Aerospike server stopped and restarted under serving and a tailing blocks worker:
  degraded pages while it is down, every event counted once after;
* a corrupt model version (garbage ONNX; hash mismatch) is refused, the old one serves;
* the broker stopped and restarted empty: serving's impressions arrive once, a tailing
  blocks worker reads the new log; and restarted five times in a row inside the worker's
  poll loop;
* the impression spool's disk and the archive warehouse's disk full (a real tmpfs; skipped
  where one cannot be mounted).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration]

_PATH = Path(__file__).resolve().parents[2] / "bench" / "faults.py"
_spec = importlib.util.spec_from_file_location("tessera_bench_faults", _PATH)
faults = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = faults  # dataclasses resolve their module by name
_spec.loader.exec_module(faults)

SIZES = faults.Sizes(views=30_000, users=300, items=1_000, pause_s=3.0, requests=12)


def _check(row) -> None:
    detail = "\n".join(row.notes)
    assert row.lost == 0, detail
    assert row.double_counted == 0, detail
    assert row.events_in > 0 and row.events_out >= row.events_in, detail
    assert row.recovery_s is not None, detail
    assert row.passed, detail


@pytest.fixture(scope="module")
def serving_stack(tmp_path_factory):
    with faults._serving_stack(tmp_path_factory.mktemp("faults-serving")) as stack:
        yield stack


@pytest.mark.slow
def test_kill_9_sequences_worker_then_restart_loses_and_repeats_nothing(tmp_path):
    _check(faults.kill9_sequences(tmp_path, SIZES))


@pytest.mark.slow
def test_kill_9_label_worker_then_restart_matches_join_reference(tmp_path):
    _check(faults.kill9_labels(tmp_path, SIZES))


@pytest.mark.slow
def test_broker_restarted_five_times_in_a_row_inside_the_poll_loop(tmp_path):
    """Back-to-back restarts (each inside the tail worker's poll loop, fetches in flight):
    the worker survives every one and counts the first and the last log exactly once."""
    _check(faults.broker_bounce(tmp_path, SIZES))


@pytest.mark.slow
def test_blocks_worker_killed_inside_its_iceberg_commits_writes_each_row_once(tmp_path):
    """SIGKILL inside the sealed-block and late-event commits, before and after the catalog
    moves: the store equals the oracle, and every sealed block and late event is on disk
    exactly once (fails with the marks ignored: the replay appends the sealed blocks of the
    commit it did not see returning again)."""
    row = faults.kill_in_commit(tmp_path, SIZES)
    _check(row)
    assert row.physical_duplicates == 0, "\n".join(row.notes)


@pytest.mark.slow
def test_every_message_produced_twice_is_counted_once_with_deduplicate(tmp_path):
    """Every views and engagements message produced twice in a row (a retrying producer):
    the blocks worker with ``deduplicate:`` equals the oracle and reports the copies it
    dropped; the same run without it double counts (the scenario fails if it does not, so
    the check can fail)."""
    row = faults.duplicate_events(tmp_path, SIZES)
    _check(row)
    assert row.physical_duplicates == 0, "\n".join(row.notes)


@pytest.mark.slow
def test_copies_sent_after_a_kill_9_are_dropped_by_the_restarted_blocks_worker(tmp_path):
    """kill -9 mid-stream, every views message sent again, restart: the resumed source
    rebuilds its event-id memory from the log and drops every copy (fails when the
    rebuild is skipped: the copies are counted again)."""
    row = faults.duplicates_after_restart(tmp_path, SIZES)
    _check(row)
    assert row.physical_duplicates == 0, "\n".join(row.notes)


@pytest.mark.slow
def test_broker_sigstop_under_load_then_sigcont_matches_oracle(tmp_path):
    _check(faults.sigstop_broker(tmp_path, SIZES))


def test_store_unavailable_degrades_to_popularity_then_recovers(serving_stack, tmp_path):
    _check(faults.store_unavailable(tmp_path, SIZES, stack=serving_stack))


def test_corrupt_model_versions_are_refused_and_the_old_one_keeps_serving(serving_stack,
                                                                         tmp_path):
    _check(faults.corrupt_model(tmp_path, SIZES, stack=serving_stack))


@pytest.mark.slow
def test_aerospike_stopped_and_restarted_under_serving_and_a_tailing_worker(tmp_path):
    from tessera import aerospike_local

    if not aerospike_local.available():
        pytest.skip(f"no Aerospike server build at {aerospike_local.server_dir()} "
                    "(set TESSERA_AEROSPIKE_DIR)")
    _check(faults.aerospike_restart(tmp_path, SIZES))


@pytest.mark.slow
def test_broker_restarted_empty_serving_and_a_tailing_worker_reconnect(tmp_path):
    _check(faults.broker_restart(tmp_path, SIZES))


def _needs_tmpfs(tmp_path) -> None:
    if not faults.can_mount(tmp_path):
        pytest.skip("cannot mount a tmpfs here (needs root): the disk-full scenarios need one")


@pytest.mark.slow
def test_spool_disk_full_loses_no_impression_and_recovers(tmp_path):
    _needs_tmpfs(tmp_path)
    _check(faults.spool_disk_full(tmp_path, SIZES))


@pytest.mark.slow
def test_warehouse_disk_full_fails_clearly_and_a_restart_archives_everything_once(tmp_path):
    _needs_tmpfs(tmp_path)
    _check(faults.warehouse_disk_full(tmp_path, SIZES))
