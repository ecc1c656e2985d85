"""Backpropagation statistics for every growable layer, gathered by temporary hooks.

One forward/backward pass over an estimation batch, streamed in chunks so memory does not grow
with the batch: only the (small) moment matrices are accumulated, in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tinydeploy.model.losses import LossFn


@dataclass
class LayerMoments:
    """Moments for growing the hidden layer between linear modules ``in_index`` and ``out_index``.

    All are divided by n (paper notation, one column per sample, ones row last):
    S = B_prev B_prev^T/n, N_v = B_prev V_goal^T/n, S_ph = B_prev B_h^T/n, S_h = B_h B_h^T/n,
    N_h = B_h V_goal^T/n, VV = V_goal V_goal^T/n, N_z = B_prev Z^T/n with Z standard Gaussian
    (independent of B_prev; used for the significance threshold).
    """

    in_index: int
    out_index: int
    n: int
    S: torch.Tensor
    N_v: torch.Tensor
    S_ph: torch.Tensor
    S_h: torch.Tensor
    N_h: torch.Tensor
    VV: torch.Tensor
    N_z: torch.Tensor

    @property
    def v_sq_norm(self) -> torch.Tensor:
        """||V_goal||_F^2 / n."""
        return torch.trace(self.VV)


def with_ones(b: torch.Tensor) -> torch.Tensor:
    """Append the bias feature (a column of ones) to a batch of activities (n, d) -> (n, d+1)."""
    return torch.cat([b, torch.ones(b.shape[0], 1, dtype=b.dtype, device=b.device)], dim=1)


class _Recorder:
    """Temporary hooks on linear modules: keep each one's input and the gradient of its output."""

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
    """(in_index, out_index) for each growable linear: out_index is the next linear module."""
    linear = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    return [(i, linear[linear.index(i) + 1]) for i in growable]


def gather_moments(
    model: nn.Sequential,
    growable: list[int],
    X: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
    *,
    chunk_size: int = 1024,
    generator: torch.Generator | None = None,
    shard: tuple[int, int] = (0, 1),
) -> list[LayerMoments]:
    """Accumulate the moments of every growable layer over (X, y), ``chunk_size`` samples at a time.

    V_goal = -d(sum_i l_i)/dA_out is not divided by n (design note), the moments are.
    ``shard = (rank, world)``: this process takes its rows ``shard_rows`` of each chunk (the moments are
    then over those rows, n counting them) while the Gaussian Z is drawn for the whole chunk, so that
    summing n x moments over the processes gives exactly the moments of the whole batch.
    """
    pairs = layer_pairs(model, growable)
    recorder = _Recorder(model, {i for pair in pairs for i in pair})
    sums: list[dict[str, torch.Tensor]] = [{} for _ in pairs]
    was_training = model.training
    model.eval()
    n = 0
    try:
        for start in range(0, X.shape[0], chunk_size):
            rows = min(chunk_size, X.shape[0] - start)
            lo, hi = (start + r for r in shard_rows(rows, *shard))
            n += hi - lo
            model.zero_grad(set_to_none=True)
            loss_fn(model(X[lo:hi]), y[lo:hi]).sum().backward()
            for acc, (i_in, i_out) in zip(sums, pairs):
                _accumulate(acc, recorder.inputs[i_in], recorder.inputs[i_out], recorder.output_grads[i_out], generator,
                            (rows, lo - start))
    finally:
        recorder.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return [LayerMoments(i_in, i_out, n, **{k: v / max(n, 1) for k, v in acc.items()}) for acc, (i_in, i_out) in zip(sums, pairs)]


def shard_rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of ``n`` that process ``rank`` of ``world`` takes (contiguous, sizes differ by at most 1)."""
    return rank * n // world, (rank + 1) * n // world


def _accumulate(
    acc: dict[str, torch.Tensor],
    b_prev: torch.Tensor,
    b_h: torch.Tensor,
    grad_out: torch.Tensor,
    generator: torch.Generator | None,
    chunk: tuple[int, int] | None = None,
) -> None:
    """Add one chunk's products to the running sums (row-per-sample tensors, float64).

    ``chunk = (rows, offset)``: these are rows offset.. of a chunk of ``rows`` samples (see ``shard``)."""
    Bp = with_ones(b_prev.double())
    Bh = with_ones(b_h.double())
    V = -grad_out.double()
    rows, offset = chunk or (V.shape[0], 0)
    Z = torch.randn((rows, *V.shape[1:]), dtype=V.dtype, device=V.device, generator=generator)[offset : offset + V.shape[0]]
    products = {
        "S": Bp.T @ Bp,
        "N_v": Bp.T @ V,
        "S_ph": Bp.T @ Bh,
        "S_h": Bh.T @ Bh,
        "N_h": Bh.T @ V,
        "VV": V.T @ V,
        "N_z": Bp.T @ Z,
    }
    for key, value in products.items():
        acc[key] = acc[key] + value if key in acc else value
