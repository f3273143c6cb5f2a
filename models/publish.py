"""Publish trained models to the model registry: ONNX files, schema, metrics, and the index.

The manifest a version carries (what serving reads):

* ``feature_schema``: the :class:`models.features.FeatureSchema` as a JSON object;
* ``feature_names``: every input feature, in model-input order;
* ``training_range``: ``{"train": {"from", "to"}, "eval": {"from", "to"}}`` (epoch ms);
* ``metrics``: the evaluation on the later time slice;
* ``models``: per ONNX file, its ``inputs`` and ``outputs`` names (``inputs``/``outputs``
  at the top level too when there is only one model);
* anything passed in ``extra_manifest`` (tasks, task weights, ...).

For ``retrieval`` an HNSW :class:`models.index.ItemIndex` over the item embeddings is
built and published as the ``index/`` directory of the same version, so towers and index
always come from the same weights.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from models.features import FeatureSchema

__all__ = ["MODEL_KINDS", "publish_model", "publish_result"]

ModelKind = Literal["retrieval", "l1", "l2"]
MODEL_KINDS: tuple[str, ...] = ("retrieval", "l1", "l2")


def _io_names(path: Path) -> dict[str, list[str]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    return {"inputs": [i.name for i in graph.input if i.name not in initializers],
            "outputs": [o.name for o in graph.output]}


def publish_model(registry: Any, kind: ModelKind, onnx_files: Mapping[str, Path],
                  schema: FeatureSchema, metrics: Mapping[str, Any],
                  training_range: Mapping[str, Any],
                  extra_files: Mapping[str, Path | bytes] | None = None, *,
                  item_embeddings: tuple[Sequence[str], np.ndarray] | None = None,
                  extra_manifest: Mapping[str, Any] | None = None,
                  version: str | None = None, promote: bool = True) -> Any:
    """Publish one model version (``models.registry.ModelRegistry.publish``) and return its info.

    Args:
        registry: a ``ModelRegistry``.
        kind: ``retrieval``, ``l1`` or ``l2``.
        onnx_files: ``{model name: path}``; each is stored as ``<name>.onnx``.
        item_embeddings: ``(item ids, vectors)`` for ``retrieval``: an HNSW index of them
            is published as ``index/``.
        extra_manifest: more manifest keys (must not clash with the ones set here).

    Raises:
        ValueError: an unknown kind, or ``retrieval`` without ``item_embeddings``.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")
    if kind == "retrieval" and item_embeddings is None:
        raise ValueError("publishing retrieval needs item_embeddings=(ids, vectors) for the "
                         "index; take them from the item tower over the catalogue")
    models = {name: _io_names(Path(p)) for name, p in onnx_files.items()}
    manifest: dict[str, Any] = {
        "feature_schema": schema.to_dict(),
        "feature_names": schema.feature_names,
        "training_range": dict(training_range),
        "metrics": dict(metrics),
        "models": {f"{name}.onnx": io for name, io in models.items()},
    }
    if len(models) == 1:
        manifest.update(next(iter(models.values())))
    for key, value in (extra_manifest or {}).items():
        if key in manifest:
            raise ValueError(f"extra_manifest key {key!r} clashes with a key publish_model sets")
        manifest[key] = value
    files: dict[str, Path | bytes] = {f"{n}.onnx": Path(p) for n, p in onnx_files.items()}
    files.update(extra_files or {})
    with tempfile.TemporaryDirectory(prefix="tessera-index-") as tmp:
        if item_embeddings is not None:
            from models.index import ItemIndex

            ids, vectors = item_embeddings
            index = ItemIndex.build(list(ids), np.asarray(vectors, dtype=np.float32))
            index.save(Path(tmp))
            files["index"] = Path(tmp)
            manifest["index"] = {"items": len(ids), "dim": int(np.asarray(vectors).shape[1])}
        return registry.publish(kind, files, manifest, version=version, promote=promote)


def publish_result(registry: Any, result: Any, onnx_files: Mapping[str, Path], *,
                   version: str | None = None, promote: bool = True) -> Any:
    """Publish a ``models.train.TrainResult`` whose modules were exported to ``onnx_files``.

    For retrieval the item embeddings come from the exported item tower run in ONNX
    Runtime over the result's catalogue (what serving would compute).
    """
    extra: dict[str, Any] = {"tasks": list(result.tasks)}
    if result.task_weights:
        extra["task_weights"] = dict(result.task_weights)
    embeddings = None
    if result.kind == "retrieval":
        from models.onnx_runtime import onnx_session

        session = onnx_session(onnx_files["item_tower"])
        vectors = session.run(["item_embedding"], result.catalog.inputs)[0]
        embeddings = (result.catalog.ids, vectors)
    return publish_model(registry, result.kind, onnx_files, result.schema, result.metrics,
                         result.training_range, item_embeddings=embeddings,
                         extra_manifest=extra, version=version, promote=promote)
