"""ONNX export of a frozen model: one self-contained file that the installed onnxruntime loads.

``torch.onnx.export(dynamo=True)`` traces the model with ``torch.export`` and translates it with
onnxscript. The returned ``ModelProto`` keeps its weights inline and is serialised here in one
piece, so no external ``.data`` file is ever written. Its IR version is clamped to what the installed
onnxruntime loads (see ``tinydeploy.export.ort_support``) and checked with ``onnx.checker``.

onnxruntime's CPU GEMM accumulates in another order than torch's, so its outputs differ from the
frozen model's by a few float32 ulps of the largest logit (measured: 5.7e-6 on logits up to 43 for
the test fixture, 3.8e-6 on a grown digits run); the parity gate's ``rtol`` term covers that.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Iterator

import onnx
import torch
from onnx import helper
from torch import nn

from tinydeploy.errors import TinyDeployError
from tinydeploy.export.ort_support import max_ir_version, max_opset
from tinydeploy.model.spec import ArchSpec

INPUT_NAME = "input"
OUTPUT_NAME = "output"
#: The opset torch's exporter implements natively; it only converts to others best-effort (a request
#: for 13 silently stays at 18), so older opsets are refused instead of half-honoured.
MIN_OPSET = 18
DEFAULT_OPSET = 18


def opset_range() -> tuple[int, int]:
    """The inclusive range of opsets that both the exporter and the installed onnxruntime handle."""
    return MIN_OPSET, max(MIN_OPSET, max_opset())


def check_opset(opset: int | None) -> int:
    """``opset`` (or the default) if it is in ``opset_range()``, else a one-line error."""
    low, high = opset_range()
    chosen = DEFAULT_OPSET if opset is None else int(opset)
    if not low <= chosen <= high:
        raise TinyDeployError(f"opset {chosen} is out of range: use an opset from {low} to {high}")
    return chosen


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress prints and its version-converter log lines."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "torch.export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx_model(frozen: nn.Module, spec: ArchSpec, opset: int, metadata: dict[str, str]) -> onnx.ModelProto:
    """Export ``frozen`` to a checked ``ModelProto`` with a dynamic batch and ``metadata`` props."""
    example = torch.zeros((2, *spec.input_shape), dtype=torch.float32)
    with _quiet_exporter():
        program = torch.onnx.export(
            frozen,
            (example,),
            None,
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            verbose=False,
        )
    model = program.model_proto
    found = {entry.domain: entry.version for entry in model.opset_import}.get("", None)
    if found != opset:
        raise TinyDeployError(f"the ONNX exporter produced opset {found} instead of {opset}: choose another --opset")
    needed_ir = helper.find_min_ir_version_for(list(model.opset_import))
    model.ir_version = max(needed_ir, min(model.ir_version, max_ir_version()))
    del model.metadata_props[:]
    helper.set_model_props(model, metadata)
    onnx.checker.check_model(model, full_check=True)
    return model


def initializer_shapes(path: str | os.PathLike[str]) -> dict[str, list[int]]:
    """Name -> shape of every initializer of the ONNX graph at ``path``."""
    model = onnx.load(str(Path(path)), load_external_data=False)
    return {tensor.name: list(tensor.dims) for tensor in model.graph.initializer}
