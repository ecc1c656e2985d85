"""Growth overhead (paper App. E.5): where the wall time of a default grow goes, and what growing
costs against training the final architecture from scratch.

1. One default ``tinydeploy grow`` run (digits, TINY, default GrowConfig, CPU, 1 torch thread) with
   the library functions timed from the outside: this process replaces the names that
   ``tinydeploy.growth.policy`` and ``tinydeploy.training.job`` look up (gather_moments, propose,
   grown_output, line_search, add_neurons, carry_optimizer_state, bottlenecks) and the job's
   checkpoint/record methods by timing wrappers. No library file is edited.
2. The final grown architecture is built fresh (same seed) and trained epoch by epoch at the
   growth-phase learning rate, checking test accuracy after every epoch, until it reaches the grown
   net's test accuracy or ``--cap-epochs``. Only the optimizer steps are timed (evaluation excluded,
   which favours the baseline).
3. Ratios: grow total wall time / from-scratch time-to-accuracy (the target is <= 1.0), and grow
   total / from-scratch training for the same number of epochs with the default cosine schedule.

Usage:
    .venv/bin/python benchmarks/growth_overhead.py
    .venv/bin/python benchmarks/growth_overhead.py --dataset mnist1d --cap-epochs 150
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, machine_info, pyplot, save_figure, thread_kwargs  # noqa: E402

import tinydeploy.training.job as grow_mod  # noqa: E402
import tinydeploy.growth.policy as policy  # noqa: E402
from tinydeploy.training.config import GrowConfig  # noqa: E402
from tinydeploy.training.job import prepare_grow  # noqa: E402
from tinydeploy.training.trainer import evaluate  # noqa: E402

NAME = "growth_overhead"

#: (module, attribute, category) of every function timed from the outside.
PATCHES = [
    (policy, "gather_moments", "statistics (gather_moments: forward/backward + S, N products)"),
    (policy, "propose", "closed form (candidates: best update, eigh, SVD, null threshold)"),
    (policy, "grown_output", "line search (grown_output precompute)"),
    (policy, "line_search", "line search (amplitude search)"),
    (policy, "add_neurons", "surgery (add_neurons, carry_optimizer_state)"),
    (grow_mod, "carry_optimizer_state", "surgery (add_neurons, carry_optimizer_state)"),
    (policy, "gather_bottlenecks", "statistics (gather_moments: forward/backward + S, N products)"),
]


class Timers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._depth = 0
        self.growth_steps = 0

    def wrap(self, fn: Callable, category: str) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            # Only the outermost timed call counts, so nested wrapped functions are not double counted.
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds[category] += time.perf_counter() - start
                    self.calls[category] += 1

        return timed


def timed_grow(cfg: GrowConfig, timers: Timers) -> tuple[Any, dict[str, Any], float]:
    originals = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in PATCHES]
    originals.append((grow_mod, "growth_step", grow_mod.growth_step))
    for mod, attr, category in PATCHES:
        setattr(mod, attr, timers.wrap(getattr(mod, attr), category))
    step = grow_mod.growth_step

    def counted_step(*args, **kwargs):
        timers.growth_steps += 1
        return step(*args, **kwargs)

    grow_mod.growth_step = counted_step
    try:
        with tempfile.TemporaryDirectory() as tmp:
            job = prepare_grow(cfg, Path(tmp) / "run")
            job.checkpoint = timers.wrap(job.checkpoint, "bookkeeping (run-dir writes after every step)")
            job._record = timers.wrap(job._record, "bookkeeping (validation after every step/epoch)")
            start = time.perf_counter()
            result = job.run()
            outer = time.perf_counter() - start
    finally:
        for mod, attr, fn in originals:
            setattr(mod, attr, fn)
    return job, result.metrics, outer


def from_scratch(cfg: GrowConfig, widths: list[int], target: float, cap_epochs: int) -> dict[str, Any]:
    """Train the fixed architecture epoch by epoch (constant lr) until test accuracy >= target."""
    fixed = GrowConfig(**{**cfg.__dict__, "init_widths": list(widths), "max_growth_epochs": 0,
                          "final_epochs": 0, "max_params": 10**9})
    with tempfile.TemporaryDirectory() as tmp:
        job = prepare_grow(fixed, Path(tmp) / "run")
    trainer, curve, train_s, eval_s, reached = job.trainer, [], 0.0, 0.0, None
    for epoch in range(1, cap_epochs + 1):
        t0 = time.perf_counter()
        trainer.train_steps(trainer.steps_per_epoch)
        train_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        _, acc = evaluate(trainer.model, job.test_set.X, job.test_set.y, job.loss_fn, job.task)
        eval_s += time.perf_counter() - t0
        curve.append({"epoch": epoch, "test_accuracy": acc, "train_s": train_s})
        if acc >= target:
            reached = epoch
            break
    return {"widths": widths, "target_test_accuracy": target, "reached_at_epoch": reached, "cap_epochs": cap_epochs,
            "train_s": train_s, "eval_s_excluded": eval_s, "curve": curve, "lr": cfg.lr}


def same_epochs(cfg: GrowConfig, widths: list[int], epochs: float) -> dict[str, Any]:
    """The usual alternative: train the final architecture from scratch for the grow run's epoch count."""
    fixed = GrowConfig(**{**cfg.__dict__, "init_widths": list(widths), "max_growth_epochs": 0,
                          "final_epochs": epochs, "max_params": 10**9})
    with tempfile.TemporaryDirectory() as tmp:
        m = prepare_grow(fixed, Path(tmp) / "run").run().metrics
    return {"epochs": m["epochs"], "test_accuracy": m["metrics"]["test"]["accuracy"], "wall_time_s": m["wall_time_s"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--method", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cap-epochs", type=int, default=100, help="from-scratch cap (default = 40 + 60, the grow maximum)")
    p.add_argument("--quick", action="store_true", help="short grow schedule (8 + 8 epochs), cap 30")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default=NAME, help="results file stem")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = machine_info()
    report = Report(args.name, f"Growth overhead: {args.dataset}, {args.method}, seed {args.seed}")
    cfg = GrowConfig(dataset=args.dataset, method=args.method, seed=args.seed, device="cpu", arch="mlp",
                     **thread_kwargs(args.threads))
    if args.quick:
        cfg.max_growth_epochs, cfg.final_epochs, args.cap_epochs = 8.0, 8.0, 30

    timers = Timers()
    job, m, outer = timed_grow(cfg, timers)
    total = m["wall_time_s"]["total"]
    training, growth = m["wall_time_s"]["training"], m["wall_time_s"]["growth"]
    growth_parts = {k: v for k, v in timers.seconds.items() if not k.startswith("bookkeeping")}
    bookkeeping = {k: v for k, v in timers.seconds.items() if k.startswith("bookkeeping")}
    rows = [["training (optimizer steps, growth + final phase)", f"{training:.2f}", f"{100 * training / total:.1f}", "-"]]
    merged: dict[str, float] = defaultdict(float)
    merged_calls: dict[str, int] = defaultdict(int)
    for k, v in growth_parts.items():
        merged[k] += v
        merged_calls[k] += timers.calls[k]
    for k in sorted(merged, key=merged.get, reverse=True):
        rows.append([k, f"{merged[k]:.3f}", f"{100 * merged[k] / total:.1f}", str(merged_calls[k])])
    other_growth = growth - sum(growth_parts.values())
    rows.append(["other growth (held-out evaluation, batch sampling)", f"{other_growth:.3f}",
                 f"{100 * other_growth / total:.1f}", "-"])
    for k, v in bookkeeping.items():
        rows.append([k, f"{v:.3f}", f"{100 * v / total:.1f}", str(timers.calls[k])])
    rest = total - training - growth - sum(bookkeeping.values())
    rows.append(["rest (final metrics, loop overhead)", f"{rest:.3f}", f"{100 * rest / total:.1f}", "-"])
    rows.append(["**total grow wall time**", f"{total:.2f}", "100.0", "-"])
    report.table(
        f"Where the time goes: one default grow ({args.dataset}, {args.method}, seed {args.seed})", 
        ["part", "seconds", "% of total", "calls"], rows,
        note=(f"Grown widths {m['final_widths']}, {m['params']:,} params, test acc "
              f"{100 * m['metrics']['test']['accuracy']:.2f}%, {m['epochs']:.2f} epochs, "
              f"{m['growth_events']} growth events, stop: {m['stop_reason']}. Growth share of total: "
              f"{100 * growth / total:.1f}% over {timers.growth_steps} calls of growth_step (growing or not; "
              f"gather_moments runs once per layer choice and once more for Psi after the step). Bookkeeping = writing the run "
              f"directory after every growth step and the validation pass per record (not growth math)."))

    target = m["metrics"]["test"]["accuracy"]
    scratch = from_scratch(cfg, m["final_widths"], target, args.cap_epochs)
    same = same_epochs(cfg, m["final_widths"], m["epochs"])
    ratio_tta = total / scratch["train_s"]
    reached = scratch["reached_at_epoch"]
    rows = [
        ["grow (growth + final training), total wall", f"{total:.2f}", f"{m['epochs']:.1f}",
         f"{100 * target:.2f}", "-"],
        ["grow, training + growth only (no bookkeeping)", f"{training + growth:.2f}", f"{m['epochs']:.1f}",
         f"{100 * target:.2f}", "-"],
        [f"from scratch {m['final_widths']} to grown test acc (constant lr)", f"{scratch['train_s']:.2f}",
         str(reached) if reached else f"not reached in {args.cap_epochs}",
         f"{100 * scratch['curve'][-1]['test_accuracy']:.2f}", f"{ratio_tta:.2f}"],
        [f"from scratch {m['final_widths']}, same epochs, cosine (standard training)",
         f"{same['wall_time_s']['total']:.2f}", f"{same['epochs']:.1f}", f"{100 * same['test_accuracy']:.2f}",
         f"{total / same['wall_time_s']['total']:.2f}"],
    ]
    met = reached is not None and ratio_tta <= 1.0
    report.table("Grow vs training the final architecture from scratch", 
                 ["run", "seconds", "epochs", "test acc %", "grow total / this"], rows,
                 note=(f"Growth overhead ratio (grow total / from-scratch time to the same test accuracy) = "
                       f"{ratio_tta:.2f}" + ("" if reached else " (scratch never reached the target: the ratio is "
                                             "an upper bound)") +
                       f"; target <= 1.0: {'MET' if met else 'NOT MET'}. One run, seed {args.seed}."))

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = ["training"] + list(merged) + ["other growth"] + list(bookkeeping) + ["rest"]
    values = [training] + list(merged.values()) + [other_growth] + list(bookkeeping.values()) + [rest]
    ax.barh([label.split(" (")[0] for label in labels], values, color="C0")
    ax.set_xlabel("seconds")
    ax.set_title(f"{args.dataset} grow ({total:.1f}s total) vs from scratch to same acc ({scratch['train_s']:.1f}s)")
    ax.axvline(scratch["train_s"], color="C3", ls="--", label="from scratch, time to same test acc")
    ax.legend(fontsize=8)
    save_figure(fig, f"{args.name}.png")
    report.write({
        "settings": {**vars(args), "grow_config": cfg.__dict__},
        "grow": {"metrics": {k: m[k] for k in ("final_widths", "params", "macs", "epochs", "growth_events",
                                               "stop_reason", "wall_time_s")},
                 "test_accuracy": target, "outer_wall_s": outer,
                 "timers_s": dict(timers.seconds), "timer_calls": dict(timers.calls),
                 "growth_step_calls": timers.growth_steps,
                 "other_growth_s": other_growth, "rest_s": rest},
        "from_scratch_to_accuracy": scratch, "from_scratch_same_epochs": same,
        "ratio_grow_over_scratch_time_to_accuracy": ratio_tta,
        "ratio_grow_over_scratch_same_epochs": total / same["wall_time_s"]["total"],
        "target_ratio_le_1_met": met,
    }, machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
