"""The export / verify / report commands: a real subprocess, exit codes and one-line messages."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from export_fixtures import PYTHON, REPO, exported, trained_run  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from cli import export as _export_commands  # noqa: F401  (registers export, verify, report)
from cli.app import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, app
from tinydeploy.export.pipeline import ExportResult
from tinydeploy.serving.manifest import read_manifest, verify_manifest


def tinydeploy(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed CLI entry point in a fresh interpreter."""
    return subprocess.run([PYTHON, "-m", "cli.main", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_export_prints_a_summary_per_format(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "artifacts"
    result = invoke("export", str(trained_run), "--onnx", "--pt2", "--out", str(out))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"Exported {trained_run} -> {out} (inputs: raw features, opset 18)"
    rows = {line.split()[0]: line.split() for line in lines if line.split()[:1] in (["safetensors"], ["onnx"], ["pt2"])}
    assert set(rows) == {"safetensors", "onnx", "pt2"} and all(row[-1] == "PASS" for row in rows.values())
    assert f"Verify:       tinydeploy verify {out}" in lines and f"Serve:        tinydeploy serve {out}" in lines
    assert sorted(p.name for p in out.glob("model.*")) == ["model.onnx", "model.pt2", "model.safetensors"]
    assert read_manifest(out)["command"].startswith("tinydeploy ")
    verify_manifest(out)


def test_verify_in_a_subprocess_names_a_changed_byte(exported: ExportResult, tmp_path: Path) -> None:
    copy = tmp_path / "export"
    shutil.copytree(exported.out_dir, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "model.onnx").write_bytes(bytes(data))
    failed = tinydeploy("verify", str(copy))
    assert failed.returncode == EXIT_CHECK_FAILED
    assert failed.stderr == (
        f"error: integrity check failed in {copy}: model.onnx changed (sha256 differs from the manifest)\n"
    )


def test_verify_passes_on_an_intact_export(exported: ExportResult) -> None:
    result = invoke("verify", str(exported.out_dir))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == (
        f"Verified {exported.out_dir}: manifest hashes match, 2 artifacts within atol 1e-05 + rtol 0.0001 x |frozen|; "
        "model.ts, model.pt2 checked by hash only (pass --trust-pickle to load them)"
    )
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[2:-1]}
    assert rows["torchscript"][-1] == rows["pt2"][-1] == "HASH" and "not loaded" in " ".join(rows["pt2"])
    assert rows["onnx"][-1] == rows["safetensors"][-1] == "PASS"
    trusted = invoke("verify", str(exported.out_dir), "--trust-pickle")
    assert trusted.exit_code == 0, trusted.output
    assert f"Verified {exported.out_dir}: manifest hashes match, 4 artifacts within" in trusted.stdout
    hashes = invoke("verify", str(exported.out_dir), "--hashes-only")
    assert hashes.exit_code == 0, hashes.output
    assert hashes.stdout.splitlines()[-1] == f"Verified {exported.out_dir}: manifest hashes match (4 artifacts, none loaded)"


def test_verify_of_a_run_directory_is_refused_as_a_failed_check(trained_run: Path) -> None:
    result = invoke("verify", str(trained_run))
    assert result.exit_code == EXIT_CHECK_FAILED
    assert result.stderr == f"error: {trained_run} has no manifest.json: pass a directory written by 'tinydeploy export'\n"


@pytest.mark.parametrize(
    "name", ["model.safetensors", "model.onnx", "model.ts", "model.pt2", "arch.json", "parity.json", "width_report.png"]
)
def test_verify_names_the_changed_file(exported: ExportResult, tmp_path: Path, name: str) -> None:
    copy = tmp_path / "export"
    shutil.copytree(exported.out_dir, copy)
    data = bytearray((copy / name).read_bytes())
    data[-1] ^= 0xFF
    (copy / name).write_bytes(bytes(data))
    result = invoke("verify", str(copy))
    assert result.exit_code == EXIT_CHECK_FAILED
    assert result.stderr == f"error: integrity check failed in {copy}: {name} changed (sha256 differs from the manifest)\n"


def test_verify_names_a_missing_file(exported: ExportResult, tmp_path: Path) -> None:
    copy = tmp_path / "export"
    shutil.copytree(exported.out_dir, copy)
    (copy / "model.ts").unlink()
    result = invoke("verify", str(copy))
    assert result.exit_code == EXIT_CHECK_FAILED
    assert result.stderr == f"error: integrity check failed in {copy}: model.ts is missing\n"


def test_report_prints_the_width_table(exported: ExportResult, trained_run: Path) -> None:
    for directory in (exported.out_dir, trained_run):
        result = invoke("report", str(directory))
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert lines[0] == "Width report: digits (classification)"
        assert lines[3].split() == ["0", "hidden", "64", "1", "12", "+11", "1,3", "780", "768", "84.1%", "0.125"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["export", "{tmp}/missing"], "run directory {tmp}/missing does not exist: pass the --out directory of 'tinydeploy grow'"),
        (
            ["export", "{tmp}"],
            "{tmp} is not a tinydeploy run directory (missing model.safetensors, arch.json, metrics.json): "
            "pass the --out directory of 'tinydeploy grow'",
        ),
        (
            ["export", "{run}", "--formats", "onnx,tflite"],
            "unknown format 'tflite': use one of onnx, torchscript, pt2 (safetensors is always written)",
        ),
        (
            ["export", "{run}", "--out", "{run}/metrics.json/artifacts"],
            "cannot create output directory {run}/metrics.json/artifacts: {run}/metrics.json is a file, not a directory",
        ),
        (["export", "{run}", "--out", "{run}/arch.json"], "cannot write to {run}/arch.json: it is a file, not a directory"),
        (
            ["export", "{run}", "--out", "{run}"],
            "--out {run} is the run directory itself: choose another directory",
        ),
        (["export", "{run}", "--opset", "40"], "opset 40 is out of range: use an opset from 18 to {max_opset}"),
        (["export", "{run}", "--opset", "13"], "opset 13 is out of range: use an opset from 18 to {max_opset}"),
        (
            ["export", "{run}", "--provider", "gpu"],
            "unknown provider 'gpu': use one of auto, cpu, cuda",
        ),
        (["verify", "{tmp}/missing"], "export directory {tmp}/missing does not exist: pass the --out directory of 'tinydeploy export'"),
        (["report", "{tmp}"], "{tmp} has no width_report.json and is not a run directory: pass an export directory or a run directory"),
    ],
)
def test_bad_input_gets_one_line(trained_run: Path, tmp_path: Path, args: list[str], message: str) -> None:
    from tinydeploy.export.ort_support import max_opset

    values = {"tmp": str(tmp_path), "run": str(trained_run), "max_opset": str(max_opset())}
    result = invoke(*(a.format(**values) for a in args))
    assert result.exit_code == EXIT_BAD_INPUT
    assert result.stderr == f"error: {message.format(**values)}\n"


def test_export_refuses_a_foreign_non_empty_directory(trained_run: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    result = invoke("export", str(trained_run), "--out", str(tmp_path))
    assert result.exit_code == EXIT_BAD_INPUT
    assert result.stderr == (
        f"error: {tmp_path} is not empty and not a tinydeploy export directory: choose a new or empty --out\n"
    )


def test_mistyped_option_lists_the_close_ones(trained_run: Path) -> None:
    result = invoke("export", str(trained_run), "--format", "onnx")
    assert result.exit_code == EXIT_BAD_INPUT
    assert "No such option: --format" in result.stderr and "--formats" in result.stderr
