"""ONNX Runtime sessions for serving: no torch here (serving installs without it).

``models.onnx_export`` (training side, needs torch) exports the models; this module only
opens them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from tessera.logs import get_logger

_log = get_logger("models.onnx_runtime")


def choose_providers(available: Sequence[str] | None = None) -> list[str]:
    """Return ``["CUDAExecutionProvider", "CPUExecutionProvider"]`` when CUDA is offered, else CPU."""
    have = list(ort.get_available_providers() if available is None else available)
    if "CUDAExecutionProvider" in have:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def onnx_session(path: str | Path, *, threads: int = 1,
                 providers: Sequence[str] | None = None) -> ort.InferenceSession:
    """Open ``path`` in ONNX Runtime: CUDA when available, else CPU; log the provider used.

    Args:
        threads: intra-op threads (1-2 suits small models serving many requests).
        providers: override the choice (e.g. ``["CPUExecutionProvider"]``).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    chosen = list(providers) if providers is not None else choose_providers()
    session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    _log.info("onnx_session", path=str(path), provider=session.get_providers()[0],
              requested=chosen, available=ort.get_available_providers(), threads=threads)
    return session
