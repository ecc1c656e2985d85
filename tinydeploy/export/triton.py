"""A Triton Inference Server model repository entry for an exported ONNX model.

``write_triton_repo(export_dir, repo_dir, name, max_batch_size)`` writes::

    repo_dir/<name>/config.pbtxt      platform "onnxruntime_onnx", batching, input/output tensors
    repo_dir/<name>/1/model.onnx      a byte-identical copy of the export's model.onnx
    repo_dir/<name>/labels.txt        class names, one per line (classifiers only)

The tensor names, data types and non-batch dims are read from the ONNX graph itself, so the config
always matches the model file. Triton's own batching dimension is the ONNX batch dimension, which
must be dynamic when ``max_batch_size > 0``. The entry is written to a staging directory and renamed
into place, so a repository that Triton is polling never sees a half-written model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tinydeploy.errors import TinyDeployError
from tinydeploy.serving.runtime import resolve_model_path

CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"
#: ONNX TensorProto element type -> Triton data type.
_TRITON_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 6: "TYPE_INT32", 7: "TYPE_INT64", 3: "TYPE_INT8", 2: "TYPE_UINT8", 9: "TYPE_BOOL"}
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _tensor(value_info: Any) -> dict[str, Any]:
    tensor_type = value_info.type.tensor_type
    dims = []
    for dim in tensor_type.shape.dim:
        dims.append(int(dim.dim_value) if dim.HasField("dim_value") else -1)
    data_type = _TRITON_TYPES.get(tensor_type.elem_type)
    if data_type is None:
        raise TinyDeployError(f"tensor '{value_info.name}' has ONNX element type {tensor_type.elem_type}, unsupported by this writer")
    return {"name": value_info.name, "data_type": data_type, "dims": dims}


def default_model_name(export_dir: str | os.PathLike[str]) -> str:
    """A Triton-safe name from the spec's dataset, else the directory name."""
    directory, model_path = resolve_model_path(export_dir)
    name = ""
    arch = directory / "arch.json"
    if arch.is_file():
        try:
            name = str(json.loads(arch.read_text(encoding="utf-8")).get("dataset", ""))
        except (OSError, json.JSONDecodeError):
            name = ""
    name = Path(name).stem if name else directory.name
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("._-") or "model"
    return f"tinydeploy_{name}"


def render_config(name: str, max_batch_size: int, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]],
                  label_file: str | None, dynamic_batching: bool) -> str:
    """The config.pbtxt text (protobuf text format)."""

    def block(kind: str, tensors: list[dict[str, Any]], labels: str | None = None) -> list[str]:
        lines = [f"{kind} ["]
        for i, t in enumerate(tensors):
            lines += [
                "  {",
                f'    name: "{t["name"]}"',
                f"    data_type: {t['data_type']}",
                f"    dims: [ {', '.join(str(d) for d in t['dims'])} ]",
            ]
            if labels and i == 0:
                lines.append(f'    label_filename: "{labels}"')
            lines.append("  }" + ("," if i < len(tensors) - 1 else ""))
        lines.append("]")
        return lines

    lines = [
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
        *block("input", inputs),
        *block("output", outputs, label_file),
    ]
    if dynamic_batching and max_batch_size > 0:
        lines.append("dynamic_batching { }")
    lines.append('version_policy: { latest: { num_versions: 1 } }')
    return "\n".join(lines) + "\n"


def write_triton_repo(
    export_dir: str | os.PathLike[str],
    repo_dir: str | os.PathLike[str],
    name: str | None = None,
    max_batch_size: int = 256,
    *,
    dynamic_batching: bool = True,
    version: int = 1,
) -> Path:
    """Write (or replace) ``repo_dir/<name>`` for the export's model.onnx; return that directory."""
    import onnx

    directory, model_path = resolve_model_path(export_dir)
    name = name or default_model_name(directory)
    if not _NAME.match(name):
        raise TinyDeployError(f"Triton model name {name!r} may only contain letters, digits, '_', '.' and '-'")
    if max_batch_size < 0:
        raise TinyDeployError(f"max_batch_size must be >= 0 (0 disables Triton batching), got {max_batch_size}")
    if version < 1:
        raise TinyDeployError(f"the model version must be >= 1, got {version}")
    model = onnx.load(str(model_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    inputs = [_tensor(v) for v in model.graph.input if v.name not in initializers]
    outputs = [_tensor(v) for v in model.graph.output]
    if max_batch_size > 0:
        for t in inputs + outputs:
            if not t["dims"] or t["dims"][0] != -1:
                raise TinyDeployError(
                    f"tensor '{t['name']}' has a fixed first dimension {t['dims'][:1]}: Triton batching needs a dynamic "
                    "batch dimension; re-export or pass max_batch_size=0"
                )
            t["dims"] = t["dims"][1:]
    props = {p.key: p.value for p in model.metadata_props}
    classes: list[str] = []
    if props.get("tinydeploy.task") == "classification" and "tinydeploy.classes" in props:
        classes = [str(c) for c in json.loads(props["tinydeploy.classes"])]

    repo = Path(repo_dir)
    repo.mkdir(parents=True, exist_ok=True)
    final = repo / name
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repo))
    try:
        (staging / str(version)).mkdir()
        shutil.copyfile(model_path, staging / str(version) / "model.onnx")
        label_file = None
        if classes:
            (staging / LABELS_FILE).write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")
            label_file = LABELS_FILE
        (staging / CONFIG_FILE).write_text(
            render_config(name, max_batch_size, inputs, outputs, label_file, dynamic_batching), encoding="utf-8"
        )
        os.chmod(staging, 0o755)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=repo))
            os.replace(final, old / name)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final
