"""The exported formats: embedded metadata, and writing / reloading each with its runtime (file names in
``tinydeploy.export.artifacts``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from tinydeploy import __version__
from tinydeploy.errors import TinyDeployError
from tinydeploy.export.artifacts import (  # noqa: F401  (re-exported names)
    CODE_FORMATS,
    FEATURE_NAMES_KEY,
    FORMATS,
    INPUTS_KEY,
    METADATA_KEYS,
    OPTIONAL_FORMATS,
    parse_formats,
)
from tinydeploy.export.onnx_format import INPUT_NAME, OUTPUT_NAME, export_onnx_model
from tinydeploy.export.torch_formats import load_pt2, load_torchscript, save_pt2, save_torchscript
from tinydeploy.model.freeze import freeze
from tinydeploy.model.serialization import SPEC_KEY, load_model_bytes, metadata_from_bytes, save_model
from tinydeploy.model.spec import ArchSpec
from tinydeploy.serving.providers import import_onnxruntime, open_session
from tinydeploy.serving.runtime import check_self_contained

Predict = Callable[[np.ndarray], np.ndarray]


@dataclass
class Loaded:
    """An artifact reloaded with its own runtime: a numpy predictor, runtime details, its metadata."""

    predict: Predict
    runtime: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)


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
        FEATURE_NAMES_KEY: json.dumps(list(spec.feature_names)),
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


def load_artifact(fmt: str, data: bytes, provider: str = "cpu", *, trusted: bool = False) -> Loaded:
    """Load artifact bytes ``data`` (read and hashed by the caller) with the runtime of ``fmt``.

    TorchScript and torch.export can run code hidden in the file: they are refused unless ``trusted``
    (a file this process wrote, or ``--trust-pickle``). ONNX must be self-contained (no external data).
    """
    name = FORMATS.get(fmt, fmt)
    if fmt in CODE_FORMATS and not trusted:
        raise TinyDeployError(f"{name} is not loaded: {fmt} files can run code when loaded; pass --trust-pickle to load it")
    torch_runtime = {"runtime": f"torch {torch.__version__}", "device": "cpu"}
    if fmt == "safetensors":
        metadata = metadata_from_bytes(data, name)
        model, spec = load_model_bytes(data, name)
        frozen = freeze(model, spec, preprocessing=metadata.get(INPUTS_KEY, "raw") == "raw")
        return Loaded(_torch_predictor(frozen), {**torch_runtime, "loader": "safetensors + spec"}, metadata)
    if fmt == "onnx":
        check_self_contained(data, name)
        session = open_session(data, provider)
        metadata = dict(session.get_modelmeta().custom_metadata_map)

        def predict(x: np.ndarray) -> np.ndarray:
            return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]

        runtime = {"runtime": f"onnxruntime {import_onnxruntime().__version__}", "providers": session.get_providers()}
        return Loaded(predict, runtime, metadata)
    if fmt == "torchscript":
        module, metadata = load_torchscript(data, METADATA_KEYS)
        return Loaded(_torch_predictor(module), {**torch_runtime, "loader": "torch.jit.load"}, metadata)
    if fmt == "pt2":
        module, metadata = load_pt2(data, METADATA_KEYS)
        return Loaded(_torch_predictor(module), {**torch_runtime, "loader": "torch.export.load"}, metadata)
    raise TinyDeployError(f"unknown format '{fmt}': use one of {', '.join(FORMATS)}")
