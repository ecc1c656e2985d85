"""Growth policy: where to add neurons, how many, at what amplitude, within which budget."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Protocol

import torch
from torch import nn

from tinydeploy.growth.amplitude import line_search
from tinydeploy.growth.candidates import Candidate, Context, balance, propose
from tinydeploy.growth.costs import count_macs, count_params, neuron_cost, output_shapes
from tinydeploy.growth.pairs import CONV_TYPES, evaluating, pair_at, pairs_of
from tinydeploy.growth.statistics import LayerMoments, gather_bottlenecks, gather_round, shard_rows
from tinydeploy.growth.surgery import add_neurons, grown_output
from tinydeploy.model.build import module_width
from tinydeploy.model.losses import LossFn, scoring_loss


@dataclass(frozen=True)
class GrowthSettings:
    """How one growth step chooses and sizes new neurons."""

    method: str = "tiny"
    neurons_per_step: int = 16
    layers_per_step: int | None = None
    max_params: int | None = None
    max_macs: int | None = None
    max_width: int | None = None
    #: Per growable module index: largest width (a residual block's full middle width) and most neurons
    #: per step (the paper's per-depth counts, App. F.1 Table 2); others use max_width / neurons_per_step.
    layer_max_width: dict[int, int] | None = None
    layer_neurons: dict[int, int] | None = None
    estimation_scale: float = 4.0
    estimation_floor: int = 16
    min_estimation_batch: int = 256
    max_estimation_batch: int = 16384
    chunk_size: int = 4096
    #: Relative ridge on S and S_h (``linalg.ridged``); 0 is the paper's pseudo-inverse.
    ridge: float = 0.0
    #: Rescale new neurons' fan-in against fan-out to the sizes of their layers' weights (``candidates.balance``).
    balance: bool = False
    #: One round of statistics per step: the layers' candidates are ranked by their loss decrease, then
    #: applied in that order, each amplitude searched again on the grown model, while they still fit their
    #: pairs (residual blocks: independent pairs). Off: fresh statistics after every layer grown.
    reuse_statistics: bool = False


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


def estimation_batch_size(fan_in: int, available: int, s: GrowthSettings, positions: int = 1) -> int:
    """App. E.1: n proportional to (fan-in + 1)^2 / P (factor ``estimation_scale``), where P is the
    number of positions each sample contributes (1 for vectors, the pixels of a convolution's grid),
    floored at ``estimation_floor`` x (fan-in + 1) / P and ``min_estimation_batch``, capped by the data
    available and ``max_estimation_batch``."""
    d1 = fan_in + 1
    wanted = max(int(s.estimation_scale * d1 * d1 / positions), s.estimation_floor * d1 // positions,
                 s.min_estimation_batch)
    return min(wanted, available, s.max_estimation_batch)


def neuron_budget(model: nn.Sequential, in_index: int, out_index: int, s: GrowthSettings,
                  sample: torch.Tensor | None = None) -> int:
    """How many neurons (channels) the layer ``in_index`` may still gain under the width, parameter and
    MAC budgets; ``sample`` (one input) is needed for the MAC budget."""
    room = (s.layer_neurons or {}).get(in_index, s.neurons_per_step)
    for cap in (s.max_width, (s.layer_max_width or {}).get(in_index)):
        if cap is not None:
            room = min(room, cap - module_width(model[in_index]))
    if s.max_params is not None or s.max_macs is not None:
        if s.max_macs is not None and sample is None:
            raise ValueError("a MAC budget needs a sample input to measure output positions")
        shapes = output_shapes(model, sample) if s.max_macs is not None else None
        params, macs = neuron_cost(model, in_index, out_index, shapes)
        if s.max_params is not None:
            room = min(room, (s.max_params - count_params(model)) // params)
        if s.max_macs is not None:
            room = min(room, (s.max_macs - count_macs(model, shapes)) // macs)
    return max(room, 0)


def _rms(weight: torch.Tensor) -> float:
    return float(weight.detach().double().pow(2).mean().sqrt())


class _Evaluator:
    """(mean loss, metric) of a model's outputs on ``batch`` (this process's rows of it, summed over
    processes); ``losses`` gives the mean loss of several outputs stacked along a leading dim at once."""

    def __init__(self, batch: Batch, loss_fn: LossFn, metric: Callable[[torch.Tensor, torch.Tensor], float],
                 parallel: DataParallel | None = None):
        self.batch, self.loss_fn, self.metric, self.parallel = batch, scoring_loss(loss_fn), metric, parallel

    def __call__(self, out: torch.Tensor) -> tuple[float, float]:
        y = self.batch.y
        if self.parallel is None:
            return float(self.loss_fn(out, y).mean()), self.metric(out, y)
        n = y.shape[0]
        local = [float(self.loss_fn(out, y).sum()), self.metric(out, y) * n if n else 0.0, float(n)]
        loss_sum, metric_sum, count = self.parallel.sum(torch.tensor(local, dtype=torch.float64)).tolist()
        return loss_sum / count, metric_sum / count

    def losses(self, outs: torch.Tensor) -> list[float]:
        """Mean loss of each of the G outputs in ``outs`` (G, n, ...): one loss call, one sum over processes."""
        y, G = self.batch.y, outs.shape[0]
        n = y.shape[0]
        per_sample = self.loss_fn(outs.flatten(0, 1), y.expand(G, *y.shape).flatten(0, 1)).reshape(G, n)
        if self.parallel is None:
            return per_sample.double().mean(1).tolist()
        sums = torch.cat([per_sample.double().sum(1), torch.tensor([float(n)], dtype=torch.float64)])
        total = self.parallel.sum(sums)
        return (total[:-1] / total[-1]).tolist()


def _rows(batch: Batch, parallel: DataParallel | None) -> Batch:
    """This process's rows of ``batch``."""
    if parallel is None:
        return batch
    lo, hi = shard_rows(batch.X.shape[0], parallel.rank, parallel.world)
    return Batch(batch.X[lo:hi], batch.y[lo:hi])


def _amplitude(model: nn.Sequential, cand: Candidate, batch: Batch, scores: _Evaluator) -> tuple[float, float]:
    """(g*, loss at g*) by line search; GradMax keeps its fixed small fan-out (g = 1, loss unchanged)."""
    output = grown_output(model, cand, batch.X)
    if not cand.searches_amplitude:
        return 1.0, scores(output(1.0))[0]
    return line_search(lambda gammas: scores.losses(output.stacked(gammas)), signed=cand.signed_amplitude)


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
) -> tuple[nn.Sequential, list[Growth], dict[int, float]]:
    """Evaluate every growable layer, add neurons to the one with the largest loss decrease on
    ``held_out``; repeat on fresh statistics (or, with ``reuse_statistics``, the candidates that still
    fit, amplitudes searched again) for up to ``layers_per_step`` layers.

    Returns the grown model, the growths applied and the bottleneck Psi of every growable layer after them
    (keyed by module index; from consumer-side statistics only): from the statistics of the round that
    found nothing to add when there is one (they were gathered on the final model, the grown layers'
    consumer side included, ``gather_round``), else from one more pass (``gather_bottlenecks``).
    With ``parallel``, this process works on its shard of each batch and takes the same decisions as
    the others (the sums over processes are the ones one process would compute on the whole batch).
    """
    sample = held_out.X  # the whole batch in every process: new BatchNorm channels' statistics
    held_out = _rows(held_out, parallel)
    scores = _Evaluator(held_out, loss_fn, metric, parallel)

    def evaluate(net: nn.Sequential) -> tuple[float, float]:
        with torch.no_grad():
            return scores(net.eval()(held_out.X))

    remaining, applied = list(growable), []
    loss_0, metric_0 = evaluate(model)
    ranked: list[Candidate] = []  # with reuse_statistics: this step's candidates, best first
    psi: dict[int, float] | None = None  # of the current model, when its statistics are at hand
    for _ in range(s.layers_per_step or len(growable)):
        reusing = s.reuse_statistics and bool(ranked)
        if reusing:
            candidates, psi = [c for c in ranked if _fits(model, c)], None
        else:
            others = [i for i in growable if i not in remaining]
            candidates, psi = _propose(model, remaining, others, train, loss_fn, s, generator, parallel)
        best: tuple[float, Candidate, float, float] | None = None
        scored: list[tuple[float, Candidate]] = []
        examined: set[int] = set()
        for cand in candidates:
            examined.add(cand.in_index)
            cand = _truncated(cand, neuron_budget(model, cand.in_index, cand.out_index, s, train.X[:1]))
            if cand.n_neurons == 0:
                continue
            gamma, loss = _amplitude(model, cand, held_out, scores)
            score = cand.gain if not cand.searches_amplitude else loss_0 - loss
            scored.append((score, cand))
            if gamma != 0.0 and score > 0 and (best is None or score > best[0]):
                best = (score, cand, gamma, loss)
            if reusing and best is not None:
                break  # the next candidate in the first round's order that still lowers the loss
        if s.reuse_statistics:
            ranked = ([c for c in ranked if c.in_index not in examined] if reusing
                      else [c for _, c in sorted(scored, key=lambda t: -t[0])])
        if best is None:
            break
        _, cand, gamma, _ = best
        model, psi = add_neurons(model, cand, gamma, sample), None
        loss_1, metric_1 = evaluate(model)
        widths = [module_width(model[i]) for i in growable]
        applied.append(Growth(cand, gamma, loss_0, loss_1, metric_0, metric_1, widths))
        loss_0, metric_0 = loss_1, metric_1
        remaining.remove(cand.in_index)
        ranked = [c for c in ranked if c.in_index != cand.in_index]
        if not remaining:
            break
    if psi is None:
        psi = _bottlenecks(model, growable, train, loss_fn, s, generator, parallel)
    for growth in applied:
        growth.psi_after = psi[growth.candidate.in_index]
    return model, applied, psi


def _propose(model: nn.Sequential, indices: list[int], others: list[int], train: Batch, loss_fn, s: GrowthSettings,
             generator, parallel: DataParallel | None) -> tuple[list[Candidate], dict[int, float]]:
    """The chosen method's candidate neurons of every layer in ``indices`` (within its budget), from one
    round of statistics, and Psi of the layers ``indices`` and ``others`` from the same round."""
    proposals = []
    (moments, psi), batch = _moments(model, indices, others, train, loss_fn, s, generator, parallel)
    context = Context(model, batch.X, batch.y, loss_fn)
    for m in moments:
        budget = neuron_budget(model, m.in_index, m.out_index, s, train.X[:1])
        cand = propose(s.method, m, budget, generator, s.ridge, context) if budget > 0 else None
        if cand is not None and s.balance:
            pair = pair_at(model, m.in_index)
            cand = balance(cand, _rms(pair.producer(model).weight), _rms(pair.consumer(model).weight))
        if cand is not None and cand.n_neurons > 0:
            proposals.append(cand)
    return proposals, psi


def _fits(model: nn.Sequential, cand: Candidate) -> bool:
    """Whether ``cand`` (from earlier statistics) still fits its pair: the producer's fan-in and the
    consumer's outputs and fan-in are those it was computed for (growing a residual block's middle
    channels leaves every other block's pair as it was; growing a layer of a plain stack does not)."""
    pair = pair_at(model, cand.in_index)
    producer, consumer = pair.producer(model), pair.consumer(model)
    fits = cand.alpha.shape[1] == producer.weight[0].numel() + 1 and cand.omega.shape[0] == consumer.weight.shape[0]
    return fits and (cand.dW is None or cand.dW.shape[1] == consumer.weight[0].numel() + 1)


def _truncated(cand: Candidate, budget: int) -> Candidate:
    """``cand`` with at most ``budget`` neurons (its first ones)."""
    if cand.n_neurons <= budget:
        return cand
    k = max(budget, 0)
    return replace(cand, alpha=cand.alpha[:k], omega=cand.omega[:, :k], lambdas=cand.lambdas[:k])


def _estimation_batch(model, indices, train: Batch, s: GrowthSettings, generator) -> tuple[Batch, list[int]]:
    """One random estimation batch for the layers ``indices``, and the samples App. E.1 asks of each."""
    rows = [_estimation_rows(model, pair.in_index, train, s) for pair in pairs_of(model, indices)]
    return train.take(max(rows), generator), rows


def _moments(model, indices, others, train: Batch, loss_fn, s: GrowthSettings, generator,
             parallel: DataParallel | None = None) -> tuple[tuple[list[LayerMoments], dict[int, float]], Batch]:
    """Statistics of the layers ``indices``, each layer reading the first samples of the batch it needs
    (with ``parallel``: this process's rows of every chunk, summed over the processes), with Psi of them
    and of the layers ``others`` (``gather_round``), and that batch."""
    batch, rows = _estimation_batch(model, indices, train, s, generator)
    return gather_round(model, indices, others, batch.X, batch.y, loss_fn, chunk_size=s.chunk_size,
                        generator=generator, rows=rows, ridge=s.ridge, **_sharding(parallel)), batch


def _bottlenecks(model, indices, train: Batch, loss_fn, s: GrowthSettings, generator,
                 parallel: DataParallel | None = None) -> dict[int, float]:
    """Psi of the layers ``indices`` (the paper's dW*, no ridge) from consumer-side statistics."""
    batch, rows = _estimation_batch(model, indices, train, s, generator)
    return gather_bottlenecks(model, indices, batch.X, batch.y, loss_fn, chunk_size=s.chunk_size, rows=rows,
                              **_sharding(parallel))


def _sharding(parallel: DataParallel | None) -> dict:
    """The statistics' arguments for this process's share of the work: its rows and the sum over processes."""
    if parallel is None:
        return {}
    return {"shard": (parallel.rank, parallel.world), "total": parallel.sum}


def _estimation_rows(model: nn.Sequential, in_index: int, train: Batch, s: GrowthSettings) -> int:
    """Samples the pair needs (App. E.1): enough for the new neurons' S (fan-in + 1 per position of the
    grid the consumer reads, before any flatten) and for the consumer's best update (its fan-in + 1 per
    output position). For an MLP: (fan-in + 1)^2 of the layer and of its consumer."""
    pair = pair_at(model, in_index)
    producer, consumer = pair.producer(model), pair.consumer(model)
    grid, out_positions = 1, 1
    if isinstance(producer, CONV_TYPES):
        with torch.no_grad(), evaluating(model):
            h = producer(pair.producer_input(model, train.X[:1]))
            for module in pair.between(model):
                h = h if isinstance(module, nn.Flatten) else module(h)
            grid = math.prod(h.shape[2:])
            if isinstance(consumer, CONV_TYPES):
                out_positions = math.prod(consumer(h).shape[2:])
    available = train.X.shape[0]
    producer_rows = estimation_batch_size(producer.weight[0].numel(), available, s, grid)
    consumer_rows = estimation_batch_size(consumer.weight[0].numel(), available, s, out_positions)
    return max(producer_rows, consumer_rows)
