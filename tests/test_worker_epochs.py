"""The workers' default epoch intervals: long for blocks (snapshots copy every open block)."""

import pytest

import dataflows.runner
from tessera.commands import worker


@pytest.mark.parametrize(("what", "given", "expected"), [
    ("blocks", None, worker.BLOCKS_EPOCH_S),
    ("sequences", None, worker.EPOCH_S),
    ("blocks", 0.5, 0.5),  # an explicit --epoch-interval always wins
])
def test_epoch_interval_defaults(monkeypatch, what, given, expected):
    seen = {}
    monkeypatch.setattr(dataflows.runner, "run_flow",
                        lambda flow, **kw: seen.update(kw))
    worker._run(object(), workers=1, process_id=None, addresses=None, recovery_dir=None,
                epoch_interval=given, bounded=True, what=what)
    assert seen["epoch_interval_s"] == expected
    assert worker.BLOCKS_EPOCH_S > worker.EPOCH_S
