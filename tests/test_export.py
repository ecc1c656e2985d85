"""Freeze, export, parity gate, width report: real files, real runtimes, no mocks."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from export_fixtures import REPO, exported, trained_run  # noqa: F401  (fixtures)
from safetensors import safe_open
from safetensors.torch import load_file

import tinydeploy.export.formats
from tinydeploy.data import apply_standardizer, load_dataset
from tinydeploy.errors import TinyDeployError
from tinydeploy.export.pipeline import ExportResult, export_run
from tinydeploy.model.freeze import STANDARDIZE, freeze, load_frozen
from tinydeploy.serving.manifest import MANIFEST_FILE, read_manifest, verify_manifest
from tinydeploy.export.onnx_format import initializer_shapes
from tinydeploy.export.ort_support import max_ir_version, max_opset
from tinydeploy.export.parity import ParityError
from tinydeploy.serving.providers import choose_providers, cuda_usable
from tinydeploy.export.width_report import check_widths
from tinydeploy.training.rundir import read_run
from tinydeploy.model.build import build_model
from tinydeploy.model.spec import ArchSpec


@pytest.fixture(scope="module")
def test_split(trained_run: Path) -> tuple[np.ndarray, np.ndarray]:
    data = load_dataset(**json.loads((trained_run / "metrics.json").read_text())["data_source"])
    return data.X_test, data.y_test


@pytest.fixture(scope="module")
def frozen_outputs(exported: ExportResult, test_split: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    frozen, _ = load_frozen(exported.out_dir)
    with torch.no_grad():
        return frozen(torch.from_numpy(test_split[0])).numpy()


# ----- freeze ----------------------------------------------------------------------------------------
def test_frozen_on_raw_inputs_equals_trained_on_standardised_inputs(trained_run: Path, test_split) -> None:
    run = read_run(trained_run)
    X = test_split[0]
    with torch.no_grad():
        trained = run.model(torch.from_numpy(apply_standardizer(X, run.spec.preprocessing))).numpy()
        frozen = freeze(run.model, run.spec)(torch.from_numpy(X)).numpy()
    assert np.abs(frozen - trained).max() == 0.0  # bit-identical: same float32 ops in the same order


def test_freeze_without_preprocessing_is_the_plain_model(trained_run: Path) -> None:
    run = read_run(trained_run)
    frozen = freeze(run.model, run.spec, preprocessing=False)
    assert STANDARDIZE not in dict(frozen.named_children())
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert set(frozen.state_dict()) == set(run.model.state_dict())


# ----- round trip of every format against the frozen model -------------------------------------------
def test_export_writes_every_file(exported: ExportResult) -> None:
    names = sorted(p.name for p in exported.out_dir.iterdir())
    assert names == sorted([
        "arch.json", "manifest.json", "model.onnx", "model.pt2", "model.safetensors", "model.ts",
        "parity.json", "width_report.json", "width_report.md", "width_report.png",
    ])
    assert set(read_manifest(exported.out_dir)["files"]) == set(names) - {MANIFEST_FILE}
    verify_manifest(exported.out_dir)
    parity = json.loads((exported.out_dir / "parity.json").read_text())
    assert parity["passed"] and set(parity["formats"]) == {"safetensors", "onnx", "torchscript", "pt2"}
    for result in parity["formats"].values():
        assert set(result["checks"]) == {"test", "random_1", "random_7", "random_360"}
        assert result["max_abs_diff"] <= 1e-5
        assert result["metric"]["artifact"] == result["metric"]["frozen"]


def test_onnx_round_trip(exported: ExportResult, test_split, frozen_outputs: np.ndarray) -> None:
    path = exported.out_dir / "model.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["output"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [64]
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in model.graph.initializer)
    assert not list(exported.out_dir.glob("*.data"))
    props = {p.key: p.value for p in model.metadata_props}
    spec = ArchSpec.from_json(props["tinydeploy.spec"])
    assert json.loads(props["tinydeploy.classes"]) == list(spec.classes) and props["tinydeploy.task"] == "classification"
    session = ort.InferenceSession(str(path), providers=choose_providers("cpu"))
    X, y = test_split
    out = session.run(["output"], {"input": X})[0]
    assert out.dtype == np.float32 and out.shape == (len(X), 10)
    assert np.abs(out - frozen_outputs).max() <= 1e-5
    assert np.mean(out.argmax(1) == y) == np.mean(frozen_outputs.argmax(1) == y)
    assert session.run(["output"], {"input": X[:1]})[0].shape == (1, 10)


def test_torchscript_round_trip(exported: ExportResult, test_split, frozen_outputs: np.ndarray) -> None:
    extra = {"tinydeploy.spec": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(exported.out_dir / "model.ts"), _extra_files=extra)
    assert ArchSpec.from_json(extra["tinydeploy.spec"]).hidden_widths == [12, 6]
    with torch.no_grad():
        out = module(torch.from_numpy(test_split[0])).numpy()
        assert module(torch.from_numpy(test_split[0][:7])).shape == (7, 10)
    assert np.abs(out - frozen_outputs).max() == 0.0


def test_pt2_round_trip(exported: ExportResult, test_split, frozen_outputs: np.ndarray) -> None:
    extra = {"tinydeploy.spec": ""}
    program = torch.export.load(str(exported.out_dir / "model.pt2"), extra_files=extra)
    assert ArchSpec.from_json(extra["tinydeploy.spec"]).hidden_widths == [12, 6]
    with torch.no_grad():
        out = program.module()(torch.from_numpy(test_split[0])).numpy()
        assert program.module()(torch.from_numpy(test_split[0][:1])).shape == (1, 10)
    assert np.abs(out - frozen_outputs).max() == 0.0


def test_safetensors_round_trip(exported: ExportResult, test_split, frozen_outputs: np.ndarray) -> None:
    path = exported.out_dir / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    spec = ArchSpec.from_json(metadata["tinydeploy.spec"])
    assert metadata["tinydeploy.spec_sha256"] == spec.sha256()
    assert json.loads(metadata["tinydeploy.classes"]) == list(spec.classes)
    assert json.loads(metadata["tinydeploy.preprocessing"]) == spec.preprocessing
    assert metadata["tinydeploy.inputs"] == "raw" and metadata["tinydeploy.version"]
    model = build_model(spec)
    model.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        out = freeze(model, spec)(torch.from_numpy(test_split[0])).numpy()
    assert np.abs(out - frozen_outputs).max() == 0.0


# ----- onnxruntime compatibility and providers ---------------------------------------------------------
def test_onnx_versions_are_loadable_by_the_installed_onnxruntime(exported: ExportResult) -> None:
    model = onnx.load(str(exported.out_dir / "model.onnx"))
    opset = {o.domain: o.version for o in model.opset_import}[""]
    assert model.ir_version <= max_ir_version() and opset <= max_opset()
    providers = choose_providers("auto")
    session = ort.InferenceSession(str(exported.out_dir / "model.onnx"), providers=providers)
    assert session.get_providers() == providers
    # the measured limits are real limits: one IR version more is refused by this onnxruntime
    if max_ir_version() < onnx.IR_VERSION:
        model.ir_version = max_ir_version() + 1
        with pytest.raises(Exception):
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_provider_choice() -> None:
    assert choose_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(TinyDeployError, match="unknown provider 'tpu': use one of auto, cpu, cuda"):
        choose_providers("tpu")
    if cuda_usable():
        assert choose_providers("auto")[0] == "CUDAExecutionProvider"
    else:
        assert choose_providers("auto") == ["CPUExecutionProvider"]
        with pytest.raises(TinyDeployError, match="provider 'cuda' requested but onnxruntime"):
            choose_providers("cuda")


def test_runtime_modules_do_not_import_torch() -> None:
    code = "import sys, tinydeploy.serving.providers, tinydeploy.serving.manifest; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ----- parity gate --------------------------------------------------------------------------------------
def test_perturbed_onnx_fails_the_gate_and_publishes_nothing(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_export = tinydeploy.export.formats.export_onnx_model

    def perturbed_export(*args, **kwargs) -> onnx.ModelProto:
        model = real_export(*args, **kwargs)
        weight = next(t for t in model.graph.initializer if t.name == "4.weight")
        values = onnx.numpy_helper.to_array(weight).copy()
        values[0, 0] += 1e-3
        weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
        return model

    monkeypatch.setattr(tinydeploy.export.formats, "export_onnx_model", perturbed_export)
    out = tmp_path / "out"
    with pytest.raises(ParityError, match=r"^parity check failed for onnx \(max abs diff .* exceeds atol 1e-05") as info:
        export_run(trained_run, out, formats=("onnx", "torchscript"))
    verdicts = {r.format: r.passed for r in info.value.results}
    assert verdicts == {"safetensors": True, "onnx": False, "torchscript": True}
    assert not out.exists()  # created for this export, left empty, removed


def test_failed_export_keeps_the_previous_export(trained_run: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    export_run(trained_run, out, formats=("torchscript",))
    before = read_manifest(out)["files"]
    monkeypatch.setattr(tinydeploy.export.formats, "save_torchscript", lambda frozen, path, metadata: path.write_bytes(b"junk"))
    with pytest.raises(ParityError, match=r"torchscript \(cannot load or run it .*; nothing was published$"):
        export_run(trained_run, out, formats=("torchscript", "pt2"), force=True)
    assert read_manifest(out)["files"] == before and not (out / "model.pt2").exists()
    verify_manifest(out)


def test_reexport_replaces_files_of_the_previous_export(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    export_run(trained_run, out, formats=("torchscript",))
    assert (out / "model.ts").is_file()
    with pytest.raises(TinyDeployError, match=r"already holds an export \(arch.json, model.safetensors, model.ts, "
                                              r"parity.json, width_report.json, width_report.md, \.\.\.\): pass --force"):
        export_run(trained_run, out, formats=("pt2",))
    assert (out / "model.ts").is_file()  # nothing deleted by the refused export
    export_run(trained_run, out, formats=("pt2",), force=True)
    assert not (out / "model.ts").exists() and "model.ts" not in read_manifest(out)["files"]
    assert "model.pt2" in read_manifest(out)["files"]
    verify_manifest(out)


# ----- width report -------------------------------------------------------------------------------------
def test_width_report_matches_the_frozen_model_and_the_onnx_graph(exported: ExportResult) -> None:
    report = json.loads((exported.out_dir / "width_report.json").read_text())
    frozen, _ = load_frozen(exported.out_dir)
    shapes = initializer_shapes(exported.out_dir / "model.onnx")
    assert report["checked_against"] == "model.onnx"
    assert report["totals"]["final"]["params"] == sum(p.numel() for p in frozen.parameters())
    for layer in report["layers"]:
        linear = frozen.get_submodule(layer["name"])
        assert layer["params"] == linear.weight.numel() + linear.bias.numel()
        assert shapes[f"{layer['name']}.weight"] == [layer["final_width"], layer["fan_in"]]
        assert layer["macs"] == linear.weight.numel()
    hidden0, hidden1, output = report["layers"]
    assert (hidden0["initial_width"], hidden0["final_width"], hidden0["neurons_added"]) == (1, 12, 11)
    assert hidden0["growth_steps"] == [1, 3] and hidden1["growth_steps"] == [2]
    assert (hidden0["bottleneck_psi"], hidden1["bottleneck_psi"], output["bottleneck_psi"]) == (0.125, 0.0625, None)
    assert report["totals"]["initial"]["params"] == (64 + 1) * 1 + (1 + 1) * 1 + (1 + 1) * 10
    assert report["totals"]["reference"]["hidden_widths"] == [32, 32]
    assert abs(sum(layer["param_share"] for layer in report["layers"]) - 1.0) < 1e-12
    png = (exported.out_dir / "width_report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and "| 0 | hidden | 64 | 1 | 12 | +11 | 1,3 |" in (
        exported.out_dir / "width_report.md"
    ).read_text()


def test_width_mismatch_with_the_exported_graph_raises(exported: ExportResult) -> None:
    report = json.loads((exported.out_dir / "width_report.json").read_text())
    shapes = initializer_shapes(exported.out_dir / "model.onnx")
    shapes["2.weight"] = [7, 12]
    with pytest.raises(TinyDeployError, match=r"2\.weight should have shape \[6, 12\] but has \[7, 12\]"):
        check_widths(report, shapes, "model.onnx")
