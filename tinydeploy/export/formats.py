"""The exported formats: file names, embedded metadata, and writing / reloading each with its runtime."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from tinydeploy import __version__
from tinydeploy.errors import TinyDeployError
from tinydeploy.export.onnx_format import INPUT_NAME, OUTPUT_NAME, export_onnx_model
from tinydeploy.export.torch_formats import load_pt2, load_torchscript, save_pt2, save_torchscript
from tinydeploy.model.freeze import freeze
from tinydeploy.model.serialization import SPEC_KEY, load_model, read_metadata, save_model
from tinydeploy.model.spec import ArchSpec
from tinydeploy.serving.providers import open_session

#: Format name -> file name in an export directory. safetensors is always written.
FORMATS: dict[str, str] = {
    "safetensors": "model.safetensors",
    "onnx": "model.onnx",
    "torchscript": "model.ts",
    "pt2": "model.pt2",
}
OPTIONAL_FORMATS = ("onnx", "torchscript", "pt2")

#: Metadata key saying whether the artifact expects raw features ("raw") or standardised ones.
INPUTS_KEY = "tinydeploy.inputs"
METADATA_KEYS = [
    SPEC_KEY,
    "tinydeploy.spec_sha256",
    "tinydeploy.version",
    "tinydeploy.task",
    "tinydeploy.classes",
    "tinydeploy.preprocessing",
    INPUTS_KEY,
]

Predict = Callable[[np.ndarray], np.ndarray]


@dataclass
class Loaded:
    """An artifact reloaded with its own runtime: a numpy predictor, runtime details, its metadata."""

    predict: Predict
    runtime: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)


def parse_formats(names: Iterable[str]) -> tuple[str, ...]:
    """Validated optional format names in canonical order (safetensors is accepted and implied)."""
    names = [n.strip().lower() for n in names if n.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise TinyDeployError(
            f"unknown format '{unknown[0]}': use one of {', '.join(OPTIONAL_FORMATS)} (safetensors is always written)"
        )
    return tuple(f for f in OPTIONAL_FORMATS if f in names)


def artifact_metadata(spec: ArchSpec, preprocessing_included: bool) -> dict[str, str]:
    """String metadata embedded in every artifact: the spec and what a client needs to use it."""
    return {
        SPEC_KEY: spec.to_json(),
        "tinydeploy.spec_sha256": spec.sha256(),
        "tinydeploy.version": __version__,
        "tinydeploy.task": spec.task,
        "tinydeploy.classes": json.dumps(list(spec.classes)),
        "tinydeploy.preprocessing": json.dumps(spec.preprocessing, sort_keys=True),
        INPUTS_KEY: "raw" if preprocessing_included and spec.preprocessing else "standardized",
    }


def write_artifact(
    fmt: str,
    path: Path,
    model: nn.Module,
    frozen: nn.Module,
    spec: ArchSpec,
    metadata: dict[str, str],
    opset: int | None = None,
) -> None:
    """Write format ``fmt`` to ``path``: safetensors stores the plain ``model``, others ``frozen``."""
    if fmt == "safetensors":
        save_model(path, model, spec, {**metadata, "tinydeploy.kind": "export"})
    elif fmt == "onnx":
        if opset is None:
            raise TinyDeployError("an ONNX export needs an opset")
        path.write_bytes(export_onnx_model(frozen, spec, opset, metadata).SerializeToString())
    elif fmt == "torchscript":
        save_torchscript(frozen, path, metadata)
    else:
        save_pt2(frozen, spec, path, metadata)


def _torch_predictor(module: nn.Module) -> Predict:
    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return predict


def load_artifact(fmt: str, path: str | os.PathLike[str], provider: str = "cpu") -> Loaded:
    """Reload ``path`` with the runtime of ``fmt`` (onnxruntime, torch.jit, torch.export, safetensors)."""
    path = Path(path)
    torch_runtime = {"runtime": f"torch {torch.__version__}", "device": "cpu"}
    if fmt == "safetensors":
        metadata = read_metadata(path)
        model, spec = load_model(path)
        frozen = freeze(model, spec, preprocessing=metadata.get(INPUTS_KEY, "raw") == "raw")
        return Loaded(_torch_predictor(frozen), {**torch_runtime, "loader": "safetensors + spec"}, metadata)
    if fmt == "onnx":
        session = open_session(path, provider)
        metadata = dict(session.get_modelmeta().custom_metadata_map)

        def predict(x: np.ndarray) -> np.ndarray:
            return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]

        runtime = {"runtime": f"onnxruntime {ort.__version__}", "providers": session.get_providers()}
        return Loaded(predict, runtime, metadata)
    if fmt == "torchscript":
        module, metadata = load_torchscript(path, METADATA_KEYS)
        return Loaded(_torch_predictor(module), {**torch_runtime, "loader": "torch.jit.load"}, metadata)
    if fmt == "pt2":
        module, metadata = load_pt2(path, METADATA_KEYS)
        return Loaded(_torch_predictor(module), {**torch_runtime, "loader": "torch.export.load"}, metadata)
    raise TinyDeployError(f"unknown format '{fmt}': use one of {', '.join(FORMATS)}")
