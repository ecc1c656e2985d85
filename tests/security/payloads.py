"""Malicious model artifacts built for real, the way an attacker who can replace a model directory would.

Each builder takes a genuine export directory (copied), plants one payload and rewrites
manifest.json to match, as anyone who can replace the directory can. A payload's side effect is a
marker file: it exists afterwards if and only if something loaded the payload.

* ``pt2_*``: model.pt2 is a zip archive read by ``torch.export.load``. Three members are unpickled
  with arbitrary globals allowed: the sample inputs (retried with ``torch.load(weights_only=False)``
  when the safe load fails), a weight whose config entry says ``use_pickle`` (``torch.load(...,
  weights_only=False)``) and an ``opaque_obj_*`` constant (``pickle.loads``).
* ``torchscript_from_file``: a scripted module whose TorchScript ``__setstate__`` calls
  ``torch.from_file(path, shared=True)``, which creates ``path`` when ``torch.jit.load`` runs.
* ``onnx_external_secret``: model.onnx with the output bias stored as external data at
  ``secret.txt``, a relative location that onnxruntime resolves against the working directory when
  it is given the model's bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import onnx
import torch


class CreatesFile:
    """Unpickling this calls ``open(path, "w")``: the file appears."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return open, (self.path, "w")


def rewrite_manifest(directory: Path, drop: tuple[str, ...] = ()) -> None:
    """Re-hash every listed file (as an attacker would), optionally dropping entries."""
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    files = {}
    for name in manifest["files"]:
        if name in drop:
            continue
        data = (directory / name).read_bytes()
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest["files"] = files
    path.write_text(json.dumps(manifest, indent=2))


def _rewrite_zip(path: Path, edit: Callable[[dict[str, bytes]], None]) -> None:
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    edit(members)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    path.write_bytes(buffer.getvalue())


def _torch_saved(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def pt2_sample_inputs(directory: Path, marker: Path) -> None:
    """Sample inputs that the safe loader refuses, so torch retries with weights_only=False."""

    def edit(members: dict[str, bytes]) -> None:
        members["model/data/sample_inputs/model.pt"] = _torch_saved(CreatesFile(marker))

    _rewrite_zip(directory / "model.pt2", edit)
    rewrite_manifest(directory)


def pt2_pickled_weight(directory: Path, marker: Path) -> None:
    """A weight entry marked use_pickle: loaded with torch.load(weights_only=False)."""

    def edit(members: dict[str, bytes]) -> None:
        config_name = "model/data/weights/model_weights_config.json"
        config = json.loads(members[config_name])
        entry = config["config"]["0.weight"]
        entry["use_pickle"] = True
        members[config_name] = json.dumps(config).encode()
        members[f"model/data/weights/{entry['path_name']}"] = _torch_saved(CreatesFile(marker))

    _rewrite_zip(directory / "model.pt2", edit)
    rewrite_manifest(directory)


def pt2_opaque_constant(directory: Path, marker: Path) -> None:
    """An opaque_obj_* constant: loaded with plain pickle.loads."""

    def edit(members: dict[str, bytes]) -> None:
        config_name = "model/data/constants/model_constants_config.json"
        config = json.loads(members[config_name])
        config["config"]["evil"] = {
            "path_name": "opaque_obj_0",
            "is_param": False,
            "use_pickle": True,
            "tensor_meta": None,
        }
        members[config_name] = json.dumps(config).encode()
        members["model/data/constants/opaque_obj_0"] = pickle.dumps(CreatesFile(marker))

    _rewrite_zip(directory / "model.pt2", edit)
    rewrite_manifest(directory)


class FromFile(torch.nn.Module):
    """A module whose TorchScript ``__setstate__`` maps ``path`` with ``aten::from_file(shared=True)``,
    creating the file, every time ``torch.jit.load`` restores it (the result is kept in an attribute,
    so TorchScript cannot drop the call as dead code)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.data = torch.zeros(16, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.path = state[0]
        self.training = state[1]
        self.data = torch.from_file(state[0], shared=True, size=16, dtype=torch.uint8)


def torchscript_from_file(directory: Path, marker: Path) -> None:
    """model.ts whose TorchScript __setstate__ creates ``marker`` when the file is loaded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(FromFile(str(marker))), str(directory / "model.ts"))
    rewrite_manifest(directory)


def onnx_external_secret(directory: Path, location: str = "secret.txt", tensor: str = "4.bias") -> int:
    """Store ``tensor`` of model.onnx as external data at ``location``; return its size in bytes."""
    model = onnx.load(str(directory / "model.onnx"))
    initializer = next(t for t in model.graph.initializer if t.name == tensor)
    size = len(initializer.raw_data) or 4 * len(initializer.float_data)
    initializer.ClearField("raw_data")
    initializer.ClearField("float_data")
    initializer.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(size))):
        entry = initializer.external_data.add()
        entry.key, entry.value = key, value
    (directory / "model.onnx").write_bytes(model.SerializeToString())
    rewrite_manifest(directory)
    return size
