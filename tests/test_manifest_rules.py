"""serving.manifest on real files: path rules, no-follow reads, strict parsing, every message exact."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import pwd
import re
import threading
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pytest

from tinydeploy.errors import IntegrityError, TinyDeployError
from tinydeploy.serving import manifest as mf
from tinydeploy.serving.manifest import (
    FileRefused,
    Unreadable,
    build_manifest,
    check_entry,
    check_relative_path,
    directory_entries,
    export_files,
    hash_file,
    open_inside,
    package_versions,
    parse_manifest,
    read_file,
    read_manifest,
    read_verified,
    sha256_bytes,
    sha256_file,
    verify_manifest,
    write_manifest,
)

SHA = "ab" * 32


def _tree(root: Path) -> Path:
    """a.bin (2.5 blocks of hashing), sub/b.json, sub/deeper/c.txt."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.bin").write_bytes(bytes(range(256)) * (10 * 1024 + 3))
    (root / "sub" / "b.json").write_text('{"b": 1}')
    (root / "sub" / "deeper" / "c.txt").write_text("c")
    return root


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ----- paths ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [None, 1, "", ["a"]])
def test_a_file_name_must_be_a_non_empty_string(name) -> None:
    with pytest.raises(IntegrityError) as info:
        check_relative_path(name)
    assert str(info.value) == f"manifest.json: file name {name!r} is not a non-empty string: re-run 'tinydeploy export'"


@pytest.mark.parametrize("name", ["a\\b", "a\x00b", "/etc/passwd", "C:x", "c:/x", "Z:"])
def test_absolute_and_foreign_paths_are_refused(name: str) -> None:
    with pytest.raises(IntegrityError) as info:
        check_relative_path(name, "where")
    assert str(info.value) == f"where: file name {name!r} is not a relative POSIX path inside the directory: refused"


@pytest.mark.parametrize("name", ["a//b", "./a", "a/.", "..", "a/../b", "a/", "."])
def test_unnormalised_paths_are_refused(name: str) -> None:
    with pytest.raises(IntegrityError) as info:
        check_relative_path(name)
    assert str(info.value) == (f"manifest.json: file name {name!r} is not a normalised path inside the directory "
                               "(no '..', '.' or empty parts): refused")


@pytest.mark.parametrize("name", ["a", "sub/b.json", "a..b", ".hidden", "xy:z", "1:2"])
def test_relative_normalised_paths_pass_unchanged(name: str) -> None:
    assert check_relative_path(name) == name


# ----- opening files -------------------------------------------------------------------------------
def test_reads_files_inside_nested_directories_without_leaking_descriptors(tmp_path: Path) -> None:
    root = _tree(tmp_path / "d")
    before = _open_fds()
    for _ in range(20):
        assert read_file(root, "sub/deeper/c.txt") == b"c"
        assert read_file(root, "sub/b.json", limit=8) == b'{"b": 1}'
        with pytest.raises(FileRefused):
            read_file(root, "sub/missing/c.txt")
        with pytest.raises(FileRefused):
            read_file(root, "sub")
    assert _open_fds() == before
    fd = open_inside(root, "a.bin")
    try:
        assert os.read(fd, 4) == bytes(range(4))
        assert os.get_inheritable(fd) is False  # O_CLOEXEC
    finally:
        os.close(fd)


def test_the_directory_itself_may_be_a_link(tmp_path: Path) -> None:
    root = _tree(tmp_path / "d")
    (tmp_path / "link").symlink_to(root)
    assert read_file(tmp_path / "link", "sub/b.json") == b'{"b": 1}'
    assert hash_file(str(tmp_path / "link"), "sub/b.json") == (hashlib.sha256(b'{"b": 1}').hexdigest(), 8)


def test_a_read_limit_is_exact(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 10)
    assert read_file(tmp_path, "f", limit=10) == b"x" * 10
    assert read_file(tmp_path, "f") == b"x" * 10
    with pytest.raises(FileRefused) as info:
        read_file(tmp_path, "f", limit=9)
    assert str(info.value) == f"f in {tmp_path} is larger than 9 bytes: refused"
    assert (info.value.name, info.value.reason) == ("f", "is larger than 9 bytes")


def test_links_missing_and_special_files_are_refused_by_reason(tmp_path: Path) -> None:
    root = _tree(tmp_path / "d")
    (tmp_path / "secret").write_text("secret")
    (root / "link").symlink_to(tmp_path / "secret")
    (root / "dirlink").symlink_to(root / "sub")
    link = "is a symbolic link (or lies under one): tinydeploy reads only regular files inside the model directory; " \
           "replace the link with the file"
    cases = {
        "link": link,
        "dirlink/b.json": link,
        "a.bin/x": link,  # ENOTDIR under a path: treated as a link component
        "missing": "is missing",
        "sub/missing": "is missing",
        "sub": "is not a regular file: refused",
        "x" * 300: "cannot be read (File name too long)",
    }
    for name, words in cases.items():
        with pytest.raises(FileRefused) as info:
            read_file(root, name)
        assert str(info.value) == f"{name} in {root} {words}", name
        assert info.value.name == name
    with pytest.raises(IntegrityError, match="not a normalised path"):
        open_inside(root, "sub/../a.bin")


@pytest.mark.parametrize(("name", "words"), [("fifo", "is not a regular file: refused"),
                                              ("fifo/x", "is a symbolic link (or lies under one)")])
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path, name: str, words: str) -> None:
    os.mkfifo(tmp_path / "fifo")
    assert _refusal_in_time(tmp_path, name).startswith(f"{name} in {tmp_path} {words}")


def _refusal_in_time(root: Path, name: str) -> str:
    """The refusal of ``read_file(root, name)``; fails the test if the read blocks (``root/fifo`` waiting)."""
    found: list[Exception] = []

    def read() -> None:
        try:
            read_file(root, name)
        except FileRefused as exc:
            found.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(2.0)
    if reader.is_alive():  # open() waits for a writer: be one, so that the thread ends, and fail
        os.close(os.open(root / "fifo", os.O_WRONLY))
        reader.join(2.0)
        pytest.fail("opening a FIFO of the model directory blocked until a writer came")
    assert len(found) == 1
    return str(found[0])


def test_a_huge_file_is_refused_by_its_size_without_being_read(tmp_path: Path) -> None:
    with open(tmp_path / "huge", "wb") as handle:
        handle.truncate(1 << 40)  # 1 TiB, sparse: reading it whole would need 1 TiB of memory
    with pytest.raises(FileRefused, match="is larger than 100 bytes"):
        read_file(tmp_path, "huge", limit=100)


def test_without_dir_fd_links_are_refused_component_by_component(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    """The path of systems without O_NOFOLLOW/dir_fd (Windows), run here on real files."""
    monkeypatch.setattr(mf, "_DIR_FD", False)
    root = _tree(tmp_path / "d")
    (root / "dirlink").symlink_to(root / "sub")
    (root / "link").symlink_to(root / "a.bin")
    (root / "sub" / "deeper" / "clink").symlink_to(root / "a.bin")
    (tmp_path / "rootlink").symlink_to(root)
    assert read_file(root, "sub/deeper/c.txt") == b"c" == read_file(tmp_path / "rootlink", "sub/deeper/c.txt")
    assert read_file(root, "a.bin", limit=4 << 20)[:3] == bytes(range(3))
    link = "is a symbolic link (or lies under one): tinydeploy reads only regular files inside the model directory; " \
           "replace the link with the file"
    for name in ("dirlink/b.json", "link", "sub/deeper/clink", "dirlink/deeper/c.txt"):
        with pytest.raises(FileRefused) as info:
            read_file(root, name)
        assert str(info.value) == f"{name} in {root} {link}", name
    with pytest.raises(FileRefused, match="is missing"):
        read_file(root, "sub/nope")
    os.mkfifo(root / "fifo")
    assert _refusal_in_time(root, "fifo") == f"fifo in {root} is not a regular file: refused"


def test_an_unreadable_file_names_the_user_and_the_fix(tmp_path: Path) -> None:
    user = pwd.getpwuid(os.geteuid()).pw_name
    for code in (errno.EACCES, errno.EPERM):
        refusal = mf._refusal(tmp_path, "model.onnx", OSError(code, os.strerror(code)))
        assert isinstance(refusal, Unreadable) and not isinstance(refusal, IntegrityError)
        assert str(refusal) == (f"cannot read {tmp_path / 'model.onnx'}: permission denied for user {user}; make the "
                                f"directory readable by that user (chmod -R a+rX {tmp_path})")
    assert mf._user() == user
    loop = mf._refusal(tmp_path, "m", OSError(errno.EMLINK, "too many links"))
    assert loop.reason == "is a symbolic link (or lies under one)"
    flat = mf._refusal(tmp_path, "m", OSError(errno.ENOTDIR, "not a directory"))
    assert flat.reason == "cannot be read (not a directory)"
    bare = mf._refusal(tmp_path, "m", OSError(errno.EIO, None))
    assert bare.reason.startswith("cannot be read (") and bare.reason != "cannot be read (None)"


def test_a_user_without_a_passwd_entry_is_described(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 2**31 - 7)  # a container user with no name
    with pytest.raises(KeyError):
        pwd.getpwuid(2**31 - 7)
    assert mf._user() == "running this process"


def test_file_refused_message_with_and_without_a_fix(tmp_path: Path) -> None:
    assert str(FileRefused(tmp_path, "n", "is odd")) == f"n in {tmp_path} is odd"
    assert str(FileRefused(tmp_path, "n", "is odd", "fix it")) == f"n in {tmp_path} is odd: fix it"


# ----- hashing and listing -------------------------------------------------------------------------
def test_hashes_are_streamed_over_blocks_and_exact(tmp_path: Path) -> None:
    root = _tree(tmp_path / "d")
    data = (root / "a.bin").read_bytes()
    assert len(data) > 2 * (1 << 20)
    expected = hashlib.sha256(data).hexdigest()
    assert hash_file(root, "a.bin") == (expected, len(data))
    assert sha256_file(root / "a.bin") == expected == sha256_bytes(data)
    (root / "empty").write_bytes(b"")
    assert hash_file(root, "empty") == (hashlib.sha256(b"").hexdigest(), 0)


def test_directory_entries_skip_staging_and_the_manifest_and_never_follow_links(tmp_path: Path) -> None:
    root = _tree(tmp_path / "d")
    (root / "manifest.json").write_text("{}")
    (root / "sub" / "manifest.json").write_text("{}")  # only the top-level manifest is left out
    (root / f"{mf.STAGING_PREFIX}x").mkdir()
    (root / f"{mf.STAGING_PREFIX}x" / "inside").write_text("i")
    (root / f"{mf.STAGING_PREFIX}tmp").write_text("t")
    (root / "sub" / f"{mf.STAGING_PREFIX}y").write_text("t")
    (root / "zlink").symlink_to(root / "sub")
    (root / "flink").symlink_to(root / "a.bin")
    os.mkfifo(root / "sub" / "fifo")
    files, odd = directory_entries(root)
    assert files == ["a.bin", "sub/b.json", "sub/deeper/c.txt", "sub/manifest.json"]
    assert odd == ["flink", "sub/fifo", "zlink"]
    with pytest.raises(TinyDeployError) as info:
        export_files(root)
    assert str(info.value) == f"{root} holds flink, sub/fifo, zlink, which are not regular files: nothing to hash"
    for name in odd:
        os.unlink(root / name)
    assert export_files(root) == files


def test_package_versions_are_the_installed_ones() -> None:
    versions = package_versions()
    assert list(versions) == ["python", "tinydeploy", "torch", "onnx", "onnxruntime", "numpy", "safetensors"]
    assert versions["python"] == platform.python_version()
    for name in ("tinydeploy", "numpy", "onnx", "safetensors"):
        assert versions[name] == metadata.version(name)
    ort = versions["onnxruntime"]
    assert ort is not None and ort in {_installed("onnxruntime"), _installed("onnxruntime-gpu")}


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def test_the_gpu_wheel_of_onnxruntime_is_recorded_as_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    installed = metadata.version

    def version(name: str) -> str:  # a machine with onnxruntime-gpu 9.9 instead of onnxruntime
        if name == "onnxruntime":
            raise metadata.PackageNotFoundError(name)
        return "9.9" if name == "onnxruntime-gpu" else installed(name)

    monkeypatch.setattr(mf.metadata, "version", version)
    versions = package_versions()
    assert versions["onnxruntime"] == "9.9" and versions["numpy"] == installed("numpy")
    monkeypatch.setattr(mf, "_PACKAGES", ("onnxruntime", "no-such-package-tinydeploy"))
    assert package_versions()["no-such-package-tinydeploy"] is None  # only onnxruntime has a second wheel name


def test_a_missing_package_is_recorded_as_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mf, "_PACKAGES", ("numpy", "no-such-package-tinydeploy", "onnxruntime"))
    versions = package_versions()
    assert versions["no-such-package-tinydeploy"] is None and versions["numpy"] == metadata.version("numpy")
    assert versions["onnxruntime"] is not None


# ----- writing -------------------------------------------------------------------------------------
def test_write_manifest_records_every_file_and_reads_back(tmp_path: Path) -> None:
    root = _tree(tmp_path / "d")
    before = datetime.now(timezone.utc).replace(microsecond=0)
    written = write_manifest(root, "tinydeploy export run", "/runs/a", run_status="interrupted")
    assert json.loads((root / "manifest.json").read_text()) == written
    assert list(written) == ["format", "created_utc", "command", "source_run", "run_status", "versions", "files"]
    assert written["format"] == "tinydeploy.manifest/1"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", written["created_utc"])
    assert before <= datetime.fromisoformat(written["created_utc"]) <= datetime.now(timezone.utc)
    assert (written["command"], written["source_run"], written["run_status"]) == ("tinydeploy export run", "/runs/a",
                                                                                   "interrupted")
    assert written["versions"] == package_versions()
    assert written["files"] == {name: {"sha256": hashlib.sha256((root / name).read_bytes()).hexdigest(),
                                       "size": (root / name).stat().st_size}
                                for name in ("a.bin", "sub/b.json", "sub/deeper/c.txt")}
    assert "run_status" not in build_manifest(root, "c", "s")
    assert verify_manifest(root, unlisted=True) == written
    assert read_manifest(root) == written


# ----- reading -------------------------------------------------------------------------------------
def _manifest(files) -> bytes:
    return json.dumps({"format": "tinydeploy.manifest/1", "files": files}).encode()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ([], 'is a JSON array, not an object {"sha256": ..., "size": ...}'),
        ("x", "is a JSON string, not an object"),
        (3, "is a JSON number, not an object"),
        (3.5, "is a JSON number, not an object"),
        (True, "is a JSON boolean, not an object"),
        (None, "is a JSON null, not an object"),
        ({"size": 1}, ".sha256 must be 64 lowercase hex digits, got null"),
        ({"sha256": "AB" * 32, "size": 1}, f'.sha256 must be 64 lowercase hex digits, got "{"AB" * 32}"'),
        ({"sha256": SHA[:-1], "size": 1}, ".sha256 must be 64 lowercase hex digits"),
        ({"sha256": SHA + "0", "size": 1}, ".sha256 must be 64 lowercase hex digits"),
        ({"sha256": 5, "size": 1}, ".sha256 must be 64 lowercase hex digits, got 5"),
        ({"sha256": ["x"], "size": 1}, ".sha256 must be 64 lowercase hex digits, got a JSON array"),
        ({"sha256": "g" * 64, "size": 1}, ".sha256 must be 64 lowercase hex digits"),
        ({"sha256": "x" * 100, "size": 1}, f'.sha256 must be 64 lowercase hex digits, got "{"x" * 76}...'),
        ({"sha256": SHA}, ".size must be a non-negative integer, got null"),
        ({"sha256": SHA, "size": -1}, ".size must be a non-negative integer, got -1"),
        ({"sha256": SHA, "size": True}, ".size must be a non-negative integer, got true"),
        ({"sha256": SHA, "size": 1.0}, ".size must be a non-negative integer, got 1.0"),
        ({"sha256": SHA, "size": "1"}, '.size must be a non-negative integer, got "1"'),
        ({"sha256": SHA, "size": {"a": 1}}, ".size must be a non-negative integer, got a JSON object"),
    ],
)
def test_each_bad_entry_is_named_exactly(entry, message: str) -> None:
    with pytest.raises(IntegrityError) as info:
        parse_manifest(_manifest({"model.onnx": entry}))
    text = str(info.value)
    assert text.startswith("manifest.json: files['model.onnx']") and message in text
    assert text.endswith(": re-run 'tinydeploy export'") and "\n" not in text


def test_short_keeps_80_characters_and_cuts_longer_ones() -> None:
    assert mf._short("x" * 78) == json.dumps("x" * 78)  # 80 characters with its quotes
    assert mf._short("x" * 79) == '"' + "x" * 76 + "..."
    assert mf._kind(b"x") == "bytes" and mf._kind({}) == "object"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"a": "\xff"}', "is not UTF-8 text (invalid start byte at byte 7): re-run 'tinydeploy export'"),
        (b'{"format": ', ("is not valid JSON (Expecting value at line 1 column 12): the file is truncated or corrupt; "
                        "re-run 'tinydeploy export'")),
        (b"\n\n  [}", "is not valid JSON (Expecting value at line 3 column 4)"),
        (b"[" * 200_000 + b"]" * 200_000, "is nested too deeply to be a manifest: refused"),
        (b"[]", ('is not a tinydeploy manifest (no "format": "tinydeploy.manifest/1"): pass a directory written by '
                "'tinydeploy export'")),
        (b'{"format": "tinydeploy.manifest/2", "files": {}}', "is not a tinydeploy manifest"),
        (b'{"format": "tinydeploy.manifest/1"}', (': "files" is missing, not an object of file entries: re-run '
                                                "'tinydeploy export'")),
        (b'{"format": "tinydeploy.manifest/1", "files": [1]}', ': "files" is a JSON array, not an object'),
        (b'{"format": "tinydeploy.manifest/1", "files": null}', ': "files" is missing'),
        (_manifest({"manifest.json": {"sha256": SHA, "size": 1}}), " lists itself: refused"),
        (_manifest({"../x": {"sha256": SHA, "size": 1}}), ": file name '../x' is not a normalised path"),
    ],
)
def test_malformed_manifests_are_one_line_errors(data: bytes, message: str, tmp_path: Path) -> None:
    with pytest.raises(IntegrityError) as info:
        parse_manifest(data, tmp_path)
    text = str(info.value)
    assert text.startswith(str(tmp_path / "manifest.json")) and message in text and "\n" not in text


def test_parse_manifest_defaults_to_the_current_directory() -> None:
    with pytest.raises(IntegrityError, match=r"^manifest\.json lists itself"):
        parse_manifest(_manifest({"manifest.json": {"sha256": SHA, "size": 1}}))
    good = _manifest({"a": {"sha256": SHA, "size": 0}, "b/c": {"sha256": SHA, "size": 7}})
    assert parse_manifest(good)["files"]["b/c"] == {"sha256": SHA, "size": 7}


def test_read_manifest_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TinyDeployError) as info:
        read_manifest(tmp_path / "nope")
    assert not isinstance(info.value, IntegrityError)
    assert str(info.value) == (f"export directory {tmp_path / 'nope'} does not exist: pass the --out directory of "
                               "'tinydeploy export'")
    with pytest.raises(IntegrityError) as info:
        read_manifest(tmp_path, " (hint)")
    assert str(info.value) == f"{tmp_path} has no manifest.json: pass a directory written by 'tinydeploy export' (hint)"
    for read in (read_manifest, verify_manifest):  # no hint by default
        with pytest.raises(IntegrityError) as info:
            read(tmp_path)
        assert str(info.value) == f"{tmp_path} has no manifest.json: pass a directory written by 'tinydeploy export'"
    (tmp_path / "manifest.json").write_bytes(b"[]")
    with pytest.raises(IntegrityError, match=rf"^{re.escape(str(tmp_path / 'manifest.json'))} is not a tinydeploy "):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "real.json").write_bytes(_manifest({}))
    (tmp_path / "manifest.json").symlink_to(tmp_path / "real.json")
    with pytest.raises(FileRefused, match="manifest.json in .* is a symbolic link"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "manifest.json").write_bytes(_manifest({}) + b" " * 100)
    monkeypatch.setattr(mf, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(FileRefused, match=r"manifest\.json in .* is larger than 100 bytes: refused"):
        read_manifest(tmp_path)
    monkeypatch.setattr(mf, "MAX_MANIFEST_BYTES", len(_manifest({})) + 100)
    assert read_manifest(tmp_path)["files"] == {}
    assert mf.MAX_MANIFEST_BYTES > 0 and mf.MAX_FILE_BYTES == 4 << 30


def test_check_entry_and_read_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _tree(tmp_path / "d")
    manifest = write_manifest(root, "c", "s")
    assert read_verified(root, manifest, "sub/b.json") == b'{"b": 1}'
    with pytest.raises(IntegrityError) as info:
        read_verified(root, manifest, "manifest.json")
    assert str(info.value) == (f"manifest.json is not listed in {root / 'manifest.json'}: tinydeploy loads only files "
                               "the manifest hashes; re-run 'tinydeploy export'")
    entry = manifest["files"]["sub/b.json"]
    check_entry(root, manifest, "sub/b.json", entry["sha256"], entry["size"])
    changed = f"integrity check failed in {root}: sub/b.json changed (sha256 differs from the manifest)"
    for sha256, size in ((entry["sha256"], entry["size"] + 1), (SHA, entry["size"])):
        with pytest.raises(IntegrityError) as info:
            check_entry(root, manifest, "sub/b.json", sha256, size)
        assert str(info.value) == changed
    (root / "sub" / "b.json").write_text('{"b": 2}')  # same size, other bytes
    with pytest.raises(IntegrityError, match=re.escape(changed)):
        read_verified(root, manifest, "sub/b.json")
    monkeypatch.setattr(mf, "MAX_FILE_BYTES", 7)
    with pytest.raises(FileRefused, match="is larger than 7 bytes"):
        read_verified(root, manifest, "sub/b.json")


def test_verify_manifest_names_every_problem_in_one_line(tmp_path: Path) -> None:
    root = _tree(tmp_path / "d")
    manifest = write_manifest(root, "c", "s")
    assert verify_manifest(root) == manifest
    (root / "sub" / "b.json").write_text('{"b": 2}')  # same size
    (root / "sub" / "deeper" / "c.txt").unlink()
    (root / "sub" / "deeper" / "c.txt").symlink_to(root / "a.bin")
    (root / "extra").write_text("e")
    (root / "elink").symlink_to(root / "a.bin")
    listed = (f"integrity check failed in {root}: sub/b.json changed (sha256 differs from the manifest); "
              "sub/deeper/c.txt is a symbolic link (or lies under one)")
    with pytest.raises(IntegrityError) as info:
        verify_manifest(root)
    assert str(info.value) == listed
    with pytest.raises(IntegrityError) as info:
        verify_manifest(root, unlisted=True)
    assert str(info.value) == listed + "; extra is not listed in the manifest; elink is a symbolic link or special file"
    (root / "a.bin").write_bytes((root / "a.bin").read_bytes() + b"!")
    with pytest.raises(IntegrityError, match=r": a\.bin changed \(sha256 differs from the manifest\); sub/b\.json"):
        verify_manifest(root)
    (root / "a.bin").unlink()
    with pytest.raises(IntegrityError, match=r": a\.bin is missing; sub/b\.json changed"):
        verify_manifest(root, hint=" (h)")
