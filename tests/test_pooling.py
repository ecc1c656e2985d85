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
                                  AvgPool2d(2, divisor_override=3)], ids=str)
def test_windows_that_do_not_tile_use_torchs_pool(pool) -> None:
    x = torch.randn(64, 8, 40) if isinstance(pool, AvgPool1d) else torch.randn(64, 8, 8, 8)
    torchs = (nn.AvgPool1d if isinstance(pool, AvgPool1d) else nn.AvgPool2d)(
        pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode, pool.count_include_pad,
        *([pool.divisor_override] if isinstance(pool, AvgPool2d) else []))
    assert type(pool(x.requires_grad_()).grad_fn).__name__ != "_TileMeanBackward"
    assert torch.equal(pool(x), torchs(x))


def test_small_inputs_use_torchs_pool() -> None:
    x = torch.randn(2, 3, 8, requires_grad=True)
    assert type(AvgPool1d(2)(x).grad_fn).__name__ != "_TileMeanBackward"


def test_the_spec_builds_these_pools() -> None:
    assert POOL_MODULES == {1: AvgPool1d, 2: AvgPool2d}


def test_scripted_and_exported_graphs_hold_torchs_average_pool() -> None:
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), AvgPool2d(2)).eval()
    x = torch.randn(32, 1, 28, 28)  # 32 x 8 x 28 x 28 values reach the pool: the strided path when eager
    scripted = torch.jit.script(model)
    assert "avg_pool2d" in str(scripted.inlined_graph)
    assert torch.equal(scripted(x), model(x))
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("avg_pool2d" in op for op in ops) and not any("slice" in op for op in ops)
    traced = torch.jit.trace(model, x)
    assert "avg_pool2d" in str(traced.inlined_graph)
