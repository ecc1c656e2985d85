"""Backpropagation statistics for every growable layer, gathered by temporary hooks.

Forward/backward passes over an estimation batch, streamed in chunks so that memory does not grow
with the batch: only the moment matrices are accumulated, in float64, and the unfolded (im2col)
tensors exist for one chunk at a time. Every pair kind of ``tinydeploy.growth.pairs`` is one case
of the convolutional construction of App. C.2.2 (a vector is a 1 x 1 image, a linear consumer a
window over the whole grid), so one code path computes them all.

Pairs whose consumer reads one tap per new channel (linear -> linear, conv -> global pool -> linear,
1 x 1 convolutions) project the goal with the cross moment S_ph in the same pass, as in the fully
connected case. Pairs with a spatial consumer window (conv -> conv, conv -> flatten -> linear) would
need an S_ph of size D x taps x (C_h taps + 1); instead a second pass computes the projected goal
V_goal - dW* B_h per chunk and accumulates N directly (``LayerMoments.N``). The second pass reads the
layers' recorded inputs and gradients kept from the first (raw, not unfolded) when they fit in
``KEEP_VALUES``, and runs the model again otherwise.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from tinydeploy.growth import linalg
from tinydeploy.growth.pairs import (
    Pair,
    consumer_goal,
    consumer_inputs,
    consumer_window,
    leading_pool,
    linearised_between,
    pairs_of,
    producer_patches,
    tap_shape,
)
from tinydeploy.model.losses import LossFn

#: Largest number of float64 values the unfolded tensors of one chunk may hold (all pairs together).
CHUNK_VALUES = 1 << 23
#: Largest number of recorded values (inputs and gradients, not unfolded) kept from the first pass for
#: the second; above it the second pass runs the model again.
KEEP_VALUES = 1 << 25
#: Pairs whose views of one sample hold at most this many values (vectors: nothing is unfolded) read the
#: whole estimation batch even where ``rows`` asks for fewer samples.
CHEAP_VIEWS = 4096


@dataclass
class LayerMoments:
    """Moments for growing the layer at module ``in_index`` whose consumer is module ``out_index``.

    All are divided by n (paper notation, ones row last; l runs over the consumer's output positions):
    S = (r/n) sum_il B^t_il^T B^t_il (Lemma C.2, r = min(taps, D); the plain B_prev B_prev^T/n for
    vectors), N_v = (1/n) sum_il B^t_il^T V_il, S_h = B_h B_h^T/n, N_h = B_h V_goal^T/n,
    VV = V_goal V_goal^T/n, N_z as N_v with a standard Gaussian Z in place of V_goal (independent of
    the inputs; for the significance threshold). N_v and N_z are (D, o * taps), columns ordered
    (output m, tap p). One-tap pairs carry S_ph = (1/n) sum_il B^t_il^T B_h,il^T; the others carry
    the projected N = (1/n) sum_il B^t_il^T (V_goal - dW* B_h)_il from a second pass.
    ``out_positions`` is the number L of the consumer's output positions.
    """

    in_index: int
    out_index: int
    n: int
    S: torch.Tensor
    N_v: torch.Tensor
    S_h: torch.Tensor
    N_h: torch.Tensor
    VV: torch.Tensor
    N_z: torch.Tensor
    S_ph: torch.Tensor | None = None
    N: torch.Tensor | None = None
    tap_shape: tuple[int, ...] = ()
    out_positions: int = 1

    @property
    def v_sq_norm(self) -> torch.Tensor:
        """||V_goal||_F^2 / n."""
        return torch.trace(self.VV)

    @property
    def taps(self) -> int:
        return math.prod(self.tap_shape)

    @property
    def n_outputs(self) -> int:
        return self.VV.shape[0]

    def projected_cross_moment(self, dW: torch.Tensor) -> torch.Tensor:
        """N = B^t V_goal_proj^T / n (D, o * taps) for the best update ``dW`` of the consumer."""
        if self.N is not None:
            return self.N
        return linalg.projected_cross_moment(self.N_v, self.S_ph, dW)


def with_ones(b: torch.Tensor) -> torch.Tensor:
    """Append the bias feature (a column of ones) to a batch of activities (n, d) -> (n, d+1)."""
    return torch.cat([b, torch.ones(b.shape[0], 1, dtype=b.dtype, device=b.device)], dim=1)


class _Recorder:
    """Temporary hooks on weight modules: keep each one's input and the gradient of its output."""

    def __init__(self, model: nn.Sequential, indices: set[int]):
        self.inputs: dict[int, torch.Tensor] = {}
        self.output_grads: dict[int, torch.Tensor] = {}
        self._handles = [model[i].register_forward_hook(self._hook(i)) for i in sorted(indices)]

    def _hook(self, index: int):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self.inputs[index] = args[0].detach()
            if output.requires_grad:
                output.register_hook(lambda grad: self.output_grads.__setitem__(index, grad.detach()))

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def layer_pairs(model: nn.Sequential, growable: list[int]) -> list[tuple[int, int]]:
    """(in_index, out_index) for each growable layer: out_index is the next linear or conv module."""
    return [(p.in_index, p.out_index) for p in pairs_of(model, growable)]


@dataclass
class _Views:
    """One chunk of one pair: B_h (n, h+1, L) and V_goal (n, o, L) of the consumer; for the producer
    side, B^t as U (n, D, taps, L) and the grid P (n, D, H, W) it was unfolded from."""

    Bh: torch.Tensor
    V: torch.Tensor
    U: torch.Tensor | None = None
    grid: torch.Tensor | None = None
    taps: tuple[int, ...] = ()


def _recorded(pair: Pair, recorder: _Recorder, rows: int | None = None) -> tuple[torch.Tensor, ...]:
    """The producer's input, the consumer's input and the gradient of its output, first ``rows`` samples."""
    return (recorder.inputs[pair.in_index][:rows], recorder.inputs[pair.out_index][:rows],
            recorder.output_grads[pair.out_index][:rows])


def _views(model: nn.Sequential, pair: Pair, recorded: tuple[torch.Tensor, ...], producer: bool = True) -> _Views:
    """The unfolded views of one recorded chunk, in float64."""
    x_in, b, grad = recorded
    consumer = pair.consumer(model)
    Bh = consumer_inputs(consumer, b.double())
    V = consumer_goal(grad.double())
    if not producer:
        return _Views(Bh, V)
    between = pair.between(model)
    pool = leading_pool(between) if not isinstance(pair.producer(model), nn.Linear) else None
    grid = linearised_between(producer_patches(pair.producer(model), x_in.double(), pool), between,
                              pooled=pool is not None)
    size = tuple(grid.shape[-2:])
    window = consumer_window(consumer, size)
    U = window.unfold(grid).reshape(grid.shape[0], grid.shape[1], window.taps, -1)
    return _Views(Bh, V, U, grid, tap_shape(consumer, size))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(n, k, L) -> (n * L, k): one row per (sample, position)."""
    return x.permute(0, 2, 1).reshape(-1, x.shape[1])


def _cross(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """sum_il B^t_il^T V_il as (D, o * taps), columns ordered (m, p)."""
    if U.shape[2] == U.shape[3] == 1:  # vectors: a plain product B_prev^T V
        return U[:, :, 0, 0].T @ V[:, :, 0]
    return torch.einsum("idpl,iml->dmp", U, V).reshape(U.shape[1], -1)


def _add(acc: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    acc[key] = acc[key] + value if key in acc else value


def _accumulate_consumer(acc: dict[str, torch.Tensor], views: _Views) -> None:
    Vr, Bhr = _rows(views.V), _rows(views.Bh)
    _add(acc, "S_h", Bhr.T @ Bhr)
    _add(acc, "N_h", Bhr.T @ Vr)
    _add(acc, "VV", Vr.T @ Vr)


def _accumulate(acc: dict[str, torch.Tensor], model: nn.Sequential, pair: Pair, views: _Views, generator) -> None:
    """Add one chunk's products to the running sums of ``pair``."""
    U, V, grid = views.U, views.V, views.grid
    D, taps = U.shape[1], U.shape[2]
    size = tuple(grid.shape[-2:])
    weight = consumer_window(pair.consumer(model), size).coverage(size, U.dtype, U.device).sqrt()
    P = _rows((grid * weight).flatten(2))
    Z = torch.randn(V.shape, dtype=V.dtype, device=V.device, generator=generator)
    _add(acc, "S", min(taps, D) * (P.T @ P))
    _add(acc, "N_v", _cross(U, V))
    _add(acc, "N_z", _cross(U, Z))
    _accumulate_consumer(acc, views)
    if taps == 1:
        _add(acc, "S_ph", _rows(U[:, :, 0]).T @ _rows(views.Bh))


@dataclass
class _Probe:
    """Per sample of one pair: float64 values of its views, values recorded, and its taps."""

    views: int
    recorded: int
    taps: int


def _probe(model: nn.Sequential, pairs: dict[int, Pair], X: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
           producer: bool) -> dict[int, _Probe]:
    """Sizes of one sample's views, from a forward/backward pass of X[:1] (nothing to measure for vectors)."""
    if all(isinstance(p.producer(model), nn.Linear) and isinstance(p.consumer(model), nn.Linear)
           for p in pairs.values()):
        return {i: _Probe(0, 0, 1) for i in pairs}
    recorder = _Recorder(model, {i for p in pairs.values() for i in (p.in_index, p.out_index)})
    try:
        model.zero_grad(set_to_none=True)
        loss_fn(model(X[:1]), y[:1]).sum().backward()
        found = {}
        for index, pair in pairs.items():
            recorded = _recorded(pair, recorder)
            v = _views(model, pair, recorded, producer)
            size = v.Bh.numel() + 3 * v.V.numel() + (3 * v.U.numel() + v.grid.numel() if producer else 0)
            found[index] = _Probe(size, sum(t.numel() for t in recorded), math.prod(v.taps) if producer else 1)
    finally:
        recorder.remove()
        model.zero_grad(set_to_none=True)
    return found


def _chunks(model: nn.Sequential, pairs: dict[int, Pair], rows: dict[int, int], X: torch.Tensor, y: torch.Tensor,
            loss_fn: LossFn, chunk_size: int, probe: dict[int, _Probe]):
    """Forward/backward over the first max(rows) samples of (X, y) chunk by chunk; yields for each chunk
    {pair index: recorded tensors} for the pairs whose first ``rows[index]`` samples it overlaps. A chunk
    holds at most ``chunk_size`` samples, and fewer when the views of the pairs still reading would
    exceed ``CHUNK_VALUES`` values."""
    recorder = _Recorder(model, {i for p in pairs.values() for i in (p.in_index, p.out_index)})
    start, end = 0, max(rows[i] for i in pairs)
    try:
        while start < end:
            active = [i for i in pairs if rows[i] > start]
            chunk = max(1, min(chunk_size, CHUNK_VALUES // max(1, sum(probe[i].views for i in active))))
            model.zero_grad(set_to_none=True)
            loss_fn(model(X[start : start + chunk]), y[start : start + chunk]).sum().backward()
            yield {i: _recorded(pairs[i], recorder, rows[i] - start) for i in active}
            start += chunk
    finally:
        recorder.remove()
        model.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm uses its running statistics) for the statistics, the previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _row_counts(n: int, pairs: list[Pair], rows: list[int] | None, probe: dict[int, _Probe]) -> dict[int, int]:
    """Samples each pair reads: ``rows[k]`` (at most n) when its views are costly, else all n."""
    return {i: min(n, rows[i]) if rows and probe[i].views > CHEAP_VIEWS else n for i in range(len(pairs))}


def gather_moments(
    model: nn.Sequential,
    growable: list[int],
    X: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    *,
    chunk_size: int = 1024,
    generator: torch.Generator | None = None,
    rows: list[int] | None = None,
    ridge: float = 0.0,
) -> list[LayerMoments]:
    """Accumulate the moments of every growable layer over (X, y), at most ``chunk_size`` samples at a
    time (fewer when the unfolded tensors of a chunk would exceed ``CHUNK_VALUES`` values). ``rows``
    (one per growable layer) limits a layer's statistics to the first rows[k] samples of X when its
    unfolded views are costly (more than ``CHEAP_VIEWS`` values per sample): pairs that need fewer
    samples (App. E.1) stop early while the others go on. ``ridge`` is the one the candidates
    will use for dW* (``linalg.best_update``): the second pass projects the goal with that dW*.

    V_goal = -d(sum_i l_i)/dA_out is not divided by n (design note), the moments are. The model runs in
    eval mode (BatchNorm uses its running statistics) and is left in its previous mode.
    """
    pairs = pairs_of(model, growable)
    indexed = dict(enumerate(pairs))
    sums: list[dict[str, torch.Tensor]] = [{} for _ in pairs]
    meta: list[dict] = [{} for _ in pairs]
    with _evaluating(model):
        probe = _probe(model, indexed, X, y, loss_fn, producer=True)
        counts = _row_counts(X.shape[0], pairs, rows, probe)
        spatial = {i: pairs[i] for i in indexed if probe[i].taps > 1}
        keep = sum(probe[i].recorded * counts[i] for i in spatial) <= KEEP_VALUES
        kept: list[dict[int, tuple[torch.Tensor, ...]]] = []
        for recorded in _chunks(model, indexed, counts, X, y, loss_fn, chunk_size, probe):
            for index, tensors in recorded.items():
                views = _views(model, pairs[index], tensors)
                _accumulate(sums[index], model, pairs[index], views, generator)
                meta[index].update(tap_shape=views.taps, out_positions=int(views.V.shape[2]))
            if keep and spatial:
                kept.append({i: tuple(t.clone() for t in recorded[i]) for i in spatial if i in recorded})
        updates = {i: linalg.best_update(sums[i]["S_h"] / counts[i], sums[i]["N_h"] / counts[i], ridge=ridge)
                   for i in spatial}
        second = kept if keep else _chunks(model, spatial, counts, X, y, loss_fn, chunk_size, probe)
        for recorded in second:
            for index, tensors in recorded.items():
                views = _views(model, pairs[index], tensors)
                projected = views.V - torch.einsum("oh,ihl->iol", updates[index], views.Bh)
                _add(sums[index], "N", _cross(views.U, projected))
    return [
        LayerMoments(p.in_index, p.out_index, counts[i], **{k: v / counts[i] for k, v in acc.items()},
                     tap_shape=m["tap_shape"], out_positions=m["out_positions"])
        for i, (acc, p, m) in enumerate(zip(sums, pairs, meta))
    ]


def gather_bottlenecks(
    model: nn.Sequential,
    growable: list[int],
    X: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    *,
    chunk_size: int = 1024,
    rows: list[int] | None = None,
) -> dict[int, float]:
    """Psi (Eq. 4 with dW*, Prop. 3.1) of every growable layer, keyed by its module index, from the
    consumer-side moments only (S_h, N_h, VV): one pass, no unfolding of the producer's inputs."""
    pairs = pairs_of(model, growable)
    indexed = dict(enumerate(pairs))
    sums: list[dict[str, torch.Tensor]] = [{} for _ in pairs]
    with _evaluating(model):
        probe = _probe(model, indexed, X, y, loss_fn, producer=False)
        counts = _row_counts(X.shape[0], pairs, rows, probe)
        for recorded in _chunks(model, indexed, counts, X, y, loss_fn, chunk_size, probe):
            for index, tensors in recorded.items():
                _accumulate_consumer(sums[index], _views(model, pairs[index], tensors, producer=False))
    psi = {}
    for i, (acc, pair) in enumerate(zip(sums, pairs)):
        S_h, N_h, VV = (acc[k] / counts[i] for k in ("S_h", "N_h", "VV"))
        dW = linalg.best_update(S_h, N_h)
        psi[pair.in_index] = float(linalg.bottleneck(torch.trace(VV), S_h, N_h, dW))
    return psi
