"""The parity gate, ``verify`` and the export pipeline's checks, each decision against a known answer: the
tolerance rule at its boundary, the metric and the report of every format, the one-line reasons and
errors, the recorded data source, the output directory and the staging directories of dead exports, a
gate that fails at export time, a forced re-export, and one ONNX export of a BatchNorm model.

Fast on purpose (numpy, safetensors and TorchScript; one tiny untrained run exported once per process, and
a single ONNX export of a tiny ResNet, about 8 s): ``scripts/mutation.sh`` runs it against every mutant of
the export modules (README, Development)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from tinydeploy.data import apply_standardizer, fit_standardizer, load_dataset
from tinydeploy.errors import IntegrityError, TinyDeployError
from tinydeploy.export import parity
from tinydeploy.export.gate import gate_file, gate_inputs, run_frozen
from tinydeploy.export.parity import FormatParity, ParityError
from tinydeploy.export.pipeline import (
    OLD_SUFFIX,
    _alive,
    check_output_dir,
    export_run,
    remove_stale_staging,
    staging_name,
)
from tinydeploy.export.verify import check_data_source, verify_export
from tinydeploy.model.build import build_model
from tinydeploy.model.freeze import freeze
from tinydeploy.model.spec import ArchSpec
from tinydeploy.training.rundir import write_run

_cache: dict[str, object] = {}


def _rehash(directory: Path, name: str) -> None:
    """Make the manifest agree with ``name`` as it is now, so that the check under test is the one after."""
    manifest = json.loads((directory / "manifest.json").read_text())
    data = (directory / name).read_bytes()
    manifest["files"][name] = {**manifest["files"][name], "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def _edit_json(directory: Path, name: str, edit) -> None:
    path = directory / name
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))
    if name != "manifest.json":
        _rehash(directory, name)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A complete run of an untrained digits MLP [3] with standardisation (no training: the gate only needs
    a model and its test split)."""
    if "run" not in _cache:
        data = load_dataset("digits")
        spec = ArchSpec.mlp(task="classification", input_shape=data.input_shape, hidden_widths=[3],
                            n_outputs=len(data.classes), classes=data.classes,
                            preprocessing=fit_standardizer(data.X_train), dataset="digits")
        torch.manual_seed(0)
        metrics = {"dataset": "digits", "task": "classification", "data_source": data.source, "final_widths": [3],
                   "params": spec.n_params()}
        _cache["run"] = write_run(tmp_path_factory.mktemp("gate") / "run", build_model(spec), spec, [], metrics)
    return _cache["run"]


@pytest.fixture(scope="module")
def export_dir(run_dir: Path) -> Path:
    """The run exported as safetensors and TorchScript (tolerance atol 2e-5, rtol 3e-4)."""
    if "export" not in _cache:
        _cache["export"] = export_run(run_dir, run_dir.parent / "export", formats=("torchscript",), atol=2e-5,
                                      rtol=3e-4).out_dir
    return _cache["export"]


def _copy(export_dir: Path, dest: Path) -> Path:
    dest.mkdir()
    for entry in export_dir.iterdir():
        (dest / entry.name).write_bytes(entry.read_bytes())
    return dest


# ----- parity: the rule, the report ---------------------------------------------------------------------------
def test_compare_applies_the_rule_elementwise_at_its_boundary():
    b = np.array([[1.0, -2.0], [0.0, 0.5]], dtype=np.float32)
    at = b + np.array([[0.5 + 0.25, 0.0], [0.5, -(0.5 + 0.125)]], dtype=np.float32)  # exactly atol + rtol |b|
    result = parity.compare(at, b, atol=0.5, rtol=0.25, task="classification")
    assert result == {"batch": 2, "max_abs_diff": 0.75, "mean_abs_diff": (0.75 + 0.5 + 0.625) / 4,
                      "max_rel_diff": 0.5e12, "passed": True, "argmax_agreement": 0.5}
    over = at.copy()
    over[1, 0] = np.float32(0.5 + 1e-6)
    assert parity.compare(over, b, atol=0.5, rtol=0.25, task="regression") == {
        "batch": 2, "max_abs_diff": 0.75, "mean_abs_diff": pytest.approx((0.75 + 0.5 + 1e-6 + 0.625) / 4),
        "max_rel_diff": pytest.approx((0.5 + 1e-6) * 1e12), "passed": False}
    wrong = parity.compare(b[:1], b, 1.0, 1.0, "classification")
    assert wrong == {"max_abs_diff": math.inf, "passed": False, "error": "shape (1, 2) != (2, 2)"}


def test_task_metric_is_accuracy_or_mean_squared_error():
    outputs = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], dtype=np.float32)
    assert parity.task_metric("classification", outputs, np.array([1, 1, 1])) == pytest.approx(2 / 3)
    assert parity.task_metric("regression", np.array([[1.0], [3.0]]), np.array([[0.0], [1.0]])) == 2.5


def test_parity_inputs_are_the_test_split_and_seeded_random_batches_of_its_statistics():
    X = np.random.default_rng(1).normal(3.0, 2.0, size=(500, 4))
    inputs = parity.parity_inputs(X, seed=5)
    assert list(inputs) == ["test", "random_1", "random_7", "random_500"]
    assert all(x.dtype == np.float32 for x in inputs.values()) and np.array_equal(inputs["test"], X.astype(np.float32))
    assert [inputs[k].shape for k in ("random_1", "random_7", "random_500")] == [(1, 4), (7, 4), (500, 4)]
    big = inputs["random_500"]
    assert np.allclose(big.mean(axis=0), X.mean(axis=0), atol=0.4) and np.allclose(big.std(axis=0), X.std(axis=0), rtol=0.15)
    again, other = parity.parity_inputs(X, seed=5), parity.parity_inputs(X, seed=6)
    assert all(np.array_equal(again[k], inputs[k]) for k in inputs) and not np.array_equal(other["random_7"], inputs["random_7"])


def test_parity_inputs_follow_each_feature_s_own_mean_and_spread():
    rng = np.random.default_rng(2)
    X = np.column_stack([rng.normal(-50.0, 0.1, 600), rng.normal(50.0, 10.0, 600)])
    big = parity.parity_inputs(X, seed=0)["random_600"].astype(np.float64)
    assert np.all(np.abs(big.mean(axis=0) - X.mean(axis=0)) < [0.02, 2.0])
    np.testing.assert_allclose(big.std(axis=0), X.std(axis=0), rtol=0.15)


def test_compare_counts_the_rows_whose_predicted_class_agrees():
    reference = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 1.0, 2.0], [1.0, 2.0, 0.0]], dtype=np.float32)
    candidate = reference.copy()
    candidate[0, 0] = 9.0  # the largest entry of the batch, same class
    candidate[3] = [5.0, 2.0, 0.0]  # row 3 now predicts class 0
    assert parity.compare(candidate, reference, 1.0, 0.0, "classification")["argmax_agreement"] == 0.75
    assert "argmax_agreement" not in parity.compare(candidate, reference, 1.0, 0.0, "regression")
    y = np.array([0, 1, 2, 1])
    gated = parity.run_gate("onnx", "model.onnx", lambda x: x, {}, {"test": reference}, {"test": reference}, y,
                            "classification", 1e-5, 1e-4)
    assert gated.checks["test"]["argmax_agreement"] == 1.0 and gated.metric["artifact"] == 1.0


def test_run_gate_reports_every_check_the_metric_and_the_verdict():
    X = np.arange(12, dtype=np.float32).reshape(6, 2)
    inputs = {"test": X, "random_1": X[:1]}
    reference = {name: np.stack([x[:, 0], -x[:, 1]], axis=1) for name, x in inputs.items()}
    y = np.array([0, 0, 0, 1, 1, 1])
    exact = lambda x: np.stack([x[:, 0], -x[:, 1]], axis=1)
    result = parity.run_gate("onnx", "model.onnx", exact, {"runtime": "r"}, inputs, reference, y, "classification",
                             1e-5, 1e-4)
    assert (result.format, result.file, result.passed, result.runtime, result.spec_matches) == (
        "onnx", "model.onnx", True, {"runtime": "r"}, True)
    assert list(result.checks) == ["test", "random_1"] and result.checks["test"]["batch"] == 6
    assert result.metric == {"name": "accuracy", "artifact": 0.5, "frozen": 0.5}
    assert result.max_abs_diff == 0.0 and result.to_dict()["max_abs_diff"] == 0.0
    shifted = parity.run_gate("onnx", "model.onnx", lambda x: exact(x) + np.float32(0.01), {}, inputs, reference, y,
                              "classification", 1e-5, 1e-4)
    assert not shifted.passed and not shifted.checks["test"]["passed"]
    assert not parity.run_gate("onnx", "f", exact, {}, inputs, reference, y, "classification", 1e-5, 1e-4, False).passed
    targets = np.array([[0.0, 0.0]] * 6)
    regression = parity.run_gate("pt2", "model.pt2", lambda x: exact(x) + np.float32(1.0), {}, inputs, reference,
                                 targets, "regression", 10.0, 0.0)
    assert regression.passed and regression.metric["name"] == "mse"
    assert regression.metric["frozen"] == pytest.approx(float(np.mean(reference["test"].astype(np.float64) ** 2)))
    assert set(regression.metric["scores"]) == {"artifact", "frozen"} and "scores" not in result.metric


def test_a_failed_format_is_named_with_its_reason_in_one_line():
    checks = {"test": {"max_abs_diff": 0.002}, "random_7": {"max_abs_diff": 0.0031}, "random_1": {"max_abs_diff": 0.0}}
    drifted = FormatParity("onnx", "model.onnx", False, checks=checks)
    assert drifted.max_abs_diff == 0.0031
    assert drifted.reason(1e-5, 1e-4) == "max abs diff 0.0031 on 'random_7' exceeds atol 1e-05 + rtol 0.0001 x |frozen|"
    spec = FormatParity("pt2", "model.pt2", False, checks=checks, spec_matches=False)
    assert spec.reason(1e-5, 1e-4) == "its embedded spec differs from model.safetensors"
    broken = FormatParity("torchscript", "model.ts", False, checks=checks, error="cannot load or run it (X: y)")
    assert broken.reason(1e-5, 1e-4) == "cannot load or run it (X: y)"
    assert math.isnan(FormatParity("onnx", "model.onnx", True).max_abs_diff)
    fine = FormatParity("safetensors", "model.safetensors", True, checks={"test": {"max_abs_diff": 0.0}})
    assert parity.failure_message([drifted, fine, broken], 1e-5, 1e-4) == (
        "parity check failed for onnx (max abs diff 0.0031 on 'random_7' exceeds atol 1e-05 + rtol 0.0001 x |frozen|); "
        "torchscript (cannot load or run it (X: y))")
    error = ParityError("message", [drifted])
    assert str(error) == "message" and error.results == [drifted] and isinstance(error, TinyDeployError)


def test_parity_document_states_the_reference_the_rule_and_every_format():
    fine = FormatParity("safetensors", "model.safetensors", True, checks={"test": {"max_abs_diff": 0.0}})
    drifted = FormatParity("onnx", "model.onnx", False, checks={"test": {"max_abs_diff": 1.0}})
    document = parity.parity_document([fine, drifted], 1e-5, 1e-4, {"seed": 0})
    assert document == {
        "reference": "frozen model (torch, CPU, float32)",
        "tolerance": {"atol": 1e-5, "rtol": 1e-4, "rule": "|artifact - frozen| <= atol + rtol * |frozen|, elementwise"},
        "inputs": {"seed": 0}, "passed": False,
        "formats": {"safetensors": fine.to_dict(), "onnx": drifted.to_dict()}}
    assert parity.parity_document([fine], 1e-5, 1e-4, {})["passed"] is True


# ----- gate: inputs in the artifact's space, a file that cannot load ------------------------------------------
def test_gate_inputs_are_the_test_split_in_the_space_the_artifacts_expect(run_dir: Path):
    from tinydeploy.training.rundir import read_run

    run = read_run(run_dir)
    source = run.metrics["data_source"]
    data = load_dataset(**source)
    for included in (True, False):
        frozen = freeze(run.model, run.spec, preprocessing=included)
        gate = gate_inputs(frozen, run.spec, source, included, seed=3)
        X = data.X_test if included else apply_standardizer(data.X_test, run.spec.preprocessing)
        assert np.array_equal(gate.inputs["test"], X.astype(np.float32)) and np.array_equal(gate.y_test, data.y_test)
        assert gate.task == "classification" and set(gate.reference) == set(gate.inputs)
        assert np.array_equal(gate.reference["random_7"], run_frozen(frozen, gate.inputs["random_7"]))
        assert gate.description == {
            "data_source": source, "test_samples": len(X), "random_batches": [1, 7, len(X)], "seed": 3,
            "space": "raw features" if included else "standardized features"}
    with torch.no_grad():
        expected = frozen(torch.from_numpy(X[:5].astype(np.float32))).numpy()
    assert run_frozen(frozen, X[:5].astype(np.float64)).dtype == np.float32
    np.testing.assert_array_equal(run_frozen(frozen, X[:5]), expected)
    other = run.spec.with_input_shape((8, 8)) if hasattr(run.spec, "with_input_shape") else None
    wrong = ArchSpec.from_dict({**run.spec.to_dict(), "input_shape": [65]}) if other is None else other
    with pytest.raises(TinyDeployError) as error:
        gate_inputs(frozen, wrong, source, True)
    assert str(error.value) == ("the dataset 'digits' has inputs of shape [64] but the model expects "
                                f"{list(wrong.input_shape)}: the run's data_source does not match its model")


def test_gate_file_fails_a_file_that_cannot_load_and_one_whose_spec_differs(export_dir: Path, run_dir: Path):
    from tinydeploy.training.rundir import read_run

    run = read_run(run_dir)
    frozen = freeze(run.model, run.spec, preprocessing=True)
    gate = gate_inputs(frozen, run.spec, run.metrics["data_source"], True)
    data = (export_dir / "model.safetensors").read_bytes()
    good = gate_file("safetensors", data, run.spec, gate, 1e-5, 1e-4)
    assert good.passed and good.spec_matches and good.max_abs_diff == 0.0 and good.file == "model.safetensors"
    broken = gate_file("safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{not json", run.spec, gate, 1e-5, 1e-4)
    assert not broken.passed and broken.checks == {}
    assert broken.error.startswith("cannot load or run it (") and broken.error.endswith(")") and len(broken.error) < 300
    other = ArchSpec.from_dict({**run.spec.to_dict(), "classes": ["zero", *run.spec.classes[1:]]})
    differs = gate_file("safetensors", data, other, gate, 1e-5, 1e-4)
    assert not differs.passed and not differs.spec_matches and differs.checks["test"]["passed"]
    ts = (export_dir / "model.ts").read_bytes()
    assert not gate_file("torchscript", ts, run.spec, gate, 1e-5, 1e-4).passed  # code format, not trusted
    assert gate_file("torchscript", ts, run.spec, gate, 1e-5, 1e-4, trusted=True).passed


# ----- verify -----------------------------------------------------------------------------------------------
def test_check_data_source_accepts_the_recorded_keys_with_their_types_only():
    good = {"name": "digits", "data_dir": None, "target": "y", "split_seed": 0, "val_fraction": 0.2,
            "task": "classification", "as_images": False, "stratify": True}
    assert check_data_source(good) is good and check_data_source({"name": "digits"}) == {"name": "digits"}
    malformed = "parity.json: inputs.data_source is malformed: re-run 'tinydeploy export'"
    for bad in (["digits"], {"name": "digits", "extra": 1}, {"split_seed": 0}):
        with pytest.raises(IntegrityError) as error:
            check_data_source(bad)
        assert str(error.value) == malformed
    for key, value in (("split_seed", True), ("split_seed", 1.0), ("as_images", 1), ("val_fraction", "0.2"),
                       ("name", 3), ("data_dir", 3)):
        with pytest.raises(IntegrityError) as error:
            check_data_source({"name": "digits", key: value})
        assert str(error.value) == f"parity.json: inputs.data_source.{key} has the wrong type: re-run 'tinydeploy export'"


def test_verify_gates_the_safe_formats_and_hashes_the_code_formats_unless_trusted(export_dir: Path, tmp_path: Path):
    result = verify_export(export_dir)
    assert [r.format for r in result.parity] == ["safetensors"] and result.hash_only == ["torchscript"]
    assert (result.atol, result.rtol) == (2e-5, 3e-4)  # the recorded tolerance
    assert result.files == {fmt: (export_dir / name).stat().st_size
                            for fmt, name in (("safetensors", "model.safetensors"), ("torchscript", "model.ts"))}
    trusted = verify_export(export_dir, atol=1e-3, trust_pickle=True)
    assert [r.format for r in trusted.parity] == ["safetensors", "torchscript"] and trusted.hash_only == []
    assert (trusted.atol, trusted.rtol) == (1e-3, 3e-4) and all(r.passed for r in trusted.parity)
    hashes = verify_export(export_dir, hashes_only=True)
    assert hashes.parity == [] and hashes.hash_only == ["safetensors", "torchscript"] and math.isnan(hashes.atol)
    assert math.isnan(hashes.rtol) and hashes.files == result.files
    with pytest.raises(TinyDeployError) as error:
        verify_export(tmp_path / "nothing")
    assert str(error.value) == (f"export directory {tmp_path / 'nothing'} does not exist: pass the --out directory "
                                "of 'tinydeploy export'")


def _shift_weights(directory: Path, delta: float) -> None:
    """Add ``delta`` to the output bias in model.safetensors, keeping its metadata."""
    path = directory / "model.safetensors"
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    tensors = load_safetensors(raw)
    last = max((k for k in tensors if k.endswith("bias")), key=lambda k: int(k.split(".")[-2]))
    tensors[last] = tensors[last] + np.float32(delta)
    path.write_bytes(save_safetensors(tensors, metadata=header.get("__metadata__")))
    _rehash(directory, "model.safetensors")


def test_verify_gates_the_code_formats_against_the_weights_and_names_the_failure(export_dir: Path, tmp_path: Path):
    copy = _copy(export_dir, tmp_path / "export")
    _shift_weights(copy, 0.01)  # the reference moves: the TorchScript file no longer computes it
    assert all(r.passed for r in verify_export(copy).parity)  # safetensors against itself
    with pytest.raises(ParityError) as error:
        verify_export(copy, trust_pickle=True)
    assert str(error.value).startswith("parity check failed for torchscript (max abs diff 0.01")
    assert str(error.value).endswith(f"exceeds atol 2e-05 + rtol 0.0003 x |frozen|) in {copy}")
    assert [r.passed for r in error.value.results] == [True, False]
    assert all(r.passed for r in verify_export(copy, atol=0.02, trust_pickle=True).parity)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.pop("tolerance"), "{} is malformed: re-run 'tinydeploy export'"),
    (lambda d: d["tolerance"].update(atol="loose"), "{} is malformed: re-run 'tinydeploy export'"),
    (lambda d: d["inputs"].update(seed=None), "{} is malformed: re-run 'tinydeploy export'"),
    (lambda d: d["inputs"].update(data_source={"name": 3}),
     "parity.json: inputs.data_source.name has the wrong type: re-run 'tinydeploy export'"),
])
def test_verify_refuses_a_malformed_parity_record(export_dir: Path, tmp_path: Path, edit, message):
    copy = _copy(export_dir, tmp_path / "export")
    _edit_json(copy, "parity.json", edit)
    with pytest.raises(IntegrityError) as error:
        verify_export(copy)
    assert str(error.value) == message.format(copy / "parity.json")


def test_verify_reads_the_seed_and_the_preprocessing_the_export_recorded(export_dir: Path, tmp_path: Path):
    copy = _copy(export_dir, tmp_path / "export")
    _edit_json(copy, "parity.json", lambda d: d["inputs"].update(seed=12345))
    assert all(r.passed for r in verify_export(copy, trust_pickle=True).parity)
    record = json.loads((copy / "parity.json").read_text())
    assert record["inputs"]["space"] == "raw features"


@pytest.mark.parametrize("name", ["model.safetensors", "parity.json"])
def test_verify_needs_the_weights_and_the_parity_record_in_the_manifest(export_dir: Path, tmp_path: Path, name: str):
    copy = _copy(export_dir, tmp_path / "export")
    (copy / name).unlink()
    _edit_json(copy, "manifest.json", lambda d: d["files"].pop(name))
    with pytest.raises(IntegrityError) as error:
        verify_export(copy)
    assert str(error.value) == f"{copy} has no {name} in its manifest: re-run 'tinydeploy export'"


# ----- pipeline: the output directory, staging, the run ---------------------------------------------------------
def test_check_output_dir_refuses_in_one_line_and_touches_nothing(run_dir: Path, export_dir: Path, tmp_path: Path):
    def refused(out: Path, force: bool = False) -> str:
        with pytest.raises(TinyDeployError) as error:
            check_output_dir(out, run_dir, force)
        return str(error.value)

    assert refused(run_dir) == f"--out {run_dir} is the run directory itself: choose another directory"
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    assert refused(link) == f"--out {link} is a symbolic link: pass the directory it points to"
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert refused(afile) == f"cannot write to {afile}: it is a file, not a directory"
    assert refused(afile / "a" / "b") == f"cannot create output directory {afile / 'a' / 'b'}: {afile} is a file, not a directory"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("x")
    assert refused(busy) == f"{busy} is not empty and not a tinydeploy export directory: choose a new or empty --out"
    check_output_dir(tmp_path / "new" / "out", run_dir)  # does not exist: fine, and nothing is created
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", run_dir)
    copy = _copy(export_dir, tmp_path / "export")
    listed = sorted(json.loads((copy / "manifest.json").read_text())["files"])
    shown = ", ".join(listed[:6]) + (", ..." if len(listed) > 6 else "")
    assert refused(copy) == (f"{copy} already holds an export ({shown}): pass --force to replace it whole (files this "
                             "export does not write are removed), or choose another --out")
    with pytest.raises(TinyDeployError, match="already holds an export"):
        check_output_dir(copy, run_dir)  # force is off unless given
    check_output_dir(copy, run_dir, force=True)
    (copy / "mine.txt").write_text("x")
    assert refused(copy, True) == (f"{copy} holds mine.txt, which no export wrote; an export replaces the whole "
                                   "directory: move them out or choose another --out")
    for name in ("a.txt", "b.txt", "c.txt", "d.txt", "e.txt"):
        (copy / name).write_text("x")
    assert refused(copy, True) == (f"{copy} holds a.txt, b.txt, c.txt, d.txt, e.txt, which no export wrote; an export "
                                   "replaces the whole directory: move them out or choose another --out")  # first 5
    for name in ("mine.txt", "a.txt", "b.txt", "c.txt", "d.txt", "e.txt"):
        (copy / name).unlink()
    (copy / "manifest.json").write_text("{")
    assert refused(copy, True).startswith(f"{copy} holds a damaged export (")
    assert refused(copy, True).endswith("): remove it or choose another --out")


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_staging_of_dead_exports_is_removed_and_an_interrupted_swap_is_undone(tmp_path: Path):
    out = tmp_path / "export"
    prefix = tmp_path / staging_name(out)
    assert staging_name(out) == ".tinydeploy-staging-export-"
    # only processes this test started are probed (a broken probe could signal them)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _check_staging(tmp_path, out, prefix, child.pid)
    finally:
        child.kill()
        child.wait()


def _check_staging(tmp_path: Path, out: Path, prefix: Path, alive: int) -> None:
    dead, mine = _dead_pid(), os.getpid()
    for pid in (dead, mine, alive):
        Path(f"{prefix}{pid}-abcd").mkdir()
    Path(f"{prefix}notapid-abcd").mkdir()
    Path(f"{prefix}{dead}-file").write_text("not a directory")
    other = tmp_path / f"{staging_name(tmp_path / 'other')}{dead}-abcd"
    other.mkdir()
    assert _alive(mine) and _alive(alive) and not _alive(dead)
    removed = remove_stale_staging(out)
    # this process is not exporting while it looks: its own staging directories are leftovers too
    assert sorted(p.name for p in removed) == sorted(f"{staging_name(out)}{name}-abcd" for name in (dead, mine, "notapid"))
    assert not any(p.exists() for p in removed)
    assert Path(f"{prefix}{alive}-abcd").is_dir() and other.is_dir() and Path(f"{prefix}{dead}-file").is_file()
    # a swap killed between its two renames: no export, the previous one under <staging>-old
    previous = Path(f"{prefix}{dead}-ef01{OLD_SUFFIX}")
    previous.mkdir()
    (previous / "manifest.json").write_text("{}")
    unfinished = Path(f"{prefix}{dead}-0000")  # a dead export's staging, manifest written, never swapped in
    unfinished.mkdir()
    (unfinished / "manifest.json").write_text('{"unfinished": true}')
    remove_stale_staging(out)
    assert (out / "manifest.json").read_text() == "{}" and not previous.exists() and not unfinished.exists()
    assert remove_stale_staging(tmp_path / "missing" / "export") == []


def _legacy_run(run_dir: Path, dest: Path, **changes) -> Path:
    """A run directory of the older layout (model.safetensors, arch.json, metrics.json) with ``changes`` to its
    metrics (None removes a key)."""
    dest.mkdir()
    for name in ("model.safetensors", "arch.json"):
        (dest / name).write_bytes((run_dir / name).read_bytes())
    metrics = {**json.loads((run_dir / "metrics.json").read_text()), **changes}
    (dest / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items() if v is not None}))
    return dest


def test_export_run_refuses_bad_requests_before_writing(run_dir: Path, tmp_path: Path):
    with pytest.raises(TinyDeployError) as error:
        export_run(run_dir, tmp_path / "out", formats=(), opset=17)
    assert str(error.value) == "opset 17 was given but ONNX is not among the formats: add onnx or drop the opset"
    blind = _legacy_run(run_dir, tmp_path / "run", data_source=None)
    with pytest.raises(TinyDeployError) as error:
        export_run(blind, tmp_path / "out", formats=())
    assert str(error.value) == f"{blind / 'metrics.json'} has no 'data_source': re-run 'tinydeploy grow'"
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tinydeploy")]


def test_an_unfinished_run_is_exported_from_its_checkpoint_with_a_warning(run_dir: Path, tmp_path: Path):
    unfinished = _legacy_run(run_dir, tmp_path / "run", status="interrupted", epochs=3)
    result = export_run(unfinished, tmp_path / "out", formats=())
    assert result.run_status == "interrupted" and result.warnings == [(
        f"the run in {unfinished} is interrupted at epoch 3: this exports its last checkpoint, not a finished model; "
        f"finish it with 'tinydeploy grow --resume {unfinished}' and export again")]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["run_status"] == "interrupted"
    later = export_run(_legacy_run(run_dir, tmp_path / "run2", status="running"), tmp_path / "run2" / "artifacts",
                       formats=())
    assert later.warnings[0].startswith(f"the run in {tmp_path / 'run2'} is running: this exports")
    assert later.out_dir == tmp_path / "run2" / "artifacts"


def test_export_without_onnx_checks_widths_on_the_safetensors_and_publishes_everything(run_dir: Path, tmp_path: Path):
    result = export_run(run_dir, tmp_path / "out", formats=(), command="pytest", atol=1e-4, rtol=1e-3)
    assert result.out_dir == tmp_path / "out" and result.opset is None and result.run_status == "complete"
    assert result.files == {"safetensors": tmp_path / "out" / "model.safetensors"} and result.warnings == []
    assert result.sizes == {"safetensors": (tmp_path / "out" / "model.safetensors").stat().st_size}
    assert [r.format for r in result.parity] == ["safetensors"] and result.parity[0].passed
    record = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert record["tolerance"]["atol"] == 1e-4 and record["tolerance"]["rtol"] == 1e-3 and record["passed"] is True
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {"model.safetensors", "parity.json", "arch.json"} <= set(manifest["files"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tinydeploy")]  # staging gone


def test_verify_reproduces_the_measurements_the_export_recorded(run_dir: Path, tmp_path: Path):
    """With and without the preprocessing inside the artifacts: verify rebuilds the frozen model and the inputs
    the same way, so every gated format's metric is the one parity.json recorded."""
    for preprocessing in (True, False):
        out = export_run(run_dir, tmp_path / f"export-{preprocessing}", formats=(), preprocessing=preprocessing).out_dir
        recorded = json.loads((out / "parity.json").read_text())
        assert recorded["inputs"]["space"] == ("raw features" if preprocessing else "standardized features")
        result = verify_export(out)
        assert [r.format for r in result.parity] == ["safetensors"] and result.parity[0].passed
        assert result.parity[0].metric == recorded["formats"]["safetensors"]["metric"]


def test_verify_checks_arch_json_against_the_weights_when_the_export_has_one(export_dir: Path, tmp_path: Path):
    copy = _copy(export_dir, tmp_path / "export")
    _edit_json(copy, "arch.json", lambda d: d["classes"].__setitem__(0, "zero"))
    with pytest.raises(IntegrityError) as error:
        verify_export(copy)
    assert str(error.value) == f"{copy / 'arch.json'} disagrees with the spec stored in model.safetensors: re-export the run"
    (copy / "arch.json").unlink()
    _edit_json(copy, "manifest.json", lambda d: d["files"].pop("arch.json"))
    assert all(r.passed for r in verify_export(copy).parity)  # arch.json is optional


def test_verify_refuses_files_the_manifest_does_not_list_and_names_the_directory(export_dir: Path, tmp_path: Path):
    assert verify_export(export_dir).directory == export_dir
    assert verify_export(export_dir, hashes_only=True).directory == export_dir
    copy = _copy(export_dir, tmp_path / "export")
    (copy / "extra.bin").write_bytes(b"x")
    with pytest.raises(IntegrityError) as error:
        verify_export(copy, hashes_only=True)
    assert str(error.value) == f"integrity check failed in {copy}: extra.bin is not listed in the manifest"


def test_verify_applies_an_explicit_rtol_with_the_recorded_atol(export_dir: Path):
    result = verify_export(export_dir, rtol=1e-2)
    assert (result.atol, result.rtol) == (2e-5, 1e-2)


def test_verify_draws_the_random_batches_of_the_recorded_seed(export_dir: Path, tmp_path: Path):
    """An artifact off by 0.01 everywhere (its differences depend on the inputs): two verify runs measure the same
    differences on every batch, and another recorded seed gives other random batches."""
    copy = _copy(export_dir, tmp_path / "export")
    _shift_weights(copy, 0.01)

    def measured():
        with pytest.raises(ParityError) as error:
            verify_export(copy, trust_pickle=True)
        return {name: check["mean_abs_diff"] for name, check in error.value.results[1].checks.items()}

    first = measured()
    assert measured() == first
    _edit_json(copy, "parity.json", lambda d: d["inputs"].update(seed=d["inputs"]["seed"] + 1))
    other = measured()
    assert other["test"] == first["test"] and other["random_7"] != first["random_7"]


def test_export_reports_its_progress_and_creates_missing_parents_with_the_usual_mode(run_dir: Path, tmp_path: Path):
    said = []
    out = tmp_path / "new" / "deeper" / "out"
    export_run(run_dir, out, formats=(), progress=said.append)
    assert said == ["loading the test split", "exporting safetensors", "checking safetensors parity",
                    "writing the width report"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o7777 == 0o777 & ~umask


def test_gate_file_records_the_runtime_the_metric_and_why_a_file_was_not_loaded(export_dir: Path, run_dir: Path):
    from tinydeploy.training.rundir import read_run

    run = read_run(run_dir)
    gate = gate_inputs(freeze(run.model, run.spec, preprocessing=True), run.spec, run.metrics["data_source"], True)
    good = gate_file("safetensors", (export_dir / "model.safetensors").read_bytes(), run.spec, gate, 1e-5, 1e-4)
    assert good.runtime == {"runtime": f"torch {torch.__version__}", "device": "cpu", "loader": "safetensors + spec"}
    accuracy = float(np.mean(gate.reference["test"].argmax(axis=1) == gate.y_test))
    assert good.metric == {"name": "accuracy", "artifact": accuracy, "frozen": accuracy} and 0.0 < accuracy < 0.5
    refused = gate_file("torchscript", (export_dir / "model.ts").read_bytes(), run.spec, gate, 1e-5, 1e-4)
    assert (refused.format, refused.file, refused.passed, refused.checks) == ("torchscript", "model.ts", False, {})
    assert refused.error == ("cannot load or run it (TinyDeployError: model.ts is not loaded: torchscript files can run "
                             "code when loaded; pass --trust-pickle to load it)")


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_export_run_defaults_records_the_command_and_the_source_and_times_itself(run_dir: Path, tmp_path: Path):
    import time

    run = _legacy_run(run_dir, tmp_path / "run")
    start = time.perf_counter()
    result = export_run(run, formats=())  # default --out: the run's artifacts folder, no command recorded
    elapsed = time.perf_counter() - start
    out = run / "artifacts"
    assert result.out_dir == out and 0.0 < result.seconds <= elapsed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "" and manifest["source_run"] == str(run.resolve())
    assert result.report == json.loads((out / "width_report.json").read_text())
    assert result.report["checked_against"] == "model.safetensors"
    assert sorted(manifest["files"]) == ["arch.json", "model.safetensors", "parity.json", "width_report.json",
                                         "width_report.md", "width_report.png"]
    # exactly six files: listed whole, no ", ..."
    with pytest.raises(TinyDeployError) as error:
        export_run(run, formats=())  # force is off unless given: nothing is touched
    assert str(error.value) == (f"{out} already holds an export (arch.json, model.safetensors, parity.json, "
                                "width_report.json, width_report.md, width_report.png): pass --force to replace it "
                                "whole (files this export does not write are removed), or choose another --out")


def test_a_forced_export_replaces_the_whole_directory(run_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    export_run(run_dir, out, formats=("torchscript",), command="first")
    assert (out / "model.ts").is_file()
    again = export_run(run_dir, out, formats=(), command="tinydeploy export --force", force=True)
    assert again.files == {"safetensors": out / "model.safetensors"} and not (out / "model.ts").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "tinydeploy export --force" and manifest["source_run"] == str(run_dir.resolve())
    assert "model.ts" not in manifest["files"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or old directory left beside it


def test_an_export_failing_its_gate_publishes_nothing_and_keeps_the_old_export(run_dir: Path, tmp_path: Path,
                                                                              monkeypatch):
    """An exporter that writes another model (the output bias off by 0.5) fails the gate at export time: the
    forced re-export raises ParityError naming the format, and the old export is left byte for byte."""
    import copy

    from tinydeploy.export import pipeline

    out = tmp_path / "out"
    export_run(run_dir, out, formats=(), command="first")
    before = _files(out)
    real = pipeline.write_artifact

    def another_model(fmt, path, model, deployed, spec, metadata, opset=None):
        other = copy.deepcopy(model)
        with torch.no_grad():
            [*_, bias] = other.parameters()
            bias += 0.5
        real(fmt, path, other, deployed, spec, metadata, opset)

    monkeypatch.setattr(pipeline, "write_artifact", another_model)
    with pytest.raises(ParityError) as error:
        export_run(run_dir, out, formats=(), force=True, atol=2e-5, rtol=3e-4)
    [result] = error.value.results
    assert (result.format, result.passed, result.spec_matches) == ("safetensors", False, True)
    assert result.max_abs_diff == pytest.approx(0.5, abs=1e-6)
    worst = max(result.checks, key=lambda name: result.checks[name]["max_abs_diff"])
    assert str(error.value) == (f"parity check failed for safetensors (max abs diff 0.5 on '{worst}' exceeds atol 2e-05 "
                                "+ rtol 0.0003 x |frozen|); nothing was published")
    assert _files(out) == before and [p.name for p in tmp_path.iterdir()] == ["out"]  # staging removed


def _batchnorm_resnet_run(directory: Path) -> Path:
    """An untrained ResNet (stem conv + BatchNorm, one residual block of middle width 1) on the 8x8 digits, its
    BatchNorms given running statistics and affine parameters far from the identity, so that folding them
    changes every conv's weights."""
    data = load_dataset("digits", as_images=True)
    spec = ArchSpec.resnet(task="classification", input_shape=data.input_shape, stages=(1,), stream_widths=[2],
                           mid_widths=[1], n_outputs=len(data.classes), classes=data.classes,
                           preprocessing=fit_standardizer(data.X_train), dataset="digits")
    torch.manual_seed(0)
    model = build_model(spec)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator))
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.randn(n, generator=generator))
                module.bias.copy_(torch.randn(n, generator=generator))
    metrics = {"dataset": "digits", "task": "classification", "data_source": data.source, "params": spec.n_params()}
    return write_run(directory, model, spec, [], metrics)


def test_onnx_export_of_a_batchnorm_model_is_folded_profiled_gated_and_verified_on_its_provider(tmp_path: Path):
    """One ONNX export (a few seconds): the BatchNorms folded into the convs, the width report checked against the
    ONNX initializers with per-layer latency, the requested opset, the gate's provider recorded; then the gate on
    the ONNX file itself with the default provider and with CUDA (refused in one line where there is no GPU), and
    verify on the provider it is given."""
    import onnx
    import onnxruntime as ort

    from tinydeploy.serving.providers import choose_providers, cuda_usable
    from tinydeploy.training.rundir import read_run

    run = _batchnorm_resnet_run(tmp_path / "run")
    said: list[str] = []
    result = export_run(run, tmp_path / "out", formats=("onnx", "torchscript"), opset=19, provider="auto",
                        progress=said.append)
    out = result.out_dir
    assert said == ["loading the test split", "exporting safetensors", "checking safetensors parity", "exporting onnx",
                    "checking onnx parity", "exporting torchscript", "checking torchscript parity",
                    "profiling the ONNX model per layer", "writing the width report"]
    model = onnx.load(str(out / "model.onnx"))
    assert result.opset == 19 and [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [19]
    assert "BatchNormalization" not in {node.op_type for node in model.graph.node}
    scripted = torch.jit.load(str(out / "model.ts"))  # written by this test: trusted
    assert "BatchNorm2d" in {type(m).__name__ for m in read_run(run).model.modules()}
    assert not [m.original_name for m in scripted.modules() if m.original_name.startswith("BatchNorm")]
    assert [r.passed for r in result.parity] == [True, True, True]
    on_gpu = cuda_usable()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if on_gpu else ["CPUExecutionProvider"]
    assert result.parity[1].runtime == {"runtime": f"onnxruntime {ort.__version__}", "providers": providers}
    report = json.loads((out / "width_report.json").read_text())
    assert result.report == report and report["checked_against"] == "model.onnx"
    assert report["latency"]["source"] == "onnxruntime profiler, model.onnx, CPU, 1 thread, mean of 20 runs"
    assert set(report["latency"]["per_module_us"]) == {"batch_1", "batch_32"}
    for layer in report["layers"]:
        assert set(layer["latency_us"]) == {"batch_1", "batch_32"} and layer["latency_us"]["batch_32"] > 0
    spec = ArchSpec.from_json((out / "arch.json").read_text())
    frozen = freeze(read_run(run).model, spec, preprocessing=True)
    gate = gate_inputs(frozen, spec, json.loads((run / "metrics.json").read_text())["data_source"], True)
    data = (out / "model.onnx").read_bytes()
    default = gate_file("onnx", data, spec, gate, 1e-5, 1e-4)
    assert default.passed and default.runtime["providers"] == ["CPUExecutionProvider"]
    verified = verify_export(out, provider="auto")
    assert [r.format for r in verified.parity] == ["safetensors", "onnx"] and all(r.passed for r in verified.parity)
    assert verified.parity[1].runtime["providers"] == providers and verified.hash_only == ["torchscript"]
    cuda = gate_file("onnx", data, spec, gate, 1e-5, 1e-4, "cuda")
    if on_gpu:
        assert cuda.passed and cuda.runtime["providers"][0] == "CUDAExecutionProvider"
    else:
        with pytest.raises(TinyDeployError) as refusal:
            choose_providers("cuda")
        assert len(str(refusal.value)) > 200  # cut to its first 200 characters
        assert (cuda.passed, cuda.error) == (False, f"cannot load or run it (TinyDeployError: {str(refusal.value)[:200]})")



def test_an_output_directory_under_an_unwritable_parent_is_refused(run_dir: Path, tmp_path: Path):
    """A read-only parent: a directory without write permission, or where the tests run as root (who may write
    anywhere permissions allow), a read-only filesystem such as /proc/sys in a container."""
    if os.geteuid() != 0:
        parent = tmp_path / "read-only"
        parent.mkdir(mode=0o555)
    else:
        parent = next((Path(p) for p in ("/proc/sys",) if os.path.isdir(p) and not os.access(p, os.W_OK)), None)
        if parent is None:
            pytest.skip("root here, and no read-only filesystem to write under")
    out = parent / "tinydeploy-export" / "out"
    with pytest.raises(TinyDeployError) as error:
        check_output_dir(out, run_dir)
    assert str(error.value) == f"cannot write to output directory {out}: {parent} is not writable"
