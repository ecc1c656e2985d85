"""The run directory written by ``tinydeploy grow`` and read by ``export``, ``report`` and ``--resume``.

Layout::

    checkpoints.jsonl              the commit log: one line per checkpoint (generation, status, epoch,
                                   widths, and how many bytes of each log belong to it), appended
                                   after the checkpoint's file is complete; the last whole line is current
    checkpoints/000042.safetensors one generation, never modified: the weights (``model.*``), the
                                   resume tensors (``resume.*``: optimizer, RNGs, trainer), and in its
                                   metadata the spec, the metrics and the resume state (JSON)
    growth_log.jsonl               append-only: one JSON object per growth event
    history.jsonl                  append-only: one JSON object per progress record
    model.safetensors, arch.json, metrics.json
                                   written when the run stops (complete or interrupted): the last
                                   generation's weights and spec, and its metrics with the history inline
    artifacts/                     the default export directory (``tinydeploy export RUN``)
    seeds/, seeds.json             ``grow --seeds N``: every seed's run, and the spread of their scores
    data.npz                       a run grown on arrays in memory (the scikit-learn estimators): the
                                   arrays, so that export can gate the model on them like on a file

``grow --force`` over a run directory removes all of these (``clear_run_dir``) and nothing else; an
``artifacts/`` that is not an export written by tinydeploy (no manifest.json) is refused instead.

A reader goes through the commit log (``read_run``, ``read_checkpoint``), so weights, spec, metrics,
resume state and logs always belong to the same step. A crash at any instant leaves a complete
commit: a generation file written without its commit line, a half-appended line, or log lines past
the committed length are ignored by readers and removed by ``--resume``. Nothing is ever renamed
or rewritten while the run goes on, so a checkpoint costs one file write and one line append;
the generation before the current one (and the last one flushed to disk) are kept for readers that
are still opening it and for recovery after a power loss.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tinydeploy import __version__
from tinydeploy.atomic import fsync_dir, write_json
from tinydeploy.errors import TinyDeployError
from tinydeploy.model.build import build_model
from tinydeploy.model.serialization import ARCH_FILE, MODEL_FILE, SPEC_KEY, load_model, save_model
from tinydeploy.model.spec import ArchSpec
from tinydeploy.training import crashpoints

GROWTH_LOG_FILE = "growth_log.jsonl"
HISTORY_FILE = "history.jsonl"
METRICS_FILE = "metrics.json"
COMMIT_LOG = "checkpoints.jsonl"
CHECKPOINTS_DIR = "checkpoints"
#: The default export directory of a run, and its manifest (the mark of a directory written by ``export``).
EXPORT_DIR = "artifacts"
EXPORT_MANIFEST = "manifest.json"
#: ``grow --seeds N``: one run directory per seed, and the summary of the seeds.
SEEDS_DIR = "seeds"
SEEDS_FILE = "seeds.json"
#: The arrays of a run grown in memory (``tinydeploy.estimators``), saved with it.
DATA_FILE = "data.npz"
#: Format of the commit log's lines and of the generation files; bumped on incompatible changes.
RUN_FORMAT = "tinydeploy-run/1"
#: Generations kept besides the last durable one: the current one and the one before.
KEEP_GENERATIONS = 2
#: Seconds between commits flushed to disk (fsync); every commit in between survives a killed process.
SYNC_EVERY_S = 60.0
LOGS = (GROWTH_LOG_FILE, HISTORY_FILE)
_METRICS_KEY = "tinydeploy.metrics"
_RESUME_KEY = "tinydeploy.resume"


@dataclass
class Run:
    """A loaded run directory: one consistent generation (``metrics['history']`` read from history.jsonl)."""

    path: Path
    model: nn.Sequential
    spec: ArchSpec
    growth_log: list[dict[str, Any]]
    metrics: dict[str, Any]
    status: str = "complete"
    generation: int | None = None


@dataclass
class Checkpoint:
    """One committed generation with the log records that belong to it."""

    commit: dict[str, Any]
    model: nn.Sequential
    spec: ArchSpec
    metrics: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    growth_log: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


def generation_file(generation: int) -> str:
    return f"{CHECKPOINTS_DIR}/{generation:06d}.safetensors"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


class RunWriter:
    """Writes a run directory: append-only logs, and generations committed by a line of the commit log.

    The stages of a commit are crash points (``tinydeploy.training.crashpoints``): the tests SIGKILL the
    process there and check that readers and ``--resume`` see the previous or the new generation.
    """

    def __init__(self, run_dir: str | os.PathLike[str]):
        self.run_dir = Path(run_dir)
        self.generation = 0
        self.durable = 0  # the last generation flushed to disk
        self._last_sync = float("-inf")
        self._files: dict[str, Any] = {}
        self._lengths = {name: [0, 0] for name in LOGS}  # bytes, lines

    # ----- starting ---------------------------------------------------------------------------
    def start(self) -> None:
        """A new run (the directory was checked to be empty, or --force was given): nothing of an earlier
        run is left (``clear_run_dir``), then empty logs."""
        clear_run_dir(self.run_dir)
        (self.run_dir / CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
        self._open()

    def reopen(self, ckpt: Checkpoint) -> None:
        """Continue from the committed ``ckpt``: drop generations, commit lines and log bytes past it."""
        commit = ckpt.commit
        self.generation = self.durable = int(commit["generation"])
        for name in LOGS:
            entry = commit["logs"][name]
            _truncate(self.run_dir / name, int(entry["bytes"]))
            self._lengths[name] = [int(entry["bytes"]), int(entry["lines"])]
        _truncate(self.run_dir / COMMIT_LOG, int(commit["_end"]))
        current = self.run_dir / generation_file(self.generation)
        for child in (self.run_dir / CHECKPOINTS_DIR).glob("*.safetensors"):
            if child != current:
                child.unlink()
        self._open()
        for path in (current, *(self.run_dir / name for name in (*LOGS, COMMIT_LOG))):
            _fsync_file(path)  # the generation resumed from becomes the durable one
        fsync_dir(current.parent)
        self._last_sync = time.monotonic()

    def _open(self) -> None:
        for name in (*LOGS, COMMIT_LOG):
            self._files[name] = open(self.run_dir / name, "ab", buffering=0)

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    # ----- appending --------------------------------------------------------------------------
    def append(self, log: str, record: dict[str, Any]) -> None:
        """Append one JSON line to ``log`` (growth_log.jsonl or history.jsonl) with one unbuffered write."""
        data = (json.dumps(record) + "\n").encode("utf-8")
        handle = self._files[log]
        if crashpoints.due("append"):  # a kill in the middle of a line
            handle.write(data[: len(data) // 2])
            crashpoints.kill()
        handle.write(data)
        self._lengths[log][0] += len(data)
        self._lengths[log][1] += 1

    # ----- committing -------------------------------------------------------------------------
    def commit(
        self,
        model: nn.Module,
        spec: ArchSpec,
        metrics: dict[str, Any],
        status: str,
        resume: tuple[dict[str, torch.Tensor], dict[str, Any]] | None,
    ) -> int:
        """Write one generation (weights, spec, metrics, resume state of the same step) and commit it.

        Every commit survives a killed process. Commits are also flushed to disk (fsync of the file,
        the logs and the directory) at most every ``SYNC_EVERY_S`` seconds and whenever the status is
        not ``running``; that last durable generation is kept, for recovery after a power loss.
        """
        generation = self.generation + 1
        durable = status != "running" or time.monotonic() - self._last_sync >= SYNC_EVERY_S
        path = self.run_dir / generation_file(generation)
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        metadata = {SPEC_KEY: spec.to_json(), "tinydeploy.version": __version__, "tinydeploy.format": RUN_FORMAT,
                    "tinydeploy.generation": str(generation), _METRICS_KEY: _compact(metrics)}
        if resume is not None:
            tensors.update({f"resume.{k}": v for k, v in resume[0].items()})
            metadata[_RESUME_KEY] = _compact(resume[1])
        write_safetensors(path, tensors, metadata)
        if durable:
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
            for name in LOGS:
                os.fsync(self._files[name].fileno())
            fsync_dir(path.parent)
        crashpoints.point("generation-written")
        widths = metrics.get("final_widths")
        line = {"format": RUN_FORMAT, "generation": generation, "file": generation_file(generation), "status": status,
                "resumable": resume is not None, "epoch": metrics.get("epochs"), "widths": widths,
                "params": metrics.get("params"), "time": round(time.time(), 3),
                "logs": {name: {"bytes": b, "lines": n} for name, (b, n) in self._lengths.items()}}
        data = (_compact(line) + "\n").encode("utf-8")
        commits = self._files[COMMIT_LOG]
        if crashpoints.due("commit-line"):  # a kill in the middle of the commit line
            commits.write(data[: len(data) // 2])
            crashpoints.kill()
        commits.write(data)
        stale = [generation - KEEP_GENERATIONS]
        if durable:
            os.fsync(commits.fileno())
            stale.append(self.durable)
            self.durable, self._last_sync = generation, time.monotonic()
        self.generation = generation
        crashpoints.point("committed")
        for old in stale:
            if 0 < old <= generation - KEEP_GENERATIONS and old != self.durable:
                (self.run_dir / generation_file(old)).unlink(missing_ok=True)
        return generation

    def publish(self, metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """Top-level model.safetensors, arch.json and metrics.json (history inline) of the current generation."""
        ckpt = _load_generation(self.run_dir, {"generation": self.generation, "file": generation_file(self.generation)},
                                resume=False)
        save_model(self.run_dir / MODEL_FILE, ckpt.model, ckpt.spec, {"tinydeploy.kind": "run"})
        write_json(self.run_dir / ARCH_FILE, ckpt.spec.to_dict())
        write_json(self.run_dir / METRICS_FILE, {**metrics, "history": history})


def foreign_export(run_dir: Path) -> str | None:
    """Why ``run_dir/artifacts`` must not be removed by ``grow --force`` (None when it may: absent, empty,
    or an export directory written by tinydeploy)."""
    path = run_dir / EXPORT_DIR
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        return f"{path} is not a directory"
    if path.is_dir() and any(path.iterdir()) and not (path / EXPORT_MANIFEST).is_file():
        return f"{path} holds files but no {EXPORT_MANIFEST}, so no tinydeploy export wrote it"
    return None


def clear_run_dir(run_dir: Path) -> None:
    """Remove everything a run owns in ``run_dir`` (its files, checkpoints, seeds and default export
    directory), nothing else; ``foreign_export`` must have been checked."""
    problem = foreign_export(run_dir)
    if problem:
        raise TinyDeployError(f"{problem}: --force removes only what a run owns; move it out of {run_dir}")
    for name in (COMMIT_LOG, MODEL_FILE, ARCH_FILE, METRICS_FILE, SEEDS_FILE, DATA_FILE, *LOGS):
        (run_dir / name).unlink(missing_ok=True)
    for name in (CHECKPOINTS_DIR, SEEDS_DIR, EXPORT_DIR):
        if (run_dir / name).is_dir() and not (run_dir / name).is_symlink():
            shutil.rmtree(run_dir / name)
    for entry in run_dir.glob(f".tinydeploy-staging-{EXPORT_DIR}-*"):  # leftovers of killed exports
        shutil.rmtree(entry, ignore_errors=True)


_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` in the safetensors format (8-byte header size, JSON header, raw little-endian data).

    ``safetensors.torch.save_file`` spends more time on per-tensor checks than on writing the few small
    tensors of a checkpoint; the files are read back with the safetensors library, which validates them.
    """
    if sys.byteorder != "little":
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
        return
    header: dict[str, Any] = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name, tensor in sorted(tensors.items()):
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little") + encoded + b"".join(blobs))


def _truncate(path: Path, length: int) -> None:
    path.touch()
    with open(path, "r+b") as handle:
        handle.truncate(length)


# ----- reading --------------------------------------------------------------------------------------
def is_run_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` looks like a run directory (a commit log, or the files of an older layout)."""
    path = Path(path)
    return (path / COMMIT_LOG).is_file() or all((path / f).is_file() for f in (MODEL_FILE, ARCH_FILE, METRICS_FILE))


def read_commits(run_dir: Path) -> list[dict[str, Any]]:
    """The whole lines of the commit log, each with ``_end`` (its end offset); a half-written last line is dropped."""
    data = (run_dir / COMMIT_LOG).read_bytes()
    commits, offset = [], 0
    for raw in data.split(b"\n")[:-1]:  # a line is whole only with its newline
        offset += len(raw) + 1
        try:
            line = json.loads(raw)
        except ValueError:
            raise TinyDeployError(f"{run_dir / COMMIT_LOG} is damaged at byte {offset - len(raw) - 1}") from None
        if not isinstance(line, dict) or line.get("format") != RUN_FORMAT:
            written = line.get("format") if isinstance(line, dict) else None
            raise TinyDeployError(
                f"{run_dir} holds a run in format {written!r}; this tinydeploy ({__version__}) reads {RUN_FORMAT!r}: "
                "use the version that wrote it, or start a new run"
            )
        commits.append({**line, "_end": offset})
    return commits


def _split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _load_generation(run_dir: Path, commit: dict[str, Any], resume: bool) -> Checkpoint:
    path = run_dir / commit["file"]
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    tensors = load_file(str(path))
    spec = ArchSpec.from_json(metadata[SPEC_KEY])
    model = build_model(spec)
    model.load_state_dict(_split_prefix(tensors, "model."), strict=True)
    state = json.loads(metadata[_RESUME_KEY]) if resume and _RESUME_KEY in metadata else {}
    return Checkpoint(commit, model.eval(), spec, json.loads(metadata[_METRICS_KEY]),
                      _split_prefix(tensors, "resume.") if resume else {}, state)


def read_checkpoint(run_dir: str | os.PathLike[str], resume: bool = False) -> Checkpoint:
    """The newest committed generation that can be read, with its log records.

    A generation that cannot be read because the writer committed twice meanwhile (and removed it)
    sends the reader to the new end of the commit log; one that cannot be read otherwise (lost in a
    power loss) to the commit before it, which ``notices`` reports.
    """
    run_dir = Path(run_dir)
    notices: list[str] = []
    skipped = 0  # unreadable commits at the end of the log
    for _attempt in range(1000):
        commits = read_commits(run_dir)
        if skipped >= len(commits):
            break
        commit = commits[len(commits) - 1 - skipped]
        try:
            ckpt = _load_generation(run_dir, commit, resume)
            ckpt.growth_log = read_log(run_dir / GROWTH_LOG_FILE, commit["logs"][GROWTH_LOG_FILE])
            ckpt.history = read_log(run_dir / HISTORY_FILE, commit["logs"][HISTORY_FILE])
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError, TinyDeployError) as exc:
            if len(read_commits(run_dir)) != len(commits):
                skipped = 0  # the writer moved on: read the new end of the commit log
                continue
            notices.append(f"generation {commit['generation']} cannot be read ({exc})")
            skipped += 1
            continue
        ckpt.notices = notices
        return ckpt
    if not notices:
        raise TinyDeployError(f"{run_dir / COMMIT_LOG} holds no checkpoint yet")
    raise TinyDeployError(f"no checkpoint of {run_dir} can be read ({notices[0]}): the run directory is damaged")


def read_log(path: Path, length: dict[str, int]) -> list[dict[str, Any]]:
    """The first ``length['lines']`` records of an append-only log (its first ``length['bytes']`` bytes)."""
    wanted = int(length["bytes"])
    data = b""
    if path.is_file():
        with open(path, "rb") as handle:
            data = handle.read(wanted)
    if len(data) < wanted:
        raise TinyDeployError(f"{path} holds {len(data)} bytes but its checkpoint says {wanted}: the log was truncated")
    records = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    if len(records) != int(length["lines"]):
        raise TinyDeployError(f"{path}: {len(records)} records where its checkpoint says {length['lines']}")
    return records


def read_run(run_dir: str | os.PathLike[str]) -> Run:
    """Load a run directory (one consistent generation), with a one-line error if it is missing or foreign."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TinyDeployError(f"run directory {run_dir} does not exist: pass the --out directory of 'tinydeploy grow'")
    if (run_dir / COMMIT_LOG).is_file():
        ckpt = read_checkpoint(run_dir)
        metrics = {**ckpt.metrics, "history": ckpt.history}
        return Run(run_dir, ckpt.model, ckpt.spec, ckpt.growth_log, metrics, ckpt.commit["status"],
                   ckpt.commit["generation"])
    missing = [f for f in (MODEL_FILE, ARCH_FILE, METRICS_FILE) if not (run_dir / f).is_file()]
    if missing:
        raise TinyDeployError(
            f"{run_dir} is not a tinydeploy run directory (missing {', '.join(missing)}): "
            "pass the --out directory of 'tinydeploy grow'"
        )
    model, spec = load_model(run_dir / MODEL_FILE)
    log_path = run_dir / GROWTH_LOG_FILE
    log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.exists() else []
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    return Run(run_dir, model, spec, log, metrics, metrics.get("status", "complete"))


def write_run(
    run_dir: str | os.PathLike[str],
    model: nn.Module,
    spec: ArchSpec,
    growth_log: list[dict[str, Any]],
    metrics: dict[str, Any],
) -> Path:
    """Write a complete (not resumable) run directory of one generation: for a model trained elsewhere."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    history = list(metrics.get("history", []))
    summary = {k: v for k, v in metrics.items() if k != "history"}
    writer = RunWriter(run_dir)
    writer.start()
    try:
        for event in growth_log:
            writer.append(GROWTH_LOG_FILE, event)
        for record in history:
            writer.append(HISTORY_FILE, record)
        writer.commit(model, spec, summary, "complete", None)
        writer.publish(summary, history)
    finally:
        writer.close()
    return run_dir
