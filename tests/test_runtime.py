"""tinydeploy.serving.runtime on a real export directory: outputs, input validation, integrity, providers, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from serving_fixtures import copy_export, export_dir, exported, trained_run  # noqa: F401

from tinydeploy.data import load_dataset
from tinydeploy.errors import TinyDeployError
from tinydeploy.serving.manifest import IntegrityError
from tinydeploy.serving.providers import cuda_usable
from tinydeploy.serving.runtime import InputError, OnnxModel, softmax

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(export_dir: Path) -> OnnxModel:
    return OnnxModel(export_dir, "cpu")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_describes_the_exported_model(model: OnnxModel, export_dir: Path) -> None:
    arch = json.loads((export_dir / "arch.json").read_text())
    manifest = json.loads((export_dir / "manifest.json").read_text())
    assert model.input_name == "input" and model.output_name == "output"
    assert model.input_shape == tuple(arch["input_shape"]) == (64,)
    assert model.n_outputs == 10 and model.task == "classification"
    assert model.classes == arch["classes"]
    assert model.spec == arch
    assert model.hidden_widths == [layer["out_features"] for layer in arch["layers"] if layer.get("growable")]
    assert model.sha256 == manifest["files"]["model.onnx"]["sha256"]
    assert model.providers == ["CPUExecutionProvider"]
    assert model.manifest is not None and model.input_space == "raw"


def test_outputs_match_a_plain_session_and_the_recorded_accuracy(model: OnnxModel, export_dir: Path, digits) -> None:
    session = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(["output"], {"input": digits.X_test})[0]
    prediction = model.predict(digits.X_test)
    np.testing.assert_array_equal(prediction.outputs, expected)
    assert prediction.labels == [model.classes[i] for i in expected.argmax(1)]
    np.testing.assert_allclose(prediction.probabilities, softmax(expected), rtol=1e-6)
    np.testing.assert_allclose(prediction.probabilities.sum(axis=1), 1.0, atol=1e-5)
    parity = json.loads((export_dir / "parity.json").read_text())
    accuracy = float(np.mean(prediction.indices == digits.y_test))
    assert accuracy == pytest.approx(parity["formats"]["onnx"]["metric"]["artifact"])
    assert accuracy > 0.85


def test_one_row_and_batch_agree(model: OnnxModel, digits) -> None:
    batch = model.predict(digits.X_test[:5])
    for i in range(5):
        row = digits.X_test[i]
        for form in (row, row.tolist(), row.astype(np.float64), row.reshape(1, 64)):
            single = model.predict(form)
            assert len(single) == 1
            np.testing.assert_allclose(single.outputs[0], batch.outputs[i], rtol=1e-5, atol=1e-5)
            assert single.labels == [batch.labels[i]]
    ints = model.predict(digits.X_test[:3].astype(np.int64))  # digits pixels are whole numbers
    np.testing.assert_allclose(ints.outputs, batch.outputs[:3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("inputs", "code", "words"),
    [
        ([], "empty", "empty"),
        (np.zeros((0, 64), dtype=np.float32), "empty", "empty"),
        ([1.0, 2.0], "shape", "shape [2]"),
        ([[1.0] * 63], "shape", "[1, 63]"),
        (np.zeros((2, 8, 8), dtype=np.float32), "shape", "[2, 8, 8]"),
        ([[1.0] * 64, [1.0] * 63], "shape", "ragged"),
        (3.0, "shape", "single number"),
        ("1,2,3", "dtype", "string"),
        ({"x": 1}, "features", "no feature names"),
        ([None] * 64, "dtype", "nulls"),
        ([True] * 64, "dtype", "booleans"),
        ([0.0] * 63 + ["a"], "dtype", "strings"),
        (np.array(["a"] * 64), "dtype", "dtype <U1"),
        ([float("nan")] + [0.0] * 63, "non_finite", "NaN"),
        (np.full((3, 64), np.inf), "non_finite", "rows 0, 1, 2"),
        ([1e39] * 64, "non_finite", "float32 range"),
        ([10**400] * 64, "non_finite", "too large"),
    ],
)
def test_bad_inputs_raise_input_error(model: OnnxModel, inputs, code: str, words: str) -> None:
    with pytest.raises(InputError) as info:
        model.predict(inputs)
    assert info.value.code == code
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_max_batch_is_enforced(model: OnnxModel, digits) -> None:
    with pytest.raises(InputError, match="exceeds the limit of 4") as info:
        model.predict(digits.X_test[:5], max_batch=4)
    assert info.value.code == "too_large"
    assert len(model.predict(digits.X_test[:4], max_batch=4)) == 4


def test_tampered_artifacts_are_refused_and_named(export_dir: Path, tmp_path: Path) -> None:
    for name in ("model.onnx", "arch.json"):
        copy = copy_export(export_dir, tmp_path / name)
        target = copy / name
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
        with pytest.raises(IntegrityError) as info:
            OnnxModel(copy, "cpu")
        assert name in str(info.value) and "sha256" in str(info.value)
    missing = copy_export(export_dir, tmp_path / "missing")
    (missing / "model.safetensors").unlink()
    with pytest.raises(IntegrityError, match="model.safetensors is missing"):
        OnnxModel(missing, "cpu")


def test_a_bare_onnx_file_needs_its_manifest_or_no_verify(export_dir: Path, tmp_path: Path, digits) -> None:
    bare = tmp_path / "elsewhere" / "model.onnx"
    bare.parent.mkdir()
    bare.write_bytes((export_dir / "model.onnx").read_bytes())
    with pytest.raises(IntegrityError, match=r"has no manifest.json: .* \(or pass --no-verify"):
        OnnxModel(bare, "cpu")
    model = OnnxModel(bare, "cpu", verify=False)
    assert model.manifest is None and model.classes == [str(i) for i in range(10)]
    assert model.spec is not None and model.spec["input_shape"] == [64]
    assert len(model.predict(digits.X_test[:3])) == 3
    assert len(OnnxModel(export_dir / "model.onnx", "cpu").predict(digits.X_test[:3])) == 3  # listed: verified


def test_missing_and_foreign_paths_give_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(TinyDeployError, match="does not exist"):
        OnnxModel(tmp_path / "nope", "cpu")
    with pytest.raises(TinyDeployError, match="holds no model.onnx"):
        OnnxModel(tmp_path, "cpu")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(TinyDeployError, match="onnxruntime cannot load"):
        OnnxModel(junk, "cpu", verify=False)


def test_provider_choice(export_dir: Path) -> None:
    with pytest.raises(TinyDeployError, match="unknown provider 'gpu'"):
        OnnxModel(export_dir, "gpu")
    auto = OnnxModel(export_dir, "auto")
    assert auto.providers[-1] == "CPUExecutionProvider"
    if cuda_usable():
        assert OnnxModel(export_dir, "cuda").providers[0] == "CUDAExecutionProvider"
    else:
        assert auto.providers == ["CPUExecutionProvider"]
        with pytest.raises(TinyDeployError) as info:
            OnnxModel(export_dir, "cuda")
        assert "provider 'cuda' requested" in str(info.value) and "\n" not in str(info.value)


_NO_TORCH = r"""
import importlib.abc, sys
class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, BlockTorch())
"""


def test_runtime_and_server_do_not_import_torch(export_dir: Path) -> None:
    """In a fresh interpreter where importing torch fails, the serving stack still loads and predicts."""
    script = _NO_TORCH + f"""
import json, numpy as np
from tinydeploy.serving.runtime import OnnxModel, read_inputs
from tinydeploy.serving.server import create_app
import tinydeploy.serving.edge, tinydeploy.export.triton
import cli.serve
model = OnnxModel({str(export_dir)!r}, "auto")
prediction = model.predict(np.zeros((3, 64), dtype=np.float32))
app = create_app({str(export_dir)!r}, "cpu", 16)
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print(json.dumps({{"rows": len(prediction), "labels": prediction.labels, "torch": loaded}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rows"] == 3 and len(result["labels"]) == 3
    assert result["torch"] == []
