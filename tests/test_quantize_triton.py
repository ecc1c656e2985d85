"""int8 quantization gate on a real digits model, and the Triton repository writer."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from serving_fixtures import copy_export, export_dir, exported, trained_run  # noqa: F401

from tinydeploy.data import load_dataset
from tinydeploy.errors import TinyDeployError
from tinydeploy.serving.manifest import verify_manifest, write_manifest
from tinydeploy.export.quantize import INT8_FILE, QuantizationError, gemm_to_matmul, quantize_int8
from tinydeploy.serving.runtime import OnnxModel
from tinydeploy.export.triton import write_triton_repo


# ----- int8 ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quantized(export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    copy = copy_export(export_dir, tmp_path_factory.mktemp("int8") / "export")
    result = quantize_int8(copy, latency_iters=20)
    return copy, result.report


def test_int8_accuracy_within_one_point_of_fp32(quantized) -> None:
    directory, report = quantized
    digits = load_dataset("digits")
    fp32 = OnnxModel(directory, "cpu")
    int8 = OnnxModel(directory, "cpu", model_file=INT8_FILE)
    acc_fp32 = float(np.mean(fp32.predict(digits.X_test).indices == digits.y_test))
    acc_int8 = float(np.mean(int8.predict(digits.X_test).indices == digits.y_test))
    assert abs(acc_fp32 - acc_int8) <= 0.01
    assert report["passed"] and report["gate"]["fp32"] == pytest.approx(acc_fp32)
    assert report["gate"]["int8"] == pytest.approx(acc_int8)
    assert report["gate"]["drop_pp"] <= report["gate"]["tolerance_pp"] == 1.0
    # a real int8 graph: integer matmuls, and the tinydeploy metadata carried over
    graph = onnx.load(str(directory / INT8_FILE))
    assert "MatMulInteger" in {node.op_type for node in graph.graph.node}
    assert int8.classes == fp32.classes and int8.spec == fp32.spec
    assert report["size"]["int8_bytes"] == (directory / INT8_FILE).stat().st_size
    assert {"fp32", "int8", "ratio"} <= set(report["latency_p50_ms"]["batch_1"])


def test_int8_results_are_recorded_and_the_manifest_stays_valid(quantized) -> None:
    directory, report = quantized
    parity = json.loads((directory / "parity.json").read_text())
    assert parity["int8"] == json.loads(json.dumps(report))
    assert parity["passed"] is True and "formats" in parity  # the exporter's document is untouched otherwise
    manifest = verify_manifest(directory)
    assert INT8_FILE in manifest["files"] and manifest["amendments"][-1]["files"] == [INT8_FILE, "parity.json"]
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]


def test_failed_gate_writes_nothing(export_dir: Path, tmp_path: Path) -> None:
    """A real degraded quantization: an outlier weight on a feature that is always 0 in digits (pixel 0)
    leaves fp32 unchanged but stretches the int8 weight scale until the other weights round to 0."""
    directory = copy_export(export_dir, tmp_path / "export")
    model = onnx.load(str(directory / "model.onnx"))
    first = next(node for node in model.graph.node if node.op_type == "Gemm")
    weight = next(t for t in model.graph.initializer if t.name == first.input[1])
    array = numpy_helper.to_array(weight).copy()
    array[:, 0] = 1e4
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    onnx.save(model, str(directory / "model.onnx"))
    manifest = json.loads((directory / "manifest.json").read_text())
    write_manifest(directory, manifest["command"], manifest["source_run"])
    parity_before = (directory / "parity.json").read_bytes()
    manifest_before = (directory / "manifest.json").read_bytes()
    with pytest.raises(QuantizationError, match="int8 gate failed") as info:
        quantize_int8(directory, latency_iters=5)
    assert info.value.result["gate"]["drop_pp"] > 1.0
    assert not (directory / INT8_FILE).exists()
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]
    assert (directory / "parity.json").read_bytes() == parity_before
    assert (directory / "manifest.json").read_bytes() == manifest_before


def test_quantize_refuses_a_tampered_export(export_dir: Path, tmp_path: Path) -> None:
    directory = copy_export(export_dir, tmp_path / "export")
    (directory / "arch.json").write_text((directory / "arch.json").read_text() + " ")
    with pytest.raises(TinyDeployError, match="arch.json changed"):
        quantize_int8(directory)
    with pytest.raises(TinyDeployError, match="unknown quantization method"):
        quantize_int8(export_dir, method="fp8")


def test_gemm_rewrite_is_exact(export_dir: Path) -> None:
    import onnxruntime as ort

    model = onnx.load(str(export_dir / "model.onnx"))
    n_gemm = sum(node.op_type == "Gemm" for node in model.graph.node)
    assert gemm_to_matmul(model) == n_gemm > 0
    assert "Gemm" not in {node.op_type for node in model.graph.node}
    onnx.checker.check_model(model)
    x = load_dataset("digits").X_test
    a = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    b = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ----- Triton --------------------------------------------------------------------------------------
_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([^\s{}\[\]:,"#]+))')


def parse_pbtxt(text: str) -> dict[str, Any]:
    """A parser for the protobuf text-format subset of Triton configs.

    Fields are ``name: scalar``, ``name: [scalars]``, ``name { message }`` / ``name: { message }`` and
    ``name [ {message}, ... ]``. Every field maps to a list of values (repeated fields accumulate).
    Scalars: quoted strings, integers, floats, and bare enum identifiers (kept as str).
    """
    tokens = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            if text[pos:].strip() == "":
                break
            raise ValueError(f"bad pbtxt at {pos}: {text[pos:pos + 20]!r}")
        pos = match.end()
        if match.group(1):
            continue
        tokens.append(match.group(2) or match.group(3) or match.group(4))
    tokens = [t for t in tokens if t is not None]

    def scalar(token: str) -> Any:
        if token.startswith('"'):
            return json.loads(token)
        for kind in (int, float):
            try:
                return kind(token)
            except ValueError:
                pass
        return token

    def message(i: int, closing: str | None) -> tuple[dict[str, Any], int]:
        fields: dict[str, list[Any]] = {}
        while i < len(tokens) and tokens[i] != closing:
            name = tokens[i]
            i += 1
            if tokens[i] == ":":
                i += 1
            if tokens[i] == "{":
                value, i = message(i + 1, "}")
                fields.setdefault(name, []).append(value)
                i += 1
            elif tokens[i] == "[":
                i += 1
                while tokens[i] != "]":
                    if tokens[i] == "{":
                        value, i = message(i + 1, "}")
                        i += 1
                    else:
                        value, i = scalar(tokens[i]), i + 1
                    fields.setdefault(name, []).append(value)
                    if tokens[i] == ",":
                        i += 1
                i += 1
            else:
                fields.setdefault(name, []).append(scalar(tokens[i]))
                i += 1
            if i < len(tokens) and tokens[i] in (",", ";"):
                i += 1
        return fields, i

    parsed, end = message(0, None)
    assert end == len(tokens)
    return parsed


def test_pbtxt_parser_handles_the_subset() -> None:
    parsed = parse_pbtxt('name: "m" # comment\nmax_batch_size: 8\ninput [ { name: "a" dims: [ 1, 2 ] data_type: TYPE_FP32 } ]\n'
                         "dynamic_batching { }\nversion_policy: { latest: { num_versions: 1 } }\n")
    assert parsed["name"] == ["m"] and parsed["max_batch_size"] == [8]
    assert parsed["input"] == [{"name": ["a"], "dims": [1, 2], "data_type": ["TYPE_FP32"]}]
    assert parsed["dynamic_batching"] == [{}]
    assert parsed["version_policy"] == [{"latest": [{"num_versions": [1]}]}]


def _onnx_tensors(model: onnx.ModelProto, values) -> list[dict[str, Any]]:
    out = []
    for v in values:
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
        out.append({"name": v.name, "elem_type": v.type.tensor_type.elem_type, "dims": dims})
    return out


def test_triton_repository_matches_the_onnx_model(export_dir: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    entry = write_triton_repo(export_dir, repo, "digits_mlp", 128)
    assert entry == repo / "digits_mlp"
    config = parse_pbtxt((entry / "config.pbtxt").read_text())
    model = onnx.load(str(entry / "1" / "model.onnx"))
    source = (export_dir / "model.onnx").read_bytes()
    assert hashlib.sha256((entry / "1" / "model.onnx").read_bytes()).digest() == hashlib.sha256(source).digest()
    assert config["name"] == ["digits_mlp"] and config["platform"] == ["onnxruntime_onnx"]
    assert config["max_batch_size"] == [128]
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        tensors = _onnx_tensors(model, values)
        assert len(config[kind]) == len(tensors)
        for block, tensor in zip(config[kind], tensors):
            assert block["name"] == [tensor["name"]]
            assert tensor["elem_type"] == onnx.TensorProto.FLOAT and block["data_type"] == ["TYPE_FP32"]
            assert tensor["dims"][0] == -1  # the dynamic batch dimension Triton batches over
            assert block["dims"] == tensor["dims"][1:]
    assert config["input"][0]["dims"] == [64] and config["output"][0]["dims"] == [10]
    labels = (entry / config["output"][0]["label_filename"][0]).read_text().splitlines()
    assert labels == OnnxModel(export_dir, "cpu").classes
    # rewriting replaces the entry in place and leaves no staging directories behind
    again = write_triton_repo(export_dir, repo, "digits_mlp", 0)
    assert parse_pbtxt((again / "config.pbtxt").read_text())["max_batch_size"] == [0]
    assert parse_pbtxt((again / "config.pbtxt").read_text())["input"][0]["dims"] == [-1, 64]
    assert sorted(p.name for p in repo.iterdir()) == ["digits_mlp"]


def test_triton_rejects_bad_names(export_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TinyDeployError, match="may only contain"):
        write_triton_repo(export_dir, tmp_path, "bad name/..", 8)
    assert write_triton_repo(export_dir, tmp_path / "r").name == "tinydeploy_digits"
