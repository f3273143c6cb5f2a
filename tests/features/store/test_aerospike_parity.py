"""The workers on Aerospike give what they give on LMDB: same events, same reads.

A fresh single-node Aerospike server (``tessera.aerospike_local``: the Community Edition
build in ``../shared/aerospike/``, or ``TESSERA_AEROSPIKE_DIR``) is started on free ports for this
module, so the records come from this run only. The blocks and sequences flows run bounded
over the same events into an LMDB store and into the server; pre-assembly runs on both; then
every read the serving path makes (block tables, feature vectors with lists, pre-assembled
values, sequences, watermarks) is compared. Skipped, with the reason, where no server build
is present.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from dataflows.blocks import BlocksFlowConfig, build_blocks_flow
from dataflows.runner import run_flow
from dataflows.sequences import SequencesFlowConfig, build_sequences_flow
from features.aggregations import build_aggregation
from features.client import FeatureClient
from features.preassembled import PREASSEMBLED_TABLE, refresh_preassembled
from features.spec_loader import load_features
from features.store import open_store
from tessera import aerospike_local
from tessera.aerospike_local import LocalAerospike
from tessera.broker import EmbeddedBroker
from tessera.synth import WorldConfig, generate_records, write_to_kafka
from tessera.topics import PLATFORM_TOPICS, create_topics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def aerospike_hosts(tmp_path_factory):
    """A fresh server of its own: ``host:port``."""
    if not aerospike_local.available():
        pytest.skip(f"no Aerospike server build at {aerospike_local.server_dir()} "
                    "(set TESSERA_AEROSPIKE_DIR)")
    with LocalAerospike(tmp_path_factory.mktemp("aerospike"), size_mb=512) as server:
        yield server.hosts


_AGGS = {f.key: build_aggregation(f) for f in load_features(REPO / "features.yaml").features}


_QUANTILES = {f.window_name(w) for f in load_features(REPO / "features.yaml").features
              if f.aggregation == "approx_quantile" for w in f.windows}


def _same_rep(feature_key: str, a: bytes, b: bytes) -> bool:
    """Equal bytes; for sketches, which keep values in arrival order (the two runs read the
    partitions interleaved differently), an equal estimate."""
    if a == b:
        return True
    agg = _AGGS[feature_key]
    x, y = agg.from_bytes(a), agg.from_bytes(b)
    if agg.kind == "approx_quantile":  # KLL compacts at random: the same n, estimates close
        return x.n == y.n
    return agg.kind == "approx_distinct" and agg.finalize(x) == agg.finalize(y)


def test_flows_preassembly_and_reads_match_lmdb(aerospike_hosts, tmp_path):
    features = load_features(REPO / "features.yaml")
    now = int(time.time() * 1000) - 15 * 60_000
    world = WorldConfig(seed=11, n_users=150, n_items=600, n_authors=40, n_topics=6,
                        total_views=4_000, start_ts=now - 86_400_000, duration_ms=86_400_000,
                        id_namespace="p-")
    urls = {"lmdb": f"lmdb://{tmp_path}/store",
            "aerospike": f"aerospike://{aerospike_hosts}/test"}
    with EmbeddedBroker(state_dir=tmp_path / "broker") as info:
        create_topics(info.bootstrap, PLATFORM_TOPICS, partitions=2)
        write_to_kafka(world, info.bootstrap, batch_events=1)  # what producers send
        for url in urls.values():
            run_flow(build_blocks_flow(BlocksFlowConfig(
                bootstrap=info.bootstrap, store_url=url, features=features, bounded=True)))
            run_flow(build_sequences_flow(SequencesFlowConfig(
                bootstrap=info.bootstrap, store_url=url, bounded=True)))
            with open_store(url) as store:
                for entity_type in ("item", "author"):
                    refresh_preassembled(store, features, entity_type)

    records = generate_records(world)
    ids = {"user": sorted({r["user_id"] for r in records["views"]}),
           "item": sorted({r["item_id"] for r in records["views"]}),
           "author": sorted({r["author_id"] for r in records["views"] if r["author_id"]})}
    lmdb_store, aero = open_store(urls["lmdb"], readonly=True), open_store(urls["aerospike"])
    try:
        marks = lmdb_store.get_watermarks("")
        assert marks and aero.get_watermarks("") == marks
        compared = 0
        keep = BlocksFlowConfig(bootstrap="", store_url="", features=features).retention()
        for entity_type, entity_ids in ids.items():
            families = {f.source for f in features.features if f.entity_type == entity_type}
            for family in sorted(families):
                a = lmdb_store.get_block_tables(entity_type, family, entity_ids)
                b = aero.get_block_tables(entity_type, family, entity_ids)
                # A block past retention is dropped when its record is next written, so
                # whether it is still there depends on when the flushes happened: compare
                # the blocks no write could have dropped yet (every read's blocks).
                wm = max(v for k, v in marks.items() if k.startswith(f"blocks/{family}/"))
                ms = keep[(entity_type, family)]

                def kept(rows, wm=wm, ms=ms):
                    return sorted(r for r in rows if r[1] + r[2] > wm - ms.get(r[2], wm))

                for e, x, y in zip(entity_ids, a, b, strict=True):
                    rows_a = kept(x.to_rows()) if x is not None else []
                    rows_b = kept(y.to_rows()) if y is not None else []
                    assert [r[:3] for r in rows_a] == [r[:3] for r in rows_b], (family, e)
                    for ra, rb in zip(rows_a, rows_b, strict=True):
                        assert _same_rep(ra[0], ra[3], rb[3]), (family, e, ra[:3])
                    compared += len(rows_a)
            client_a, client_b = FeatureClient(lmdb_store, features), FeatureClient(aero, features)
            names = client_a.names_for(entity_type)
            end = client_a.snapshot_end([(entity_type, names)])
            fa = client_a.get_features(entity_type, entity_ids, names, end=end)
            fb = client_b.get_features(entity_type, entity_ids, names, end=end)
            exact = [j for j, n in enumerate(names) if n not in _QUANTILES]
            np.testing.assert_array_equal(fa.values[:, exact], fb.values[:, exact],
                                          err_msg=entity_type)
            np.testing.assert_array_equal(np.isnan(fa.values), np.isnan(fb.values))
            assert fa.lists == fb.lists, entity_type
            assert np.count_nonzero(np.nan_to_num(fa.values)) > 0, entity_type
        assert compared > 10_000
        for entity_type in ("item", "author"):
            va = lmdb_store.get_values(entity_type, PREASSEMBLED_TABLE, ids[entity_type])
            vb = aero.get_values(entity_type, PREASSEMBLED_TABLE, ids[entity_type])
            assert va.columns == vb.columns and va.columns
            exact = [j for j, n in enumerate(va.columns) if n not in _QUANTILES]
            np.testing.assert_array_equal(va.matrix[:, exact], vb.matrix[:, exact])
            np.testing.assert_array_equal(va.watermarks, vb.watermarks)
        sa = lmdb_store.get_sequences("user", ids["user"])
        sb = aero.get_sequences("user", ids["user"])
        fields = ("ts", "item_ids", "actions", "dwell_ms", "event_ids")
        for a, b in zip(sa, sb, strict=True):
            for f in fields:
                np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
        assert sum(len(s.ts) for s in sa) > 1_000
    finally:
        lmdb_store.close()
        aero.close()
