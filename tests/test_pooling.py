"""The model's average pools (``tinydeploy.model.pooling``): the same values and gradients as torch's,
bit for bit, on the strided-view path, and torch's own pool wherever a graph is traced or scripted."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tinydeploy.model import pooling
from tinydeploy.model.build import POOL_MODULES
from tinydeploy.model.pooling import AvgPool1d, AvgPool2d

CASES = [
    (AvgPool1d, nn.AvgPool1d, (64, 8, 41), 2),  # an odd length: the last value fills no tile
    (AvgPool1d, nn.AvgPool1d, (70, 9, 40), 3),
    (AvgPool2d, nn.AvgPool2d, (40, 8, 15, 13), 2),
    (AvgPool2d, nn.AvgPool2d, (30, 9, 12, 14), (2, 3)),
    (AvgPool2d, nn.AvgPool2d, (30, 9, 12, 14), (3, 1)),
]


@pytest.mark.parametrize(("ours", "torchs", "shape", "kernel"), CASES, ids=str)
def test_tile_means_equal_torchs_pool_bit_for_bit(ours, torchs, shape, kernel) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert x.numel() >= pooling.MIN_VALUES  # the strided-view path, with and without autograd
    fast, reference = ours(kernel), torchs(kernel)
    out, expected = fast(x), reference(x)
    assert type(out.grad_fn).__name__ == "_TileMeanBackward"
    assert torch.equal(out, expected)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(expected, x, grad)[0])
    with torch.no_grad():
        assert torch.equal(fast(x), expected)


def test_spread_puts_each_gradient_on_its_tile_and_zero_on_the_dropped_values() -> None:
    grad = torch.tensor([[[1.0, 2.0]]])
    assert pooling.spread(grad, (2,), torch.Size([1, 1, 5])).tolist() == [[[0.5, 0.5, 1.0, 1.0, 0.0]]]
    grad = torch.tensor([[[[4.0]]]])
    assert pooling.spread(grad, (1, 2), torch.Size([1, 1, 2, 3])).tolist() == [[[[2.0, 2.0, 0.0], [0.0, 0.0, 0.0]]]]


@pytest.mark.parametrize("pool", [AvgPool1d(2, stride=1), AvgPool1d(2, padding=1), AvgPool1d(2, ceil_mode=True),
                                  AvgPool1d(3, stride=2, padding=1, count_include_pad=False),
                                  AvgPool2d(3, stride=(1, 2), padding=1, count_include_pad=False),
                                  AvgPool2d(2, divisor_override=3)], ids=str)
def test_windows_that_do_not_tile_use_torchs_pool(pool) -> None:
    x = torch.randn(64, 8, 40) if isinstance(pool, AvgPool1d) else torch.randn(64, 8, 8, 8)
    torchs = (nn.AvgPool1d if isinstance(pool, AvgPool1d) else nn.AvgPool2d)(
        pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode, pool.count_include_pad,
        *([pool.divisor_override] if isinstance(pool, AvgPool2d) else []))
    assert type(pool(x.requires_grad_()).grad_fn).__name__ != "_TileMeanBackward"
    assert torch.equal(pool(x), torchs(x))


def test_inputs_below_min_values_use_torchs_pool() -> None:
    x = torch.randn(2, 8, pooling.MIN_VALUES // 16, requires_grad=True)  # MIN_VALUES values: the strided views
    assert type(AvgPool1d(2)(x).grad_fn).__name__ == "_TileMeanBackward"
    x = torch.randn(2, 8, pooling.MIN_VALUES // 16 - 1, requires_grad=True)
    assert type(AvgPool1d(2)(x).grad_fn).__name__ != "_TileMeanBackward"


def test_the_spec_builds_these_pools() -> None:
    assert POOL_MODULES == {1: AvgPool1d, 2: AvgPool2d}
