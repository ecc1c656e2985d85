"""The export's checks seen from outside, each against an artifact broken on purpose: ``verify`` (library and
CLI) must fail when an artifact drifts past the tolerance the export recorded, when an embedded spec or
arch.json disagrees with the weights; a model file swapped while it loads is never served; a model whose
outputs overflow gets a clear 4xx from the HTTP server, not a 500.

Every tampered file gets its manifest entry rewritten (sha256 and size), so that the hash check passes
and the check under test is the one that has to catch it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from serving_fixtures import copy_export, export_dir, exported, running_server, trained_run  # noqa: F401
from typer.testing import CliRunner

from cli import export as _export_commands  # noqa: F401  (registers export, verify, report)
from cli.app import EXIT_CHECK_FAILED, app
from tinydeploy.data import load_dataset
from tinydeploy.errors import TinyDeployError
from tinydeploy.export.parity import ParityError
from tinydeploy.export.pipeline import export_run
from tinydeploy.export.verify import verify_export
from tinydeploy.serving.runtime import OnnxModel
from tinydeploy.serving.server import create_app


def _rehash(directory: Path, name: str) -> None:
    """Rewrite ``name``'s manifest entry so that the manifest agrees with the file as it is now."""
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    data = (directory / name).read_bytes()
    manifest["files"][name] = {**manifest["files"][name], "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest_path.write_text(json.dumps(manifest))


def _shifted_onnx(path: Path, delta: float) -> bytes:
    """model.onnx with ``delta`` added to the output layer's bias: every output moves by ``delta``."""
    model = onnx.load(str(path))
    biases = [t for t in model.graph.initializer if t.name.endswith(".bias") and t.name.split(".")[0].isdigit()]
    last = max(biases, key=lambda t: int(t.name.split(".")[0]))
    last.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(last) + np.float32(delta), last.name))
    return model.SerializeToString()


def _drifted_copy(export_dir: Path, dest: Path, delta: float) -> Path:
    copy = copy_export(export_dir, dest)
    (copy / "model.onnx").write_bytes(_shifted_onnx(copy / "model.onnx", delta))
    _rehash(copy, "model.onnx")
    return copy


def test_verify_fails_when_an_artifact_drifts_past_the_recorded_tolerance(export_dir: Path, tmp_path: Path) -> None:
    copy = _drifted_copy(export_dir, tmp_path / "export", 1e-3)
    with pytest.raises(ParityError, match=r"^parity check failed for onnx \(max abs diff 0\.001 .*exceeds atol 1e-05") as info:
        verify_export(copy)
    assert [r.format for r in info.value.results if not r.passed] == ["onnx"]
    assert "safetensors" in [r.format for r in info.value.results]
    result = CliRunner().invoke(app, ["verify", str(copy)])
    assert result.exit_code == EXIT_CHECK_FAILED and result.stderr.startswith("error: parity check failed for onnx")
    looser = verify_export(copy, atol=1e-2, rtol=1e-3)  # a tolerance given explicitly is applied and reported
    assert (looser.atol, looser.rtol) == (1e-2, 1e-3) and all(r.passed for r in looser.parity)
    assert looser.directory == copy


def test_verify_defaults_to_the_tolerance_the_export_recorded(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    export_run(trained_run, out, formats=("onnx",), atol=1e-2)
    assert json.loads((out / "parity.json").read_text())["tolerance"]["atol"] == 1e-2
    (out / "model.onnx").write_bytes(_shifted_onnx(out / "model.onnx", 1e-3))
    _rehash(out, "model.onnx")
    result = verify_export(out)
    assert result.atol == 1e-2 and result.rtol == 1e-4 and all(r.passed for r in result.parity)
    with pytest.raises(ParityError, match="parity check failed for onnx"):
        verify_export(out, atol=1e-5)


def test_verify_passes_an_export_without_preprocessing(trained_run: Path, tmp_path: Path) -> None:
    """--no-preprocessing artifacts expect standardised features: verify must rebuild the frozen model the same way."""
    out = tmp_path / "export"
    export_run(trained_run, out, formats=("onnx",), preprocessing=False)
    assert json.loads((out / "parity.json").read_text())["inputs"]["space"] == "standardized features"
    assert all(r.passed for r in verify_export(out).parity)


def test_verify_refuses_an_artifact_whose_embedded_spec_differs(export_dir: Path, tmp_path: Path) -> None:
    copy = copy_export(export_dir, tmp_path / "export")
    model = onnx.load(str(copy / "model.onnx"))
    prop = next(p for p in model.metadata_props if p.key == "tinydeploy.spec")
    spec = json.loads(prop.value)
    spec["classes"][0] = "zero"
    prop.value = json.dumps(spec)
    onnx.save(model, str(copy / "model.onnx"))
    _rehash(copy, "model.onnx")
    with pytest.raises(ParityError, match=r"onnx \(its embedded spec differs from model\.safetensors\)") as info:
        verify_export(copy)
    assert [r.format for r in info.value.results if not r.passed] == ["onnx"]


def test_verify_names_a_missing_parity_record(export_dir: Path, tmp_path: Path) -> None:
    copy = copy_export(export_dir, tmp_path / "export")
    (copy / "parity.json").unlink()
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["files"]["parity.json"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TinyDeployError, match=rf"^{re.escape(str(copy))} has no parity\.json\b.*: re-run 'tinydeploy export'$"):
        verify_export(copy)


def test_verify_refuses_an_arch_json_that_disagrees_with_the_weights(export_dir: Path, tmp_path: Path) -> None:
    copy = copy_export(export_dir, tmp_path / "export")
    arch = json.loads((copy / "arch.json").read_text())
    arch["classes"][0] = "zero"
    (copy / "arch.json").write_text(json.dumps(arch))
    _rehash(copy, "arch.json")
    with pytest.raises(TinyDeployError, match=r"arch\.json disagrees with the spec stored in .*model\.safetensors"):
        verify_export(copy)


def test_a_model_file_swapped_while_it_loads_is_never_served(export_dir: Path, tmp_path: Path) -> None:
    """Another process replaces model.onnx (atomically, back and forth) while the server's runtime opens it:
    every open either refuses the directory or runs exactly the bytes the manifest lists."""
    copy = copy_export(export_dir, tmp_path / "export")
    listed = json.loads((copy / "manifest.json").read_text())["files"]["model.onnx"]["sha256"]
    versions = [(copy / "model.onnx").read_bytes(), _shifted_onnx(copy / "model.onnx", 1.0)]
    stop = threading.Event()

    def swap() -> None:
        i = 0
        while not stop.is_set():
            staged = copy / f".swap-{i % 2}"
            staged.write_bytes(versions[i % 2])
            os.replace(staged, copy / "model.onnx")
            i += 1
            time.sleep(0.0002)

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    served, refused = [], 0
    try:
        while len(served) < 20 and refused < 400:  # a load that skipped the check would run the wrong bytes
            try:
                served.append(OnnxModel(copy, "cpu").sha256)
            except TinyDeployError:
                refused += 1
    finally:
        stop.set()
        swapper.join()
    assert refused > 0 and served  # both outcomes happened: the race was exercised
    assert served.count(listed) == len(served)


def test_non_finite_model_outputs_get_a_clear_422_and_the_server_keeps_serving(export_dir: Path) -> None:
    x_test = load_dataset("digits").X_test
    rows = np.stack([x_test[0], np.full(64, 3e38, dtype=np.float32)])  # finite inputs, the second overflows inside
    outputs = OnnxModel(export_dir, "cpu").predict(rows).outputs
    assert np.isfinite(outputs[0]).all() and not np.isfinite(outputs[1]).all()
    with running_server(create_app(export_dir, "cpu", 8)) as url, httpx.Client(base_url=url, timeout=10.0) as client:
        answer = client.post("/v1/predict", json={"inputs": rows.tolist()})
        assert answer.status_code == 422, answer.text[:300]
        error = answer.json()["error"]
        assert error["status"] == 422 and "non-finite" in error["message"] and "[1]" in error["message"]
        assert client.post("/v1/predict", json={"inputs": rows[:1].tolist()}).status_code == 200


def test_parity_and_manifest_records_state_the_rule_and_the_versions(export_dir: Path) -> None:
    parity = json.loads((export_dir / "parity.json").read_text())
    assert parity["reference"] == "frozen model (torch, CPU, float32)"
    assert parity["tolerance"] == {"atol": 1e-5, "rtol": 1e-4, "rule": "|artifact - frozen| <= atol + rtol * |frozen|, elementwise"}
    versions = json.loads((export_dir / "manifest.json").read_text())["versions"]
    assert versions["python"] == platform.python_version() and versions["onnxruntime"] == ort.__version__
    assert versions["onnx"] == onnx.__version__ and versions["numpy"] == np.__version__
