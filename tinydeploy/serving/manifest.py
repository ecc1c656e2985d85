"""manifest.json: sha256 and size of every file of an export directory, versions, provenance.

A model directory is untrusted input (anyone who can replace it can rewrite its manifest too), so
reading one follows three rules:

* the manifest is parsed strictly: ``files`` maps relative, normalised POSIX paths inside the
  directory (no ``..``, no absolute paths, no empty or ``.`` parts) to ``{"sha256": 64 hex digits,
  "size": int}``; anything else is a one-line ``IntegrityError`` naming the entry;
* every file is opened without following symbolic links (``O_NOFOLLOW`` on every path component,
  relative to a handle on the directory), and must be a regular file;
* a loader gets the bytes it uses from ``read_verified``, which hashes exactly those bytes, so a file
  swapped after the whole-directory check is refused as well.

Imports only the standard library (the torch-free serving runtime reuses it).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import re
import stat
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from tinydeploy.atomic import write_json
from tinydeploy.errors import IntegrityError, TinyDeployError

__all__ = ["IntegrityError"]  # re-exported: it used to live here

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "tinydeploy.manifest/1"
#: Names starting with this are in-progress work of tinydeploy (staging directories beside an
#: export, temporary files inside one), never part of an export.
STAGING_PREFIX = ".tinydeploy-staging-"
#: A manifest larger than this is refused before it is parsed.
MAX_MANIFEST_BYTES = 16 << 20
_PACKAGES = ("tinydeploy", "torch", "onnx", "onnxruntime", "numpy", "safetensors")
#: The largest file ``read_verified`` hands to a loader (a model file is held in memory once).
MAX_FILE_BYTES = 4 << 30
_SHA256 = re.compile(r"[0-9a-f]{64}")
_BLOCK = 1 << 20
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIR_FD = os.open in os.supports_dir_fd and bool(_NOFOLLOW)


# ----- paths and files -----------------------------------------------------------------------------
def check_relative_path(name: Any, where: str = MANIFEST_FILE) -> str:
    """``name`` if it is a relative, normalised POSIX path inside a directory, else an IntegrityError."""
    if not isinstance(name, str) or not name:
        raise IntegrityError(f"{where}: file name {name!r} is not a non-empty string: re-run 'tinydeploy export'")
    if "\\" in name or "\x00" in name or name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise IntegrityError(f"{where}: file name {name!r} is not a relative POSIX path inside the directory: refused")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise IntegrityError(
            f"{where}: file name {name!r} is not a normalised path inside the directory (no '..', '.' or empty parts): refused"
        )
    return name


class FileRefused(IntegrityError):
    """A file of a model directory cannot be read safely; ``reason`` is the short clause."""

    def __init__(self, directory: Path, name: str, reason: str, fix: str = "") -> None:
        super().__init__(f"{name} in {directory} {reason}{': ' + fix if fix else ''}")
        self.name = name
        self.reason = reason


class Unreadable(TinyDeployError):
    """A file of a model directory exists but this user may not read it (not a sign of tampering)."""


def _refusal(directory: Path, name: str, exc: OSError) -> TinyDeployError:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return Unreadable(f"cannot read {directory / name}: permission denied for user {_user()}; make the directory "
                          f"readable by that user (chmod -R a+rX {directory})")
    if exc.errno in (errno.ELOOP, errno.EMLINK) or (exc.errno == errno.ENOTDIR and "/" in name):
        return FileRefused(directory, name, "is a symbolic link (or lies under one)",
                           "tinydeploy reads only regular files inside the model directory; replace the link with the file")
    if exc.errno == errno.ENOENT:
        return FileRefused(directory, name, "is missing")
    return FileRefused(directory, name, f"cannot be read ({exc.strerror or exc})")


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError, AttributeError):
        return "running this process"


def open_inside(directory: str | os.PathLike[str], name: str) -> int:
    """A read-only descriptor of ``directory/name`` opened without following any symbolic link at or
    below ``directory`` (the directory itself may be a link the user named); regular files only."""
    directory = Path(directory)
    check_relative_path(name)
    parts = name.split("/")
    flags = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        if _DIR_FD:
            parent = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
            try:
                for part in parts[:-1]:
                    child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=parent)
                    os.close(parent)
                    parent = child
                fd = os.open(parts[-1], flags, dir_fd=parent)
            finally:
                os.close(parent)
        else:  # no O_NOFOLLOW/dir_fd (Windows): refuse links component by component, then open
            for i in range(1, len(parts) + 1):
                if (directory.joinpath(*parts[:i])).is_symlink():
                    raise OSError(errno.ELOOP, "symbolic link")
            fd = os.open(directory.joinpath(*parts), flags | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise _refusal(directory, name, exc) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileRefused(directory, name, "is not a regular file", "refused")
    return fd


@contextlib.contextmanager
def _opened(directory: str | os.PathLike[str], name: str) -> Iterator[Any]:
    with os.fdopen(open_inside(directory, name), "rb") as handle:
        yield handle


def read_file(directory: str | os.PathLike[str], name: str, limit: int | None = None) -> bytes:
    """The bytes of ``directory/name`` (no symbolic links followed); at most ``limit`` bytes or refused."""
    with _opened(directory, name) as handle:
        data = handle.read() if limit is None else handle.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise FileRefused(Path(directory), name, f"is larger than {limit} bytes", "refused")
    return data


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_file(directory: str | os.PathLike[str], name: str) -> tuple[str, int]:
    """(sha256, size) of ``directory/name``, streamed, without following symbolic links."""
    digest, size = hashlib.sha256(), 0
    with _opened(directory, name) as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def sha256_file(path: Path) -> str:
    """sha256 of a file tinydeploy itself just wrote (no link checks: use ``hash_file`` for inputs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def directory_entries(directory: Path) -> tuple[list[str], list[str]]:
    """(regular files, symbolic links or other non-files) under ``directory`` as relative POSIX paths,
    never descending into links; staging entries of tinydeploy and manifest.json are left out."""
    files, odd = [], []
    for root, dirs, names in os.walk(directory, followlinks=False):
        base = Path(root).relative_to(directory)
        dirs[:] = sorted(d for d in dirs if not d.startswith(STAGING_PREFIX))
        for entry in [*dirs, *sorted(names)]:
            relative = (base / entry).as_posix()
            if entry.startswith(STAGING_PREFIX) or relative == MANIFEST_FILE:
                continue
            mode = os.lstat(Path(root) / entry).st_mode
            if stat.S_ISLNK(mode) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                odd.append(relative)
            elif stat.S_ISREG(mode):
                files.append(relative)
    return sorted(files), sorted(odd)


# ----- writing -------------------------------------------------------------------------------------
def package_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that produce and run the artifacts, and of Python."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        candidates = (name, "onnxruntime-gpu") if name == "onnxruntime" else (name,)
        versions[name] = None
        for candidate in candidates:
            try:
                versions[name] = metadata.version(candidate)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


def export_files(directory: Path) -> list[str]:
    """Relative POSIX paths of every file under ``directory`` except the manifest and staging areas."""
    files, odd = directory_entries(Path(directory))
    if odd:
        raise TinyDeployError(f"{directory} holds {', '.join(odd)}, which are not regular files: nothing to hash")
    return files


def build_manifest(directory: str | os.PathLike[str], command: str, source: str,
                   run_status: str | None = None) -> dict[str, Any]:
    """The manifest of ``directory`` as it is now; ``run_status`` is the status of the exported run
    ("complete", or "interrupted"/"running" for a run exported from a checkpoint)."""
    directory = Path(directory)
    files = {}
    for name in export_files(directory):
        sha256, size = hash_file(directory, name)
        files[name] = {"sha256": sha256, "size": size}
    return {
        "format": MANIFEST_FORMAT,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "source_run": source,
        **({"run_status": run_status} if run_status is not None else {}),
        "versions": package_versions(),
        "files": files,
    }


def write_manifest(directory: str | os.PathLike[str], command: str, source: str,
                   run_status: str | None = None) -> dict[str, Any]:
    """Hash every file of ``directory`` and write manifest.json atomically."""
    manifest = build_manifest(directory, command, source, run_status)
    write_json(Path(directory) / MANIFEST_FILE, manifest)
    return manifest


# ----- reading -------------------------------------------------------------------------------------
def _check_entry(name: str, entry: Any) -> None:
    where = f"{MANIFEST_FILE}: files[{name!r}]"
    if not isinstance(entry, dict):
        raise IntegrityError(f'{where} is a JSON {_kind(entry)}, not an object {{"sha256": ..., "size": ...}}: re-run \'tinydeploy export\'')
    digest, size = entry.get("sha256"), entry.get("size")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise IntegrityError(f"{where}.sha256 must be 64 lowercase hex digits, got {_short(digest)}: re-run 'tinydeploy export'")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise IntegrityError(f"{where}.size must be a non-negative integer, got {_short(size)}: re-run 'tinydeploy export'")


def _kind(value: Any) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null",
            dict: "object"}.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else f"a JSON {_kind(value)}"
    return text if len(text) <= 80 else text[:77] + "..."


def parse_manifest(data: bytes, directory: str | os.PathLike[str] = ".") -> dict[str, Any]:
    """The manifest in ``data``, validated (see the module docstring), or a one-line IntegrityError."""
    path = Path(directory) / MANIFEST_FILE
    try:
        manifest = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise IntegrityError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): re-run 'tinydeploy export'") from None
    except json.JSONDecodeError as exc:
        raise IntegrityError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): the file is truncated or "
            "corrupt; re-run 'tinydeploy export'"
        ) from None
    except RecursionError:
        raise IntegrityError(f"{path} is nested too deeply to be a manifest: refused") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise IntegrityError(f"{path} is not a tinydeploy manifest (no \"format\": \"{MANIFEST_FORMAT}\"): pass a directory written by 'tinydeploy export'")
    files = manifest.get("files")
    if not isinstance(files, dict):
        what = "missing" if files is None else f"a JSON {_kind(files)}"
        raise IntegrityError(f"{path}: \"files\" is {what}, not an object of file entries: re-run 'tinydeploy export'")
    for name, entry in files.items():
        check_relative_path(name, str(path))
        if name == MANIFEST_FILE:
            raise IntegrityError(f"{path} lists itself: refused")
        _check_entry(name, entry)
    return manifest


def read_manifest(directory: str | os.PathLike[str], hint: str = "") -> dict[str, Any]:
    """The validated manifest.json of an export directory; one-line IntegrityError if absent or malformed
    (``hint`` is appended to the message for a missing manifest)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TinyDeployError(f"export directory {directory} does not exist: pass the --out directory of 'tinydeploy export'")
    try:
        data = read_file(directory, MANIFEST_FILE, MAX_MANIFEST_BYTES)
    except FileRefused as exc:
        if exc.reason != "is missing":
            raise
        raise IntegrityError(f"{directory} has no {MANIFEST_FILE}: pass a directory written by 'tinydeploy export'{hint}") from None
    return parse_manifest(data, directory)


def check_entry(directory: Path, manifest: dict[str, Any], name: str, sha256: str, size: int) -> None:
    """Raise unless (sha256, size) is what ``manifest`` records for ``name``."""
    entry = manifest["files"].get(name)
    if entry is None:
        raise IntegrityError(
            f"{name} is not listed in {directory / MANIFEST_FILE}: tinydeploy loads only files the manifest hashes; "
            "re-run 'tinydeploy export'"
        )
    if size != entry["size"] or sha256 != entry["sha256"]:
        raise IntegrityError(f"integrity check failed in {directory}: {name} changed (sha256 differs from the manifest)")


def read_verified(directory: str | os.PathLike[str], manifest: dict[str, Any], name: str) -> bytes:
    """The bytes of ``name``, which must be listed in ``manifest`` and match its sha256 and size.

    Hash exactly the bytes returned: the caller loads these, never the path again.
    """
    directory = Path(directory)
    data = read_file(directory, name, MAX_FILE_BYTES)
    check_entry(directory, manifest, name, sha256_bytes(data), len(data))
    return data


def verify_manifest(directory: str | os.PathLike[str], *, unlisted: bool = False, hint: str = "") -> dict[str, Any]:
    """Check every listed file's size and sha256 (no links followed); raise ``IntegrityError`` naming
    each bad file. With ``unlisted=True`` files and links that the manifest does not list fail too."""
    directory = Path(directory)
    manifest = read_manifest(directory, hint)
    problems = []
    for name, entry in manifest["files"].items():
        try:
            sha256, size = hash_file(directory, name)
        except FileRefused as exc:
            problems.append(f"{name} {exc.reason}")
            continue
        if size != entry["size"] or sha256 != entry["sha256"]:
            problems.append(f"{name} changed (sha256 differs from the manifest)")
    if unlisted:
        files, odd = directory_entries(directory)
        problems += [f"{name} is not listed in the manifest" for name in files if name not in manifest["files"]]
        problems += [f"{name} is a symbolic link or special file" for name in odd if name not in manifest["files"]]
    if problems:
        raise IntegrityError(f"integrity check failed in {directory}: {'; '.join(problems)}")
    return manifest
