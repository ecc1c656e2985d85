"""A small export directory written directly, for serving tests that need no trained model (about 0.1 s).

``write_export`` lays out what ``tinydeploy export RUN --formats onnx`` publishes for a digits-shaped
MLP (64 raw features -> standardize -> [12, 6] ReLU -> 10 classes): ``arch.json`` (the spec of
``ArchSpec.mlp``), ``model.onnx`` (the same graph as the exporter's: Sub, Div, Gemm, Relu, ... with a
dynamic batch and the same metadata keys), ``model.safetensors`` and ``manifest.json`` written by
``serving.manifest.write_manifest``, as the export pipeline does. The weights are random (seeded), not
trained: ``forward`` computes the same function in float64 numpy, so a test can check the runtime and
the server against an independent implementation. No torch is imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

from tinydeploy import __version__
from tinydeploy.atomic import write_json
from tinydeploy.model.spec import ArchSpec
from tinydeploy.serving.manifest import write_manifest

N_FEATURES = 64
HIDDEN = (12, 6)
CLASSES = tuple(str(i) for i in range(10))
OPSET = 18


def fast_spec(feature_names: tuple[str, ...] = (), classes: tuple[str, ...] = CLASSES, image: bool = False) -> ArchSpec:
    """The spec of the digits-shaped MLP, with per-feature standardisation (mean 8, std 4 .. 5.26); with
    ``image`` it takes 8x8 grey images [1, 8, 8] (values 0..16, flattened first) and records their format."""
    preprocessing = {"kind": "standardize", "mean": [8.0] * N_FEATURES,
                     "std": [4.0 + i / 48 for i in range(N_FEATURES)]}
    spec = ArchSpec.mlp(task="classification", input_shape=(1, 8, 8) if image else (N_FEATURES,),
                        hidden_widths=list(HIDDEN), n_outputs=len(classes), classes=classes,
                        preprocessing=preprocessing, dataset="digits")
    extra = {"image": {"mode": "L", "size": [8, 8], "max_value": 16.0}} if image else {}
    return dataclasses.replace(spec, feature_names=tuple(feature_names), extra=extra)


def weights(spec: ArchSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded float32 weights named as the exporter names them (``0.weight``, ``0.bias``, ``2.weight`` ...)."""
    rng = np.random.default_rng(seed)
    found, fan_in = {}, N_FEATURES
    linear = [i for i, layer in enumerate(spec.layers) if layer["kind"] == "linear"]
    for index in linear:
        out = spec.layers[index]["out_features"]
        found[f"{index}.weight"] = (rng.standard_normal((out, fan_in)) / np.sqrt(fan_in)).astype(np.float32)
        found[f"{index}.bias"] = (0.1 * rng.standard_normal(out)).astype(np.float32)
        fan_in = out
    return found


def forward(spec: ArchSpec, params: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    """The model's outputs for raw inputs ``X``, in float64 numpy (the reference the tests compare with)."""
    prep = spec.preprocessing
    X = np.asarray(X, dtype=np.float64).reshape(len(X), N_FEATURES)
    h = (X - np.asarray(prep["mean"])) / np.asarray(prep["std"])
    linear = [i for i, layer in enumerate(spec.layers) if layer["kind"] == "linear"]
    for k, index in enumerate(linear):
        h = h @ params[f"{index}.weight"].astype(np.float64).T + params[f"{index}.bias"]
        if k < len(linear) - 1:
            h = np.maximum(h, 0.0)
    return h


def metadata(spec: ArchSpec) -> dict[str, str]:
    """The metadata props the exporter embeds (``export.formats.artifact_metadata``, preprocessing included)."""
    return {
        "tinydeploy.spec": spec.to_json(),
        "tinydeploy.spec_sha256": spec.sha256(),
        "tinydeploy.version": __version__,
        "tinydeploy.task": spec.task,
        "tinydeploy.classes": json.dumps(list(spec.classes)),
        "tinydeploy.preprocessing": json.dumps(spec.preprocessing, sort_keys=True),
        "tinydeploy.inputs": "raw",
        "tinydeploy.feature_names": json.dumps(list(spec.feature_names)),
    }


def onnx_model(spec: ArchSpec, params: dict[str, np.ndarray], props: dict[str, str] | None = None,
               batch: str | int = "batch") -> onnx.ModelProto:
    """The exporter's graph for ``spec``: input -> Sub(mean) -> Div(std) -> (Gemm, Relu)* -> Gemm -> output."""
    prep = spec.preprocessing
    initializers = [numpy_helper.from_array(np.asarray(prep["mean"], dtype=np.float32), "standardize.mean"),
                    numpy_helper.from_array(np.asarray(prep["std"], dtype=np.float32), "standardize.std")]
    image = len(spec.input_shape) > 1
    nodes = [helper.make_node("Flatten", ["input"], ["flat"])] if image else []
    nodes += [helper.make_node("Sub", ["flat" if image else "input", "standardize.mean"], ["sub"]),
              helper.make_node("Div", ["sub", "standardize.std"], ["div"])]
    current = "div"
    linear = [i for i, layer in enumerate(spec.layers) if layer["kind"] == "linear"]
    for k, index in enumerate(linear):
        initializers += [numpy_helper.from_array(params[f"{index}.{p}"], f"{index}.{p}") for p in ("weight", "bias")]
        last = k == len(linear) - 1
        out = "output" if last else f"linear_{k}"
        nodes.append(helper.make_node("Gemm", [current, f"{index}.weight", f"{index}.bias"], [out], transB=1))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"relu_{k}"]))
            current = f"relu_{k}"
    n_out = spec.layers[linear[-1]]["out_features"]
    graph = helper.make_graph(
        nodes, "main_graph",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, *spec.input_shape])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, n_out])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
    helper.set_model_props(model, metadata(spec) if props is None else props)
    onnx.checker.check_model(model, full_check=True)
    return model


def write_export(directory: Path, spec: ArchSpec | None = None, *, seed: int = 0, props: dict[str, str] | None = None,
                 batch: str | int = "batch", model: onnx.ModelProto | None = None) -> Path:
    """Write the export directory (arch.json, model.onnx, model.safetensors, manifest.json) and return it.

    ``props`` replaces the embedded metadata, ``batch`` fixes the batch dimension, ``model`` replaces the
    ONNX graph altogether (for malformed models)."""
    spec = spec or fast_spec()
    params = weights(spec, seed)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "arch.json", spec.to_dict())
    model = model or onnx_model(spec, params, props, batch)
    (directory / "model.onnx").write_bytes(model.SerializeToString())
    save_file(params, str(directory / "model.safetensors"), metadata={**metadata(spec), "tinydeploy.kind": "export"})
    write_manifest(directory, "pytest fast fixture", str(directory), run_status="complete")
    return directory


def rehash(directory: Path, name: str) -> None:
    """Rewrite ``name``'s manifest entry so that the manifest agrees with the file as it is now."""
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    data = (directory / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    path.write_text(json.dumps(manifest))


def digit_rows(n: int, seed: int = 1) -> np.ndarray:
    """``n`` digits-like float32 rows (whole numbers 0..16, as the digits pixels are)."""
    return np.random.default_rng(seed).integers(0, 17, size=(n, N_FEATURES)).astype(np.float32)


@pytest.fixture(scope="session")
def fast_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fast export directory (written once per process). Do not modify it: copy it."""
    return write_export(tmp_path_factory.mktemp("fast-export") / "export")


def reference(directory: Path, X: Any) -> np.ndarray:
    """``forward`` with the spec of ``directory``'s arch.json and the weights its seed 0 gives."""
    spec = ArchSpec.from_dict(json.loads((directory / "arch.json").read_text()))
    return forward(spec, weights(spec), X)


@contextlib.contextmanager
def running_server(app, timeout: float = 20.0, lifespan: str = "off") -> Iterator[str]:
    """Serve ``app`` with a real uvicorn server on a free loopback port in a thread; yield its URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    async def asgi(scope, receive, send) -> None:
        # uvicorn calls an application without arguments to tell a factory from an app: a plain function fails
        # that probe as ModelServer does, while mutation testing's wrapper of ModelServer.__call__ does not
        await app(scope, receive, send)

    config = uvicorn.Config(asgi, log_level="warning", access_log=False, lifespan=lifespan)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
