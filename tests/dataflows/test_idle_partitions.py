"""Idle partitions do not hold the watermark back (``features.watermarks``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from features.store import open_store
from features.watermarks import IDLE_WATERMARK, NO_WATERMARK, combined_watermark
from tessera.importer import ImportConfig, import_events

FEATURES = """\
features:
  - name: item_views
    source: views
    entity: item_id
    aggregation: count
    windows: [1h]
"""
T0_S = 1_764_000_000


def test_combined_watermark_leaves_idle_partitions_out() -> None:
    wms = {"v:0": 500, "v:1": IDLE_WATERMARK, "v:2": 700}
    assert combined_watermark(wms, ["v:0", "v:1", "v:2"]) == 500
    assert combined_watermark(wms, ["v:0", "v:1", "v:3"]) == NO_WATERMARK  # v:3 never heard
    assert combined_watermark(wms, ["v:1"]) == NO_WATERMARK  # all idle: nothing known
    assert combined_watermark({}, []) == NO_WATERMARK


@pytest.mark.parametrize("idle_timeout", ["5m", "0"])
def test_a_bounded_partition_without_events_holds_no_watermark(
        fresh_broker: str, tmp_path: Path, idle_timeout: str) -> None:
    """One user's views land in one of the three partitions; the two empty ones end without
    an event. With the idle rule the blocks watermark is the busy partition's; without it
    (--idle-timeout 0) it never moves."""
    csv = tmp_path / "views.csv"
    rows = [f"e{k},{(T0_S + 60 * k) * 1000},u1,i{k % 3},a1,news,home,100,0\n" for k in range(30)]
    csv.write_text("event_id,event_ts,user_id,item_id,author_id,topic,surface,dwell_ms,"
                   "position\n" + "".join(rows))
    import_events(ImportConfig(path=csv, topic="views"), fresh_broker)
    features = tmp_path / "features.yaml"
    features.write_text(FEATURES)
    store_url = f"lmdb://{tmp_path / 'store'}"
    subprocess.run(
        [sys.executable, "-m", "tessera.cli", "--log-level", "WARNING", "worker", "blocks",
         "--bootstrap", fresh_broker, "--store", store_url, "--features", str(features),
         "--topics", "views", "--bounded", "--lateness", "0", "--idle-timeout", idle_timeout],
        check=True, timeout=300, capture_output=True)
    with open_store(store_url, readonly=True) as store:
        marks = store.get_watermarks("blocks/")
    if idle_timeout == "0":
        assert not marks  # held at NO_WATERMARK by the empty partitions: never written
    else:
        assert marks and set(marks.values()) == {(T0_S + 60 * 29) * 1000}
