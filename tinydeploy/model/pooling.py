"""The model's average pools: ``nn.AvgPool1d`` / ``nn.AvgPool2d`` whose windows, when they tile the
input (kernel = stride, no padding), are summed as strided views.

torch's CPU average pool loops over the windows one output at a time, which is 3-7x slower than adding
``taps`` strided views at the batch sizes of the growth statistics and line search (e.g. 4,000 x 8 x 40:
7.8 ms against 1.1 ms forward, 18 ms against 9 ms forward + backward, one thread). The sums are taken
in the order of the window's taps, row by row, then divided by the tap count, as torch does, so the
values are the same bit for bit (tested). Small inputs, overlapping windows, padding, ceil mode,
TorchScript, tracing and torch.export / torch.compile use torch's own pool, so exported graphs hold a
plain AveragePool.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

#: Below this many values torch's pool is as fast (the views cost one call each, the Function ~10 us).
MIN_VALUES = 1 << 14


def window_sum(x: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    """Sum of each tile of ``kernel`` over the last ``len(kernel)`` dims of ``x`` (the trailing rows and
    columns that fill no tile are dropped, as a pool without ceil mode does)."""
    tiles = [size // k for size, k in zip(x.shape[-len(kernel):], kernel)]
    total: torch.Tensor | None = None
    for offsets in itertools.product(*(range(k) for k in kernel)):
        view = x[(..., *(slice(o, o + k * n, k) for o, k, n in zip(offsets, kernel, tiles)))]
        total = view if total is None else total + view
    assert total is not None
    return total


def spread(grad: torch.Tensor, kernel: tuple[int, ...], shape: torch.Size) -> torch.Tensor:
    """The input gradient of the tile mean: each output's gradient / taps on every value of its tile,
    0 on the values no tile holds."""
    out = grad.new_zeros(shape)
    tiles = grad.shape[-len(kernel):]
    lead = grad.shape[: grad.dim() - len(kernel)]
    covered = out[(..., *(slice(0, k * n) for k, n in zip(kernel, tiles)))]
    interleaved = [d for n, k in zip(tiles, kernel) for d in (n, k)]
    expanded = grad.reshape(*lead, *[d for n in tiles for d in (n, 1)]).expand(*lead, *interleaved)
    covered.view(*lead, *interleaved).copy_(expanded / math.prod(kernel))
    return out


class _TileMean(torch.autograd.Function):
    """Mean of each tile, with the backward of ``spread`` (one copy instead of a scatter per view)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:  # type: ignore[override]
        ctx.kernel, ctx.shape = kernel, x.shape
        return window_sum(x, kernel) / math.prod(kernel)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return spread(grad, ctx.kernel, ctx.shape), None


def _tiling(kernel, stride, padding, ceil_mode: bool, dims: int) -> tuple[int, ...] | None:
    """The kernel when windows tile the input (kernel = stride, no padding, no ceil mode), else None."""
    kernel, stride, padding = (tuple(v) if isinstance(v, tuple | list) else (v,) * dims for v in (kernel, stride, padding))
    return kernel if kernel == stride and not any(padding) and not ceil_mode else None


def _tile_mean(x: torch.Tensor, kernel: tuple[int, ...] | None) -> torch.Tensor | None:
    """The tiles' means by strided views where that is faster and the caller is not tracing, else None."""
    if kernel is None or torch.jit.is_tracing() or torch.compiler.is_compiling() or x.numel() < MIN_VALUES:
        return None
    if torch.is_grad_enabled() and x.requires_grad:
        return _TileMean.apply(x, kernel)
    return window_sum(x, kernel) / math.prod(kernel)


class _TilingPool:
    """What the two pools share: the strided-view mean of ``_tile_mean`` where their windows tile the input."""

    dims: int

    @torch.jit.unused
    def _fast(self, x: torch.Tensor) -> torch.Tensor | None:
        if getattr(self, "divisor_override", None):
            return None
        return _tile_mean(x, _tiling(self.kernel_size, self.stride, self.padding, self.ceil_mode, self.dims))


class AvgPool1d(_TilingPool, nn.AvgPool1d):
    """``nn.AvgPool1d`` with the strided-view mean where its windows tile the signal (module docstring)."""

    dims = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            fast = self._fast(x)
            if fast is not None:
                return fast
        return F.avg_pool1d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad)


class AvgPool2d(_TilingPool, nn.AvgPool2d):
    """``nn.AvgPool2d`` with the strided-view mean where its windows tile the image (module docstring)."""

    dims = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            fast = self._fast(x)
            if fast is not None:
                return fast
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad,
                            self.divisor_override)
