"""The Feast peer of ``bench/serving.py``: Tessera's serving stack hydrating through Feast.

Run by ``bench/serving.py`` with an interpreter that has Feast (see ``find_feast_python`` in
``bench/online.py``) and ``PYTHONPATH`` at the repository, so this one process holds both
Feast and Tessera's ``serving`` package: no IPC hop, the Feast read is an in-process call.
Feast's venv needs the serving dependencies Feast does not bring (installed with its pip, at
the project's lock versions; the Feast venv keeps Feast's own pins)::

    ~/.venvs/tessera-feast/bin/pip install orjson cachetools lmdb confluent-kafka hnswlib \
        onnxruntime structlog fastavro datasketches httpx zstandard

What runs: ``serving.app.create_app`` with the bench's ``ServingConfig`` (same store, same
registry models, same candidate limits, same broker, same feed threads), served by uvicorn in
this process, with one change: ``FeedPipeline._hydrate_items`` (the item and author read of
every candidate, the ``hydrate`` stage) is replaced by one ``FeatureStore.get_online_features
(...).to_dict()`` call over Feast's SQLite online store. Everything else is Tessera's code:
the user's sequence and features (``hydrate_user``: the user read stays on Tessera's store),
the window end of the request (``snapshot_end``), candidates, ONNX L1/L2, rules, the forward
log. The in-memory item snapshot is off (it would never be read).

The Feast store, filled at startup before the server listens: once the catalog is caught up
and the registry's L1/L2 are loaded, every catalog item's item features and every author's
author features (the names the loaded models read) are read with ``FeatureClient.get_features
(..., end=E)`` at the request end ``E`` (``snapshot_end`` over the user, item and author
reads, as the pipeline computes it): the pre-assembled values Tessera itself serves at ``E``.
They go into two feature views (``item_features`` keyed by ``item_id``, ``author_features``
by ``author_id``; Float32 fields, no ttl) with ``FeatureStore.write_to_online_store``.
A request whose end is not ``E`` (the workers moved the store on while the ladder ran)
still hydrates through Feast, with the values written at ``E``: what a Feast deployment
serves between two materializations, and the same work per request (counted as
``bench_feast_hydrate_total{result="feast_older_end"}``). Only a request whose models read
other names hydrates from Tessera's store (``result="fallback"``). ``bench/serving.py``
reports these counts.

Usage (by bench/serving.py): python bench/feast_serving_peer.py WORK_DIR PORT, with
TESSERA_SERVE_CONFIG as for ``serving.app:app_from_env``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == REPO / "bench":
    sys.path[0] = str(REPO)  # bench/serving.py would shadow the serving package

EXPORT_CHUNK = 5_000


class FeastHydrator:
    """Item and author columns of candidates from Feast's online store, at one end."""

    def __init__(self, store, end: int, item_names: tuple[str, ...],
                 author_names: tuple[str, ...], counter) -> None:
        self.store = store
        self.end = end
        self.item_names = item_names
        self.author_names = author_names
        self.refs = [f"item_features:{n}" for n in item_names] + \
            [f"author_features:{n}" for n in author_names]
        self.counter = counter

    def columns(self, ids: list[str], authors: list[str]) -> dict[str, np.ndarray]:
        rows: dict[str, list[str]] = {"item_id": ids}
        if self.author_names:
            rows["author_id"] = authors
        resp = self.store.get_online_features(features=self.refs, entity_rows=rows).to_dict()
        # None (no row) becomes NaN; Tessera gives the feature default there, so a missing
        # row shows up in the bench's check of the served items
        return {n: np.asarray(resp[n], dtype=np.float32)
                for n in (*self.item_names, *self.author_names)}


HYDRATOR: FeastHydrator | None = None


def install_hydration() -> None:
    """Route ``FeedPipeline._hydrate_items`` through Feast (class-level: this process only)."""
    from serving.pipeline import FeedPipeline

    original = FeedPipeline._hydrate_items

    def hydrate_via_feast(self, cands, item_names, author_names, end, *args, **kwargs):
        # (further arguments, e.g. the request's set of split families, go to the original;
        # Feast's values are all at ``end``: nothing splits)
        h = HYDRATOR
        if h is None or item_names != h.item_names or author_names != h.author_names:
            if h is not None:
                h.counter.labels(result="fallback").inc()
            return original(self, cands, item_names, author_names, end, *args, **kwargs)
        h.counter.labels(result="feast" if end == h.end else "feast_older_end").inc()
        ids = cands.ids()  # Feast is keyed by id strings
        cols = h.columns(ids, self.catalog.authors(ids) if author_names else [])
        self.metrics.feature_lag.set(max(0, int(time.time() * 1000) - end) / 1000)
        return cols

    FeedPipeline._hydrate_items = hydrate_via_feast


def feature_repo(root: Path, item_names, author_names, items_path: Path, authors_path: Path):
    """A local Feast repo (SQLite online store, file registry cached for the run), applied."""
    from feast import Entity, FeatureView, Field, FileSource
    from feast.types import Float32
    from feast.value_type import ValueType

    from bench.feast_repo import open_feature_store

    store = open_feature_store(root, "tessera_serving")
    item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING)
    author = Entity(name="author", join_keys=["author_id"], value_type=ValueType.STRING)
    objs: list = [item, FeatureView(
        name="item_features", entities=[item], ttl=None,
        source=FileSource(name="item_src", path=str(items_path),
                          timestamp_field="event_timestamp"),
        schema=[Field(name=n, dtype=Float32) for n in item_names])]
    if author_names:
        objs += [author, FeatureView(
            name="author_features", entities=[author], ttl=None,
            source=FileSource(name="author_src", path=str(authors_path),
                              timestamp_field="event_timestamp"),
            schema=[Field(name=n, dtype=Float32) for n in author_names])]
    store.apply(objs)
    return store


def read_at(client, entity_type: str, ids: list[str], names, end: int) -> np.ndarray:
    """Tessera's values of ``ids`` x ``names`` at ``end`` (what its serving path returns)."""
    out = np.zeros((len(ids), len(names)), dtype=np.float32)
    for lo in range(0, len(ids), EXPORT_CHUNK):
        fv = client.get_features(entity_type, ids[lo:lo + EXPORT_CHUNK], list(names), end=end)
        if fv.lists:
            raise SystemExit(f"{entity_type} features {sorted(fv.lists)} are lists")
        out[lo:lo + EXPORT_CHUNK] = fv.values
    return out


def load_feast(st, work: Path, timeout_s: float = 300.0) -> dict:
    """Wait for the catalog and the models; export Tessera's values at the end into Feast."""
    import feast
    import pandas as pd
    from prometheus_client import Counter

    global HYDRATOR
    deadline = time.monotonic() + timeout_s
    while st.follower is not None and not st.follower.caught_up.is_set():
        if time.monotonic() > deadline:
            raise SystemExit("the catalog did not catch up")
        time.sleep(0.2)
    while st.pipeline.models.l1 is None or st.pipeline.models.l2 is None:
        if time.monotonic() > deadline:
            raise SystemExit("the L1/L2 models did not load")
        time.sleep(0.2)
    st.refresh_catalog()
    models = st.pipeline.models
    item_names, author_names = models.item_feature_names(), models.author_feature_names()
    user_names = models.user_feature_names()
    end = st.client.snapshot_end([("user", user_names), ("item", item_names),
                                  ("author", author_names)])
    t = time.perf_counter()
    ids = st.catalog.item_ids()
    authors = sorted(set(st.catalog.authors(ids)))
    ivals = read_at(st.client, "item", ids, item_names, end)
    avals = read_at(st.client, "author", authors, author_names, end) if author_names else None
    export_s = time.perf_counter() - t
    ts = pd.Timestamp(end, unit="ms", tz="UTC")
    items_df = pd.DataFrame({"item_id": ids, "event_timestamp": ts,
                             **{n: ivals[:, j] for j, n in enumerate(item_names)}})
    authors_df = pd.DataFrame({"author_id": authors, "event_timestamp": ts,
                               **{n: avals[:, j] for j, n in enumerate(author_names)}}) \
        if author_names else None
    items_df.to_parquet(work / "items.parquet")
    if authors_df is not None:
        authors_df.to_parquet(work / "authors.parquet")
    store = feature_repo(work / "repo", item_names, author_names, work / "items.parquet",
                         work / "authors.parquet")
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        store.write_to_online_store("item_features", df=items_df)
        if authors_df is not None:
            store.write_to_online_store("author_features", df=authors_df)
    write_s = time.perf_counter() - t
    counter = Counter("bench_feast_hydrate", "Item hydrations by where they read",
                      ["result"], registry=st.metrics.registry)
    HYDRATOR = FeastHydrator(store, end, item_names, author_names, counter)
    HYDRATOR.columns(ids[:2_000], st.catalog.authors(ids[:2_000]))  # registry, page cache
    info = {"feast": feast.__version__, "end": end, "items": len(ids), "authors": len(authors),
            "item_names": list(item_names), "author_names": list(author_names),
            "user_names": list(user_names), "export_s": round(export_s, 2),
            "write_s": round(write_s, 2), "pid": os.getpid()}
    (work / "info.json").write_text(json.dumps(info))
    return info


def main() -> None:
    import anyio.to_thread
    import uvicorn

    from serving.app import app_from_env
    from tessera.logs import configure_logging

    work, port = Path(sys.argv[1]), int(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    configure_logging(level="WARNING")
    install_hydration()
    app = app_from_env()
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a):
        async with inner(a):
            # uvicorn listens only after this: /readyz answers once Feast is loaded
            info = await anyio.to_thread.run_sync(load_feast, a.state.serving, work)
            print(f"feast {info['feast']}: {info['items']:,} items x {len(info['item_names'])} "
                  f"+ {info['authors']:,} authors x {len(info['author_names'])} at end "
                  f"{info['end']}: exported in {info['export_s']}s, written to the SQLite "
                  f"online store in {info['write_s']}s", flush=True)
            yield

    app.router.lifespan_context = lifespan
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
