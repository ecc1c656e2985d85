"""``grow --seeds N``: grow N runs that differ only in their seed, keep the best on validation, and
report the spread, so that a user sees how much one run can be trusted (small data sets vary a lot:
breast_cancer's test accuracy spans 0.91-0.97 over seeds 0-2).

Seeds ``seed, seed + 1, ..., seed + N - 1`` grow one after the other into ``OUT/seeds/seed-<s>/``
(complete run directories). The best one by validation score (accuracy, ties broken by the lower
validation loss; for regression the lower validation loss) is copied to ``OUT`` itself, which is then
a run directory like any other (``export``, ``report``); ``OUT/seeds.json`` and its ``metrics.json``
(``seeds``) hold every seed's scores and their mean, standard deviation, minimum and maximum. The test
split plays no part in the choice.
"""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from tinydeploy.atomic import write_json
from tinydeploy.errors import TinyDeployError
from tinydeploy.training.config import GrowConfig
from tinydeploy.training.job import GrowResult, Progress, check_run_dir, make_run_dir, prepare_grow
from tinydeploy.training.rundir import METRICS_FILE, SEEDS_DIR, SEEDS_FILE, clear_run_dir

MAX_SEEDS = 100


def seed_dir(out: Path, seed: int) -> Path:
    return out / SEEDS_DIR / f"seed-{seed}"


def _score(metrics: dict[str, Any]) -> tuple[float, float]:
    """Sort key, larger is better: (validation accuracy, -validation loss), or (-validation loss, 0)."""
    val = metrics["metrics"]["val"]
    return (val["accuracy"], -val["loss"]) if "accuracy" in val else (-val["loss"], 0.0)


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), minimum and maximum."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summary(results: list[GrowResult]) -> dict[str, Any]:
    """Every seed's scores, the spread of each score over the seeds, and the seed kept."""
    best = max(results, key=lambda r: _score(r.metrics))
    rows = [{"seed": r.metrics["seed"], "final_widths": r.metrics["final_widths"], "params": r.metrics["params"],
             **{f"{split}_{name}": value for split in ("val", "test") for name, value in r.metrics["metrics"][split].items()}}
            for r in results]
    names = [key for key in rows[0] if key.startswith(("val_", "test_")) and isinstance(rows[0][key], (int, float))]
    return {"seeds": [r["seed"] for r in rows], "kept": best.metrics["seed"],
            "rule": "best validation accuracy (ties: lower validation loss); regression: lower validation loss",
            "runs": rows, "spread": {name: spread([row[name] for row in rows]) for name in names}}


def grow_seeds(
    cfg: GrowConfig,
    out: Path,
    n_seeds: int,
    *,
    force: bool = False,
    command: str = "",
    on_progress: Callable[[int, Progress], None] | None = None,
    on_start: Callable[[int, GrowConfig], None] | None = None,
) -> tuple[GrowResult, dict[str, Any]]:
    """Grow ``n_seeds`` runs (see the module docstring); the kept run (now in ``out``) and the summary.

    ``on_start(k, cfg)`` is called before the k-th run (its options resolved, its seed set),
    ``on_progress(k, progress)`` during it."""
    if not 1 <= n_seeds <= MAX_SEEDS:
        raise TinyDeployError(f"--seeds must be between 1 and {MAX_SEEDS}, got {n_seeds}")
    cfg.validate()
    out = Path(out)
    check_run_dir(out, force)
    first = prepare_grow(cfg, seed_dir(out, cfg.seed), force=True, command=command)  # options and data checked
    make_run_dir(out)
    clear_run_dir(out)
    results = []
    for k in range(n_seeds):
        seed = cfg.seed + k
        job = first if k == 0 else prepare_grow(replace(cfg, seed=seed), seed_dir(out, seed), force=True, command=command)
        if on_start is not None:
            on_start(k, job.cfg)
        result = job.run(None if on_progress is None else (lambda p, k=k: on_progress(k, p)))
        if result.metrics["status"] != "complete":
            raise TinyDeployError(f"the run of seed {job.cfg.seed} was interrupted; its directory {job.run_dir} can be "
                                  f"resumed with 'tinydeploy grow --resume {job.run_dir}'; no seed was kept")
        results.append(result)
    report = summary(results)
    kept = next(r for r in results if r.metrics["seed"] == report["kept"])
    for entry in kept.run_dir.iterdir():
        target = out / entry.name
        if entry.is_dir():
            shutil.copytree(entry, target)
        else:
            shutil.copy2(entry, target)
    metrics = json.loads((out / METRICS_FILE).read_text(encoding="utf-8"))
    write_json(out / METRICS_FILE, {**metrics, "seeds": report})
    write_json(out / SEEDS_FILE, report)
    return replace(kept, run_dir=out, metrics={**kept.metrics, "seeds": report}), report
