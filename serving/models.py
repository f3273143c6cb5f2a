"""Learned models in serving: ONNX sessions built from registry versions, hot-reloaded.

A ``RegistryWatcher`` per kind (l1, l2, retrieval) loads each newly promoted, verified version
off the request path; the pipeline's ``ModelBundle`` is then replaced with one assignment, so a
request in flight keeps the bundle it started with and no request fails during a swap. A
version that fails to load (broken file, bad schema, a session that cannot run a probe batch)
is refused and the previous one keeps serving.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from models.features import FeatureSchema, categorical_matrix, dense_matrix, sequence_matrix
from models.onnx_runtime import choose_providers, onnx_session
from tessera.logs import get_logger

log = get_logger("serving.models")


def _split(names, entity_of) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(item, user, author) names of a model's dense features.

    Author features are read for each candidate's author and broadcast to its rows.
    """
    items = tuple(n for n in names if entity_of(n) not in ("user", "author"))
    users = tuple(n for n in names if entity_of(n) == "user")
    authors = tuple(n for n in names if entity_of(n) == "author")
    return items, users, authors


@dataclass
class OnnxRanker:
    """An L1 or L2 model: features -> one score per candidate."""

    kind: str
    version: str
    schema: FeatureSchema
    session: Any
    input_names: tuple[str, ...]
    output_name: str
    item_features: tuple[str, ...]
    user_features: tuple[str, ...]
    author_features: tuple[str, ...]
    task_weights: dict[str, float]
    tasks: tuple[str, ...]

    def score(self, features: dict[str, np.ndarray], *, user: dict[str, Any],
              context: dict[str, Any] | None = None) -> np.ndarray:
        n = len(next(iter(features.values()))) if features else 0
        if n == 0:
            return np.zeros(0)
        cols: dict[str, Any] = dict(features)
        for name in self.user_features:
            v = user.get(name)
            cols[name] = np.full(n, np.nan if v is None or isinstance(v, list) else v)
        for cross in self.schema.crosses:  # the user's lists, one object for every candidate
            for name in cross.lists:
                cols[name] = [user.get(name)] * n
        ctx = context or {}
        for key, value in ctx.items():
            cols[key] = value if not np.isscalar(value) else [value] * n
        feeds = {"dense": dense_matrix(cols, self.schema)}
        if "ids" in self.input_names:
            feeds["ids"] = categorical_matrix(cols, self.schema)
        if "seq" in self.input_names:
            seq = ctx.get("sequence") or []
            feeds["seq"] = np.repeat(sequence_matrix({self.schema.sequence or "seq": [seq]},
                                                     self.schema), n, axis=0)
        out = self.session.run([self.output_name], feeds)[0]
        if out.ndim == 2 and out.shape[1] > 1:  # multi-task probabilities -> one score
            w = np.array([self.task_weights.get(t, 0.0) for t in self.tasks], dtype=np.float32)
            return out @ w
        return out.reshape(-1)


@dataclass
class Retrieval:
    """User tower + HNSW index of the same version."""

    version: str
    schema: FeatureSchema
    user_session: Any
    index: Any
    user_features: tuple[str, ...]

    def search(self, sequence: list[str], k: int, user: dict[str, Any] | None = None) -> list[str]:
        user = user or {}
        dense_schema = FeatureSchema(dense=tuple(d for d in self.schema.dense
                                                 if d.name in self.user_features))
        dense = dense_matrix({n: [user.get(n)] for n in self.user_features}, dense_schema)
        seq = sequence_matrix({self.schema.sequence or "seq": [sequence]}, self.schema)
        vec = self.user_session.run(["user_embedding"], {"seq": seq, "user_dense": dense})[0]
        ids, _ = self.index.search(vec.astype(np.float32), min(k, len(self.index)))
        return list(ids[0])


def load_version(info: Any, entity_of, providers: list[str] | None = None) -> Any:
    """Build the serving object of one registry version (raises when it cannot serve).

    ``providers``: ONNX Runtime providers (default: ``choose_providers()``, CUDA when offered).
    """
    m = info.manifest
    schema = FeatureSchema.from_dict(m["feature_schema"])
    if info.kind == "retrieval":
        from models.index import ItemIndex

        extra = dict(schema.extra)
        session = onnx_session(info.file("user_tower.onnx"), providers=providers)
        index = ItemIndex.load(info.path / "index")
        r = Retrieval(info.version, schema, session, index, tuple(extra.get("user_dense", ())))
        r.search([], 5)  # probe: the version must be able to answer
        return r
    files = [f for f in info.files if f.endswith(".onnx")]
    if not files:
        raise ValueError(f"{info.kind} version {info.version} has no .onnx file")
    path = info.file(files[0])
    session = onnx_session(path, providers=providers)
    inputs = tuple(i.name for i in session.get_inputs())
    output = session.get_outputs()[0].name
    computed = {k.name for k in schema.crosses}
    item_names, user_names, author_names = _split(
        [d.name for d in schema.dense if d.name not in computed], entity_of)
    lists = [name for k in schema.crosses for name in k.lists]
    user_names += tuple(n for n in dict.fromkeys(lists) if n not in user_names)
    ranker = OnnxRanker(info.kind, info.version, schema, session, inputs, output, item_names,
                        user_names, author_names, dict(m.get("task_weights") or {}),
                        tuple(m.get("tasks") or ()))
    ranker.score({n: np.zeros(2) for n in item_names} or {"_": np.zeros(2)}, user={})  # probe
    return ranker


def start_model_watch(state: Any) -> Any:
    """Watch the registry for l1, l2 and retrieval; swap each new version into the pipeline.

    Raises:
        RuntimeInstallError: ``state.config.device`` is ``cuda`` and ONNX Runtime has no CUDA.
    """
    from models.registry import ModelRegistry, RegistryWatcher

    providers = choose_providers(device=state.config.device)
    log.info("onnx_providers", device=state.config.device, providers=providers)

    registry = ModelRegistry(state.config.registry_dir)
    client = state.client

    def entity_of(name: str) -> str:
        ref = client._refs.get(name)
        if ref is None:
            return "user" if name.startswith("user_") else "item"
        return client._entity_type(ref)

    watchers = []
    for kind in ("l1", "l2", "retrieval"):
        def on_change(info, kind=kind) -> None:
            loaded = load_version(info, entity_of, providers)
            state.pipeline.models = replace(state.pipeline.models, **{kind: loaded})
            state.metrics.model_version.labels(kind=kind, version=info.version).set(1)
            log.info("model_loaded", kind=kind, version=info.version)

        watchers.append(RegistryWatcher(registry, kind, on_change, poll_s=1.0))
    group = _Watchers(watchers)
    group.start()
    return group


class _Watchers:
    def __init__(self, watchers):
        self.watchers = watchers

    def start(self) -> None:
        for w in self.watchers:
            w.start()

    def stop(self) -> None:
        for w in self.watchers:
            w.stop()

