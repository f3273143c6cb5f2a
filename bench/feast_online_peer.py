"""The Feast side of ``bench/online.py``: an online read per request, run in its own process.

Run by ``bench/online.py`` with an interpreter that has Feast (see ``find_feast_python``
there); it imports only Feast, pandas, pyarrow and numpy, never Tessera, so Feast can live
in a separate virtual environment when its pins clash with the project's lock (Feast 0.67
pins ``prometheus_client<0.25`` and ``tenacity<9``).

Input, in the work directory ``bench/online.py`` fills:

* ``config.json``: feature names (``items``, ``user_numeric``, ``user_lists``), ``warmup``.
* ``items.parquet``: ``item_id``, ``event_timestamp`` and the 10 pre-assembled item values
  (float32) Tessera returns at its watermark, one row per item.
* ``users.parquet``: ``user_id``, ``event_timestamp``, the user's numeric features
  (float32) and its ``last_n`` lists (list<string>), as Tessera's read returns them.
* ``request_items.npy`` [requests + warmup, 2000] and ``request_users.npy``: the requests
  (the warm-up ones first), the same ones every engine reads.

Feast setup: a local provider, a SQLite online store, a file registry cached for the whole
run (``cache_ttl_seconds: 0``), entities ``item_id`` and ``user_id``, one feature view for
each (Float32 fields, ``Array(String)`` for the lists, no ttl), filled with
``FeatureStore.write_to_online_store``. Per request two calls, timed apart: the user's
features (1 row) and the items' (2,000 rows), each
``get_online_features(features, entity_rows=[{key: id}, ...]).to_dict()``; ``to_dict`` is
the response's native conversion (``to_df`` and ``to_arrow`` are built on it). The
columnar form ``entity_rows={key: ids}`` measured the same (within noise) as the list of
rows, so the documented list form is used.

Output: ``timings.npy`` [requests, 2] (seconds: user call, items call), ``item_values.npy``
[requests, 2000, 10] float32, ``user_values.npy`` [requests, k] float32, ``user_lists.json``
(one list of lists per request), ``info.json`` (version, write seconds, peak RSS).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, any venv
from bench.feast_repo import open_feature_store


def build_repo(root: Path, items_path: Path, users_path: Path, cfg: dict):
    """Feature repo (SQLite online store) with an item and a user feature view, applied."""
    from feast import Entity, FeatureView, Field, FileSource
    from feast.types import Array, Float32, String
    from feast.value_type import ValueType

    store = open_feature_store(root, "tessera_online")
    item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING)
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING)
    items_fv = FeatureView(
        name="item_features", entities=[item], ttl=None,
        source=FileSource(name="item_src", path=str(items_path),
                          timestamp_field="event_timestamp"),
        schema=[Field(name=n, dtype=Float32) for n in cfg["items"]])
    users_fv = FeatureView(
        name="user_features", entities=[user], ttl=None,
        source=FileSource(name="user_src", path=str(users_path),
                          timestamp_field="event_timestamp"),
        schema=[Field(name=n, dtype=Float32) for n in cfg["user_numeric"]]
        + [Field(name=n, dtype=Array(String)) for n in cfg["user_lists"]])
    store.apply([item, user, items_fv, users_fv])
    return store


def main() -> None:
    import feast
    import pandas as pd

    work = Path(sys.argv[1])
    cfg = json.loads((work / "config.json").read_text())
    store = build_repo(work / "repo", work / "items.parquet", work / "users.parquet", cfg)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        store.write_to_online_store("item_features", df=pd.read_parquet(work / "items.parquet"))
        store.write_to_online_store("user_features", df=pd.read_parquet(work / "users.parquet"))
    write_s = time.perf_counter() - t0
    print(f"feast {feast.__version__}: wrote the online store in {write_s:.1f}s", flush=True)

    req_items = np.load(work / "request_items.npy")
    req_users = np.load(work / "request_users.npy")
    warmup = int(cfg["warmup"])
    item_refs = [f"item_features:{n}" for n in cfg["items"]]
    user_names = cfg["user_numeric"] + cfg["user_lists"]
    user_refs = [f"user_features:{n}" for n in user_names]
    n_req = len(req_items) - warmup
    timings = np.zeros((n_req, 2))
    item_values = np.zeros((n_req, req_items.shape[1], len(item_refs)), dtype=np.float32)
    user_values = np.zeros((n_req, len(cfg["user_numeric"])), dtype=np.float32)
    user_lists = []
    for k in range(len(req_items)):
        ids = req_items[k].tolist()
        user = str(req_users[k])
        t = time.perf_counter()
        u = store.get_online_features(features=user_refs,
                                      entity_rows=[{"user_id": user}]).to_dict()
        t1 = time.perf_counter()
        r = store.get_online_features(features=item_refs,
                                      entity_rows=[{"item_id": i} for i in ids]).to_dict()
        t2 = time.perf_counter()
        if k < warmup:
            continue
        j = k - warmup
        timings[j] = (t1 - t, t2 - t1)
        if r["item_id"] != ids:
            raise SystemExit("feast returned rows out of request order")
        # None (no row) becomes NaN: the check in bench/online.py then fails
        item_values[j] = np.array([r[n] for n in cfg["items"]], dtype=np.float32).T
        user_values[j] = np.array([u[n][0] for n in cfg["user_numeric"]], dtype=np.float32)
        user_lists.append([u[n][0] for n in cfg["user_lists"]])
    np.save(work / "timings.npy", timings)
    np.save(work / "item_values.npy", item_values)
    np.save(work / "user_values.npy", user_values)
    (work / "user_lists.json").write_text(json.dumps(user_lists))
    (work / "info.json").write_text(json.dumps({
        "version": feast.__version__, "write_s": write_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "pid": os.getpid()}))


if __name__ == "__main__":
    main()
