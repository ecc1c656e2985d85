"""Hostile model directories: code, file reads and writes hidden in artifacts; broken or lying manifests.

Every case plants the payload in a copy of a real export and rewrites manifest.json to match (as an
attacker who can replace the directory can), then runs the real commands (verify, bench, predict,
serve). Each payload's only side effect is a marker file, or a secret file's bytes in an answer:
the tests assert that the refusal is a one-line error and that the side effect never happens, and
check once per payload that the payload is real (a trusting loader does run it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import payloads
import pytest
from typer.testing import CliRunner

from cli.app import EXIT_CHECK_FAILED, app
from tinydeploy.errors import IntegrityError
from tinydeploy.export.formats import load_artifact
from tinydeploy.serving import runtime
from tinydeploy.serving.runtime import OnnxModel
from tinydeploy.serving.server import create_app

CODE_PAYLOADS = {  # builder -> (format, file)
    "pt2_sample_inputs": ("pt2", "model.pt2"),
    "pt2_pickled_weight": ("pt2", "model.pt2"),
    "pt2_opaque_constant": ("pt2", "model.pt2"),
    "torchscript_from_file": ("torchscript", "model.ts"),
}
SECRET = b"TOPSECRET-ssh-key-0123456789abcdefghijkl"  # 40 bytes: the 10 floats of the output bias


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def copy(export_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(export_dir, tmp_path / "export"))


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "x.npy"
    np.save(path, np.zeros((5, 64), dtype=np.float32))
    return path


# ----- code execution ------------------------------------------------------------------------------
@pytest.mark.parametrize("payload", sorted(CODE_PAYLOADS))
def test_code_in_torchscript_and_pt2_never_runs_by_default(
    payload: str, copy: Path, tmp_path: Path, rows: Path
) -> None:
    fmt, file = CODE_PAYLOADS[payload]
    marker = tmp_path / "pwned"
    getattr(payloads, payload)(copy, marker)

    verify = invoke("verify", copy)
    assert verify.exit_code == 0, verify.output
    row = next(line.split() for line in verify.stdout.splitlines() if line.startswith(fmt + " "))
    assert row[-1] == "HASH" and "PASS" not in row  # checked by hash, never reported as a passed reload
    summary = verify.stdout.splitlines()[-1]
    assert file in summary.split("; ")[-1] and summary.endswith(
        "checked by hash only (pass --trust-pickle to load them)"
    )
    bench = invoke("bench", copy, "--batch-sizes", "1", "--iters", "1", "--warmup", "0", "--out", tmp_path / "b.json")
    assert bench.exit_code == 0, bench.output
    skipped = json.loads((tmp_path / "b.json").read_text())["skipped"]
    assert "can run code when loaded" in skipped["torchscript" if fmt == "torchscript" else "torch-export"]
    assert invoke("predict", copy, "-i", rows).exit_code == 0
    create_app(copy, "cpu", 8)
    assert not marker.exists()

    # The payload is real: loading the file the way a trusting tool does runs it.
    with pytest.raises(Exception, match="can run code"):
        load_artifact(fmt, (copy / file).read_bytes())
    try:
        load_artifact(fmt, (copy / file).read_bytes(), trusted=True)
    except Exception:  # the payload breaks the model after it ran; what matters is that it ran
        pass
    assert marker.exists()


def test_trust_pickle_reloads_and_gates_genuine_torch_files(export_dir: Path, tmp_path: Path) -> None:
    trusted = invoke("verify", export_dir, "--trust-pickle")
    assert trusted.exit_code == 0, trusted.output
    rows = {line.split()[0]: line.split()[-1] for line in trusted.stdout.splitlines()[2:-1]}
    assert rows == {"safetensors": "PASS", "onnx": "PASS", "torchscript": "PASS", "pt2": "PASS"}


def test_cifar_test_data_named_by_parity_json_cannot_run_code(copy: Path, tmp_path: Path) -> None:
    """CIFAR's batches are pickles: planted ones that would run code are refused by the restricted
    unpickler, and the code never runs."""
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"):
        (folder / name).write_bytes(pickle.dumps({"data": Payload(), "labels": [0], "label_names": ["a"]}))
    parity = json.loads((copy / "parity.json").read_text())
    parity["inputs"]["data_source"] = {
        "name": "cifar10",
        "data_dir": str(tmp_path / "data"),
        "target": None,
        "split_seed": 0,
        "val_fraction": 0.2,
    }
    (copy / "parity.json").write_text(json.dumps(parity))
    payloads.rewrite_manifest(copy)
    result = invoke("verify", copy)
    assert result.exit_code != 0
    assert "refused to load io.open" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not marker.exists()


# ----- reading files outside the directory ---------------------------------------------------------
def test_onnx_external_data_is_refused_and_the_secret_never_read(
    copy: Path, export_dir: Path, tmp_path: Path, rows: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = payloads.onnx_external_secret(copy, "secret.txt")
    assert size == len(SECRET)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "secret.txt").write_bytes(SECRET)
    monkeypatch.chdir(cwd)
    # The payload is real: onnxruntime given the bytes reads the secret from the working directory.
    x = {"input": np.zeros((1, 64), dtype=np.float32)}
    tampered = ort.InferenceSession((copy / "model.onnx").read_bytes(), providers=["CPUExecutionProvider"])
    genuine = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    bias = next(t for t in onnx.load(str(export_dir / "model.onnx")).graph.initializer if t.name == "4.bias")
    shift = tampered.run(None, x)[0][0].astype(np.float64) - genuine.run(None, x)[0][0]
    secret_floats = np.frombuffer(SECRET, dtype=np.float32).astype(np.float64)
    np.testing.assert_allclose(shift + onnx.numpy_helper.to_array(bias), secret_floats, rtol=1e-5, atol=1e-5)

    message = "keeps tensor '4.bias' in the external file 'secret.txt'"
    for verify in (True, False):
        with pytest.raises(IntegrityError, match=message):
            OnnxModel(copy, "cpu", verify=verify)
    with pytest.raises(IntegrityError, match=message):
        create_app(copy, "cpu", 8)
    for args in (("predict", copy, "-i", rows), ("predict", copy, "-i", rows, "--no-verify"), ("verify", copy)):
        result = invoke(*args)
        assert result.exit_code == EXIT_CHECK_FAILED, args
        assert message in result.output and SECRET.decode()[:9] not in result.output


@pytest.mark.parametrize("where", ["outside", "inside"])
def test_symlinked_model_is_refused_even_with_no_verify(copy: Path, tmp_path: Path, rows: Path, where: str) -> None:
    target = (tmp_path / "outside.onnx") if where == "outside" else (copy / "real.onnx")
    target.write_bytes((copy / "model.onnx").read_bytes())  # same bytes: the hashes still match
    (copy / "model.onnx").unlink()
    (copy / "model.onnx").symlink_to(target)
    for verify in (True, False):
        with pytest.raises(IntegrityError, match="model.onnx.* is a symbolic link"):
            OnnxModel(copy, "cpu", verify=verify)
    result = invoke("predict", copy, "-i", rows)
    assert result.exit_code == EXIT_CHECK_FAILED and "symbolic link" in result.stderr
    result = invoke("verify", copy)
    assert result.exit_code == EXIT_CHECK_FAILED and "model.onnx is a symbolic link" in result.stderr


def test_symlinked_directory_inside_and_manifest_link_are_refused(copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "notes.txt").write_text("private")
    (copy / "sub").symlink_to(outside, target_is_directory=True)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["sub/notes.txt"] = {"sha256": __import__("hashlib").sha256(b"private").hexdigest(), "size": 7}
    (outside / "manifest.json").write_text(json.dumps(manifest))
    (copy / "manifest.json").unlink()
    (copy / "manifest.json").symlink_to(outside / "manifest.json")
    with pytest.raises(IntegrityError, match="manifest.json.* is a symbolic link"):
        OnnxModel(copy, "cpu")
    (copy / "manifest.json").unlink()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="sub/notes.txt is a symbolic link"):
        OnnxModel(copy, "cpu")


# ----- manifests -----------------------------------------------------------------------------------
def _manifest_cases(outside: Path) -> list[tuple[str, object, str]]:
    """(name, manifest.json content (dict, or bytes as written), words of the one-line error)."""

    def files(entries: dict) -> dict:
        return {"format": "tinydeploy.manifest/1", "files": entries}

    outside_entry = {"sha256": __import__("hashlib").sha256(b"outside").hexdigest(), "size": 7}
    return [
        ("files is a list", files(["model.onnx"]), '"files" is a JSON array, not an object'),
        ("files missing", {"format": "tinydeploy.manifest/1"}, '"files" is missing'),
        ("entry is a string", files({"model.onnx": "abc"}), "files['model.onnx'] is a JSON string"),
        (
            "numeric sha256",
            files({"model.onnx": {"sha256": 123, "size": 1}}),
            "sha256 must be 64 lowercase hex digits, got 123",
        ),
        (
            "size is a string",
            files({"model.onnx": {"sha256": "0" * 64, "size": "9"}}),
            'size must be a non-negative integer, got "9"',
        ),
        ("not a manifest", [1, 2], "is not a tinydeploy manifest"),
        ("truncated", b'{"format": "tinydeploy.manifest/1", "files": {"model.onnx": {"sha2', "is not valid JSON"),
        ("not utf-8", b"\xff\xfe{}", "is not UTF-8 text"),
        ("parent path", files({"../outside.txt": outside_entry}), "'../outside.txt' is not a normalised path inside"),
        ("absolute path", files({str(outside / "outside.txt"): outside_entry}), "is not a relative POSIX path inside"),
        ("dot path", files({"./model.onnx": outside_entry}), "'./model.onnx' is not a normalised path"),
        ("backslash path", files({"..\\outside.txt": outside_entry}), "is not a relative POSIX path inside"),
        ("deep nesting", b"[" * 100000, "is nested too deeply"),
    ]


def test_malformed_manifests_are_one_line_errors_with_the_same_exit_code_everywhere(
    copy: Path, tmp_path: Path, rows: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "outside.txt").write_bytes(b"outside")  # hashes match: refused for the path alone
    for name, content, words in _manifest_cases(outside):
        data = content if isinstance(content, bytes) else json.dumps(content).encode()
        (copy / "manifest.json").write_bytes(data)
        errors = []
        for args in (
            ("verify", copy),
            ("verify", copy, "--hashes-only"),
            ("predict", copy, "-i", rows),
            ("serve", copy, "--port", "0"),
        ):
            result = invoke(*args)
            assert result.exit_code == EXIT_CHECK_FAILED, (name, args, result.output)
            assert result.stdout == "" and len(result.stderr.splitlines()) == 1, (name, args, result.output)
            assert words in result.stderr, (name, args, result.stderr)
            errors.append(result.stderr)
        assert len(set(errors)) == 1, (name, errors)  # the same message from every command


def test_missing_manifest_is_refused_unless_no_verify(copy: Path, rows: Path, tmp_path: Path) -> None:
    (copy / "manifest.json").unlink()
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # tampered weights: nothing can tell once the manifest is gone
    (copy / "model.safetensors").write_bytes(bytes(data))
    for args in (("predict", copy, "-i", rows), ("serve", copy, "--port", "0"), ("verify", copy)):
        result = invoke(*args)
        assert result.exit_code == EXIT_CHECK_FAILED
        assert result.stderr.startswith(
            f"error: {copy} has no manifest.json: pass a directory written by 'tinydeploy export'"
        )
    unverified = invoke("predict", copy, "-i", rows, "--no-verify")
    assert unverified.exit_code == 0
    assert "WARNING: --no-verify" in unverified.stderr and "WITHOUT checking manifest.json" in unverified.stderr


def test_a_model_left_out_of_the_manifest_is_never_loaded(copy: Path, rows: Path) -> None:
    data = bytearray((copy / "model.onnx").read_bytes())
    payloads.rewrite_manifest(copy, drop=("model.onnx",))
    data[len(data) // 2] ^= 0x01
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.onnx is not listed in .*manifest.json"):
        OnnxModel(copy, "cpu")
    result = invoke("verify", copy)
    assert result.exit_code == EXIT_CHECK_FAILED and "model.onnx is not listed in the manifest" in result.stderr


def test_unlisted_files_fail_verify(copy: Path) -> None:
    (copy / "extra.bin").write_bytes(b"planted")
    result = invoke("verify", copy, "--hashes-only")
    assert result.exit_code == EXIT_CHECK_FAILED
    assert result.stderr == f"error: integrity check failed in {copy}: extra.bin is not listed in the manifest\n"


def test_the_bytes_loaded_are_the_bytes_hashed(copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file swapped after the whole-directory check (a race) is refused: the loaded bytes are re-hashed."""
    other = tmp_path / "other"
    shutil.copytree(copy, other)
    payloads.onnx_external_secret(other)  # any different bytes
    real = runtime.verify_manifest

    def check_then_swap(directory, **kwargs):
        manifest = real(directory, **kwargs)
        shutil.copyfile(other / "model.onnx", Path(directory) / "model.onnx")
        return manifest

    monkeypatch.setattr(runtime, "verify_manifest", check_then_swap)
    with pytest.raises(IntegrityError, match="model.onnx changed"):
        OnnxModel(copy, "cpu")


def test_tampered_bytes_are_refused_by_every_command(copy: Path, rows: Path) -> None:
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "model.onnx").write_bytes(bytes(data))
    message = f"error: integrity check failed in {copy}: model.onnx changed (sha256 differs from the manifest)\n"
    for args in (
        ("predict", copy, "-i", rows),
        ("verify", copy),
        ("serve", copy, "--port", "0"),
        ("bench", copy, "--iters", "1"),
    ):
        result = invoke(*args)
        assert (result.exit_code, result.stderr) == (EXIT_CHECK_FAILED, message), args


def test_export_never_writes_a_symlink_or_external_data_itself(export_dir: Path) -> None:
    assert not any(p.is_symlink() for p in export_dir.rglob("*"))
    assert runtime.external_tensors((export_dir / "model.onnx").read_bytes()) == []
    assert os.stat(export_dir).st_mode & 0o777 == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
