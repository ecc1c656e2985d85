"""Pure growth (analogue of the paper's Fig. 8): neuron additions only, no gradient step.

From a freshly initialised [1, 1] MLP on digits, ``tinydeploy.growth.policy.growth_step`` is called
repeatedly with nothing in between: each call gathers statistics, proposes neurons (TINY or Random),
picks their amplitude by line search on the held-out batch and adds them. We record the parameter
count, and loss and accuracy on the validation and test splits after every call, until the
parameter budget is used up or ``patience`` consecutive calls add nothing.

The line search uses the validation split (as ``tinydeploy grow`` does), so validation numbers are
optimistically biased; the test split is never seen. GradMax is left out, as in the paper: its new
neurons have fan-in 0 and a fixed tiny fan-out, so without gradient steps they do not change the
function at all (its curve would be flat by construction).

Usage:
    .venv/bin/python benchmarks/pure_growth.py                 # digits, seeds 0,1,2, budget 3000
    .venv/bin/python benchmarks/pure_growth.py --quick         # budget 600, seed 0
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, fmt_pm, machine_info, mean_std, pyplot, save_figure  # noqa: E402

from tinydeploy.training.config import GrowConfig  # noqa: E402
from tinydeploy.training.job import prepare_grow  # noqa: E402
from tinydeploy.growth import linalg  # noqa: E402
from tinydeploy.growth.policy import growth_step, neuron_budget  # noqa: E402
from tinydeploy.model.losses import task_metric  # noqa: E402
from tinydeploy.training.trainer import evaluate  # noqa: E402

NAME = "pure_growth"
METHODS = {"tiny": "TINY", "tiny-nothreshold": "TINY, no significance test", "random": "Random"}


@contextlib.contextmanager
def significance_test_off():
    """Ablation, in this process only: the null threshold lambda_- returns 0, so every non-zero
    TINY direction counts as significant (the library's own stop rule is what the plain 'TINY'
    runs use; the paper's Fig. 8 adds a fixed number of neurons per step instead)."""
    original = linalg.null_threshold
    linalg.null_threshold = lambda S_inv_sqrt, N_null: torch.zeros((), dtype=S_inv_sqrt.dtype)
    try:
        yield
    finally:
        linalg.null_threshold = original


def scores(job, model) -> dict[str, float]:
    out = {}
    for split, batch in (("val", job.val_set), ("test", job.test_set)):
        loss, acc = evaluate(model, batch.X, batch.y, job.loss_fn, job.task)
        out[f"{split}_loss"], out[f"{split}_accuracy"] = loss, acc
    return out


def run(dataset: str, method: str, seed: int, max_params: int, patience: int, max_calls: int) -> dict[str, Any]:
    ablation = method == "tiny-nothreshold"
    method = "tiny" if ablation else method
    cfg = GrowConfig(dataset=dataset, method=method, seed=seed, device="cpu", arch="mlp", max_params=max_params)
    with tempfile.TemporaryDirectory() as tmp:
        job = prepare_grow(cfg, Path(tmp) / "unused")  # builds data + model, writes nothing
    model = job.model
    growable = job.spec.growable_indices
    pairs = list(zip(growable, job.spec.linear_indices[1:]))
    metric = lambda out, y: task_metric(job.task, out, y)  # noqa: E731
    steps = [{"call": 0, "params": sum(p.numel() for p in model.parameters()), "widths": [model[i].out_features for i in growable],
              "added": 0, "gamma": None, "seconds": 0.0, **scores(job, model)}]
    idle, started = 0, time.perf_counter()
    for call in range(1, max_calls + 1):
        if not any(neuron_budget(model, i, o, job.settings) > 0 for i, o in pairs):
            stop = "max_params"
            break
        t0 = time.perf_counter()
        held_out = job.val_set.take(cfg.line_search_batch, job.generator)
        with torch.enable_grad(), (significance_test_off() if ablation else contextlib.nullcontext()):
            model, growths, _ = growth_step(model, growable, job.train_set, held_out, job.loss_fn, metric,
                                            job.settings, job.generator)
        seconds = time.perf_counter() - t0
        idle = 0 if growths else idle + 1
        if growths:
            steps.append({
                "call": call, "params": sum(p.numel() for p in model.parameters()),
                "widths": [model[i].out_features for i in growable],
                "added": sum(g.candidate.n_neurons for g in growths),
                "layers": [growable.index(g.candidate.in_index) for g in growths],
                "gamma": [g.gamma for g in growths], "seconds": seconds, **scores(job, model)})
        if idle >= patience:
            stop = f"no growth in {patience} consecutive calls"
            break
    else:
        stop = f"max_calls {max_calls}"
    return {"dataset": dataset, "method": "tiny-nothreshold" if ablation else method, "seed": seed, "max_params": max_params, "stop_reason": stop,
            "calls": call, "wall_s": time.perf_counter() - started, "steps": steps}


def at_budget(steps: list[dict[str, Any]], budget: int, key: str) -> float | None:
    """``key`` after the last step whose parameter count is <= budget."""
    ok = [s for s in steps if s["params"] <= budget]
    return ok[-1][key] if ok else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--max-params", type=int, default=3000)
    p.add_argument("--patience", type=int, default=GrowConfig().patience,
                   help="stop after this many calls in a row add nothing (default: the library's grow patience)")
    p.add_argument("--max-calls", type=int, default=400)
    p.add_argument("--quick", action="store_true", help="budget 600, first seed only")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.quick:
        args.max_params, seeds = 600, seeds[:1]
    torch.set_num_threads(args.threads)
    machine = machine_info()
    report = Report(NAME, f"Pure growth on {args.dataset} (no gradient steps), TINY vs Random")
    runs = []
    for method in METHODS:
        for seed in seeds:
            r = run(args.dataset, method, seed, args.max_params, args.patience, args.max_calls)
            last = r["steps"][-1]
            print(f"[{report.elapsed:5.0f}s] {METHODS[method]:6s} seed {seed}: {len(r['steps']) - 1} growths in "
                  f"{r['calls']} calls, {last['params']} params {last['widths']}, test acc "
                  f"{100 * last['test_accuracy']:.1f}% loss {last['test_loss']:.3f} ({r['stop_reason']}, "
                  f"{r['wall_s']:.1f}s)", flush=True)
            runs.append(r)

    budgets = sorted({b for b in (100, 250, 500, 1000, 2000, args.max_params) if b <= args.max_params})
    rows = []
    for method, label in METHODS.items():
        rs = [r for r in runs if r["method"] == method]
        for b in budgets:
            acc = [at_budget(r["steps"], b, "test_accuracy") for r in rs]
            loss = [at_budget(r["steps"], b, "test_loss") for r in rs]
            vacc = [at_budget(r["steps"], b, "val_accuracy") for r in rs]
            rows.append([label, f"<= {b:,}", fmt_pm(acc, 100, 1), fmt_pm(loss, 1, 3), fmt_pm(vacc, 100, 1)])
        final = [r["steps"][-1] for r in rs]
        rows.append([label, f"final ({mean_std(s['params'] for s in final)[0]:,.0f})",
                     fmt_pm([s["test_accuracy"] for s in final], 100, 1), fmt_pm([s["test_loss"] for s in final], 1, 3),
                     fmt_pm([s["val_accuracy"] for s in final], 100, 1)])
    init = [r["steps"][0] for r in runs]
    report.table(
        f"{args.dataset}: accuracy/loss after pure growth from [1,1] (seeds {','.join(map(str, seeds))})",
        ["method", "params", "test acc %", "test loss", "val acc % (used by line search)"], rows,
        note=(f"Initial [1,1] net: test acc {fmt_pm([s['test_accuracy'] for s in init], 100, 1)}%, "
              f"test loss {fmt_pm([s['test_loss'] for s in init], 1, 3)}. Chance = 10%."))
    summary_rows = []
    for method, label in METHODS.items():
        rs = [r for r in runs if r["method"] == method]
        summary_rows.append([
            label, fmt_pm([len(r["steps"]) - 1 for r in rs], 1, 1), fmt_pm([r["calls"] for r in rs], 1, 1),
            " / ".join("x".join(map(str, r["steps"][-1]["widths"])) for r in rs),
            "; ".join(sorted({r["stop_reason"] for r in rs})), fmt_pm([r["wall_s"] for r in rs], 1, 1)])
    report.table("Growth calls", ["method", "growth events", "calls", "final widths (per seed)", "stop", "wall s"],
                 summary_rows)

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"tiny": "C0", "tiny-nothreshold": "C9", "random": "C2"}
    for r in runs:
        xs = [s["params"] for s in r["steps"]]
        lab = f"{METHODS[r['method']]}" if r["seed"] == seeds[0] else None
        axes[0].plot(xs, [100 * s["test_accuracy"] for s in r["steps"]], ".-", markersize=3, color=colors[r["method"]], alpha=0.8,
                     label=lab and f"{lab} test")
        axes[0].plot(xs, [100 * s["val_accuracy"] for s in r["steps"]], ":", color=colors[r["method"]], alpha=0.6,
                     label=lab and f"{lab} val (line-search set)")
        axes[1].plot(xs, [s["test_loss"] for s in r["steps"]], ".-", markersize=3, color=colors[r["method"]], alpha=0.8,
                     label=lab and f"{lab} test")
        axes[1].plot(xs, [s["val_loss"] for s in r["steps"]], ":", color=colors[r["method"]], alpha=0.6,
                     label=lab and f"{lab} val")
    from matplotlib.ticker import NullFormatter

    for ax, ylabel in zip(axes, ("accuracy (%)", "cross-entropy loss")):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("parameters (log)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title(f"{args.dataset}: pure growth (no gradient steps), one line per seed")
    axes[1].set_title("loss during pure growth")
    save_figure(fig, f"{NAME}.png")
    report.write({"settings": {**vars(args), "seeds": seeds}, "runs": runs}, machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
