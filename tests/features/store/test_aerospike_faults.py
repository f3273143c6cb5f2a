"""Aerospike error mapping against a live server: down, back, and a record too big.

A persistent single-node server of this module's own (``tessera.aerospike_local``) is stopped
under an open store: every read and write must raise ``StoreUnavailableError`` (never a
silent success: with the node gone the client reports a batch write's records as 0), and
the same store object must read every record back once the server has restarted.
"""

from __future__ import annotations

import pytest

from features.store import open_store
from features.store.base import BlockBatchWrite
from features.store.blockbatch import BlockBatch
from features.store.errors import StoreError, StoreUnavailableError
from tessera import aerospike_local
from tessera.aerospike_local import LocalAerospike

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not aerospike_local.available():
        pytest.skip(f"no Aerospike server build at {aerospike_local.server_dir()} "
                    "(set TESSERA_AEROSPIKE_DIR)")
    with LocalAerospike(tmp_path_factory.mktemp("aerospike"), persistent=True,
                        size_mb=256) as srv:
        yield srv


def _batch(entities: list[str], rep: bytes = b"\x01\x00\x00\x00") -> BlockBatch:
    return BlockBatch.from_rows([(e, "f@1", 0, 300_000, rep) for e in entities])


def test_server_down_raises_unavailable_and_the_store_recovers(server):
    ids = [f"e{i}" for i in range(50)]
    with open_store(server.store_url + "?timeout_ms=300&retries=0") as store:
        store.put_block_batches([BlockBatchWrite("item", "views", _batch(ids))],
                                {"blocks/x": 1_000})
        before = [t.to_rows() for t in store.get_block_tables("item", "views", ids)]
        server.stop()
        try:
            with pytest.raises(StoreUnavailableError, match="unavailable"):
                store.get_block_tables("item", "views", ids)
            with pytest.raises(StoreUnavailableError, match="unavailable"):
                store.put_block_batches([BlockBatchWrite("item", "views", _batch(["z"]))])
            with pytest.raises(StoreUnavailableError, match="unavailable"):
                store.get_watermarks("blocks/")
        finally:
            server.start()
        after = [t.to_rows() for t in store.get_block_tables("item", "views", ids)]
        assert after == before
        assert store.get_watermarks("blocks/") == {"blocks/x": 1_000}


def test_record_too_big_names_the_limit(server):
    with open_store(server.store_url) as store:
        huge = _batch(["big"], rep=b"\x00" * (9 * 1024 * 1024))
        with pytest.raises(StoreError, match="max-record-size") as err:
            store.put_block_batches([BlockBatchWrite("item", "views", huge)])
        assert not isinstance(err.value, StoreUnavailableError)
