"""Serving refuses to start on a device its ONNX Runtime cannot give it."""

from __future__ import annotations

import onnxruntime as ort
import pytest
from starlette.testclient import TestClient

from models.errors import RuntimeInstallError
from serving.app import create_app
from serving.config import ServingConfig
from tessera.broker import find_free_port


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="this ONNX Runtime has CUDA")
def test_device_cuda_without_a_cuda_provider_refuses_to_start(stack, tmp_path):
    config = ServingConfig(port=find_free_port(), store_url=stack.store_url, bootstrap=None,
                           spool_dir=tmp_path / "spool", registry_dir=tmp_path / "registry",
                           device="cuda")
    with pytest.raises(RuntimeInstallError, match=r"device 'cuda' asked for.*pip install -e "
                                                  r"'.\[gpu\]'.*or serve with --device cpu"):
        with TestClient(create_app(config)):
            pass


def test_device_must_be_known():
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda, got 'gpu'"):
        ServingConfig(device="gpu")
