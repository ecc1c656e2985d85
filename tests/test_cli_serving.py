"""`tinydeploy predict` and `tinydeploy bench` through the real Typer commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from serving_fixtures import copy_export, export_dir, exported, trained_run  # noqa: F401
from typer.testing import CliRunner

import cli.export  # noqa: F401  (registers export)
import cli.serve  # noqa: F401  (registers serve, predict, bench)
from cli.app import app
from tinydeploy.export.bench import parse_batch_sizes
from tinydeploy.data import load_dataset
from tinydeploy.errors import TinyDeployError
from tinydeploy.serving.manifest import verify_manifest
from tinydeploy.export.quantize import quantize_int8
from tinydeploy.serving.runtime import OnnxModel, read_inputs

runner = CliRunner()


@pytest.fixture(scope="module")
def x_test() -> np.ndarray:
    return load_dataset("digits").X_test


@pytest.fixture(scope="module")
def expected(export_dir: Path, x_test: np.ndarray):
    return OnnxModel(export_dir, "cpu").predict(x_test)


def test_predict_npy_to_npy_json_and_csv(export_dir: Path, tmp_path: Path, x_test: np.ndarray, expected) -> None:
    source = tmp_path / "x.npy"
    np.save(source, x_test)
    for suffix in (".npy", ".json", ".csv"):
        out = tmp_path / f"pred{suffix}"
        result = runner.invoke(app, ["predict", str(export_dir), "--input", str(source), "--output", str(out),
                                     "--provider", "cpu", "--chunk-size", "100"])
        assert result.exit_code == 0, result.output
        if suffix == ".npy":
            np.testing.assert_allclose(np.load(out), expected.outputs, rtol=1e-5, atol=1e-5)
        elif suffix == ".json":
            document = json.loads(out.read_text())
            assert document["labels"] == expected.labels and len(document["outputs"]) == len(x_test)
        else:
            lines = out.read_text().splitlines()
            assert lines[0] == "label," + ",".join(f"p_{i}" for i in range(10))
            assert [line.split(",")[0] for line in lines[1:]] == expected.labels


def test_predict_csv_with_and_without_header_to_stdout(export_dir: Path, tmp_path: Path, x_test: np.ndarray, expected) -> None:
    rows = x_test[:20]
    with_header = tmp_path / "with.csv"
    with_header.write_text(",".join(f"px{i}" for i in range(64)) + "\n" +
                           "".join(",".join(f"{v:g}" for v in row) + "\n" for row in rows))
    without = tmp_path / "without.csv"
    without.write_text("".join(",".join(f"{v:g}" for v in row) + "\n" for row in rows))
    for path in (with_header, without):
        np.testing.assert_array_equal(read_inputs(path), rows)
        result = runner.invoke(app, ["predict", str(export_dir), "-i", str(path), "--provider", "cpu"])
        assert result.exit_code == 0, result.output
        labels = [line.split(",")[0] for line in result.stdout.splitlines()[1:]]
        assert labels == expected.labels[:20]


def test_predict_npz_key_and_first_array(export_dir: Path, tmp_path: Path, x_test: np.ndarray, expected) -> None:
    archive = tmp_path / "x.npz"
    np.savez(archive, first=x_test[:5], second=x_test[5:9])
    np.testing.assert_array_equal(read_inputs(archive), x_test[:5])
    np.testing.assert_array_equal(read_inputs(archive, "second"), x_test[5:9])
    out = tmp_path / "p.json"
    result = runner.invoke(app, ["predict", str(export_dir), "-i", str(archive), "--key", "second", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["labels"] == expected.labels[5:9]


def test_predict_large_input_in_chunks(export_dir: Path, tmp_path: Path, x_test: np.ndarray) -> None:
    big = np.tile(x_test, (30, 1))  # 10800 rows: chunked, with a progress bar
    source = tmp_path / "big.npy"
    np.save(source, big)
    out = tmp_path / "big_pred.npy"
    result = runner.invoke(app, ["predict", str(export_dir), "-i", str(source), "-o", str(out), "--chunk-size", "1000"])
    assert result.exit_code == 0, result.output
    assert "predicted 10800 rows" in result.output
    whole = OnnxModel(export_dir, "cpu").predict(big).outputs
    np.testing.assert_allclose(np.load(out), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("content", "suffix", "words"),
    [
        ("1,2,3\n4,5,6\n", ".csv", "[2, 3]"),
        ("a,b\n1,x\n", ".csv", "non-numeric value 'x'"),
        ("1,2\n1\n", ".csv", "row 2 has 1 values"),
        ("", ".txt", "unsupported file type"),
    ],
)
def test_predict_bad_files_fail_in_one_line(export_dir: Path, tmp_path: Path, content: str, suffix: str, words: str) -> None:
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    result = runner.invoke(app, ["predict", str(export_dir), "-i", str(path)])
    assert result.exit_code == 2
    assert words in result.output and result.output.strip().startswith("error:")
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((2, 64), np.nan))
    result = runner.invoke(app, ["predict", str(export_dir), "-i", str(nan)])
    assert result.exit_code == 2 and "NaN" in result.output


def test_bench_writes_bench_json(export_dir: Path, tmp_path: Path) -> None:
    directory = copy_export(export_dir, tmp_path / "export")
    quantize_int8(directory, latency_iters=5)
    result = runner.invoke(app, ["bench", str(directory), "--batch-sizes", "1,4", "--iters", "5", "--warmup", "1",
                                 "--trust-pickle"])
    assert result.exit_code == 0, result.output
    document = json.loads((directory / "bench.json").read_text())
    assert {"format", "settings", "machine", "engines", "results", "ratios_p50", "skipped", "agreement"} <= set(document)
    assert document["settings"]["batch_sizes"] == [1, 4] and document["settings"]["iters"] == 5
    assert document["settings"]["onnxruntime_intra_op_num_threads"] == 1 and document["settings"]["torch_num_threads"] == 1
    assert set(document["results"]) == {"onnxruntime", "onnxruntime-int8", "torch-eager", "torchscript", "torch-export"}
    for engine, by_batch in document["results"].items():
        for batch in ("1", "4"):
            stats = by_batch[batch]
            assert stats["iters"] == 5 and 0 < stats["p50_ms"] <= stats["p95_ms"] <= stats["p99_ms"]
            assert stats["throughput_rows_per_s"] > 0
    for engine in ("onnxruntime", "torchscript", "torch-export"):
        assert document["agreement"][engine]["4"]["max_abs_diff_vs_onnxruntime"] < 1e-4
    assert set(document["ratios_p50"]["onnxruntime/torch-eager"]) == {"1", "4"}
    assert "onnxruntime" in result.output and "torch-eager" in result.output
    assert "bench.json" in verify_manifest(directory)["files"]  # recorded, and the export still verifies


def test_bench_options_are_checked(export_dir: Path) -> None:
    with pytest.raises(TinyDeployError, match="comma-separated"):
        parse_batch_sizes("1,x")
    result = runner.invoke(app, ["bench", str(export_dir), "--batch-sizes", "0"])
    assert result.exit_code == 2 and "comma-separated" in result.output


def test_export_quantize_and_triton_options(trained_run: Path, tmp_path: Path) -> None:  # noqa: F811
    out, repo = tmp_path / "export", tmp_path / "triton"
    result = runner.invoke(app, ["export", str(trained_run), "--onnx", "--out", str(out), "--quantize", "int8",
                                 "--triton", str(repo)])
    assert result.exit_code == 0, result.output
    parity = json.loads((out / "parity.json").read_text())
    assert parity["int8"]["passed"] and (out / "model.int8.onnx").is_file()
    said = " ".join(result.output.split())  # the summary states the measured verdict, a gain or none
    assert parity["int8"]["verdict"] in said
    assert ("note: int8 brings no gain" in said) == (not parity["int8"]["gains"])
    assert "model.int8.onnx" in verify_manifest(out)["files"]
    assert (repo / "tinydeploy_digits" / "config.pbtxt").is_file()
    assert (repo / "tinydeploy_digits" / "1" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    refused = runner.invoke(app, ["export", str(trained_run), "--torchscript", "--out", str(tmp_path / "x"), "--quantize", "int8"])
    assert refused.exit_code == 2 and "add --onnx" in refused.output
    assert not (tmp_path / "x").exists()
