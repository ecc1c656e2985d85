"""manifest.json: sha256 and size of every file of an export directory, versions, provenance.

Imports only the standard library (the torch-free serving runtime reuses it).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from tinydeploy.atomic import write_json
from tinydeploy.errors import TinyDeployError

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "tinydeploy.manifest/1"
#: Entries whose name starts with this are in-progress staging areas, never part of an export.
STAGING_PREFIX = ".tinydeploy-staging-"
_PACKAGES = ("tinydeploy", "torch", "onnx", "onnxruntime", "numpy", "safetensors")


class IntegrityError(TinyDeployError):
    """A file of an export directory is missing or differs from its manifest entry."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    files = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if relative.parts[0].startswith(STAGING_PREFIX) or relative.as_posix() == MANIFEST_FILE:
            continue
        if path.is_file():
            files.append(relative.as_posix())
    return files


def build_manifest(directory: str | os.PathLike[str], command: str, source: str) -> dict[str, Any]:
    """The manifest of ``directory`` as it is now."""
    directory = Path(directory)
    return {
        "format": MANIFEST_FORMAT,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "source_run": source,
        "versions": package_versions(),
        "files": {
            name: {"sha256": sha256_file(directory / name), "size": (directory / name).stat().st_size}
            for name in export_files(directory)
        },
    }


def write_manifest(directory: str | os.PathLike[str], command: str, source: str) -> dict[str, Any]:
    """Hash every file of ``directory`` and write manifest.json atomically."""
    manifest = build_manifest(directory, command, source)
    write_json(Path(directory) / MANIFEST_FILE, manifest)
    return manifest


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed manifest.json of an export directory, with a one-line error if absent or foreign."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise TinyDeployError(f"{directory} has no {MANIFEST_FILE}: pass a directory written by 'tinydeploy export'")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{path} is not valid JSON ({exc}): re-run 'tinydeploy export'") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise TinyDeployError(f"{path} is not a tinydeploy manifest: pass a directory written by 'tinydeploy export'")
    return manifest


def verify_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Check every listed file's size and sha256; raise ``IntegrityError`` naming each bad file."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = []
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            problems.append(f"{name} changed (sha256 differs from the manifest)")
    if problems:
        raise IntegrityError(f"integrity check failed in {directory}: {'; '.join(problems)}")
    return manifest
