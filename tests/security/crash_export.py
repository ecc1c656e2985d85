"""Kill ``export_run`` with SIGKILL at every step that changes the file system, and report what is left.

Usage: ``python crash_export.py RUN_DIR WORK_DIR``. The process imports torch once, writes two
reference exports of RUN_DIR (old: with the standardisation baked in; new: without, so every file
differs), then for each kill point forks a child that re-exports over a copy of the old export at
WORK_DIR/artifacts and SIGKILLs itself right before (or, for the last, right after) the k-th call of
``os.replace``, ``os.rename``, ``tinydeploy.atomic.exchange`` or ``shutil.rmtree`` — every rename,
swap and delete of the publishing path. After each kill it prints one JSON line: the event, whether
the child died by SIGKILL, what a reader finds at WORK_DIR/artifacts ("old", "new", "mixed",
"missing" or "refused: ..."), and the staging entries left beside it; a "next_run" line reports a
normal export run after a kill that left a complete staging directory behind. The same points are
then replayed with the atomic exchange reported unavailable (the two-rename fallback).

Only safetensors is exported (a second per export instead of several for ONNX): publishing does not
depend on the formats.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import torch

import tinydeploy.atomic
from tinydeploy.errors import IntegrityError
from tinydeploy.export.artifacts import INPUTS_KEY
from tinydeploy.export.pipeline import export_run, remove_stale_staging
from tinydeploy.model.serialization import metadata_from_bytes
from tinydeploy.serving.manifest import STAGING_PREFIX, verify_manifest

HOOKED = (
    ("os.replace", os, "replace"),
    ("os.rename", os, "rename"),
    ("exchange", tinydeploy.atomic, "exchange"),
    ("shutil.rmtree", shutil, "rmtree"),
)


def _hook(kill_at: int, after: bool, log: list[str], renames: bool = False) -> None:
    """Count calls of the hooked functions; SIGKILL this process at call ``kill_at``. With ``renames``
    the atomic exchange is reported as unavailable, so publishing takes its two-rename fallback."""
    if renames:
        tinydeploy.atomic.exchange = lambda a, b: False
    for name, owner, attribute in HOOKED:
        real = getattr(owner, attribute)

        def call(*args: Any, _real: Callable[..., Any] = real, _name: str = name, **kwargs: Any) -> Any:
            log.append(f"{_name} {Path(str(args[0])).name}")
            if len(log) == kill_at and not after:
                os.kill(os.getpid(), signal.SIGKILL)
            result = _real(*args, **kwargs)
            if len(log) == kill_at and after:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(owner, attribute, call)


def _export(run_dir: Path, out: Path) -> None:
    export_run(run_dir, out, formats=(), preprocessing=False, command="crash test", force=True)


def _in_child(target: Callable[[], Any]) -> tuple[int, str]:
    """Run ``target`` in a forked child; (raw wait status, the child's last line on the pipe)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        code = 0
        try:
            result = target()
            os.write(write, (json.dumps(result) + "\n").encode())
        except BaseException as exc:  # report, never run the parent's code in the child
            os.write(write, (json.dumps(f"{type(exc).__name__}: {exc}") + "\n").encode())
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read().strip()
    _, status = os.waitpid(pid, 0)
    return status, text


def fingerprint(directory: Path) -> dict[str, Any]:
    """The files of a verified export (a manifest whose every entry matches), by content.

    safetensors writes its metadata in no fixed order, so model.safetensors counts by what it says
    (the raw or standardised inputs that tell the old export from the new one), every other file by
    its sha256."""
    files = verify_manifest(directory, unlisted=True)["files"]
    found = {name: entry["sha256"] for name, entry in files.items() if name != "model.safetensors"}
    found["model.safetensors"] = metadata_from_bytes((directory / "model.safetensors").read_bytes())[INPUTS_KEY]
    return found


def state(out: Path, old: dict[str, Any], new: dict[str, Any]) -> str:
    """What a reader of ``out`` finds: the whole old export, the whole new one, or something refused."""
    if not out.exists():
        return "missing"
    try:
        found = fingerprint(out)
    except IntegrityError as exc:
        return f"refused: {exc}"
    return "old" if found == old else "new" if found == new else "mixed"


def main(run_dir: Path, work: Path) -> None:
    torch.set_num_threads(1)
    out = work / "artifacts"
    references = {}
    for name, preprocessing in (("old", True), ("new", False)):
        export_run(run_dir, work / f"reference-{name}", formats=(), preprocessing=preprocessing, command="crash test")
        references[name] = fingerprint(work / f"reference-{name}")

    def reset() -> None:
        for entry in work.iterdir():
            if entry.name.startswith(STAGING_PREFIX) or entry == out:
                shutil.rmtree(entry)
        shutil.copytree(work / "reference-old", out)

    def leftovers() -> list[str]:
        return sorted(e.name for e in work.iterdir() if e.name.startswith(STAGING_PREFIX))

    def kill(kill_at: int, after: bool, renames: bool) -> int:
        reset()
        status, _ = _in_child(lambda: (_hook(kill_at, after, [], renames), _export(run_dir, out)))  # called at once
        return status

    def dry_run(renames: bool) -> list[str]:
        log: list[str] = []
        _hook(0, False, log, renames)
        _export(run_dir, out)
        return log

    for renames in (False, True):
        reset()
        status, text = _in_child(lambda: dry_run(renames))  # noqa: B023  (called at once)
        events = json.loads(text)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, text
        # the first write into staging, then every step from the manifest on, and right after the last
        manifest = next(i for i, e in enumerate(events) if "manifest.json" in e) + 1
        steps = range(manifest + 1 if renames else manifest, len(events) + 1)
        points = [(k, False) for k in ([] if renames else [1]) + list(steps)] + [(len(events), True)]
        for kill_at, after in points:
            status = kill(kill_at, after, renames)
            found = state(out, references["old"], references["new"])
            record = {
                "publish": "two renames" if renames else "exchange",
                "event": f"{'after' if after else 'before'} {kill_at}/{len(events)}: {events[kill_at - 1]}",
                "killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL,
                "state": found,
                "leftovers": leftovers(),
            }
            if found == "missing":  # what the next export does first: put the previous one back
                remove_stale_staging(out)
                record["restored"] = state(out, references["old"], references["new"])
            print(json.dumps(record), flush=True)
        if not renames:  # the next run after a kill right before the swap (a complete staging directory left)
            kill(next(i for i, e in enumerate(events) if e.startswith("exchange")) + 1, False, False)
            stale = leftovers()
            _export(run_dir, out)
            print(
                json.dumps(
                    {
                        "next_run": state(out, references["old"], references["new"]),
                        "stale_before": stale,
                        "leftovers": leftovers(),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
