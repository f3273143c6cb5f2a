"""Table maintenance: every long-running Iceberg writer keeps its commit cost and file count flat.

An Iceberg append writes a data file, a manifest, a manifest list and a new metadata JSON
that lists every snapshot so far. Left alone, a writer that commits every few seconds (the
archive, the blocks flow's sealed blocks, the late events, the label join) makes each commit
slower than the last: the metadata JSON (deep-copied several times by every pyiceberg commit) grows by a
snapshot a commit, and a plan reads one manifest and one data file more a commit. Three
rules keep it flat, the ones Iceberg's own maintenance uses:

1. **Manifest merging** (table property ``commit.manifest-merge.enabled``): an append folds
   small manifests into one once there are ``commit.manifest.min-count-to-merge`` of them.
2. **Old metadata files deleted** on commit (``write.metadata.delete-after-commit.enabled``,
   keeping ``write.metadata.previous-versions-max``).
3. **Compaction, snapshot expiry and orphan removal**, run by the writer itself every
   ``MaintenancePolicy.every_commits`` commits (``after_commit``; expiry alone every
   ``expire_every``):

   - a partition with ``min_files`` or more data files under ``small_file_bytes`` has them
     rewritten as one file (one commit for every partition: files swapped, rows unchanged;
     a concurrent commit that deleted one of them makes it give up until the next run);
   - every snapshot but the last ``keep_last`` is expired (and but the newest snapshot
     carrying Tessera's summary properties, with the snapshots after it: the raw archive's
     committed offsets), so the metadata a commit copies and rewrites stays small. A commit
     another process started on a snapshot expired meanwhile fails pyiceberg's validation
     ("cannot find starting snapshot"); every Tessera writer retries it on a fresh read;
   - a file under the table that no kept snapshot references is deleted once it has been
     unreferenced for ``grace_ms`` (manifest lists, manifests, the data files compaction or
     a replacement removed, and the files of a commit that failed). The grace is how long a
     scan may take: one planned on a snapshot just expired still finds every file. When a
     file was first seen unreferenced is kept beside the metadata
     (``metadata/tessera-unreferenced.json``).

Nothing in Tessera time-travels: every reader reads the current snapshot. Orphan removal
works on a local warehouse (``file://`` or a path); elsewhere only the metadata is trimmed.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import structlog
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.table import Table

log = structlog.get_logger("features.offline.maintenance")

#: set on every table Tessera creates, and on older tables when they are opened
TABLE_PROPERTIES: Mapping[str, str] = {
    "commit.manifest-merge.enabled": "true",
    "commit.manifest.min-count-to-merge": "16",
    "commit.manifest.target-size-bytes": str(8 * 1024 * 1024),
    "write.metadata.delete-after-commit.enabled": "true",
    "write.metadata.previous-versions-max": "8",
}


@dataclass(frozen=True)
class MaintenancePolicy:
    """When a writer expires snapshots and removes orphan files, and what it keeps."""

    #: compact and remove files after every this many commits of one table in one
    #: process (0: never maintain)
    every_commits: int = 50
    #: expire snapshots after every this many (a metadata-only commit: the snapshots a
    #: commit copies stay between ``keep_last`` and ``keep_last + expire_every``)
    expire_every: int = 10
    #: the newest snapshots always kept
    keep_last: int = 5
    #: how long a scan may take: a file no kept snapshot references is deleted once it has
    #: been unreferenced this long
    grace_ms: int = 5 * 60_000
    #: a partition's data files under this size are merged once there are ``min_files``
    small_file_bytes: int = 16 * 1024 * 1024
    min_files: int = 8


DEFAULT_POLICY = MaintenancePolicy()


@dataclass(frozen=True)
class MaintenanceReport:
    """What one ``maintain`` run did."""

    table: str
    files_compacted: int
    snapshots_expired: int
    snapshots_kept: int
    files_deleted: int
    seconds: float


def ensure_properties(table: Table) -> Table:
    """Set ``TABLE_PROPERTIES`` on ``table`` where it lacks them (one commit; none if set)."""
    missing = {k: v for k, v in TABLE_PROPERTIES.items() if table.properties.get(k) != v}
    if not missing:
        return table
    try:
        with table.transaction() as tx:
            tx.set_properties(missing)
    except CommitFailedException:
        pass  # another process set them at the same time
    return table.refresh()


def maintain(table: Table, policy: MaintenancePolicy = DEFAULT_POLICY,
             now_ms: int | None = None) -> MaintenanceReport:
    """Compact ``table``'s small files, expire its old snapshots, then delete the files no
    kept snapshot has referenced for ``policy.grace_ms``.

    Safe beside other writers: a compaction or an expiry that loses a commit race is skipped
    (the next run does it).
    """
    t0 = time.perf_counter()
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    table.refresh()
    compacted = compact(table, policy)
    expired = expire_snapshots(table, policy)
    deleted = _remove_orphans(table, now_ms, policy.grace_ms)
    report = MaintenanceReport(".".join(table.name()), compacted, expired,
                               len(table.metadata.snapshots), deleted, time.perf_counter() - t0)
    log.info("maintenance.done", table=report.table, compacted=compacted, expired=expired,
             snapshots=report.snapshots_kept, files_deleted=deleted,
             seconds=round(report.seconds, 3))
    return report


def expire_snapshots(table: Table, policy: MaintenancePolicy = DEFAULT_POLICY) -> int:
    """Expire every snapshot but the last ``policy.keep_last`` and the marked chain (see
    ``_chain_to_marked``); return how many (0 when a concurrent commit won the race)."""
    table.refresh()
    snaps = sorted(table.metadata.snapshots, key=lambda s: s.timestamp_ms)
    keep_ids = {s.snapshot_id for s in snaps[-policy.keep_last:]} if policy.keep_last else set()
    keep_ids |= _chain_to_marked(table)
    expire = [s.snapshot_id for s in snaps if s.snapshot_id not in keep_ids]
    if not expire:
        return 0
    try:
        table.maintenance.expire_snapshots().by_ids(expire).commit()
    except (CommitFailedException, ValueError):  # raced: another process expired some
        log.info("maintenance.expire_skipped", table=".".join(table.name()),
                 reason="a concurrent commit")
        return 0
    finally:
        table.refresh()
    return len(expire)


#: summary properties Tessera writes (the raw archive's offsets): the newest snapshot that
#: carries them, and every snapshot after it, are never expired
MARKED_PREFIX = "tessera."


def _chain_to_marked(table: Table) -> set[int]:
    """The current snapshot and its ancestors back to the newest one with Tessera properties
    (only the current one when no ancestor has them)."""
    current = table.current_snapshot()
    if current is None:
        return set()
    chain: set[int] = set()
    snap = current
    while snap is not None:
        chain.add(snap.snapshot_id)
        props = snap.summary.additional_properties if snap.summary is not None else {}
        if any(k.startswith(MARKED_PREFIX) for k in props):
            return chain
        snap = table.snapshot_by_id(snap.parent_snapshot_id) \
            if snap.parent_snapshot_id is not None else None
    return {current.snapshot_id}


def compact(table: Table, policy: MaintenancePolicy = DEFAULT_POLICY) -> int:
    """Rewrite each partition's small data files as one file; return the files replaced.

    One overwrite commit for all partitions, rows unchanged. If a concurrent commit deleted
    one of the files meanwhile, the commit fails its validation and nothing changes (the
    files written become orphans, removed after the grace period).
    """
    from pyiceberg.exceptions import ValidationException
    from pyiceberg.expressions import AlwaysTrue
    from pyiceberg.io.pyarrow import ArrowScan, _dataframe_to_data_files

    if table.current_snapshot() is None:
        return 0
    spec_id = table.metadata.default_spec_id
    groups: dict[tuple, list] = {}
    for task in table.scan().plan_files():
        f = task.file
        if f.spec_id == spec_id and f.file_size_in_bytes < policy.small_file_bytes:
            groups.setdefault(tuple(f.partition), []).append(task)
    groups = {k: v for k, v in groups.items() if len(v) >= policy.min_files}
    if not groups:
        return 0
    scan = ArrowScan(table.metadata, table.io, table.schema(), AlwaysTrue())
    old, new = [], []
    for tasks in groups.values():
        data = scan.to_table(tasks)
        old += [t.file for t in tasks]
        new += list(_dataframe_to_data_files(table.metadata, data, table.io))
    try:
        with table.transaction() as tx, tx.update_snapshot().overwrite() as rewrite:
            for f in old:
                rewrite.delete_data_file(f)
            for f in new:
                rewrite.append_data_file(f)
    except (CommitFailedException, ValidationException) as exc:
        log.info("maintenance.compact_skipped", table=".".join(table.name()), reason=str(exc))
        table.refresh()
        return 0
    table.refresh()
    return len(old)


def _local_dir(location: str) -> Path | None:
    """The local directory of a table location (None: not a local file system)."""
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else location)
    return None


def _referenced(table: Table) -> set[str]:
    """Local paths of every file a kept snapshot or the metadata log references."""
    io = table.io
    refs: set[str] = set()
    seen_manifests: set[str] = set()
    for snap in table.metadata.snapshots:
        refs.add(snap.manifest_list)
        for manifest in snap.manifests(io):
            refs.add(manifest.manifest_path)
            if manifest.manifest_path in seen_manifests:
                continue
            seen_manifests.add(manifest.manifest_path)
            for entry in manifest.fetch_manifest_entry(io, discard_deleted=True):
                refs.add(entry.data_file.file_path)
    refs.add(table.metadata_location)
    refs.update(m.metadata_file for m in table.metadata.metadata_log)
    local = (_local_dir(r) for r in refs)
    return {str(path) for path in local if path is not None}


#: beside a table's metadata: when each unreferenced file was first seen (path -> epoch ms)
UNREFERENCED_FILE = "tessera-unreferenced.json"


def _remove_orphans(table: Table, now_ms: int, grace_ms: int) -> int:
    """Delete the table's files unreferenced for ``grace_ms``; return how many."""
    root = _local_dir(table.metadata.location)
    if root is None or not root.is_dir():
        return 0
    refs = _referenced(table)
    ledger_path = root / "metadata" / UNREFERENCED_FILE
    try:
        seen: dict[str, int] = json.loads(ledger_path.read_text())
    except (FileNotFoundError, ValueError):
        seen = {}
    now_seen: dict[str, int] = {}
    deleted = 0
    for sub in ("metadata", "data"):
        base = root / sub
        if not base.is_dir():
            continue
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                path = os.path.join(dirpath, name)
                if path in refs or name == UNREFERENCED_FILE or name.startswith("."):
                    continue
                since = seen.get(path, now_ms)
                if since > now_ms - grace_ms:
                    now_seen[path] = since
                    continue
                try:
                    os.remove(path)
                    deleted += 1
                except FileNotFoundError:
                    pass  # another process removed it
    tmp = ledger_path.with_name(f".{UNREFERENCED_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps(now_seen))
    os.replace(tmp, ledger_path)
    return deleted


class CommitCounter:
    """Counts one process's commits per table and runs ``maintain`` every N of them."""

    def __init__(self, policy: MaintenancePolicy = DEFAULT_POLICY,
                 run: Callable[[Table, MaintenancePolicy], object] = maintain) -> None:
        self.policy = policy
        self._run = run
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def after_commit(self, table: Table) -> None:
        """Record a commit of ``table``; every ``policy.every_commits``-th one maintains it,
        and every ``policy.expire_every``-th one in between expires its old snapshots.

        A failed maintenance is logged and never fails the commit it follows.
        """
        if self.policy.every_commits <= 0:
            return
        key = table.metadata.location
        with self._lock:
            n = self._counts.get(key, 0) + 1
            self._counts[key] = n
        full = n % self.policy.every_commits == 0
        expire = self.policy.expire_every > 0 and n % self.policy.expire_every == 0
        if not (full or expire):
            return
        try:
            if full:
                self._run(table, self.policy)
            else:
                expire_snapshots(table, self.policy)
        except Exception as exc:  # maintenance is best effort: the data is committed
            log.warning("maintenance.failed", table=".".join(table.name()), error=repr(exc))


#: the process-wide counter every Tessera writer reports its commits to
COMMITS = CommitCounter()
