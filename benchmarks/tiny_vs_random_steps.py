"""Paired comparison of one growth step: TINY vs Random on the same model states (issue 2 acceptance).

Follows the default ``tinydeploy grow`` schedule with TINY (``GrowJob.growth_phase`` at this
library version: grow once at initialisation, then train ``grow_every`` epochs between growth steps,
stop on the budget, ``max_growth_epochs`` or ``patience`` steps in a row that add nothing). Before
each TINY step, the same model is grown with Random on a copy (same budget, same held-out batch, its
own line search; the Random copy is then dropped). Writes the held-out loss decrease of each method
at every step, measured right after the neurons are added (before any training).

The TINY trajectory is the one a plain ``tinydeploy grow`` run of the same seed follows: the Random
step draws from its own generator, and the shared held-out batch is drawn from a copy of the job's
generator, so the job's random streams are untouched.

    .venv/bin/python benchmarks/tiny_vs_random_steps.py [--dataset digits] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, machine_info  # noqa: E402

from tinydeploy.training.config import GrowConfig  # noqa: E402
from tinydeploy.training.job import prepare_grow  # noqa: E402
from tinydeploy.growth import candidates  # noqa: E402
from tinydeploy.growth.amplitude import line_search, pointwise  # noqa: E402
from tinydeploy.growth.policy import estimation_batch_size, growth_step, neuron_budget  # noqa: E402
from tinydeploy.growth.statistics import gather_moments  # noqa: E402
from tinydeploy.growth.surgery import grown_output  # noqa: E402
from tinydeploy.model.losses import task_metric  # noqa: E402


def decrease(growths) -> float:
    return growths[0].loss_before - growths[-1].loss_after if growths else 0.0


def equal_neuron_pairs(job, held_out, seed: int) -> list[dict]:
    """Per layer, on the current model: TINY's significant neurons vs as many Random neurons, each with
    its own line search on ``held_out``; the held-out loss decrease of each (equal added parameters)."""
    gen = torch.Generator(device=job.device).manual_seed(seed)
    growable = job.spec.growable_indices
    fan_in = max(job.model[i].in_features for i in growable)
    batch = job.train_set.take(estimation_batch_size(fan_in, job.train_set.X.shape[0], job.settings), gen)
    moments = gather_moments(job.model, growable, batch.X, batch.y, job.loss_fn, generator=gen)
    with torch.no_grad():
        base = float(job.loss_fn(job.model.eval()(held_out.X), held_out.y).mean())
    pairs = []
    for m in moments:
        tiny = candidates.tiny(m, neuron_budget(job.model, m.in_index, m.out_index, job.settings))
        if tiny.n_neurons == 0:
            continue
        rand = candidates.random(m, tiny.n_neurons, gen)
        losses = {}
        for label, cand in (("tiny", tiny), ("random", rand)):
            output = grown_output(job.model, cand, held_out.X)
            _, losses[label] = line_search(pointwise(lambda g: float(job.loss_fn(output(g), held_out.y).mean())),
                                           signed=cand.signed_amplitude)
        pairs.append({"layer": growable.index(m.in_index), "neurons": tiny.n_neurons,
                      "tiny": base - losses["tiny"], "random": base - losses["random"]})
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    machine = machine_info()
    name = f"tiny_vs_random_steps_{args.dataset}"
    report = Report(name, f"TINY vs Random, paired growth steps: {args.dataset}, seed {args.seed}")
    with tempfile.TemporaryDirectory() as tmp:
        job = prepare_grow(GrowConfig(dataset=args.dataset, seed=args.seed, device="cpu", arch="mlp"), Path(tmp) / "unused")
    cfg = job.cfg
    metric = lambda out, y: task_metric(job.task, out, y)  # noqa: E731
    random_settings = dataclasses.replace(job.settings, method="random")
    steps_between = max(1, round(cfg.grow_every * job.trainer.steps_per_epoch))
    rows, step, idle, stop = [], 0, 0, ""
    while True:  # same loop and stop rules as GrowJob.growth_phase (target accuracy unset)
        if not job._budget_left():
            stop = "max_params"
            break
        if job.trainer.epoch >= cfg.max_growth_epochs:
            stop = "max_growth_epochs"
            break
        step += 1
        shadow = torch.Generator(device=job.device)
        shadow.set_state(job.generator.get_state())
        held_out = job.val_set.take(cfg.line_search_batch, shadow)  # the batch job._grow is about to draw
        params_before = sum(p.numel() for p in job.model.parameters())
        pairs = equal_neuron_pairs(job, held_out, 2000 * args.seed + step)
        _, random_growths, _ = growth_step(job.model, job.spec.growable_indices, job.train_set, held_out, job.loss_fn,
                                           metric, random_settings,
                                           torch.Generator(device=job.device).manual_seed(1000 * args.seed + step))
        tiny_growths = job._grow(step)
        idle = 0 if tiny_growths else idle + 1
        rows.append({
            "step": step, "epoch": round(job.trainer.epoch, 2), "params_before": params_before,
            "params_after_tiny": job.log[-1]["params"] if tiny_growths else params_before,
            "tiny_decrease": decrease(tiny_growths), "random_decrease": decrease(random_growths),
            "tiny_neurons": sum(g.candidate.n_neurons for g in tiny_growths),
            "random_neurons": sum(g.candidate.n_neurons for g in random_growths),
            "equal_neurons": pairs,
        })
        if idle >= cfg.patience:
            stop = "no_significant_neuron"
            break
        job._train(steps_between)
    grew = [r for r in rows if r["tiny_neurons"]]
    wins = sum(r["tiny_decrease"] > r["random_decrease"] for r in grew)
    random_only = sum(1 for r in rows if not r["tiny_neurons"] and r["random_neurons"])
    table = [[r["step"], r["epoch"], f"{r['params_before']:,}", f"{r['params_after_tiny']:,}",
              f"{r['tiny_decrease']:.4f} ({r['tiny_neurons']})", f"{r['random_decrease']:.4f} ({r['random_neurons']})"]
             for r in rows]
    report.table(
        "Held-out loss decrease per growth step (neurons added)",
        ["step", "epoch", "params before", "params after TINY", "TINY decrease (neurons)",
         "Random decrease (neurons)"], table,
        note=(f"TINY's held-out loss decrease is larger at {wins} of the {len(grew)} steps where TINY added neurons. "
              f"At the other {len(rows) - len(grew)} steps TINY added nothing (no direction above its significance "
              f"threshold, or no gain at the line search); Random added neurons at {random_only} of them. TINY stop: {stop} after {step} steps at epoch "
              f"{job.trainer.epoch:.2f}, {rows[-1]['params_after_tiny']:,} params (budget {job.max_params:,}, "
              f"patience {cfg.patience}). Decreases are on the held-out batch used by the line search "
              f"({held_out.X.shape[0]} validation samples), right after the addition, before training."))
    pairs = [(r["step"], p) for r in rows for p in r["equal_neurons"]]
    pair_wins = sum(p["tiny"] > p["random"] for _, p in pairs)
    report.table(
        "Equal neurons: per layer, TINY's significant neurons vs as many Random neurons (same model, same batch)",
        ["step", "hidden layer", "neurons", "TINY decrease", "Random decrease"],
        [[s, p["layer"], p["neurons"], f"{p['tiny']:.4f}", f"{p['random']:.4f}"] for s, p in pairs],
        note=(f"TINY's held-out loss decrease is larger in {pair_wins} of {len(pairs)} (step, layer) pairs at equal "
              "added parameters. Each candidate gets its own line search (TINY g >= 0 with dW*, Random both signs)."))
    report.write({"settings": vars(args), "config": dataclasses.asdict(cfg), "stop_reason": stop, "rows": rows,
                  "wins": wins, "tiny_growth_steps": len(grew), "steps": len(rows),
                  "equal_neuron_wins": pair_wins, "equal_neuron_pairs": len(pairs)}, machine)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
