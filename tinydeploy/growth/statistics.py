"""Backpropagation statistics for every growable layer, gathered by temporary hooks.

Forward/backward passes over an estimation batch, streamed in chunks so that memory does not grow
with the batch: only the moment matrices are accumulated, and the unfolded (im2col) tensors exist for
one chunk at a time. The products of one chunk are formed in the activities' dtype (float32 for a
float32 model: half the memory traffic of float64 and twice the arithmetic rate) and accumulated
over chunks in float64, so rounding grows with the chunk, not with the batch (measured against
float64 products in ``benchmarks/step_scaling.py``; a float64 model gets float64 products). The
backward pass computes only the gradients of the recorded outputs (``torch.autograd.grad``), not
the weights'. Every pair kind of ``tinydeploy.growth.pairs`` is one case
of the convolutional construction of App. C.2.2 (a vector is a 1 x 1 image, a linear consumer a
window over the whole grid), so one code path computes them all.

Pairs whose consumer reads one tap per new channel (linear -> linear, conv -> global pool -> linear,
1 x 1 convolutions) project the goal with the cross moment S_ph in the same pass, as in the fully
connected case. Pairs with a spatial consumer window (conv -> conv, conv -> flatten -> linear) need an
S_ph of size D x taps x (C_h taps + 1): narrow ones form it in the same pass too; for wide ones a second
pass is cheaper (``_spatial_projects_later``): it computes the projected goal V_goal - dW* B_h per
chunk and accumulates N directly (``LayerMoments.N``). The second pass reads the
layers' recorded inputs and gradients kept from the first (raw, not unfolded) when they fit in
``KEEP_VALUES``, and runs the model again otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn.grad import conv2d_weight

from tinydeploy.growth import linalg
from tinydeploy.growth.pairs import (
    Pair,
    Window,
    consumer_goal,
    consumer_inputs,
    consumer_window,
    evaluating as _evaluating,
    leading_pool,
    linearised_between,
    pairs_of,
    producer_patches,
    tap_shape,
)
from tinydeploy.model.losses import LossFn

#: Largest number of float64 values the unfolded tensors of one pair may hold at a time: a chunk's rows
#: are unfolded in slices of at most that size.
CHUNK_VALUES = 1 << 23
#: Largest number of values the recorded inputs and gradients of one chunk may hold (all pairs together):
#: a forward/backward pass covers that many samples, however costly their unfolded views.
RECORD_VALUES = 1 << 24
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
    (output m, tap p). Pairs whose goal is projected in the same pass carry S_ph = (1/n) sum_il
    B^t_il^T B_h,il^T ((D, (h+1) * taps), columns (input m, tap p)); the others carry the projected
    N = (1/n) sum_il B^t_il^T (V_goal - dW* B_h)_il from a second pass (``gather_moments``).
    ``out_positions`` is the number L of the consumer's output positions. Pairs with the projected N
    also carry the best update ``dW`` it was projected with (``linalg.best_update`` with ``ridge``).
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
    dW: torch.Tensor | None = None
    ridge: float = 0.0
    eps: float = 0.0  # unit roundoff of the activities the products were formed from (``linalg.rank_cut``)
    #: Eigendecompositions found so far, keyed by id of the moment (kept with it): shared by the pairs of
    #: one ``gather_moments``, where a layer's S_h is the same tensor as the next layer's S.
    spectra: dict[int, tuple[torch.Tensor, linalg.Spectrum]] = field(default_factory=dict, repr=False, compare=False)

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

    def best_update(self, ridge: float = 0.0) -> torch.Tensor:
        """dW* = N_h^T S_h^+ (Prop. 3.1; ``ridge``: ``linalg.ridged``), the one computed with the moments if any."""
        if self.dW is not None and ridge == self.ridge:
            return self.dW
        return linalg.best_update(self.factor(self.S_h, linalg.DEFAULT_RELATIVE_CUT, ridge), self.N_h, ridge=ridge)

    def factor(self, moment: torch.Tensor, rel_cut: float, ridge: float) -> linalg.Cholesky | linalg.Spectrum:
        """``linalg.factorise`` of one of these symmetric moments (S or S_h), its Spectrum computed once per tensor."""
        return linalg.factorise(moment, rel_cut, ridge, spectrum=self.spectrum)

    def spectrum(self, moment: torch.Tensor) -> linalg.Spectrum:
        """``linalg.Spectrum`` of one of these symmetric moments (S or S_h), computed once per tensor."""
        found = self.spectra.get(id(moment))
        if found is None or found[0] is not moment:
            found = self.spectra[id(moment)] = (moment, linalg.Spectrum.of(moment))
        return found[1]

    def projected_cross_moment(self, dW: torch.Tensor) -> torch.Tensor:
        """N = B^t V_goal_proj^T / n (D, o * taps) for the best update ``dW`` of the consumer."""
        if self.N is not None:
            return self.N
        return linalg.projected_cross_moment(self.N_v, self.S_ph, dW, self.taps)


def with_ones(b: torch.Tensor) -> torch.Tensor:
    """Append the bias feature (a column of ones) to a batch of activities (n, d) -> (n, d+1)."""
    return torch.cat([b, torch.ones(b.shape[0], 1, dtype=b.dtype, device=b.device)], dim=1)


class _Recorder:
    """Temporary hooks on weight modules (by path): keep each one's input and output; ``backward`` then
    gives the gradients of the outputs of the modules asked for (and of nothing else: no weight gradients)."""

    def __init__(self, model: nn.Module, paths: set[str]):
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.output_grads: dict[str, torch.Tensor] = {}
        self._handles = [model.get_submodule(p).register_forward_hook(self._hook(p)) for p in sorted(paths)]

    def _hook(self, path: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self.inputs[path] = args[0].detach()
            self.outputs[path] = output

        return hook

    def backward(self, loss: torch.Tensor, paths: set[str]) -> None:
        """d loss / d output of each module in ``paths`` (autograd computes only what leads there)."""
        order = sorted(paths)
        grads = torch.autograd.grad(loss, [self.outputs[i] for i in order])
        self.output_grads = {i: g.detach() for i, g in zip(order, grads)}
        self.outputs = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def layer_pairs(model: nn.Sequential, growable: list[int]) -> list[tuple[int, int]]:
    """(in_index, out_index) for each growable layer: out_index is the next linear or conv module."""
    return [(p.in_index, p.out_index) for p in pairs_of(model, growable)]


@dataclass
class _Views:
    """One chunk of one pair: B_h (n, h+1, L) and V_goal (n, o, L) of the consumer; for the producer
    side, the grid P (n, D, H, W) and the consumer's window on it, whose unfolding is B^t (``U``)."""

    Bh: torch.Tensor
    V: torch.Tensor
    grid: torch.Tensor | None = None
    window: Window | None = None
    taps: tuple[int, ...] = ()

    @property
    def U(self) -> torch.Tensor:
        """B^t as (n, D, taps, L): the grid unfolded by the consumer's window (a copy)."""
        assert self.grid is not None and self.window is not None
        unfolded = self.window.unfold(self.grid)
        return unfolded.reshape(self.grid.shape[0], self.grid.shape[1], self.window.taps, unfolded.shape[-1])

    def cross(self, M: torch.Tensor) -> torch.Tensor:
        """sum_il B^t_il^T M_il as (D, o * taps), columns ordered (m, p), for M (n, o, L) shaped like V.

        A window that slides over the grid makes this the weight gradient of a convolution of the grid
        with output gradient M (torch's kernel, without unfolding the grid: 2-7x faster than the product
        with ``U`` at the statistics' sizes); a window over the whole grid, or a single tap, a product
        with the grid itself."""
        assert self.grid is not None and self.window is not None
        grid, window = self.grid, self.window
        n, D = grid.shape[:2]
        if window.kernel == tuple(grid.shape[-2:]) and window.padding == (0, 0):  # one position: no unfolding
            product = grid.reshape(n, D * window.taps).T @ M[:, :, 0]  # rows (d, p)
            return product.reshape(D, window.taps, -1).transpose(1, 2).reshape(D, -1)
        if window.taps == 1:
            return torch.einsum("idl,iml->dm", self.U[:, :, 0], M)
        out = window.out_size(tuple(grid.shape[-2:]))
        weight = conv2d_weight(grid, (M.shape[1], D, *window.kernel), M.reshape(n, M.shape[1], *out),
                               stride=window.stride, padding=window.padding)
        return weight.transpose(0, 1).reshape(D, -1)


def _recorded(pair: Pair, recorder: _Recorder, rows: int | None = None) -> tuple[torch.Tensor, ...]:
    """The producer's input, the consumer's input and the gradient of its output, first ``rows`` samples."""
    return (recorder.inputs[pair.producer_path][:rows], recorder.inputs[pair.consumer_path][:rows],
            recorder.output_grads[pair.consumer_path][:rows])


def _views(model: nn.Sequential, pair: Pair, recorded: tuple[torch.Tensor, ...], producer: bool = True) -> _Views:
    """The views of one recorded chunk, in the recorded dtype (B^t is unfolded only where asked: ``U``)."""
    x_in, b, grad = recorded
    consumer = pair.consumer(model)
    Bh = consumer_inputs(consumer, b)
    V = consumer_goal(grad)
    if not producer:
        return _Views(Bh, V)
    between = pair.between(model)
    pool = leading_pool(between) if not isinstance(pair.producer(model), nn.Linear) else None
    grid = linearised_between(producer_patches(pair.producer(model), x_in, pool), between, pooled=pool is not None)
    size = tuple(grid.shape[-2:])
    return _Views(Bh, V, grid, consumer_window(consumer, size), tap_shape(consumer, size))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(n, k, L) -> (n * L, k): one row per (sample, position)."""
    return x.permute(0, 2, 1).reshape(-1, x.shape[1])


def _add(acc: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    """Add one chunk's product (formed in the activities' dtype) to the float64 running sum (in place)."""
    if key in acc:
        acc[key].add_(value)
    else:
        acc[key] = value.to(torch.float64, copy=True)


def symmetric_product(A: torch.Tensor) -> torch.Tensor:
    """A^T A; for a wide A from three of its four blocks (the fourth is a transpose): 3/4 of the work."""
    if A.shape[1] < SPLIT_WIDTH:
        return A.T @ A
    half = A.shape[1] // 2
    left, right = A[:, :half], A[:, half:]
    corner = left.T @ right
    return torch.cat([torch.cat([left.T @ left, corner], 1), torch.cat([corner.T, right.T @ right], 1)], 0)


#: Matrices at least this wide have A^T A formed from three of its four blocks.
SPLIT_WIDTH = 128


def ones_gram(A: torch.Tensor) -> torch.Tensor:
    """[A 1]^T [A 1] without forming [A 1]: the ones column contributes column sums and the row count."""
    sums = A.sum(0)
    corner = torch.full((1, 1), A.shape[0], dtype=A.dtype, device=A.device)
    return torch.cat([torch.cat([symmetric_product(A), sums[:, None]], 1), torch.cat([sums[None], corner], 1)], 0)


def ones_cross(A: torch.Tensor, M: torch.Tensor, ones_right: bool = False) -> torch.Tensor:
    """[A 1]^T M (or [A 1]^T [M 1] with ``ones_right``) without forming [A 1]."""
    product = torch.cat([A.T @ M, M.sum(0)[None]], 0)
    if not ones_right:
        return product
    column = torch.cat([A.sum(0), torch.full((1,), A.shape[0], dtype=A.dtype, device=A.device)])
    return torch.cat([product, column[:, None]], 1)


class _Grams:
    """[A 1]^T [A 1] of the layer inputs A of one chunk, each computed once: keyed by the module A is the
    input of, and the rows read, so that a layer's S_h serves as the next layer's S."""

    def __init__(self) -> None:
        self._found: dict[tuple[str, int], torch.Tensor] = {}

    def of(self, key: str, A: torch.Tensor) -> torch.Tensor:
        if (key, A.shape[0]) not in self._found:
            self._found[key, A.shape[0]] = ones_gram(A)
        return self._found[key, A.shape[0]]


def _accumulate_consumer(acc: dict[str, torch.Tensor], views: _Views) -> None:
    Vr, Bhr = _rows(views.V), _rows(views.Bh)
    _add(acc, "S_h", symmetric_product(Bhr))
    _add(acc, "N_h", Bhr.T @ Vr)
    _add(acc, "VV", symmetric_product(Vr))


def _is_vector_pair(model: nn.Sequential, pair: Pair) -> bool:
    return isinstance(pair.producer(model), nn.Linear) and isinstance(pair.consumer(model), nn.Linear)


def _projects_later(model: nn.Sequential, pair: Pair) -> bool:
    """Whether a vector pair's projected N is cheaper from a second pass over the recorded matrices,
    B_prev^T (V_goal - B_h dW*^T) at (h+1) o + D o per sample, than from S_ph = B_prev^T B_h at D (h+1)."""
    D, h1, o = pair.producer(model).in_features + 1, pair.consumer(model).in_features + 1, pair.consumer(model).out_features
    return h1 * o + D * o < D * h1


def _vector_scale(model: nn.Sequential, pair: Pair) -> float:
    """What the modules between a vector pair's layers do to a new unit at first order: 1, or the
    1 / sqrt(1 + eps) of each BatchNorm (``linearised_between``)."""
    return float(linearised_between(torch.ones(1, 1, 1, 1, dtype=torch.float64), pair.between(model)))


def _accumulate_vectors(acc: dict[str, torch.Tensor], model: nn.Sequential, pair: Pair,
                        recorded: tuple[torch.Tensor, ...], grams: _Grams) -> None:
    """Add one chunk of a vector pair (linear -> linear): B_prev = c [x 1] (x: the producer's input, c:
    ``_vector_scale``), B_h = [b 1], V_goal = -grad, one row per sample, nothing unfolded nor
    concatenated (``ones_gram``, ``ones_cross``); [x 1]^T [x 1] is the previous layer's S_h; S_ph only
    where the projected N does not come from a second pass (``_projects_later``)."""
    x_in, b, grad = recorded
    x, b = x_in.flatten(1), b.flatten(1)
    c = _vector_scale(model, pair)
    _add(acc, "S", c * c * grams.of(pair.producer_path, x))
    _add(acc, "N_v", -c * ones_cross(x, grad))  # V_goal = -grad: the sign goes on the small products
    if not _projects_later(model, pair):
        _add(acc, "S_ph", c * ones_cross(x, b, ones_right=True))
    _add(acc, "S_h", grams.of(pair.consumer_path, b))
    _add(acc, "N_h", -ones_cross(b, grad))
    _add(acc, "VV", symmetric_product(grad))


def _vector_projected(model: nn.Sequential, pair: Pair, recorded: tuple[torch.Tensor, ...],
                      dW: torch.Tensor) -> torch.Tensor:
    """B_prev (V_goal - dW* B_h)^T of one chunk of a vector pair (rows: samples), the second pass's N."""
    x_in, b, grad = recorded
    projected = -grad - b.flatten(1) @ dW[:, :-1].T - dW[:, -1]
    return _vector_scale(model, pair) * ones_cross(x_in.flatten(1), projected)


def _accumulate(acc: dict[str, torch.Tensor], views: _Views, Z: torch.Tensor | None, projects_now: bool) -> None:
    """Add one chunk's products to the running sums of a pair (Z: a standard Gaussian shaped like V, for
    pairs with several taps; one-tap pairs get their probe from ``derived_probe``); S_ph if the pair's
    goal is projected from this pass (``projects_now``)."""
    grid, window = views.grid, views.window
    assert grid is not None and window is not None
    D, taps = grid.shape[1], window.taps
    size = tuple(grid.shape[-2:])
    weight = window.coverage(size, grid.dtype, grid.device).sqrt()
    P = _rows((grid * weight).flatten(2))
    _add(acc, "S", min(taps, D) * (P.T @ P))
    _add(acc, "N_v", views.cross(views.V))
    if Z is not None:
        _add(acc, "N_z", views.cross(Z))
    _accumulate_consumer(acc, views)
    if projects_now:
        _add(acc, "S_ph", views.cross(views.Bh))


def derived_probe(S: torch.Tensor, n_outputs: int, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """N_z = B^t Z^T / n of a one-tap pair for a standard Gaussian Z independent of the inputs, drawn
    without Z: given the inputs, each of its ``n_outputs`` columns is N(0, S / n) (S = B^t B^t^T / n), so
    N_z = C G / sqrt(n) for any C C^T = S and G a (D, o) standard Gaussian (C: ``linalg.psd_factor``,
    a continuous function of S, so equal sums over processes give equal probes)."""
    G = torch.randn((S.shape[0], n_outputs), dtype=S.dtype, device=S.device, generator=generator)
    return linalg.psd_factor(S) @ G / math.sqrt(n)


def _unfolded_size(views: _Views) -> int:
    """Values of B^t unfolded (D x taps x L per sample), whether or not it is formed."""
    assert views.grid is not None and views.window is not None
    out = views.window.out_size(tuple(views.grid.shape[-2:]))
    return views.grid.shape[0] * views.grid.shape[1] * views.window.taps * out[0] * out[1]


#: What rebuilding one value of a pair's views costs, in multiply-adds of its products (the views are
#: built by memory-bound copies, the products by matrix kernels; ``_spatial_projects_later``).
VIEW_COST = 4


def _spatial_projects_later(v: _Views, views: int) -> bool:
    """Whether a pair with several taps gets its projected N cheaper from a second pass (rebuild the views,
    ``VIEW_COST`` each, then V_goal - dW* B_h and its cross moment: (h+1) o L + D taps o L multiply-adds per
    sample) than from S_ph in the first pass (D taps (h+1) L): the second pass for wide consumers, S_ph for
    narrow ones."""
    assert v.grid is not None and v.window is not None
    D, taps = v.grid.shape[1], v.window.taps
    h1, o, L = v.Bh.shape[1], v.V.shape[1], v.V.shape[2]
    return VIEW_COST * views + (h1 * o + D * taps * o) * L < D * taps * h1 * L


@dataclass
class _Probe:
    """Per sample of one pair: float64 values of its views, values recorded, its taps, and whether its goal
    is projected in a second pass (pairs with several taps, ``_spatial_projects_later``)."""

    views: int
    recorded: int
    taps: int
    projects_later: bool = False


def _probe(model: nn.Sequential, pairs: dict[int, Pair], X: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
           consumer_only: set[int]) -> dict[int, _Probe]:
    """Sizes of one sample's views, from a forward/backward pass of X[:1] (nothing to measure for vectors);
    the pairs in ``consumer_only`` build only their consumer's views."""
    if all(_is_vector_pair(model, p) for p in pairs.values()):  # recorded: x_in (d), b (h), grad (o)
        return {i: _Probe(0, p.producer(model).in_features + sum(p.consumer(model).weight.shape), 1)
                for i, p in pairs.items()}
    recorder = _Recorder(model, {path for p in pairs.values() for path in (p.producer_path, p.consumer_path)})
    try:
        recorder.backward(loss_fn(model(X[:1]), y[:1]).sum(), {p.consumer_path for p in pairs.values()})
        found = {}
        for index, pair in pairs.items():
            recorded = _recorded(pair, recorder)
            producer = index not in consumer_only
            v = _views(model, pair, recorded, producer)
            size = v.Bh.numel() + 3 * v.V.numel() + (3 * _unfolded_size(v) + v.grid.numel() if producer else 0)
            taps = math.prod(v.taps) if producer else 1
            found[index] = _Probe(size, sum(t.numel() for t in recorded), taps,
                                  taps > 1 and _spatial_projects_later(v, size))
    finally:
        recorder.remove()
    return found


@dataclass
class _Part:
    """One pair's part of a chunk: this process's recorded tensors, covering rows [lo, hi) of the
    ``rows`` samples of the chunk that the pair reads (over every process); possibly none."""

    tensors: tuple[torch.Tensor, ...]
    rows: int
    lo: int
    hi: int


def _chunks(model: nn.Sequential, pairs: dict[int, Pair], rows: dict[int, int], X: torch.Tensor, y: torch.Tensor,
            loss_fn: LossFn, chunk_size: int, probe: dict[int, _Probe], shard: tuple[int, int] = (0, 1)):
    """Forward/backward over the first max(rows) samples of (X, y) chunk by chunk; yields for each chunk
    {pair index: _Part} for the pairs whose first ``rows[index]`` samples it overlaps. A chunk holds at
    most ``chunk_size`` samples, and fewer when the recorded tensors of the pairs still reading would
    exceed ``RECORD_VALUES`` values (their unfolded views are built in slices, ``_slices``). With
    ``shard = (rank, world)`` this process runs only its rows of each chunk (``shard_rows``); the chunks
    are the same in every process."""
    recorder = _Recorder(model, {path for p in pairs.values() for path in (p.producer_path, p.consumer_path)})
    start, end = 0, max(rows[i] for i in pairs)
    try:
        while start < end:
            active = [i for i in pairs if rows[i] > start]
            chunk = max(1, min(chunk_size, end - start,
                               RECORD_VALUES // max(1, sum(probe[i].recorded for i in active))))
            lo, hi = shard_rows(chunk, *shard)  # a process may have no rows here: an empty batch adds zeros
            loss = loss_fn(model(X[start + lo : start + hi]), y[start + lo : start + hi]).sum()
            recorder.backward(loss, {pairs[i].consumer_path for i in active})
            parts = {}
            for i in active:
                reads = min(chunk, rows[i] - start)
                mine = (min(lo, reads), min(hi, reads))
                parts[i] = _Part(_recorded(pairs[i], recorder, mine[1] - mine[0]), reads, *mine)
            yield parts
            start += chunk
    finally:
        recorder.remove()


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied when it is a part of a larger tensor (so that keeping it does not keep the rest)."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def _slices(part: _Part, probe: _Probe):
    """(recorded tensors, lo, hi) for slices of this process's rows of ``part`` whose unfolded views hold
    at most ``CHUNK_VALUES`` values; rows [lo, hi) of the chunk. A process without rows gets one empty slice."""
    n = part.hi - part.lo
    step = max(1, CHUNK_VALUES // max(1, probe.views))
    for a in range(0, max(n, 1), step):
        b = min(a + step, n)
        yield tuple(t[a:b] for t in part.tensors), part.lo + a, part.lo + b


def shard_rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of ``n`` that process ``rank`` of ``world`` takes (contiguous, sizes differ by at most 1)."""
    return rank * n // world, (rank + 1) * n // world


def _sum_over(total: Callable[[torch.Tensor], torch.Tensor] | None, sums: list[dict[str, torch.Tensor]],
              keys: dict[int, list[str]]) -> None:
    """Replace ``sums[i][k]`` for every k in ``keys[i]`` by its sum over the processes (one all-reduce)."""
    entries = [(i, k) for i, names in keys.items() for k in names]
    if total is None or not entries:
        return
    flat = total(torch.cat([sums[i][k].reshape(-1) for i, k in entries]))
    for (i, k), part in zip(entries, flat.split([sums[i][k].numel() for i, k in entries])):
        sums[i][k] = part.reshape(sums[i][k].shape)


def _row_counts(n: int, pairs: list[Pair], rows: list[int] | None, probe: dict[int, _Probe]) -> dict[int, int]:
    """Samples each pair reads: ``rows[k]`` (at most n) when its views are costly, else all n."""
    return {i: min(n, rows[i]) if rows and probe[i].views > CHEAP_VIEWS else n for i in range(len(pairs))}


def gather_moments(
    model: nn.Sequential,
    growable: list[int],
    X: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    **options,
) -> list[LayerMoments]:
    """Accumulate the moments of every growable layer over (X, y), at most ``chunk_size`` samples at a
    time (fewer when the unfolded tensors of a chunk would exceed ``CHUNK_VALUES`` values). ``rows``
    (one per growable layer) limits a layer's statistics to the first rows[k] samples of X when its
    unfolded views are costly (more than ``CHEAP_VIEWS`` values per sample): pairs that need fewer
    samples (App. E.1) stop early while the others go on. ``ridge`` is the one the candidates
    will use for dW* (``linalg.best_update``): the second pass projects the goal with that dW*.

    V_goal = -d(sum_i l_i)/dA_out is not divided by n (design note), the moments are. The model runs in
    eval mode (BatchNorm uses its running statistics) and is left in its previous mode.

    ``shard = (rank, world)`` with ``total`` (a sum over the processes): this process runs its rows
    ``shard_rows`` of every chunk, the Gaussian Z is drawn for the whole chunk and sliced, and the sums
    are added over the processes before dW* and at the end, so that every process returns exactly the
    moments of the whole batch (n counting every process's rows).
    """
    return _gather(model, growable, [], X, y, loss_fn, **options)[0]


def gather_round(model: nn.Sequential, growable: list[int], others: list[int], X: torch.Tensor, y: torch.Tensor,
                 loss_fn: LossFn, **options) -> tuple[list[LayerMoments], dict[int, float]]:
    """``gather_moments`` of the layers ``growable``, and in the same pass the consumer-side moments of the
    layers ``others`` (all of X: as ``gather_bottlenecks``), with Psi of every one of them (``psi``),
    keyed by module index: the bottleneck of each layer of the model as it is, at the cost of one pass."""
    moments, consumers = _gather(model, growable, others, X, y, loss_fn, **options)
    found = {m.in_index: psi(m.S_h, m.N_h, m.VV) for m in moments}
    return moments, {**found, **{i: psi(*consumers[i]) for i in others}}


def psi(S_h: torch.Tensor, N_h: torch.Tensor, VV: torch.Tensor) -> float:
    """Psi = ||V_goal||^2 / n - <dW*, N_h> (Eq. 4 with the paper's dW* = N_h^T S_h^+, Prop. 3.1) from the
    consumer-side moments."""
    return float(linalg.bottleneck(torch.trace(VV), S_h, N_h, linalg.best_update(S_h, N_h)))


def _gather(
    model: nn.Sequential,
    growable: list[int],
    others: list[int],
    X: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    *,
    chunk_size: int = 4096,
    generator: torch.Generator | None = None,
    rows: list[int] | None = None,
    ridge: float = 0.0,
    shard: tuple[int, int] = (0, 1),
    total: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[list[LayerMoments], dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """``gather_moments`` of ``growable``, and (S_h, N_h, VV) of the layers ``others`` from the same passes
    (keyed by module index). ``rows`` has one entry per layer of ``growable``, then of ``others``; layers
    past its end read all of X."""
    if shard[1] > 1 and total is None:
        raise ValueError("statistics on a shard of the batch need `total`, the sum over the processes")
    pairs = pairs_of(model, growable + others)
    indexed = dict(enumerate(pairs))
    consumer_only = set(range(len(growable), len(pairs)))
    sums: list[dict[str, torch.Tensor]] = [{} for _ in pairs]
    meta: list[dict] = [{} for _ in pairs]
    with _evaluating(model):
        probe = _probe(model, indexed, X, y, loss_fn, consumer_only)
        counts = _row_counts(X.shape[0], pairs, None if rows is None else rows + [X.shape[0]] * (len(pairs) - len(rows)),
                             probe)
        spatial = {i: pairs[i] for i in indexed if probe[i].taps > 1}
        vectors = {i for i in indexed if _is_vector_pair(model, pairs[i]) and i not in consumer_only}
        late = {**{i: p for i, p in spatial.items() if probe[i].projects_later},
                **{i: pairs[i] for i in vectors if _projects_later(model, pairs[i])}}
        keep = sum(probe[i].recorded * counts[i] for i in late) <= KEEP_VALUES
        kept: list[dict[int, _Part]] = []
        for parts in _chunks(model, indexed, counts, X, y, loss_fn, chunk_size, probe, shard):
            grams = _Grams()
            for index, part in parts.items():
                if index in consumer_only:
                    _accumulate_consumer(sums[index], _views(model, pairs[index], part.tensors, producer=False))
                    continue
                if index in vectors:
                    _accumulate_vectors(sums[index], model, pairs[index], part.tensors, grams)
                    meta[index].update(tap_shape=(), out_positions=1)
                    continue
                Z = None
                if index in spatial:  # the whole chunk's draw in every process: Z is shard-free
                    goal = consumer_goal(part.tensors[2][:0])
                    Z = torch.randn((part.rows, *goal.shape[1:]), dtype=goal.dtype, device=goal.device,
                                    generator=generator)
                for tensors, lo, hi in _slices(part, probe[index]):
                    views = _views(model, pairs[index], tensors)
                    _accumulate(sums[index], views, None if Z is None else Z[lo:hi], index not in late)
                meta[index].update(tap_shape=views.taps, out_positions=int(views.V.shape[2]))
            if keep and late:
                kept.append({i: _Part(tuple(_own(t) for t in parts[i].tensors), parts[i].rows, parts[i].lo,
                                      parts[i].hi) for i in late if i in parts})
        _sum_over(total, sums, {i: ["S_h", "N_h"] for i in late})
        updates = {i: linalg.best_update(sums[i]["S_h"] / counts[i], sums[i]["N_h"] / counts[i], ridge=ridge)
                   for i in late}
        second = kept if keep else _chunks(model, late, counts, X, y, loss_fn, chunk_size, probe, shard)
        for parts in second:
            for index, part in parts.items():
                dW = updates[index].to(part.tensors[-1].dtype)
                if index in vectors:
                    _add(sums[index], "N", _vector_projected(model, pairs[index], part.tensors, dW))
                    continue
                for tensors, _, _ in _slices(part, probe[index]):
                    views = _views(model, pairs[index], tensors)
                    projected = views.V - torch.einsum("oh,ihl->iol", dW, views.Bh)
                    _add(sums[index], "N", views.cross(projected))
        _sum_over(total, sums, {i: [k for k in acc if not (i in late and k in ("S_h", "N_h"))]
                                for i, acc in enumerate(sums)})
    found: list[LayerMoments] = []
    spectra: dict[int, tuple[torch.Tensor, linalg.Spectrum]] = {}
    consumers = {pairs[i].in_index: tuple(sums[i][k] / counts[i] for k in ("S_h", "N_h", "VV")) for i in consumer_only}
    for i, (acc, p, m) in enumerate(zip(sums[: len(growable)], pairs, meta)):
        moments = {k: v / counts[i] for k, v in acc.items()}
        if found and torch.equal(moments["S"], found[-1].S_h):  # one tensor: one eigendecomposition
            moments["S"] = found[-1].S_h
        if i not in spatial:
            moments["N_z"] = derived_probe(moments["S"], moments["VV"].shape[0], counts[i], generator)
        found.append(LayerMoments(p.in_index, p.out_index, counts[i], **moments, tap_shape=m["tap_shape"],
                                  out_positions=m["out_positions"], dW=updates.get(i), ridge=ridge,
                                  eps=torch.finfo(X.dtype).eps, spectra=spectra))
    return found, consumers


def gather_bottlenecks(
    model: nn.Sequential,
    growable: list[int],
    X: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    *,
    chunk_size: int = 4096,
    rows: list[int] | None = None,
    shard: tuple[int, int] = (0, 1),
    total: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[int, float]:
    """Psi (Eq. 4 with dW*, Prop. 3.1) of every growable layer, keyed by its module index, from the
    consumer-side moments only (S_h, N_h, VV): one pass, no unfolding of the producer's inputs
    (``gather_round`` with every layer consumer-side only). ``shard`` and ``total`` as in ``gather_moments``."""
    return gather_round(model, [], growable, X, y, loss_fn, chunk_size=chunk_size, rows=rows, shard=shard,
                        total=total)[1]
