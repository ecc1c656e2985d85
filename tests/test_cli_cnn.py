"""A CNN end to end through the real CLI (the Typer app in-process, real files): grow on mnist5k, export
every format, parity, verify, the width report against the ONNX graph, torch-free inference on image
tensors, and bad CNN options."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

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
             "--grow-every", "0.3", "--final-epochs", "0.3", "--seed", "1"]


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
    with pytest.raises(InputError, match=r"inputs has shape \[3, 28, 28\]; expected one row of 784 values"):
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
    assert result.metrics["metrics"]["test"]["accuracy"] > 0.3
