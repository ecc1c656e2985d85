"""Linear regions of Folding-grown networks against a random initialisation of the same width.

The folding talk's claim ("utilization of approximatability: random initialized 65/1000, grow from
2-2-2 to 2-3-2: 360/1000") measured on its 2-D tasks (sine2d, quadratic2d) and on moons and spirals.
For each dataset, seed and width w (the talk's scale: 3, 6, 12 units; ``budget``: the dataset's
default parameter budget, a full grow):

* Folding grows a one-hidden-layer ReLU MLP from width 2 to w (the default MLP recipe: a fold at
  initialisation and then every 0.25 epoch, ``--growth-epochs`` at most, then ``--final-epochs`` with
  cosine decay), under each x_t rule of ``--rules``: ``domain`` (the code's: the highest-loss cluster
  whose fold point lies in the data's box and is not a fold yet) and ``talk`` (the highest-loss cluster,
  wherever its fold point is: the rule before this benchmark);
* the same width w freshly initialised ("random init", no training) and trained from scratch for as
  many epochs as Folding took.

Counted, side by side: regions on the 200 x 200 grid over the training inputs' box (the metric of
``tinydeploy grow``), and regions that hold data (distinct activation patterns among the 1,000 training
inputs: the count over the data's support; on sine2d and quadratic2d the data fill the box uniformly,
so this is a coarser grid). Folding is counted at the end of growth (the network Folding built) and
after the final training.

Usage:
    python benchmarks/folding_regions.py --jobs 2          # the committed run (~10 min on 2 shared cores)
    python benchmarks/folding_regions.py --datasets sine2d --seeds 0 --widths 3 --budget-seeds ""  # smoke
    # the talk's 2-2-2 -> 2-3-2 (the width-2 net trained first), 30 seeds:
    python benchmarks/folding_regions.py --datasets sine2d,quadratic2d --seeds 0,1,...,29 --widths 3 \
        --budget-seeds "" --rules domain --pretrain-epochs 10 --jobs 2 --name folding_regions_pretrained
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, fmt_pm, machine_info, mean_std

from tinydeploy.growth import folding
from tinydeploy.model.regions import count_patterns
from tinydeploy.training.config import DATASET_DEFAULTS, GrowConfig
from tinydeploy.training.job import prepare_grow

NAME = "folding_regions"
RULES = ("domain", "talk")
CODE_RULE = (folding.in_domain, folding.FOLDED_FRACTION)


def use_rule(rule: str) -> None:
    """Set Folding's x_t rule in this (worker) process. ``talk``: every cluster passes, so the highest-loss
    one is folded wherever its fold point is; ``domain``: the code's rule."""
    folding.in_domain, folding.FOLDED_FRACTION = (lambda x_f, X: True, 0.0) if rule == "talk" else CODE_RULE


def counts(job) -> tuple[int, int]:
    """(regions on the grid over the training box, regions holding training inputs)."""
    return job.linear_regions(), count_patterns(job.model, job.train_set.X)


def config(ds: str, seed: int, args, **overrides: Any) -> GrowConfig:
    base: dict[str, Any] = {"dataset": ds, "seed": seed, "device": "cpu", "threads": 1, "arch": "mlp",
                              "max_growth_epochs": args.growth_epochs, "final_epochs": args.final_epochs}
    return GrowConfig(**{**base, **overrides})


def params_of(width: int) -> int:
    """Parameters of 2 - width - 2."""
    return 2 * width + width + width * 2 + 2


def reference(ds: str, seed: int, width: int, args) -> dict[str, Any]:
    """The same width freshly initialised (counts before training) and trained from scratch for as many
    epochs as Folding's one fold per step takes to reach it."""
    epochs = args.final_epochs + args.pretrain_epochs + min(args.growth_epochs, 0.25 * (width - 2))
    with tempfile.TemporaryDirectory(prefix="tinybench-") as tmp:
        job = prepare_grow(config(ds, seed, args, method="tiny", init_widths=[width], max_growth_epochs=0.0,
                                  final_epochs=epochs, max_params=10**9), Path(tmp) / "run")
        init = counts(job)
        m = job.run().metrics
        return {"init": init, "final": counts(job), "test_accuracy": m["metrics"]["test"]["accuracy"]}


def run_task(task: tuple[str, str, int, str, str | None], args) -> dict[str, Any]:
    """("fold", ...): Folding grown from width 2 to ``width`` under ``rule`` (at ``budget``, with the
    references at the width it reached); ("reference", ...): the references at ``width``."""
    torch.set_num_threads(1)
    kind, ds, seed, width, rule = task
    if kind == "reference":
        return {"kind": kind, "dataset": ds, "seed": seed, "width": width, "rule": None, "final_width": int(width),
                **reference(ds, seed, int(width), args)}
    use_rule(rule)
    budget = DATASET_DEFAULTS[ds]["max_params"] if width == "budget" else params_of(int(width))
    pretrain = {"patience": 10**6, "max_growth_epochs": args.pretrain_epochs + args.growth_epochs} \
        if args.pretrain_epochs else {}
    with tempfile.TemporaryDirectory(prefix="tinybench-") as tmp:
        job = prepare_grow(config(ds, seed, args, method="folding", init_widths=[2], max_params=budget, **pretrain),
                           Path(tmp) / "run")
        end: dict[str, tuple[int, int]] = {}
        enter_final, grow = job._enter_final, job._grow

        def counted_enter_final() -> None:  # the network Folding built, before the final training
            end.setdefault("counts", counts(job))
            enter_final()

        def pretrained_grow(step: int):  # the talk's protocol: the 2-2-2 net trained first, then folded
            if job.trainer.epoch < args.pretrain_epochs:
                return []
            growths = grow(step)
            if not job._budget_left():  # the last fold: counted right after it
                end.setdefault("counts", counts(job))
            return growths

        job._enter_final = counted_enter_final
        if args.pretrain_epochs:
            job._grow = pretrained_grow
        m = job.run().metrics
        rec = {"kind": kind, "dataset": ds, "seed": seed, "width": width, "rule": rule,
               "final_width": m["final_widths"][0], "epochs": m["epochs"], "stop_reason": m["stop_reason"],
               "end": end.get("counts"), "final": counts(job), "test_accuracy": m["metrics"]["test"]["accuracy"],
               "folds": len(job.log),
               "folds_not_rank0": sum(e.get("details", {}).get("cluster_rank", 0) > 0 for e in job.log),
               "folds_fallback": sum(not e.get("details", {}).get("x_f_in_data_and_new", True) for e in job.log)}
    if width == "budget":
        rec["reference"] = reference(ds, seed, rec["final_width"], args)
    return rec


def references_of(records: list[dict[str, Any]], fold: dict[str, Any]) -> dict[str, Any]:
    """The reference record of a Folding record: its own (budget) or the one at its width and seed."""
    if "reference" in fold:
        return fold["reference"]
    return next(r for r in records if r["kind"] == "reference" and r["dataset"] == fold["dataset"]
                and r["width"] == fold["width"] and r["seed"] == fold["seed"])


def table(records: list[dict[str, Any]], report: Report, args) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for which, index in (("grid 200 x 200 over the training box", 0), ("regions that hold training inputs", 1)):
        rows = []
        for ds in args.datasets:
            for width in args.widths:
                for rule in args.rules:
                    fold = sorted((r for r in records if r["kind"] == "fold" and r["dataset"] == ds
                                   and r["width"] == width and r["rule"] == rule), key=lambda r: r["seed"])
                    if not fold:
                        continue
                    refs = [references_of(records, r) for r in fold]
                    end, final = [r["end"][index] for r in fold], [r["final"][index] for r in fold]
                    init, trained = [r["init"][index] for r in refs], [r["final"][index] for r in refs]
                    wins = sum(e > i for e, i in zip(end, init))
                    wins_final = sum(f > i for f, i in zip(final, init))
                    w = width if width != "budget" else f"budget ({'/'.join(str(r['final_width']) for r in fold)})"
                    rows.append([ds, w, rule, fmt_pm(end, 1, 1), fmt_pm(final, 1, 1), fmt_pm(init, 1, 1),
                                 fmt_pm(trained, 1, 1), f"{wins}/{len(fold)}", f"{wins_final}/{len(fold)}",
                                 fmt_pm([r["test_accuracy"] for r in fold], 100, 1),
                                 fmt_pm([r["test_accuracy"] for r in refs], 100, 1)])
                    out.setdefault(which, {}).setdefault(ds, {}).setdefault(str(width), {})[rule] = {
                        "seeds": [r["seed"] for r in fold], "widths": [r["final_width"] for r in fold],
                        "folding_end_of_growth": end, "folding_final": final, "random_init": init,
                        "trained_from_scratch": trained, "end_of_growth_more_than_init": wins,
                        "final_more_than_init": wins_final, "end_of_growth_mean": mean_std(end)[0],
                        "random_init_mean": mean_std(init)[0]}
        report.table(f"Linear regions, {which} (mean ± std over seeds)",
                     ["dataset", "width", "x_t rule", "Folding, end of growth", "Folding, after final training",
                      "random init, same width", "trained from scratch, same width",
                      "seeds: Folding end > init", "seeds: Folding final > init", "Folding test acc %",
                      "from scratch test acc %"], rows)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="sine2d,quadratic2d,moons,spirals")
    p.add_argument("--seeds", default="0,1,2,3,4", help="seeds at the talk's widths")
    p.add_argument("--widths", default="3,6,12", help="the talk's scale: widths Folding grows to from 2")
    p.add_argument("--budget-seeds", default="0,1,2", help="seeds of the full grow to the dataset's budget")
    p.add_argument("--rules", default=",".join(RULES), help="x_t rules among " + ", ".join(RULES))
    p.add_argument("--growth-epochs", type=float, default=20.0)
    p.add_argument("--final-epochs", type=float, default=30.0)
    p.add_argument("--pretrain-epochs", type=float, default=0.0,
                   help="the talk's protocol: train the width-2 net this long before the first fold (0: fold at "
                        "initialisation, the default recipe)")
    p.add_argument("--name", default=NAME, help="results file stem")
    p.add_argument("--jobs", type=int, default=1)
    args = p.parse_args(argv)
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.rules = [r for r in args.rules.split(",") if r]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    budget_seeds = [int(s) for s in args.budget_seeds.split(",") if s]
    widths = [w for w in args.widths.split(",") if w]
    args.widths = widths + (["budget"] if budget_seeds else [])
    torch.set_num_threads(1)
    machine = machine_info()
    report = Report(args.name, "Folding's linear regions against a random initialisation of the same width")
    tasks = [(kind, ds, seed, width, rule) for ds in args.datasets
             for width in args.widths for seed in (budget_seeds if width == "budget" else seeds)
             for kind, rule in ([] if width == "budget" else [("reference", None)]) + [("fold", r) for r in args.rules]]
    tasks.sort(key=lambda t: t[3] != "budget")  # the long runs first
    records = []
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        for done in as_completed([pool.submit(run_task, t, args) for t in tasks]):
            r = done.result()
            records.append(r)
            print(f"[{report.elapsed:5.0f}s] {r['dataset']:11s} seed {r['seed']} width {r['width']:6s} "
                  f"{r['kind']:9s} {r['rule'] or '':6s} -> {r['final_width']:3d} units, (grid, data) regions "
                  f"{r.get('init') or r.get('end')} -> {r['final']}, acc {100 * r['test_accuracy']:.1f}%"
                  + (f", references {r['reference']['init']} -> {r['reference']['final']}" if "reference" in r else "")
                  + (f", folds {r['folds']} ({r['folds_not_rank0']} not the top cluster, {r['folds_fallback']} "
                     "fallbacks)" if "folds" in r else ""), flush=True)
    summary = table(records, report, args)
    report.note(
        "Settings: Folding from width 2, "
        + (f"trained {args.pretrain_epochs:g} epochs at width 2 first (the talk's 2-2-2 -> 2-3-2; 'end of growth' "
           "is counted right after the last fold), then a fold every 0.25 epoch" if args.pretrain_epochs else
           "a fold at initialisation and every 0.25 epoch")
        + f" for at most {args.growth_epochs:g} epochs, then {args.final_epochs:g} epochs with cosine decay "
        "(Adam, batch 16, the "
        f"default recipe); trained from scratch at the final width w for as many epochs as Folding's one fold per "
        f"step takes, {args.final_epochs:g} + {args.pretrain_epochs:g} + 0.25 (w - 2). Seeds "
        f"{seeds} at the talk's widths, {budget_seeds} at the budget. A hidden layer of w ReLU units on 2-D inputs "
        "has at most 1 + w + w(w-1)/2 regions (7, 22, 79 for w = 3, 6, 12). 'seeds: Folding end > init': seeds "
        "where the grown network, before its final training, has more regions than the same width freshly "
        "initialised with the same seed. At the budget the references are at the width Folding reached.")
    report.write({"settings": {k: v for k, v in vars(args).items()}, "summary": summary, "records": records}, machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
