"""Paired comparison of one growth step: TINY vs Random on the same model states (issue 2 acceptance).

Follows the default `tinydeploy grow` schedule on digits with TINY; before each growth step, the
same model is also grown with Random (same budget, same held-out batch, its own line search) on a
copy. Prints and writes the held-out loss decrease of each method at every step (before training).

    python benchmarks/tiny_vs_random_steps.py [--dataset digits] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from tinydeploy.atomic import write_json, write_text
from tinydeploy.grow import GrowConfig, prepare_grow
from tinydeploy.growth.policy import growth_step
from tinydeploy.losses import task_metric

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    job = prepare_grow(GrowConfig(dataset=args.dataset, seed=args.seed), Path("/tmp") / "tiny-vs-random", force=True)
    metric = lambda out, y: task_metric(job.task, out, y)  # noqa: E731
    random_settings = dataclasses.replace(job.settings, method="random")
    steps_between = max(1, round(job.cfg.grow_every * job.trainer.steps_per_epoch))
    rows, step = [], 0
    while job._budget_left() and job.trainer.epoch < job.cfg.max_growth_epochs:
        job._train(steps_between)
        step += 1
        held_out = job.val_set.take(job.cfg.line_search_batch, job.generator)
        _, random_growths, _ = growth_step(job.model, job.spec.growable_indices, job.train_set, held_out, job.loss_fn,
                                           metric, random_settings, torch.Generator(device=job.device).manual_seed(step))
        tiny_growths = job._grow(step)
        if not tiny_growths:
            break
        rows.append({
            "step": step, "epoch": round(job.trainer.epoch, 2), "params": job.log[-1]["params"],
            "tiny_decrease": tiny_growths[0].loss_before - tiny_growths[-1].loss_after,
            "random_decrease": random_growths[0].loss_before - random_growths[-1].loss_after if random_growths else 0.0,
            "tiny_neurons": sum(g.candidate.n_neurons for g in tiny_growths),
            "random_neurons": sum(g.candidate.n_neurons for g in random_growths),
        })
    wins = sum(r["tiny_decrease"] > r["random_decrease"] for r in rows)
    lines = ["| step | epoch | params | TINY decrease (neurons) | Random decrease (neurons) |", "|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['epoch']} | {r['params']} | {r['tiny_decrease']:.4f} ({r['tiny_neurons']}) | "
              f"{r['random_decrease']:.4f} ({r['random_neurons']}) |" for r in rows]
    lines.append(f"\nTINY's held-out loss decrease is larger at {wins} of {len(rows)} growth steps.")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"tiny_vs_random_steps_{args.dataset}.json", {"rows": rows, "wins": wins, "steps": len(rows)})
    write_text(RESULTS / f"tiny_vs_random_steps_{args.dataset}.md", table + "\n")


if __name__ == "__main__":
    main()
