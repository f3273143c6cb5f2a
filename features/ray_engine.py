"""Offline jobs on Ray: the batch blocks job's scan, shuffle and aggregation as Ray Data.

:class:`RayBlocksEngine` computes what :class:`features.batch.LocalBlocksEngine` computes, on
a Ray cluster (a local one started for the job, or ``--ray-address``):

1. Ray Data reads the raw Iceberg table (``read_iceberg``, with the local scan's row filter,
   so the same partitions are pruned) in parallel read tasks;
2. each event is tagged with the hash shard of every entity its features group by
   (``features.interning.hash_strings``: the same in every process);
3. per entity, the events are grouped by shard (Ray Data's hash shuffle) and each shard runs
   :func:`features.batch.shard_blocks`, the local engine's kernels. A shard holds every event
   of its entities, put in the local scan's order, so its blocks are byte for byte the blocks
   a whole-table run computes for them.

The blocks come back to the driver as Arrow tables and are written by the same code as the
local engine's (one Iceberg commit per feature, then the online store): a block is far
smaller than the events it aggregates, and one commit per feature keeps the replacement of a
range atomic. Ray is an optional dependency (``pip install -e '.[ray]'``).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.batch import BLOCK_TABLE_SCHEMA, shard_blocks
from features.errors import TesseraError
from features.interning import hash_strings
from features.spec import FeatureSpec

#: shards per Ray worker process (CPU): a few, so a slow shard does not hold a whole worker
SHARDS_PER_WORKER = 4
_SHARD_PREFIX = "_shard_"


class RayUnavailableError(TesseraError):
    """Ray (with Ray Data) is not installed, or its cluster cannot be reached."""


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # needs pandas: the ``ray[data]`` extra
    except ImportError as exc:
        raise RayUnavailableError(
            f"the ray engine needs Ray Data ({exc}): pip install -e '.[ray]'") from None
    return ray


@contextmanager
def ray_runtime(address: str | None = None, workers: int | None = None) -> Iterator[int]:
    """Connect to the Ray cluster at ``address``, or start a local one of ``workers`` CPUs
    (default: this machine's); yield the cluster's CPUs. A runtime this call started is shut
    down on exit; one that was already running (a caller's) is left as it was.
    """
    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "logging_level": logging.WARNING}
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(num_cpus=workers or os.cpu_count() or 1, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RayUnavailableError(
                f"cannot start or reach a Ray cluster ({address or 'local'}): {exc}") from exc
        started = True
    _quiet_ray_data()
    try:
        yield max(1, int(ray.cluster_resources().get("CPU", 1)))
    finally:
        if started:
            ray.shutdown()


def _quiet_ray_data() -> None:
    """No progress bars or per-dataset INFO lines on the job's output (its own progress
    lines say what runs)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def shard_column(entity: str) -> str:
    """The column holding each event's shard of ``entity``."""
    return _SHARD_PREFIX + entity


def tag_shards(batch: pa.Table, entities: Sequence[str], shards: int) -> pa.Table:
    """``batch`` with a :func:`shard_column` per entity: ``hash(id) % shards`` (0 for a
    missing id, which no block counts)."""
    for entity in entities:
        enc = pc.dictionary_encode(batch.column(entity).combine_chunks())
        if len(enc.dictionary):
            per_id = hash_strings(np.asarray(enc.dictionary.to_pylist(), dtype=object))
            per_id = (per_id % np.uint64(shards)).astype(np.int32)
            codes = pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False)
            shard = np.where(codes >= 0, per_id[np.maximum(codes, 0)], 0).astype(np.int32)
        else:
            shard = np.zeros(batch.num_rows, np.int32)
        batch = batch.append_column(shard_column(entity), pa.array(shard, pa.int32()))
    return batch


def _shard_group(group: pa.Table, topic: str, jobs: list[tuple[FeatureSpec, int]],
                 from_ts: int) -> pa.Table:
    return shard_blocks(topic, jobs, from_ts, group)


@dataclass
class RayBlocksEngine:
    """Blocks of a topic's features computed on the Ray cluster of the current runtime
    (:func:`ray_runtime`), ``shards`` hash shards per entity (default: a few per CPU)."""

    raw: Any  # features.offline.raw.RawTables
    shards: int | None = None

    def topic_blocks(self, topic: str, jobs: Sequence[tuple[FeatureSpec, int]], from_ts: int
                     ) -> tuple[int, dict[str, pa.Table]]:
        """Return (raw events read, ``{spec.key: blocks}``), as ``LocalBlocksEngine`` does."""
        ray = _import_ray()
        from features.offline.raw import raw_table_name

        self.raw.table(topic)  # creates raw_<topic> if missing, as the local scan does
        shards = self.shards or SHARDS_PER_WORKER * max(
            1, int(ray.cluster_resources().get("CPU", 1)))
        offline = self.raw.offline
        entities = sorted({spec.entity for spec, _ in jobs})
        with warnings.catch_warnings():
            # the Iceberg row filter (the local scan's, with its partition pruning) is
            # deprecated in favour of Ray expressions, which cannot yet say the same
            warnings.filterwarnings("ignore", "The 'row_filter' parameter", DeprecationWarning)
            source = ray.data.read_iceberg(
                table_identifier=offline.identifier(raw_table_name(topic)),
                catalog_kwargs=offline.catalog_config,
                row_filter=self.raw.scan_filter(from_ts, max(end for _, end in jobs)))
        events = source.map_batches(tag_shards, fn_kwargs={"entities": entities, "shards": shards},
                      batch_format="pyarrow").materialize()
        n_events = events.count()
        parts: list[pa.Table] = []
        if n_events:
            for entity in entities:
                entity_jobs = [(spec, end) for spec, end in jobs if spec.entity == entity]
                blocks = events.groupby(shard_column(entity), num_partitions=shards).map_groups(
                    _shard_group, fn_kwargs={"topic": topic, "jobs": entity_jobs,
                                             "from_ts": from_ts},
                    batch_format="pyarrow")
                parts += [t for t in ray.get(blocks.to_arrow_refs()) if t.num_rows]
        every = (pa.concat_tables([t.cast(BLOCK_TABLE_SCHEMA) for t in parts]) if parts
                 else BLOCK_TABLE_SCHEMA.empty_table())
        keys = every.column("feature_key")
        return n_events, {spec.key: every.filter(pc.equal(keys, spec.key)) for spec, _ in jobs}
