"""A CNN end to end through the real CLI (the Typer app in-process, real files): grow on mnist5k, export
every format, parity, verify, the width report against the ONNX graph, torch-free inference on image
tensors, and bad CNN options."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from tinydeploy.data import load_dataset
from tinydeploy.export.onnx_format import initializer_shapes
from tinydeploy.model.freeze import load_frozen
from tinydeploy.serving.runtime import InputError, OnnxModel
from tinydeploy.training.config import GrowConfig
from tinydeploy.training.job import prepare_grow

#: One conv block straight into the output layer, a few seconds of training.
SMALL_CNN = ["--conv-kernels", "3", "--hidden-layers", "0", "--max-params", "8000", "--max-growth-epochs", "0.3",
             "--grow-every", "0.3", "--final-epochs", "0.3", "--seed", "2"]


@pytest.fixture(scope="module")
def cnn_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("cnn") / "run"
    grown = cli("grow", "--dataset", "mnist5k", "--out", str(run), *SMALL_CNN)
    assert grown.exit_code == 0, grown.stderr
    exported = cli("export", str(run), "--onnx", "--torchscript", "--pt2")
    assert exported.exit_code == 0, exported.stderr + exported.stdout
    return run


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_grow_writes_a_cnn_run(cnn_export: Path) -> None:
    metrics = json.loads((cnn_export / "metrics.json").read_text())
    arch = json.loads((cnn_export / "arch.json").read_text())
    assert metrics["arch"] == "cnn" and metrics["initial_widths"] == [1] and metrics["final_widths"][0] > 1
    assert [layer["kind"] for layer in arch["layers"]] == ["conv", "activation", "avgpool", "flatten", "linear"]
    assert arch["preprocessing"]["per"] == "channel" and arch["extra"]["image"]["size"] == [28, 28]
    assert metrics["params"] <= 8000 and metrics["max_shift"] == 2 and metrics["config"]["batch_size"] == 64
    events = [json.loads(line) for line in (cnn_export / "growth_log.jsonl").read_text().splitlines()]
    assert events and all(lam > e["lambda_null"] for e in events for lam in e["lambdas"])
    assert all(e["loss_after"] < e["loss_before"] for e in events)


def test_every_format_passes_parity_and_verify(cnn_export: Path) -> None:
    artifacts = cnn_export / "artifacts"
    parity = json.loads((artifacts / "parity.json").read_text())
    assert parity["passed"] and set(parity["formats"]) == {"safetensors", "onnx", "torchscript", "pt2"}
    assert parity["tolerance"] == {"atol": 1e-5, "rtol": 1e-4, "rule": parity["tolerance"]["rule"]}
    for result in parity["formats"].values():
        assert result["passed"] and result["checks"]["test"]["argmax_agreement"] == 1.0
    verified = cli("verify", str(artifacts))
    assert verified.exit_code == 0, verified.stderr


def test_width_report_lists_the_conv_block_and_matches_the_onnx_graph(cnn_export: Path) -> None:
    artifacts = cnn_export / "artifacts"
    report = json.loads((artifacts / "width_report.json").read_text())
    conv, output = report["layers"]
    shapes = initializer_shapes(artifacts / "model.onnx")
    width = conv["final_width"]
    assert (conv["kind"], conv["kernel"], conv["stride"], conv["fan_in"]) == ("conv2d", 3, 1, 1)
    assert shapes["0.weight"] == conv["weight_shape"] == [width, 1, 3, 3]
    assert shapes["4.weight"] == output["weight_shape"] == [10, width * 14 * 14]
    assert conv["macs"] == width * 9 * 28 * 28 and output["macs"] == 10 * width * 196
    assert conv["params"] + output["params"] == report["totals"]["final"]["params"]
    assert report["checked_against"] == "model.onnx"
    assert "kernel/stride" in (artifacts / "width_report.md").read_text()


def test_onnx_runtime_takes_images_and_batches_of_images(cnn_export: Path) -> None:
    model = OnnxModel(cnn_export / "artifacts")
    frozen, _ = load_frozen(cnn_export / "artifacts")
    X = load_dataset("mnist5k").X_test[:5]
    with torch.no_grad():
        expected = frozen(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(model.predict(X).outputs, expected, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(model.predict(X[0]).outputs, expected[:1], atol=1e-5, rtol=1e-4)
    final_widths = json.loads((cnn_export / "metrics.json").read_text())["final_widths"]
    assert model.describe()["widths"]["hidden"] == final_widths
    with pytest.raises(InputError, match=r"inputs has shape \[3, 28, 28\]; expected one tensor of shape \[1, 28, 28\] "
                                         r"or a batch of shape \[batch, 1, 28, 28\] \(or rows of 784 values\)"):
        model.predict(np.zeros((3, 28, 28), dtype=np.float32))
    np.save(cnn_export / "images.npy", X)
    predicted = cli("predict", str(cnn_export / "artifacts"), "--input", str(cnn_export / "images.npy"))
    assert predicted.exit_code == 0, predicted.stderr
    assert len(predicted.stdout.strip().splitlines()) == 6  # header + 5 rows


@pytest.mark.parametrize(("args", "message"), [
    (["--dataset", "moons", "--arch", "cnn"],
     "error: X_train of 'moons' has shape (1000, 2) (flat features): a CNN needs signals (n, C, L) or images "
     "(n, C, H, W); reshape X or use --arch mlp"),
    (["--dataset", "digits", "--arch", "cnn", "--init-widths", "1,1"],
     "error: --init-widths lists 2 widths but the CNN has 2 conv blocks and 1 hidden linear layer(s): give 3"),
    (["--dataset", "digits", "--arch", "cnn", "--conv-kernels", "3,3", "--conv-strides", "1"],
     "error: --conv-kernels [3, 3], --conv-strides [1] and --conv-pools None must list one value per conv block"),
    (["--dataset", "digits", "--arch", "rnn"], "error: unknown --arch 'rnn': use one of mlp, cnn, resnet18, resnet10"),
    (["--dataset", "digits", "--conv-pools", "2,x"],
     "error: --conv-pools must be comma-separated non-negative integers like 1,1; got '2,x'"),
    (["--dataset", "digits", "--arch", "cnn", "--conv-pools", "4,4"],
     "error: layer 5 (avgpool): kernel 4 does not fit inputs of spatial size [2, 2]: use a smaller kernel, more "
     "padding or fewer pooling layers"),
])
def test_bad_cnn_options_are_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = cli("grow", "--out", str(tmp_path / "run"), *args)
    assert result.exit_code == 2 and result.stderr.strip() == message
    assert not (tmp_path / "run").exists()


def test_digits_as_images_grow_a_cnn_in_process(tmp_path: Path) -> None:
    cfg = GrowConfig(dataset="digits", arch="cnn", max_growth_epochs=0.5, final_epochs=0.5, max_params=1500,
                     device="cpu", seed=0)
    job = prepare_grow(cfg, tmp_path / "run")
    assert job.spec.input_shape == (1, 8, 8) and job.max_shift == 1 and job.cfg.ridge == 1e-3
    assert job.cfg.batch_size == 1149 // 50  # about 50 steps per epoch on a small dataset
    result = job.run()
    assert result.spec.has_convolutions and 57 < result.metrics["params"] <= 1500
    test = result.metrics["metrics"]["test"]  # one epoch in all: it has learned, well short of converging
    assert test["loss"] < 0.9 * math.log(10) and test["accuracy"] > 0.15  # chance: ln(10) and 0.1


# ----- serving the CNN: JSON tensors and image files ------------------------------------------------
def _png(pixels: np.ndarray, mode: str = "L", kind: str = "PNG") -> bytes:
    """A PNG (or ``kind``: JPEG) file of ``pixels`` (uint8 (H, W) or (H, W, 3))."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buffer, format=kind)
    return buffer.getvalue()


def test_jpeg_files_are_read_as_pillow_decodes_them(cnn_export: Path, cnn_client, digits_as_png, tmp_path) -> None:
    """JPEG is lossy: the answer is the model's on the decoded pixels, by upload and by ``predict``."""
    import io

    pixels, _ = digits_as_png
    jpeg = _png(pixels[2], kind="JPEG")
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)), dtype=np.float32)[None, None] / 255
    assert np.abs(decoded[0, 0] * 255 - pixels[2]).max() > 0  # lossy: not the PNG's pixels
    frozen, _ = load_frozen(cnn_export / "artifacts")
    with torch.no_grad():
        expected = frozen(torch.from_numpy(decoded)).numpy()
    uploaded = cnn_client.post("/v1/predict", files=[("image", ("digit.jpg", jpeg, "image/jpeg"))])
    assert uploaded.status_code == 200, uploaded.text
    np.testing.assert_allclose(uploaded.json()["outputs"], expected, atol=1e-4, rtol=1e-4)
    (tmp_path / "digit.jpg").write_bytes(jpeg)
    predicted = cli("predict", str(cnn_export / "artifacts"), "--input", str(tmp_path / "digit.jpg"), "--output",
                    str(tmp_path / "out.npy"))
    assert predicted.exit_code == 0, predicted.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def digits_as_png() -> tuple[np.ndarray, list[bytes]]:
    """Five mnist5k test digits as 8-bit grey pixels, and as PNG files."""
    pixels = np.round(load_dataset("mnist5k").X_test[:5, 0] * 255).astype(np.uint8)
    return pixels, [_png(p) for p in pixels]


@pytest.fixture(scope="module")
def cnn_client(cnn_export: Path):
    import httpx
    from serving_fixtures import running_server

    from tinydeploy.serving.server import create_app

    with running_server(create_app(cnn_export / "artifacts", "cpu", 8)) as base:
        with httpx.Client(base_url=base, timeout=30.0) as client:
            yield client


def _upload(client, files: list[tuple[str, bytes]], field: str = "image"):
    return client.post("/v1/predict", files=[(field, (name, data, "image/png")) for name, data in files])


def test_server_answers_png_uploads_and_json_tensors(cnn_export: Path, cnn_client, digits_as_png) -> None:
    pixels, pngs = digits_as_png
    frozen, _ = load_frozen(cnn_export / "artifacts")
    images = pixels[:, None].astype(np.float32) / 255  # the raw values the PNGs decode to (mnist5k: pixel / 255)
    with torch.no_grad():
        expected = frozen(torch.from_numpy(images)).numpy()
    uploaded = _upload(cnn_client, [(f"{i}.png", data) for i, data in enumerate(pngs)])
    assert uploaded.status_code == 200, uploaded.text
    np.testing.assert_allclose(uploaded.json()["outputs"], expected, atol=1e-4, rtol=1e-4)
    assert uploaded.json()["labels"] == [str(i) for i in expected.argmax(axis=1)]
    one = cnn_client.post("/v1/predict", json={"inputs": images[0].tolist()})  # [C, H, W]
    batch = cnn_client.post("/v1/predict", json={"inputs": images[:3].tolist()})  # [B, C, H, W]
    assert one.status_code == batch.status_code == 200
    np.testing.assert_allclose(one.json()["outputs"], expected[:1], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(batch.json()["outputs"], expected[:3], atol=1e-4, rtol=1e-4)
    meta = cnn_client.get("/v1/metadata").json()
    assert meta["image"] == {"mode": "L", "size": [28, 28], "max_value": 1.0} and meta["max_images"] == 8


def _bomb_header() -> bytes:
    """A 69-byte PNG that claims 100,000 x 100,000 grey pixels (a decompression bomb's header; never decoded)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_each_bad_image_input_gets_its_4xx(cnn_client, digits_as_png) -> None:
    pixels, pngs = digits_as_png
    cases = {
        "shape": (cnn_client.post("/v1/predict", json={"inputs": (pixels[0] / 255).tolist()}), 422),
        "image_mode": (_upload(cnn_client, [("colour.png", _png(np.stack([pixels[0]] * 3, -1), "RGB"))]), 422),
        "image_size": (_upload(cnn_client, [("big.png", _png(np.zeros((32, 32), np.uint8)))]), 422),
        "undecodable_image": (_upload(cnn_client, [("junk.png", b"\x89PNG not really")]), 422),
        "unknown_field": (_upload(cnn_client, [("a.png", pngs[0])], field="picture"), 422),
        "too_many_images": (_upload(cnn_client, [(f"{i}.png", pngs[0]) for i in range(9)]), 413),
        "image_too_large": (_upload(cnn_client, [("huge.png", pngs[0] + b"\0" * (1 << 18))]), 413),
        "upload_too_large": (cnn_client.post("/v1/predict", content=b"x" * (9 * ((1 << 18) + 1024) + 1),
                                             headers={"Content-Type": "multipart/form-data; boundary=b"}), 413),
    }
    for code, (answer, status) in cases.items():
        assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), answer.text
    bomb = _upload(cnn_client, [("bomb.png", _bomb_header())]).json()["error"]
    assert bomb["code"] == "image_size" and bomb["message"] == (
        f"image 0 ('bomb.png') is over {Image.MAX_IMAGE_PIXELS:,} pixels (not decoded) but the model takes 28x28: "
        "resize it")
    mode = cases["image_mode"][0].json()["error"]["message"]
    assert mode == "image 0 ('colour.png') has mode RGB but the model takes grey (L) images: convert it to grey"


def test_predict_reads_an_image_or_a_folder_of_images(cnn_export: Path, tmp_path: Path, digits_as_png) -> None:
    _, pngs = digits_as_png
    folder = tmp_path / "digits"
    folder.mkdir()
    for i, data in enumerate(pngs):
        (folder / f"digit-{i}.png").write_bytes(data)
    whole = cli("predict", str(cnn_export / "artifacts"), "--input", str(folder))
    single = cli("predict", str(cnn_export / "artifacts"), "--input", str(folder / "digit-3.png"))
    assert whole.exit_code == single.exit_code == 0, whole.stderr
    rows = whole.stdout.strip().splitlines()
    assert rows[0].startswith("input,label,p_0") and [r.split(",")[0] for r in rows[1:]] == [
        f"digit-{i}.png" for i in range(5)]
    assert single.stdout.strip().splitlines()[1] == rows[4]
    (folder / "digit-9.png").write_bytes(b"not an image")
    refused = cli("predict", str(cnn_export / "artifacts"), "--input", str(folder))
    assert refused.exit_code == 2 and refused.stderr.strip() == (
        f"error: {folder / 'digit-9.png'} cannot be decoded as an image (not a format Pillow recognises): use a PNG "
        "or JPEG file")


def test_a_server_without_pillow_refuses_uploads_and_serves_tensors(cnn_export: Path, digits_as_png) -> None:
    """An edge install may lack Pillow: uploads get a 415 saying so, JSON tensors are still answered."""
    import subprocess
    import sys

    pixels, pngs = digits_as_png
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'PIL':
            raise ImportError(name + ' is blocked')
sys.meta_path.insert(0, Block())
import httpx
from serving_fixtures import running_server
from tinydeploy.serving.server import create_app
with running_server(create_app({str(cnn_export / 'artifacts')!r}, 'cpu', 8)) as base:
    upload = httpx.post(base + '/v1/predict', files=[('image', ('a.png', {pngs[0]!r}, 'image/png'))])
    tensor = httpx.post(base + '/v1/predict', json={{'inputs': {(pixels[:1, None] / 255).tolist()!r}}})
print(upload.status_code, upload.json()['error']['message'])
print(tensor.status_code)
"""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": f"{repo}:{repo / 'tests'}", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ['415 image uploads need Pillow, which this server lacks (pip install pillow): '
                                        'send application/json {"inputs": [...]}', "200"]
    assert "Pillow is not installed: image uploads are refused (415)" in done.stderr
