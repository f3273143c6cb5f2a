"""Where serving may run its ONNX models; no onnxruntime import, so configs can use it."""

from __future__ import annotations

DEVICES = ("auto", "cpu", "cuda")
"""``auto``: CUDA when ONNX Runtime offers it, else CPU; ``cuda``: CUDA or refuse to start."""
