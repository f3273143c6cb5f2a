"""A request reads at the feature snapshot's end while the next snapshot is built."""

from __future__ import annotations

from types import SimpleNamespace

from features.store.base import NO_WATERMARK
from serving.pipeline import SNAPSHOT_LAG_MS, FeedPipeline

NAMES = ("item_views_1d", "author_views_7d")
END = 1_796_255_700_000


def _pipeline(snapshot_end: int | None, names=NAMES):
    cur = None if snapshot_end is None else SimpleNamespace(
        features=SimpleNamespace(end=snapshot_end, names=names))
    return SimpleNamespace(snapshots=SimpleNamespace(current=cur))


def test_the_snapshot_end_is_used_while_at_most_one_block_behind():
    end = FeedPipeline._request_end
    assert end(_pipeline(END), END + SNAPSHOT_LAG_MS, NAMES) == END  # being rebuilt
    assert end(_pipeline(END), END, NAMES) == END


def test_the_newest_end_otherwise():
    end = FeedPipeline._request_end
    newest = END + 2 * SNAPSHOT_LAG_MS
    assert end(_pipeline(END), newest, NAMES) == newest  # too far behind: the store
    assert end(_pipeline(END, names=("other",)), END + 1, NAMES) == END + 1  # other columns
    assert end(_pipeline(None), END + 1, NAMES) == END + 1  # no snapshot yet
    assert end(_pipeline(END + SNAPSHOT_LAG_MS), END, NAMES) == END  # never a newer end
    assert end(_pipeline(END), NO_WATERMARK, NAMES) == NO_WATERMARK
    assert end(SimpleNamespace(snapshots=None), END + 1, NAMES) == END + 1
