"""Deliberate kills at named points, for the crash-safety tests of ``grow`` (never set in normal use).

``TINYDEPLOY_CRASH_AT=STAGE:N`` makes the process SIGKILL itself the N-th time it reaches ``STAGE``
(a real kill: no handler runs, nothing is flushed). Stages: ``slice`` (after a slice of training
steps), ``grow`` (inside a growth step, before the job records it), ``append`` (in the middle of a
log line), ``generation-written`` / ``generation-renamed`` / ``committed`` (the stages of a
checkpoint write, see ``RunWriter.commit``).
"""

from __future__ import annotations

import os
import signal

ENV = "TINYDEPLOY_CRASH_AT"
_counts: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    value = os.environ.get(ENV)
    if not value:
        return None
    stage, _, count = value.partition(":")
    return stage, int(count or 1)


_TARGET = _target()


def due(stage: str) -> bool:
    """Whether the process is to die at this visit of ``stage`` (counts the visit)."""
    if _TARGET is None or _TARGET[0] != stage:
        return False
    _counts[stage] = _counts.get(stage, 0) + 1
    return _counts[stage] == _TARGET[1]


def kill() -> None:
    """SIGKILL this process (no cleanup, like the OOM killer or a pre-empted machine)."""
    os.kill(os.getpid(), signal.SIGKILL)


def point(stage: str) -> None:
    """Die here if ``TINYDEPLOY_CRASH_AT`` names this visit of ``stage``."""
    if due(stage):
        kill()
