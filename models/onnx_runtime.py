"""ONNX Runtime sessions for serving: no torch here (serving installs without it).

``models.onnx_export`` (training side, needs torch) exports the models; this module only
opens them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

import onnxruntime as ort

from models.devices import DEVICES
from models.errors import RuntimeInstallError
from tessera.logs import get_logger

_log = get_logger("models.onnx_runtime")


#: the ONNX Runtime builds on PyPI; each installs the same ``onnxruntime`` module
RUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")


def installed_runtimes() -> dict[str, str]:
    """``{distribution: version}`` of the ONNX Runtime builds installed in this environment."""
    out = {}
    for name in RUNTIME_DISTRIBUTIONS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def check_runtime(installed: Mapping[str, str] | None = None) -> None:
    """Raise ``RuntimeInstallError`` unless exactly one ONNX Runtime build is installed.

    The CPU (``onnxruntime``) and GPU (``onnxruntime-gpu``) builds share one module: with
    both, whichever pip installed last wins, often the one without CUDA.
    """
    have = installed_runtimes() if installed is None else dict(installed)
    if len(have) > 1:
        found = ", ".join(f"{k} {v}" for k, v in sorted(have.items()))
        raise RuntimeInstallError(
            f"both ONNX Runtime builds are installed ({found}); they provide the same module "
            "and only one can load. Keep one: pip uninstall -y onnxruntime onnxruntime-gpu, "
            "then pip install -e '.[gpu]' for CUDA or -e '.[cpu]' for CPU")


def choose_providers(available: Sequence[str] | None = None, device: str = "auto") -> list[str]:
    """The providers for ``device``: ``auto`` takes CUDA when offered, else CPU.

    Raises:
        RuntimeInstallError: ``device="cuda"`` and this ONNX Runtime offers no CUDA provider.
        ValueError: an unknown device.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    have = list(ort.get_available_providers() if available is None else available)
    cuda = "CUDAExecutionProvider" in have
    if device == "cuda" and not cuda:
        raise RuntimeInstallError(
            f"device 'cuda' asked for, but ONNX Runtime offers only {', '.join(have)}: install "
            "the GPU build (pip uninstall -y onnxruntime && pip install -e '.[gpu]') on a "
            "machine with CUDA 12 and cuDNN 9, or serve with --device cpu")
    if cuda and device != "cpu":
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
    # Requests run concurrently on few cores: an intra-op pool that spins while idle takes
    # the cores the other requests need (tail latency); with one thread there is no pool.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    chosen = list(providers) if providers is not None else choose_providers()
    session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    _log.info("onnx_session", path=str(path), provider=session.get_providers()[0],
              requested=chosen, available=ort.get_available_providers(), threads=threads)
    return session
