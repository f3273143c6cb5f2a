"""Export torch modules to ONNX with a dynamic batch axis, checked against torch.

:func:`export_onnx` writes the model with the TorchScript-based exporter
(``dynamo=False``: it handles these small static graphs exactly and fast), marks axis 0 of
every input and output as the dynamic ``batch`` axis, then runs held-out rows through
ONNX Runtime and torch and raises :class:`ExportParityError` when any output differs by
``atol`` (1e-4) or more. :func:`onnx_session` opens a model on the CUDA execution
provider when ONNX Runtime offers it, on the CPU otherwise, and logs the choice.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from features.errors import TesseraError
from models.onnx_runtime import choose_providers, onnx_session
from tessera.logs import get_logger

__all__ = [
    "ExportParityError",
    "ExportReport",
    "check_parity",
    "choose_providers",
    "export_onnx",
    "onnx_session",
]

PARITY_ATOL = 1e-4
OPSET = 17
_log = get_logger("models.onnx")


class ExportParityError(TesseraError):
    """The exported ONNX model does not reproduce the torch model's outputs."""

    def __init__(self, *, path: Path, output: str, max_abs_diff: float, atol: float, rows: int):
        self.path = path
        self.output = output
        self.max_abs_diff = max_abs_diff
        self.atol = atol
        super().__init__(
            f"ONNX export {path} differs from torch on output {output!r}: max abs diff "
            f"{max_abs_diff:.3g} >= {atol:g} over {rows} held-out rows; check for ops that "
            "export differently (random, in-place, data-dependent shapes) or raise atol"
        )


@dataclass(frozen=True)
class ExportReport:
    """Where a model was written and how closely ONNX Runtime matched torch."""

    path: Path
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    max_abs_diff: float
    parity_rows: int
    provider: str


def _torch_outputs(model: nn.Module, inputs: Mapping[str, np.ndarray],
                   input_names: Sequence[str]) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(*(torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in input_names))
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().numpy() for o in outs]


def check_parity(model: nn.Module, session: ort.InferenceSession,
                 inputs: Mapping[str, np.ndarray], input_names: Sequence[str],
                 output_names: Sequence[str]) -> dict[str, float]:
    """Return ``{output: max abs difference}`` between torch and ONNX Runtime on ``inputs``."""
    want = _torch_outputs(model, inputs, input_names)
    got = session.run(list(output_names), {n: inputs[n] for n in input_names})
    return {name: float(np.max(np.abs(w - g))) if w.size else 0.0
            for name, w, g in zip(output_names, want, got)}


def export_onnx(model: nn.Module, example_inputs: Mapping[str, np.ndarray], path: str | Path,
                input_names: Sequence[str], output_names: Sequence[str], *,
                parity_inputs: Mapping[str, np.ndarray] | None = None,
                atol: float = PARITY_ATOL, opset: int = OPSET) -> ExportReport:
    """Export ``model`` to ``path`` with a dynamic batch axis, then check parity.

    Args:
        example_inputs: ``{input name: array}`` used to trace the model.
        input_names, output_names: names in the order ``forward`` takes/returns them.
        parity_inputs: held-out rows for the parity check (default: ``example_inputs``).
        atol: the largest allowed absolute difference.

    Returns:
        An :class:`ExportReport` with the parity measured on the CPU provider.

    Raises:
        ExportParityError: ONNX Runtime and torch disagree by ``atol`` or more.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    args = tuple(torch.from_numpy(np.ascontiguousarray(example_inputs[n])) for n in input_names)
    axes = {n: {0: "batch"} for n in [*input_names, *output_names]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, args, str(path), input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=axes,
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    held = parity_inputs if parity_inputs is not None else example_inputs
    session = onnx_session(path, providers=["CPUExecutionProvider"])
    diffs = check_parity(model, session, held, input_names, output_names)
    rows = len(next(iter(held.values())))
    for name, diff in diffs.items():
        if not diff < atol:
            raise ExportParityError(path=path, output=name, max_abs_diff=diff, atol=atol,
                                    rows=rows)
    worst = max(diffs.values(), default=0.0)
    _log.info("onnx_exported", path=str(path), max_abs_diff=worst, rows=rows)
    return ExportReport(path, tuple(input_names), tuple(output_names), worst, rows,
                        session.get_providers()[0])


def export_result(result: object, out_dir: str | Path) -> dict[str, ExportReport]:
    """Export every module of a ``models.train.TrainResult`` to ``out_dir/<name>.onnx``.

    Each is traced on its held-out rows and checked on them.

    Raises:
        TrainingDataError: a module has no held-out rows (the evaluation range was empty).
        ExportParityError: an export does not match torch.
    """
    from models.data import TrainingDataError

    out: dict[str, ExportReport] = {}
    for name, spec in result.exports.items():  # type: ignore[attr-defined]
        if not spec.holdout or not len(next(iter(spec.holdout.values()))):
            raise TrainingDataError(
                f"no held-out rows to check the {name} export against: the evaluation range "
                "has no rows; move --eval-from earlier or --to later"
            )
        out[name] = export_onnx(spec.module, spec.holdout, Path(out_dir) / f"{name}.onnx",
                                spec.input_names, spec.output_names)
    return out
