"""Producer/consumer pairs of a plain ``nn.Sequential``, seen the way TINY sees them (App. A.6, C.2.2).

A growable layer (the *producer*: ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``) gains neurons or
channels; the next weight layer (the *consumer*) reads them through channel-wise modules (activation,
average pooling, flatten, global average pooling, BatchNorm). A residual block
(``tinydeploy.model.build.ResidualBlock``) at a growable index holds its own pair: conv1 -> bn1 ->
activation -> conv2, its middle channels. A ``Pair`` names its modules by path in the model
(``"3"``, ``"5.conv1"``) and knows how the model continues after the consumer (``continuation``), so
statistics, surgery and the line search treat both the same way. Every pair kind is handled as one
case of a convolution pair, on 2-D grids (a Conv1d signal is a 1 x L image, a vector a 1 x 1 image):

* the producer's input, unfolded (im2col) with a ones row for the bias, is an image ``P`` with
  D = fan-in + 1 channels: column q of ``B^c_i`` in the paper is the patch behind intermediate pixel q;
* the modules in between act on a new channel linearly at first order (sigma'(0) = 1 for the
  linearised effect, average pooling and global average pooling are linear), so they act on ``P``;
* the consumer slides a window (its kernel, or the whole grid for a linear layer after flatten, or
  1 x 1 after global pooling / for vectors) over the grid: output position l, tap p of the window
  selects pixel T_l(p), so ``B^t_il`` (taps x D) holds the patches that output position sees.

This module holds the geometry and those unfolded views; ``statistics`` accumulates their moments.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from typing import Callable, Iterator

from tinydeploy.model.build import ELEMENTWISE_TYPES, GlobalAvgPool, ResidualBlock

CONV_TYPES = (nn.Conv1d, nn.Conv2d)
WEIGHT_TYPES = (nn.Linear, *CONV_TYPES)
POOL_TYPES = (nn.AvgPool1d, nn.AvgPool2d)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
#: Modules that may sit between a producer and its consumer: each acts on every channel on its own.
BETWEEN_TYPES = (*ELEMENTWISE_TYPES, *POOL_TYPES, *NORM_TYPES, nn.Flatten, GlobalAvgPool)
#: Modules f with f(c x) = c f(x) for every c > 0 (positively homogeneous of degree 1).
HOMOGENEOUS_TYPES = (nn.ReLU, nn.Identity, *POOL_TYPES, nn.Flatten, GlobalAvgPool)


@dataclass(frozen=True)
class Window:
    """A sliding window on a 2-D grid: kernel, stride and zero padding per axis (height, width)."""

    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]

    def out_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        return tuple((g + 2 * p - k) // s + 1 for g, k, s, p in zip(grid, self.kernel, self.stride, self.padding))

    def windows(self, x: torch.Tensor) -> torch.Tensor:
        """This window's positions on (n, C, H, W), zero-padded: (n, C, kh, kw, H_out, W_out) (``windows``)."""
        grid = F.pad(x, (self.padding[1], self.padding[1], self.padding[0], self.padding[0]))
        return windows(grid, self.kernel, self.stride)

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """im2col of (n, C, H, W): (n, C * taps, L) with rows ordered (channel, kernel row, kernel column),
        equal to ``F.unfold`` (``windows``: one copy)."""
        patches = self.windows(x)
        return patches.reshape(x.shape[0], x.shape[1] * self.taps, patches.shape[-2] * patches.shape[-1])

    def coverage(self, grid: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(H, W): how many (output position, tap) pairs read each grid pixel."""
        ones = torch.ones(1, 1, *grid, dtype=dtype, device=device)
        return F.fold(self.unfold(ones), grid, self.kernel, padding=self.padding, stride=self.stride)[0, 0]


def windows(grid: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """The windows of a padded (n, C, H, W) as a strided view (n, C, kh, kw, H_out, W_out), nothing copied:
    reshaped, it is im2col. CPU's im2col (behind ``F.unfold``) loops over the samples; this view is
    copied by one strided kernel, 1.5-3.6x faster at the statistics' sizes and bit-equal."""
    return grid.unfold(2, kernel[0], stride[0]).unfold(3, kernel[1], stride[1]).permute(0, 1, 4, 5, 2, 3)


def columns_with_ones(patches: torch.Tensor, positions: tuple[int, ...]) -> torch.Tensor:
    """Windows (n, C, kh, kw, H_out, W_out) (``windows``) -> (n, C * kh * kw + 1, *positions), im2col
    with a last channel of ones (the bias feature), copied once."""
    n, C, kh, kw = patches.shape[:4]
    out = torch.empty(n, C * kh * kw + 1, *positions, dtype=patches.dtype, device=patches.device)
    out[:, :-1].view(n, C, kh, kw, *patches.shape[4:]).copy_(patches)
    out[:, -1] = 1.0
    return out


def _two(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[0]) if len(value) == 1 else tuple(value)


def window_of(module: nn.Module) -> Window:
    """The 2-D window of a Conv1d/Conv2d (1 x k for 1-d) or AvgPool1d/AvgPool2d module."""
    if isinstance(module, CONV_TYPES):
        if module.groups != 1 or any(d != 1 for d in module.dilation) or module.padding_mode != "zeros":
            raise ValueError(f"{module}: TINY supports convolutions with groups 1, dilation 1, zero padding")
        kernel, stride, padding = module.kernel_size, module.stride, module.padding
    elif isinstance(module, POOL_TYPES):
        kernel, stride, padding = module.kernel_size, module.stride, module.padding
        if _two(padding) != (0, 0) or module.ceil_mode:
            raise ValueError(f"{module}: TINY supports average pooling without padding or ceil mode")
    else:
        raise ValueError(f"{type(module).__name__} has no sliding window")
    if isinstance(module, (nn.Conv1d, nn.AvgPool1d)):
        one = lambda v: v if isinstance(v, int) else v[0]  # noqa: E731
        return Window((1, one(kernel)), (1, one(stride)), (0, one(padding)))
    return Window(_two(kernel), _two(stride), _two(padding))


def as_grid(x: torch.Tensor) -> torch.Tensor:
    """A batch as 2-D grids: (n, d) -> (n, d, 1, 1); (n, C, L) -> (n, C, 1, L); (n, C, H, W) unchanged."""
    if x.dim() == 2:
        return x[:, :, None, None]
    if x.dim() == 3:
        return x[:, :, None, :]
    return x


def with_ones_channel(x: torch.Tensor) -> torch.Tensor:
    """Append the bias feature (a channel of ones) along dim 1."""
    shape = list(x.shape)
    shape[1] = 1
    return torch.cat([x, torch.ones(shape, dtype=x.dtype, device=x.device)], dim=1)


@dataclass(frozen=True)
class Pair:
    """The growable layer at top-level module ``in_index``: its producer, the channel-wise modules in
    between and its consumer, named by their paths in the model. ``out_index`` is the top-level module
    holding the consumer (``in_index`` itself for a residual block)."""

    in_index: int
    out_index: int
    producer_path: str
    consumer_path: str
    between_paths: tuple[str, ...]

    def producer(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.producer_path)

    def consumer(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.consumer_path)

    def between(self, model: nn.Module) -> nn.Sequential:
        return nn.Sequential(*(model.get_submodule(path) for path in self.between_paths))

    @property
    def in_block(self) -> bool:
        return self.in_index == self.out_index

    def producer_input(self, model: nn.Sequential, X: torch.Tensor) -> torch.Tensor:
        """The producer's input for model inputs ``X`` (a block's conv1 reads the block's input)."""
        return model[: self.in_index](X)

    def continuation(self, model: nn.Sequential, x: torch.Tensor,
                     repeats: int = 1) -> Callable[[torch.Tensor], torch.Tensor]:
        """pre -> the model's output when the consumer's output is ``pre`` and the producer's input ``x``
        (a block finishes with its BatchNorm, shortcut of ``x`` and activation, then the next modules).
        With ``repeats`` = G, ``pre`` holds G versions of the consumer's output, stacked along dim 0."""
        suffix = model[self.out_index + 1 :]
        if not self.in_block:
            return suffix
        block = model[self.in_index]
        shortcut = block.shortcut(x)
        shortcut = shortcut.repeat(repeats, *[1] * (shortcut.dim() - 1))
        return lambda pre: suffix(block.act2(block.bn2(pre) + shortcut))


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm uses its running statistics) for the duration, the previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def pair_at(model: nn.Sequential, index: int) -> Pair:
    """The pair of the growable module at top-level ``index``: a residual block's own conv1 -> conv2,
    else the module and the next Linear/Conv module, with the channel-wise modules between them."""
    module = model[index]
    if isinstance(module, ResidualBlock):
        return Pair(index, index, f"{index}.conv1", f"{index}.conv2", (f"{index}.bn1", f"{index}.act1"))
    following = [j for j, m in enumerate(model) if j > index and isinstance(m, (*WEIGHT_TYPES, ResidualBlock))]
    if not isinstance(module, WEIGHT_TYPES) or not following or isinstance(model[following[0]], ResidualBlock):
        raise ValueError(f"module {index} ({type(module).__name__}) is not a weight layer with a consumer")
    out = following[0]
    pair = Pair(index, out, str(index), str(out), tuple(str(j) for j in range(index + 1, out)))
    odd = [type(m).__name__ for m in pair.between(model) if not isinstance(m, BETWEEN_TYPES)]
    if odd:
        raise ValueError(f"modules {odd} between {index} and {out} do not act channel by channel")
    return pair


def pairs_of(model: nn.Sequential, growable: list[int]) -> list[Pair]:
    """The pair of each growable module (``pair_at``)."""
    return [pair_at(model, i) for i in growable]


# ----- the unfolded views of one chunk --------------------------------------------------------------
def producer_patches(producer: nn.Module, x: torch.Tensor, pool: Window | None = None) -> torch.Tensor:
    """B^c: the producer's input unfolded, with a ones channel, as (n, D, H, W), D = fan-in + 1.

    Pixel q of channel d is feature d of the patch behind intermediate pixel q, so a new channel's
    pre-activation at q is alpha^T P[:, :, q] (alpha with the bias last). With ``pool`` (an average
    pooling right after the producer), the pooled patches are returned: the average of the patches of
    a pool window is the patch, with stride s * pool stride, of the input box-filtered over the pool
    window with dilation s, which costs C_in instead of D channels of pooling and unfolds 1/pool^2 of
    the positions.
    """
    if isinstance(producer, nn.Linear):
        return as_grid(with_ones_channel(x.flatten(1)))
    window = window_of(producer)
    grid = F.pad(as_grid(x), (window.padding[1], window.padding[1], window.padding[0], window.padding[0]))
    out = window.out_size(tuple(x.shape[-2:]) if x.dim() == 4 else (1, x.shape[-1]))
    stride = window.stride
    if pool is not None:
        grid = box_mean(grid, pool.kernel, stride)
        out = pool.out_size(out)
        stride = (stride[0] * pool.stride[0], stride[1] * pool.stride[1])
    return columns_with_ones(windows(grid, window.kernel, stride)[..., : out[0], : out[1]], out)


def box_mean(x: torch.Tensor, kernel: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """The mean of (n, C, H, W) over a ``kernel`` window with ``dilation`` at every position (stride 1, no
    padding): a per-channel convolution with a box kernel, as a sum of shifted views (3-17x faster than
    torch's grouped convolution on CPU at the statistics' sizes; the same values for 1- and 2-tap windows)."""
    H, W = (size - (k - 1) * d for size, k, d in zip(x.shape[-2:], kernel, dilation))
    total = x[..., :H, :W]
    for a, b in itertools.product(range(kernel[0]), range(kernel[1])):
        if a or b:
            total = total + x[..., a * dilation[0] : a * dilation[0] + H, b * dilation[1] : b * dilation[1] + W]
    return total / (kernel[0] * kernel[1])


def linearised_between(patches: torch.Tensor, between: nn.Sequential, pooled: bool = False) -> torch.Tensor:
    """Apply to ``patches`` the first-order effect of the modules between producer and consumer on a
    new channel: activations count as the identity (sigma'(0) factor left to the amplitude search),
    average pools and global average pooling act as themselves, flatten leaves the grid, and a
    BatchNorm is the identity on a new channel (its parameters are set so, ``surgery.widen_between``).
    ``pooled``: the first average pool was already applied by ``producer_patches``."""
    for module in between:
        if isinstance(module, POOL_TYPES):
            if pooled:
                pooled = False
                continue
            window = window_of(module)
            patches = F.avg_pool2d(patches, window.kernel, window.stride)
        elif isinstance(module, GlobalAvgPool):
            patches = patches.mean(dim=(2, 3), keepdim=True)
    return patches


def leading_pool(between: nn.Sequential) -> Window | None:
    """The window of an average pool that follows the producer with only activations/BatchNorm before it."""
    for module in between:
        if isinstance(module, POOL_TYPES):
            return window_of(module)
        if not isinstance(module, (*ELEMENTWISE_TYPES, *NORM_TYPES)):
            return None
    return None


def consumer_window(consumer: nn.Module, grid: tuple[int, int]) -> Window:
    """The consumer's window on the grid it reads: its kernel for a conv, the whole grid for a linear."""
    return window_of(consumer) if isinstance(consumer, CONV_TYPES) else Window(tuple(grid))


def tap_shape(consumer: nn.Module, grid: tuple[int, int]) -> tuple[int, ...]:
    """Shape of one new channel's fan-out per consumer output: () for a vector consumer, the kernel
    for a conv ((k,) for Conv1d), (H * W,) for a linear layer after flatten."""
    if isinstance(consumer, nn.Conv2d):
        return tuple(consumer.kernel_size)
    if isinstance(consumer, nn.Conv1d):
        return (consumer.kernel_size[0],)
    return () if grid == (1, 1) else (grid[0] * grid[1],)


def consumer_inputs(consumer: nn.Module, b: torch.Tensor) -> torch.Tensor:
    """B_h: the consumer's unfolded input with a ones row, (n, C_h * taps + 1, L)."""
    if isinstance(consumer, nn.Linear):
        return with_ones_channel(b.flatten(1))[:, :, None]
    patches = window_of(consumer).windows(as_grid(b))
    return columns_with_ones(patches, (patches.shape[-2] * patches.shape[-1],))


def consumer_goal(grad: torch.Tensor) -> torch.Tensor:
    """V_goal = -d(sum of losses)/dA of the consumer's output, as (n, o, L) (L = output positions)."""
    return -(grad.flatten(2) if grad.dim() > 2 else grad[:, :, None])
