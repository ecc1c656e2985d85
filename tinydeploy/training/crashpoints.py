"""Deliberate kills at named points, for the crash-safety tests of ``grow`` (never set in normal use).

``TINYDEPLOY_CRASH_AT=STAGE:N[:TERM][@RANK]`` makes the process SIGKILL itself (a real kill: no handler
runs, nothing is flushed) the N-th time it reaches ``STAGE``; ``:TERM`` sends SIGTERM instead (a
pre-emption notice; not for the two mid-line stages), ``@RANK`` limits it to that torchrun rank. Stages: ``slice`` (after a slice of
training steps), ``grow`` (inside a growth step, before the job records it), ``append`` (in the
middle of a log line), ``generation-written`` (a checkpoint's file written, not committed),
``commit-line`` (in the middle of the commit line), ``committed`` (after the commit, before old
generations are removed).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

ENV = "TINYDEPLOY_CRASH_AT"


@dataclass(frozen=True)
class _Target:
    stage: str
    count: int
    signal: int
    rank: str | None


def _parse(value: str | None) -> _Target | None:
    if not value:
        return None
    value, _, rank = value.partition("@")
    stage, _, rest = value.partition(":")
    count, _, sig = rest.partition(":")
    return _Target(stage, int(count or 1), signal.SIGTERM if sig == "TERM" else signal.SIGKILL, rank or None)


_target = _parse(os.environ.get(ENV))
_counts: dict[str, int] = {}


def arm(value: str | None) -> None:
    """Set the target as ``TINYDEPLOY_CRASH_AT`` would (for processes forked after the import)."""
    global _target
    _target = _parse(value)
    _counts.clear()


def due(stage: str) -> bool:
    """Whether the process is to die at this visit of ``stage`` (counts the visit)."""
    if _target is None or _target.stage != stage:
        return False
    if _target.rank is not None and os.environ.get("RANK", "0") != _target.rank:
        return False
    _counts[stage] = _counts.get(stage, 0) + 1
    return _counts[stage] == _target.count


def kill() -> None:
    """SIGKILL this process (like the OOM killer or a lost machine)."""
    os.kill(os.getpid(), signal.SIGKILL)


def point(stage: str) -> None:
    """Send the target's signal to this process if ``TINYDEPLOY_CRASH_AT`` names this visit of ``stage``."""
    if due(stage):
        os.kill(os.getpid(), _target.signal)
