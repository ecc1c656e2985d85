"""Growth policy: where to add neurons, how many, at what amplitude, within which budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from tinydeploy.growth import linalg
from tinydeploy.growth.amplitude import line_search
from tinydeploy.growth.candidates import Candidate, propose
from tinydeploy.growth.statistics import LayerMoments, gather_moments, shard_rows
from tinydeploy.growth.surgery import add_neurons, grown_output
from tinydeploy.model.losses import LossFn


@dataclass(frozen=True)
class GrowthSettings:
    """How one growth step chooses and sizes new neurons."""

    method: str = "tiny"
    neurons_per_step: int = 16
    layers_per_step: int | None = None
    max_params: int | None = None
    max_width: int | None = None
    estimation_scale: float = 4.0
    estimation_floor: int = 16
    min_estimation_batch: int = 256
    max_estimation_batch: int = 16384
    chunk_size: int = 1024


@dataclass(frozen=True)
class Batch:
    """Inputs and targets on the model's device."""

    X: torch.Tensor
    y: torch.Tensor

    def take(self, n: int, generator: torch.Generator | None) -> "Batch":
        """A random subset of ``n`` samples (all of them, in order, when n >= len)."""
        if n >= self.X.shape[0]:
            return self
        device = generator.device if generator is not None else self.X.device
        index = torch.randperm(self.X.shape[0], generator=generator, device=device)[:n].to(self.X.device)
        return Batch(self.X[index], self.y[index])


@dataclass
class Growth:
    """One applied neuron addition, with the measurements the growth log records."""

    candidate: Candidate
    gamma: float
    loss_before: float
    loss_after: float
    metric_before: float
    metric_after: float
    widths_after: list[int]
    psi_after: float | None = None


class DataParallel(Protocol):
    """This process's part in a growth step run by several processes on shards of the same batches.

    Every process holds the same model, data and generator state; each gathers statistics on its
    rows of the estimation batch and scores its rows of the held-out batch, and the sums over the
    processes make every process take the same decisions (``tinydeploy.training.distributed``).
    """

    rank: int
    world: int

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The sum of ``values`` (float64) over the processes."""

    def sum_moments(self, moments: list[LayerMoments]) -> list[LayerMoments]:
        """The moments of the union of the processes' rows."""


def estimation_batch_size(fan_in: int, available: int, s: GrowthSettings) -> int:
    """App. E.1: n proportional to (fan-in + 1)^2 (factor ``estimation_scale``), floored at ``estimation_floor`` x (fan-in + 1) and
    ``min_estimation_batch``, capped by the data available and ``max_estimation_batch``."""
    d1 = fan_in + 1
    wanted = max(int(s.estimation_scale * d1 * d1), s.estimation_floor * d1, s.min_estimation_batch)
    return min(wanted, available, s.max_estimation_batch)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def neuron_budget(model: nn.Sequential, in_index: int, out_index: int, s: GrowthSettings) -> int:
    """How many neurons the layer feeding ``out_index`` may still gain under the width and param budgets."""
    layer_in, layer_out = model[in_index], model[out_index]
    room = s.neurons_per_step
    if s.max_width is not None:
        room = min(room, s.max_width - layer_in.out_features)
    if s.max_params is not None:
        per_neuron = layer_in.in_features + 1 + layer_out.out_features
        room = min(room, (s.max_params - count_params(model)) // per_neuron)
    return max(room, 0)


def _evaluator(batch: Batch, loss_fn: LossFn, metric: Callable[[torch.Tensor, torch.Tensor], float],
               parallel: DataParallel | None = None):
    """(mean loss, metric) of a model's outputs on ``batch`` (this process's rows of it, summed over processes)."""

    def scores(out: torch.Tensor) -> tuple[float, float]:
        if parallel is None:
            return float(loss_fn(out, batch.y).mean()), metric(out, batch.y)
        n = batch.y.shape[0]
        local = [float(loss_fn(out, batch.y).sum()), metric(out, batch.y) * n if n else 0.0, float(n)]
        loss_sum, metric_sum, count = parallel.sum(torch.tensor(local, dtype=torch.float64)).tolist()
        return loss_sum / count, metric_sum / count

    return scores


def _rows(batch: Batch, parallel: DataParallel | None) -> Batch:
    """This process's rows of ``batch``."""
    if parallel is None:
        return batch
    lo, hi = shard_rows(batch.X.shape[0], parallel.rank, parallel.world)
    return Batch(batch.X[lo:hi], batch.y[lo:hi])


def _amplitude(model: nn.Sequential, cand: Candidate, batch: Batch, scores) -> tuple[float, float]:
    """(g*, loss at g*) by line search; GradMax keeps its fixed small fan-out (g = 1, loss unchanged)."""
    output = grown_output(model, cand, batch.X)
    if not cand.searches_amplitude:
        return 1.0, scores(output(1.0))[0]
    return line_search(lambda g: scores(output(g))[0], signed=cand.signed_amplitude)


def growth_step(
    model: nn.Sequential,
    growable: list[int],
    train: Batch,
    held_out: Batch,
    loss_fn: LossFn,
    metric: Callable[[torch.Tensor, torch.Tensor], float],
    s: GrowthSettings,
    generator: torch.Generator | None = None,
    parallel: DataParallel | None = None,
) -> tuple[nn.Sequential, list[Growth], list[LayerMoments]]:
    """Evaluate every growable layer, add neurons to the one with the largest loss decrease on
    ``held_out``; repeat on fresh statistics for up to ``layers_per_step`` layers.

    Returns the grown model, the growths applied and the final statistics of every layer (for Psi).
    With ``parallel``, this process works on its shard of each batch and takes the same decisions as
    the others (the sums over processes are the ones one process would compute on the whole batch).
    """
    held_out = _rows(held_out, parallel)
    scores = _evaluator(held_out, loss_fn, metric, parallel)

    def evaluate(net: nn.Sequential) -> tuple[float, float]:
        with torch.no_grad():
            return scores(net.eval()(held_out.X))

    remaining, applied = list(growable), []
    loss_0, metric_0 = evaluate(model)
    for _ in range(s.layers_per_step or len(growable)):
        moments = _moments(model, remaining, train, loss_fn, s, generator, parallel)
        best: tuple[float, Candidate, float, float] | None = None
        for m in moments:
            budget = neuron_budget(model, m.in_index, m.out_index, s)
            cand = propose(s.method, m, budget, generator) if budget > 0 else None
            if cand is None or cand.n_neurons == 0:
                continue
            gamma, loss = _amplitude(model, cand, held_out, scores)
            score = cand.gain if not cand.searches_amplitude else loss_0 - loss
            if gamma != 0.0 and score > 0 and (best is None or score > best[0]):
                best = (score, cand, gamma, loss)
        if best is None:
            break
        _, cand, gamma, _ = best
        model = add_neurons(model, cand, gamma)
        loss_1, metric_1 = evaluate(model)
        widths = [model[i].out_features for i in growable]
        applied.append(Growth(cand, gamma, loss_0, loss_1, metric_0, metric_1, widths))
        loss_0, metric_0 = loss_1, metric_1
        remaining.remove(cand.in_index)
        if not remaining:
            break
    final = _moments(model, growable, train, loss_fn, s, generator, parallel)
    psi = bottlenecks(final)
    for growth in applied:
        growth.psi_after = psi[growth.candidate.in_index]
    return model, applied, final


def _moments(model, indices, train: Batch, loss_fn, s: GrowthSettings, generator,
             parallel: DataParallel | None = None) -> list[LayerMoments]:
    fan_in = max(model[i].in_features for i in indices)
    batch = train.take(estimation_batch_size(fan_in, train.X.shape[0], s), generator)
    if parallel is None:
        return gather_moments(model, indices, batch.X, batch.y, loss_fn, chunk_size=s.chunk_size, generator=generator)
    local = gather_moments(model, indices, batch.X, batch.y, loss_fn, chunk_size=s.chunk_size, generator=generator,
                           shard=(parallel.rank, parallel.world))
    return parallel.sum_moments(local)


def bottlenecks(moments: list[LayerMoments]) -> dict[int, float]:
    """Psi per growable layer (keyed by the module index of its linear layer), Eq. 4 with dW*."""
    psi = {}
    for m in moments:
        dW = linalg.best_update(m.S_h, m.N_h)
        psi[m.in_index] = float(linalg.bottleneck(m.v_sq_norm, m.S_h, m.N_h, dW))
    return psi
