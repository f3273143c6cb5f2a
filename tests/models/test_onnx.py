"""ONNX export: parity with torch for every exported model, provider choice, publishing.

Each model is trained briefly on the generated world of ``test_training`` and exported;
ONNX Runtime must reproduce torch on held-out rows of the later time slice within 1e-4,
at batch sizes 1 and 37 (the batch axis is dynamic).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from models.errors import RuntimeInstallError
from models.onnx_export import (
    ExportParityError,
    check_parity,
    choose_providers,
    export_onnx,
    export_result,
    onnx_session,
)
from models.onnx_runtime import check_runtime
from models.publish import publish_model, publish_result
from models.registry import ModelRegistry
from models.train import TrainConfig, TrainResult, train_l1, train_l2, train_retrieval
from tests.models.test_training import (
    L1_FEATURES,
    L2_FEATURES,
    RETRIEVAL_FEATURES,
    START,
    ranges,
    source,
    world_table,
)


@pytest.fixture(scope="module")
def trained() -> dict[str, TrainResult]:
    """L1, L2 and the two towers, one epoch each."""
    train, ev = ranges()
    config = TrainConfig(epochs=1, batch_size=128)
    return {
        "l1": train_l1(source(), train, ev, features=L1_FEATURES, config=config),
        "l2": train_l2(source(), train, ev, features=L2_FEATURES, config=config),
        "retrieval": train_retrieval(source(), train, ev, features=RETRIEVAL_FEATURES,
                                     config=config),
    }


CASES = [("l1", "l1"), ("l2", "l2"), ("retrieval", "user_tower"), ("retrieval", "item_tower")]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "name"), CASES)
def test_parity_on_held_out_rows(trained, tmp_path, kind: str, name: str) -> None:
    spec = trained[kind].exports[name]
    assert len(next(iter(spec.holdout.values()))) == 256
    path = tmp_path / f"{name}.onnx"
    report = export_onnx(spec.module, spec.holdout, path, spec.input_names, spec.output_names)
    assert report.max_abs_diff < 1e-4 and report.parity_rows == 256
    session = onnx_session(path)
    # dynamic batch axis: 1 row and 37 rows from the held-out set, and the graph says so
    for rows in (1, 37):
        sub = {k: v[:rows] for k, v in spec.holdout.items()}
        diffs = check_parity(spec.module, session, sub, spec.input_names, spec.output_names)
        assert max(diffs.values()) < 1e-4, diffs
        out = session.run(None, sub)[0]
        assert out.shape[0] == rows
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == spec.input_names
    assert all(i.type.tensor_type.shape.dim[0].dim_param == "batch" for i in graph.input)


class _ShapeBaked(nn.Module):
    """A model whose trace bakes the example's batch size in (a real export pitfall)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float(x.shape[0])


def test_parity_failure_raises(tmp_path) -> None:
    example = {"x": np.ones((4, 3), dtype=np.float32)}
    held = {"x": np.ones((37, 3), dtype=np.float32)}
    with pytest.raises(ExportParityError, match=r"differs from torch on output 'y': max abs "
                                                r"diff 33 >= 0.0001 over 37 held-out rows"):
        export_onnx(_ShapeBaked(), example, tmp_path / "bad.onnx", ["x"], ["y"],
                    parity_inputs=held)


def test_provider_choice() -> None:
    assert choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["AzureExecutionProvider", "CPUExecutionProvider"]) == [
        "CPUExecutionProvider"]
    assert choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], device="cpu") == [
        "CPUExecutionProvider"]
    with pytest.raises(RuntimeInstallError, match=r"offers only CPUExecutionProvider: install "
                                                  r"the GPU build"):
        choose_providers(["CPUExecutionProvider"], device="cuda")
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda"):
        choose_providers(["CPUExecutionProvider"], device="gpu")


def test_both_runtime_builds_installed_is_refused() -> None:
    check_runtime({"onnxruntime": "1.32.0"})
    check_runtime({"onnxruntime-gpu": "1.31.1"})
    with pytest.raises(RuntimeInstallError, match=r"both ONNX Runtime builds are installed "
                                                  r"\(onnxruntime 1.32.0, onnxruntime-gpu 1.31.1\)"
                                                  r".*pip install -e '.\[gpu\]'"):
        check_runtime({"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"})
    check_runtime()  # this environment: one build


@pytest.mark.slow
def test_publish_ranker_and_retrieval_with_index(trained, tmp_path) -> None:
    from models.index import ItemIndex

    registry = ModelRegistry(tmp_path / "registry")
    l2 = trained["l2"]
    files = {n: r.path for n, r in export_result(l2, tmp_path / "l2").items()}
    info = publish_result(registry, l2, files)
    m = info.manifest
    assert m["feature_names"] == l2.schema.feature_names
    assert m["inputs"] == ["dense", "ids", "seq"] and m["outputs"] == ["probs"]
    assert m["tasks"] == l2.tasks and m["metrics"]["auc_click"] == l2.metrics["auc_click"]
    assert m["training_range"]["eval"]["from"] == ranges()[1].start
    schema_again = type(l2.schema).from_dict(m["feature_schema"])
    assert schema_again == l2.schema
    assert registry.current_version("l2") == info.version

    ret = trained["retrieval"]
    files = {n: r.path for n, r in export_result(ret, tmp_path / "ret").items()}
    info = publish_result(registry, ret, files)
    assert {"user_tower.onnx", "item_tower.onnx"} <= set(info.files)
    index = ItemIndex.load(info.path / "index")
    assert len(index) == len(ret.catalog.ids)
    user = onnx_session(info.file("user_tower.onnx")).run(
        None, {k: v[:5] for k, v in ret.exports["user_tower"].holdout.items()})[0]
    ids, _ = index.search(user, 10)
    assert len(ids) == 5 and all(len(r) == 10 for r in ids)
    with pytest.raises(ValueError, match="needs item_embeddings"):
        publish_model(registry, "retrieval", files, ret.schema, {}, {})


@pytest.mark.slow
def test_cli_trains_from_iceberg_and_publishes(tmp_path) -> None:
    from features.offline.training import TrainingTables
    from tessera.cli import cli

    warehouse = tmp_path / "warehouse"
    TrainingTables.open(warehouse).append_examples(world_table().drop_columns(["version"]), "v1")
    registry = tmp_path / "registry"
    end = START + 3 * 24 * 3600 * 1000
    result = CliRunner().invoke(cli, [
        "train", "l1", "--from", str(START), "--to", str(end), "--warehouse", str(warehouse),
        "--registry", str(registry), "--epochs", "1"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout[result.stdout.index("{"):])
    assert metrics["train_rows"] > 10_000
    assert ModelRegistry(registry).current("l1") is not None
