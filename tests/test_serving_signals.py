"""A CNN grown on signals (C, L), served: the torch-free runtime, a real uvicorn server on loopback and
``tinydeploy predict`` take one tensor [C, L] or a batch [B, C, L] (in JSON, in .npy) and answer what
the frozen PyTorch model answers; wrong shapes, image uploads and bad .json files are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from serving_fixtures import running_server
from typer.testing import CliRunner

from cli.main import app
from tinydeploy.model.freeze import load_frozen
from tinydeploy.serving.runtime import InputError, OnnxModel
from tinydeploy.serving.server import create_app

CHANNELS, LENGTH = 2, 24


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def signals(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two-channel noise with a bump in channel 0 (class 0) or channel 1 (class 1)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(scale=0.3, size=(n, CHANNELS, LENGTH)).astype(np.float32)
    y = np.arange(n) % 2
    where = rng.integers(4, LENGTH - 4, size=n)
    for i in range(n):
        X[i, y[i], where[i] - 2:where[i] + 2] += 2.0
    return X, y


@pytest.fixture(scope="module")
def signal_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("signals")
    (X_train, y_train), (X_test, y_test) = signals(300, 0), signals(100, 1)
    np.savez(work / "signals.npz", X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test)
    grown = cli("grow", "--dataset", work / "signals.npz", "--out", work / "run", "--conv-kernels", "3",
                "--hidden-layers", "0", "--max-growth-epochs", "1", "--final-epochs", "2", "--threads", "1",
                "--device", "cpu")
    assert grown.exit_code == 0, grown.stderr
    exported = cli("export", work / "run", "--onnx")
    assert exported.exit_code == 0, exported.stderr
    return work / "run" / "artifacts"


@pytest.fixture(scope="module")
def expected(signal_export: Path) -> tuple[np.ndarray, np.ndarray]:
    """Five test signals and the frozen PyTorch model's outputs for them."""
    X = signals(5, 2)[0]
    frozen, _ = load_frozen(signal_export)
    with torch.no_grad():
        return X, frozen(torch.from_numpy(X)).numpy()


def test_the_runtime_takes_one_signal_or_a_batch(signal_export: Path, expected) -> None:
    X, outputs = expected
    model = OnnxModel(signal_export)
    assert model.input_shape == (CHANNELS, LENGTH) and model.image is None
    np.testing.assert_allclose(model.predict(X).outputs, outputs, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(model.predict(X[3]).outputs, outputs[3:4], atol=1e-5, rtol=1e-4)
    with pytest.raises(InputError, match=r"^inputs has shape \[3, 24\]; expected one tensor of shape \[2, 24\] or "
                                         r"a batch of shape \[batch, 2, 24\] \(or rows of 48 values\)$"):
        model.predict(X[0, :1].repeat(3, axis=0))  # three one-channel signals


def test_the_server_takes_json_signals_and_refuses_uploads(signal_export: Path, expected) -> None:
    X, outputs = expected
    with running_server(create_app(signal_export, "cpu", 8)) as base, httpx.Client(base_url=base, timeout=30) as client:
        one = client.post("/v1/predict", json={"inputs": X[0].tolist()})  # [C, L]
        batch = client.post("/v1/predict", json={"inputs": X.tolist()})  # [B, C, L]
        assert one.status_code == batch.status_code == 200, batch.text
        np.testing.assert_allclose(one.json()["outputs"], outputs[:1], atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(batch.json()["outputs"], outputs, atol=1e-5, rtol=1e-4)
        assert batch.json()["labels"] == [str(i) for i in outputs.argmax(axis=1)]
        wrong = client.post("/v1/predict", json={"inputs": X[0].T.tolist()})  # [L, C]
        assert wrong.status_code == 422 and wrong.json()["error"] == {
            "status": 422, "code": "shape", "message": "inputs has shape [24, 2]; expected one tensor of shape [2, 24] "
            "or a batch of shape [batch, 2, 24] (or rows of 48 values)"}
        deep = client.post("/v1/predict", json={"inputs": X[None].tolist()})  # [1, B, C, L]: one level too deep
        assert (deep.status_code, deep.json()["error"]["code"]) == (400, "too_deep")
        upload = client.post("/v1/predict", files=[("image", ("a.png", b"\x89PNG", "image/png"))])
        assert upload.status_code == 415 and upload.json()["error"]["message"] == (
            'this model was not grown on images: send application/json {"inputs": [...]}')
        assert client.get("/v1/metadata").json()["input"]["shape"] == ["batch", CHANNELS, LENGTH]


def test_predict_reads_a_json_request_body(signal_export: Path, expected, tmp_path: Path) -> None:
    X, outputs = expected
    (tmp_path / "batch.json").write_text(json.dumps({"inputs": X.tolist()}))
    (tmp_path / "one.json").write_text(json.dumps({"inputs": X[2].tolist()}))
    np.save(tmp_path / "batch.npy", X)
    from_json = cli("predict", signal_export, "--input", tmp_path / "batch.json", "--output", tmp_path / "out.npy")
    one = cli("predict", signal_export, "--input", tmp_path / "one.json")
    from_npy = cli("predict", signal_export, "--input", tmp_path / "batch.npy")
    assert from_json.exit_code == one.exit_code == from_npy.exit_code == 0, from_json.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), outputs, atol=1e-5, rtol=1e-4)
    assert one.stdout.splitlines()[1] == from_npy.stdout.splitlines()[3]


@pytest.mark.parametrize(("body", "message"), [
    ('{"rows": []}', 'the body has no "inputs" field (found keys: \'rows\'): send {"inputs": [...]}'),
    ('{"inputs": [[[[[0]]]]]}', ("the body nests 6 levels deep, over the limit of 4: send {\"inputs\": [row, ...]} "
                                 "with plain rows of numbers")),
    ('{"inputs": [1, 2,', "the request body is not valid JSON: Expecting value at line 1 column 18"),
])
def test_a_bad_json_input_file_is_one_line_error(signal_export: Path, tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(body)
    refused = cli("predict", signal_export, "--input", path)
    assert refused.exit_code == 2 and refused.stderr.strip() == f"error: --input {path}: {message}"
