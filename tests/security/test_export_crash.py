"""Crash injection: ``export`` killed with SIGKILL at every publishing step leaves the whole old or the
whole new export, never a mix, and the next export cleans up (harness: ``crash_export.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tinydeploy.serving.manifest import STAGING_PREFIX

HARNESS = Path(__file__).with_name("crash_export.py")
REPO = Path(__file__).resolve().parents[2]


def test_export_killed_at_each_step_leaves_old_or_new(trained_run: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(HARNESS), str(trained_run), str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    points = [r for r in records if "event" in r]
    exchange = [r for r in points if r["publish"] == "exchange"]
    fallback = [r for r in points if r["publish"] == "two renames"]
    assert len(exchange) >= 5 and len(fallback) >= 4 and all(r["killed"] for r in points)
    for record in points:
        assert all(name.startswith(STAGING_PREFIX) for name in record["leftovers"]), record
    # atomic exchange: the old export up to the swap, the new one from the swap on; never a mix
    states = [r["state"] for r in exchange]
    swap = next(i for i, r in enumerate(exchange) if ": exchange " in r["event"])
    assert states == ["old"] * (swap + 1) + ["new"] * (len(states) - swap - 1), exchange
    # two-rename fallback: at worst a moment with no export at all, which the next export repairs
    assert {r["state"] for r in fallback} <= {"old", "new", "missing"}, fallback
    assert all(r["restored"] == "old" for r in fallback if r["state"] == "missing")
    assert [r["state"] for r in fallback][-1] == "new"
    (next_run,) = [r for r in records if "next_run" in r]
    assert next_run["stale_before"] and next_run["leftovers"] == [] and next_run["next_run"] == "new"
