"""Convolutional statistics (App. C.2.2) against brute-force float64 products of explicitly unfolded
tensors, for Conv1d and Conv2d, kernels 1/3/5, strides 1/2, paddings 0/1 and every pair kind."""

from __future__ import annotations

import pytest
import torch
from conv_fixtures import Case, brute_force, build, cases, consumer_index, one_thread  # noqa: F401

from tinydeploy.growth import candidates, linalg, statistics
from tinydeploy.growth.statistics import gather_bottlenecks, gather_moments

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("case", cases(), ids=str)
def test_streamed_conv_moments_equal_brute_force_products(case: Case) -> None:
    model, X, y = build(case)
    expected = brute_force(model, X, y)
    m = gather_moments(model, [0], X, y, _loss, chunk_size=5,
                       generator=torch.Generator().manual_seed(0))[0]
    assert m.out_index == consumer_index(model) and m.taps == expected["taps"]
    for name in ("S", "N_v", "S_h", "N_h", "VV"):
        torch.testing.assert_close(getattr(m, name), expected[name], rtol=1e-10, atol=1e-12, msg=name)
    dW = linalg.best_update(m.S_h, m.N_h)
    torch.testing.assert_close(m.projected_cross_moment(dW), expected["N"], rtol=1e-8, atol=1e-11)
    psi = float(linalg.bottleneck(m.v_sq_norm, m.S_h, m.N_h, dW))
    residual = sum(float((V - B @ dW.T).pow(2).sum()) for V, B in zip(expected["V"], expected["Bh"])) / X.shape[0]
    assert psi == pytest.approx(residual, rel=1e-9)


def _loss(out, y):
    return torch.nn.functional.cross_entropy(out, y, reduction="none")


@pytest.mark.parametrize("case", [Case(dims=2, kind="pool-flatten-linear", size=14), Case(dims=1)], ids=str)
def test_second_pass_recomputed_when_the_recorded_tensors_do_not_fit(case: Case, monkeypatch) -> None:
    """Above KEEP_VALUES the projected N comes from running the model again: same moments."""
    monkeypatch.setattr(statistics, "_spatial_projects_later", lambda views, size: True)
    model, X, y = build(case)
    kept = gather_moments(model, [0], X, y, _loss, chunk_size=4)[0]
    monkeypatch.setattr(statistics, "KEEP_VALUES", 0)
    rerun = gather_moments(model, [0], X, y, _loss, chunk_size=4)[0]
    expected = brute_force(model, X, y)["N"]
    for m in (kept, rerun):
        torch.testing.assert_close(m.N, expected, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("case", cases(), ids=str)
def test_goal_projected_in_the_first_pass_or_in_a_second_gives_the_same_N(case: Case, monkeypatch) -> None:
    """S_ph formed in the first pass (with several taps: (D, (h+1) * taps)) and the second pass's projected N
    agree with the brute-force N."""
    model, X, y = build(case)
    expected = brute_force(model, X, y)["N"]
    for later in (False, True):
        monkeypatch.setattr(statistics, "_spatial_projects_later", lambda views, size: later)
        m = gather_moments(model, [0], X, y, _loss, chunk_size=5)[0]
        assert (m.N is not None) == (later and m.taps > 1) and (m.S_ph is None) == (m.N is not None)
        torch.testing.assert_close(m.projected_cross_moment(linalg.best_update(m.S_h, m.N_h)), expected,
                                   rtol=1e-8, atol=1e-11)


def _one_sample_views(channels: int, kernel: int, consumer_channels: int, length: int):
    """The views of one sample of a Conv1d pair (``channels`` producer inputs, kernel 5, pad 2) read by a
    Conv1d of kernel ``kernel`` with ``consumer_channels`` outputs, on signals of ``length``."""
    from tinydeploy.growth.pairs import Window
    from tinydeploy.growth.statistics import _Views

    D = channels * 5 + 1
    window = Window((1, kernel), (1, 1), (0, kernel // 2))
    return _Views(torch.zeros(1, 8 * kernel + 1, length), torch.zeros(1, consumer_channels, length),
                  torch.zeros(1, D, 1, length), window, (kernel,))


def test_narrow_pairs_form_S_ph_and_wide_ones_take_a_second_pass() -> None:
    """mnist1d's first pair (1 -> 8 channels, kernel 5, read by a conv of 13 channels): S_ph of 6 x 41 x 5
    values per position against 923 multiply-adds of the second pass plus 4 per view value: S_ph. With 64
    input channels (D = 321) S_ph is 321 x 41 x 5 per position: the second pass."""
    narrow = _one_sample_views(1, 5, 13, 20)
    assert not statistics._spatial_projects_later(narrow, 3520)
    wide = _one_sample_views(64, 5, 13, 20)
    assert statistics._spatial_projects_later(wide, 3520 + 3 * 64 * 5 * 20)
    # the boundary: D taps (h+1) L = 6 * 5 * 41 * 20 = 24,600 against 4 views + (41 * 13 + 30 * 13) * 20 = 18,460 + 4 views
    assert statistics._spatial_projects_later(narrow, 1534) and not statistics._spatial_projects_later(narrow, 1535)


def test_rows_limit_each_layer_to_the_first_samples() -> None:
    """rows[k] (App. E.1 per layer): the moments of a layer equal those of its first rows[k] samples alone."""
    model, X, y = build(Case(dims=2, kind="pool-conv", size=14, n=30))
    both = gather_moments(model, [0], X, y, _loss, chunk_size=8, rows=[11])[0]
    alone = gather_moments(model, [0], X[:11], y[:11], _loss, chunk_size=8)[0]
    assert both.n == alone.n == 11
    for name in ("S", "N_v", "S_h", "N_h", "VV", "N"):
        torch.testing.assert_close(getattr(both, name), getattr(alone, name), rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("case", [Case(dims=2, kind="pool-conv", size=14), Case(dims=1, kind="flatten-linear"),
                                  Case(dims=2, kind="gap-linear")], ids=str)
def test_consumer_only_bottleneck_equals_psi_from_the_full_moments(case: Case) -> None:
    model, X, y = build(case)
    psi = statistics.gather_bottlenecks(model, [0], X, y, _loss, chunk_size=6)[0]
    m = gather_moments(model, [0], X, y, _loss, chunk_size=6)[0]
    assert psi == pytest.approx(candidates.bottleneck(m), rel=1e-10) and psi > 0


# ----- the pair geometry on its own, against explicit loops ---------------------------------------------
def _patches_by_hand(x: torch.Tensor, kernel, stride, padding, pool: int | tuple[int, int] = 1) -> torch.Tensor:
    """(n, D, H', W'): the patch behind every output pixel of a conv with a ones feature, averaged over
    ``pool`` x ``pool`` windows of output pixels (a following AvgPool2d(pool))."""
    from conv_fixtures import patch

    grid = x if x.dim() == 4 else x[:, :, None, :]
    H, W = ((s + 2 * p - k) // st + 1 for s, k, st, p in zip(grid.shape[-2:], kernel, stride, padding))
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype)
    P = torch.stack([torch.stack([torch.cat([patch(grid, r, c, kernel, stride, padding), ones], 1) for c in range(W)], -1)
                     for r in range(H)], -2)
    if pool != 1:
        P = torch.nn.functional.avg_pool2d(P, pool)
    return P


@pytest.mark.parametrize(("kernel", "stride", "padding"), [((3, 1), (1, 2), (1, 0)), ((2, 3), (2, 1), (0, 1))])
@pytest.mark.parametrize("pool", [1, 2, (2, 1), (3, 2)])
def test_producer_patches_of_non_square_convolutions_equal_explicit_patches(kernel, stride, padding, pool) -> None:
    from tinydeploy.growth.pairs import producer_patches, window_of

    conv = torch.nn.Conv2d(2, 3, kernel, stride, padding).double()
    x = torch.randn(3, 2, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    P = producer_patches(conv, x, window_of(torch.nn.AvgPool2d(pool)) if pool != 1 else None)
    torch.testing.assert_close(P, _patches_by_hand(x, kernel, stride, padding, pool), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kernel", [(1, 1), (1, 2), (2, 2), (3, 3), (2, 1)])
@pytest.mark.parametrize("dilation", [(1, 1), (2, 3)])
def test_box_mean_is_a_per_channel_box_convolution(kernel, dilation) -> None:
    """box_mean = conv2d with a box kernel (1 / taps everywhere) per channel; bit for bit for 1 and 2 taps."""
    from tinydeploy.growth.pairs import box_mean

    for dtype, tol in ((torch.float64, 1e-14), (torch.float32, 1e-6)):
        x = torch.randn(3, 4, 9, 11, dtype=dtype, generator=torch.Generator().manual_seed(0))
        box = torch.ones(4, 1, *kernel, dtype=dtype) / (kernel[0] * kernel[1])
        expected = torch.nn.functional.conv2d(x, box, dilation=dilation, groups=4)
        found = box_mean(x, kernel, dilation)
        assert found.shape == expected.shape
        if kernel[0] * kernel[1] <= 2:
            assert torch.equal(found, expected)
        torch.testing.assert_close(found, expected, rtol=tol, atol=tol)


def test_producer_patches_of_a_conv1d_and_of_a_linear_layer() -> None:
    from tinydeploy.growth.pairs import producer_patches

    x = torch.randn(3, 2, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    P = producer_patches(torch.nn.Conv1d(2, 3, 3, 2, 1).double(), x)
    torch.testing.assert_close(P, _patches_by_hand(x, (1, 3), (1, 2), (0, 1)), rtol=1e-12, atol=1e-14)
    v = torch.randn(4, 3, 2, dtype=torch.float64)  # a Linear producer reads its input flattened
    P = producer_patches(torch.nn.Linear(6, 2).double(), v)
    assert P.shape == (4, 7, 1, 1)
    torch.testing.assert_close(P[:, :, 0, 0], torch.cat([v.flatten(1), torch.ones(4, 1, dtype=torch.float64)], 1))


def test_window_geometry_matches_torch_and_counts_every_read() -> None:
    from tinydeploy.growth.pairs import Window, _two, window_of

    assert (_two(3), _two((3,)), _two((3, 1))) == ((3, 3), (3, 3), (3, 1))
    for kernel, stride, padding in [((3, 1), (1, 2), (1, 0)), ((2, 3), (2, 1), (0, 1)), ((1, 1), (3, 3), (2, 2))]:
        conv = torch.nn.Conv2d(1, 1, kernel, stride, padding, bias=False)
        window = window_of(conv)
        assert window == Window(kernel, stride, padding)
        assert window.out_size((7, 6)) == tuple(conv(torch.zeros(1, 1, 7, 6)).shape[2:])
        counted = torch.zeros(7, 6)
        rows, cols = window.out_size((7, 6))
        for r, c, a, b in ((r, c, a, b) for r in range(rows) for c in range(cols)
                           for a in range(kernel[0]) for b in range(kernel[1])):
            i, j = r * stride[0] - padding[0] + a, c * stride[1] - padding[1] + b
            if 0 <= i < 7 and 0 <= j < 6:
                counted[i, j] += 1
        torch.testing.assert_close(window.coverage((7, 6), torch.float32, torch.device("cpu")), counted)
    assert window_of(torch.nn.Conv1d(2, 2, 5, 2, 1)) == Window((1, 5), (1, 2), (0, 1))
    assert window_of(torch.nn.AvgPool1d(3)) == Window((1, 3), (1, 3), (0, 0))


@pytest.mark.parametrize(("module", "message"), [
    (torch.nn.Conv2d(4, 4, 3, groups=2), "TINY supports convolutions with groups 1, dilation 1, zero padding"),
    (torch.nn.Conv2d(4, 4, 3, dilation=2), "TINY supports convolutions with groups 1, dilation 1, zero padding"),
    (torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
     "TINY supports convolutions with groups 1, dilation 1, zero padding"),
    (torch.nn.AvgPool2d(2, padding=1), "TINY supports average pooling without padding or ceil mode"),
    (torch.nn.AvgPool2d(2, ceil_mode=True), "TINY supports average pooling without padding or ceil mode"),
])
def test_unsupported_windows_are_named_with_what_tiny_supports(module, message) -> None:
    from tinydeploy.growth.pairs import window_of

    with pytest.raises(ValueError) as error:
        window_of(module)
    assert str(error.value) == f"{module}: {message}"
    with pytest.raises(ValueError) as error:
        window_of(torch.nn.ReLU())
    assert str(error.value) == "ReLU has no sliding window"


def test_leading_pool_and_tap_shapes() -> None:
    from torch import nn

    from tinydeploy.growth.pairs import Window, leading_pool, tap_shape

    pool = nn.AvgPool2d(2)
    assert leading_pool(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), pool)) == Window((2, 2), (2, 2))
    assert leading_pool(nn.Sequential(pool, nn.ReLU())) == Window((2, 2), (2, 2))
    assert leading_pool(nn.Sequential(nn.ReLU(), nn.Flatten(), pool)) is None
    assert leading_pool(nn.Sequential(nn.ReLU())) is None
    linear = nn.Linear(4, 2)
    assert [tap_shape(linear, g) for g in ((1, 1), (2, 1), (1, 2), (2, 3))] == [(), (2,), (2,), (6,)]
    assert tap_shape(nn.Conv2d(1, 1, (3, 1)), (5, 5)) == (3, 1) and tap_shape(nn.Conv1d(1, 1, 5), (1, 9)) == (5,)


def test_a_residual_blocks_continuation_finishes_the_block_and_the_network() -> None:
    """pre = the block's conv2 output: continuation(x)(pre) is the network's output (BatchNorm, shortcut of
    the block's input, activation, then the following modules)."""
    from tinydeploy.growth.pairs import pair_at
    from tinydeploy.model.build import ResidualBlock, build_model
    from tinydeploy.model.spec import ArchSpec

    spec = ArchSpec.resnet(task="classification", input_shape=(1, 4, 4), stages=(1, 1), stream_widths=[2, 3],
                           mid_widths=[2, 2], n_outputs=3)
    torch.manual_seed(0)
    model = build_model(spec).double().eval()
    X = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.bias.uniform_(-0.5, 0.5)
        for i in (i for i, m in enumerate(model) if isinstance(m, ResidualBlock)):
            block, pair = model[i], pair_at(model, i)
            x = pair.producer_input(model, X)
            pre = block.conv2(block.act1(block.bn1(block.conv1(x))))
            torch.testing.assert_close(pair.continuation(model, x)(pre), model(X), rtol=1e-12, atol=1e-12)


def test_rows_limit_the_consumer_only_bottleneck_to_the_first_samples() -> None:
    """A consumer whose unfolded input is costly (8 channels x 9 taps x 256 positions per sample) reads only
    the first rows[k] samples."""
    model, X, y = build(Case(dims=2, kind="conv", size=16, width=8, n=30))
    both = gather_bottlenecks(model, [0], X, y, _loss, chunk_size=8, rows=[11])
    alone = gather_bottlenecks(model, [0], X[:11], y[:11], _loss, chunk_size=8)
    assert both.keys() == {0} and both[0] == pytest.approx(alone[0], rel=1e-12)
    assert both[0] != pytest.approx(gather_bottlenecks(model, [0], X, y, _loss, chunk_size=8)[0], rel=1e-6)


def test_rows_do_not_limit_a_cheap_consumer_even_when_its_producer_is_costly() -> None:
    """Only the consumer's views count for the consumer-only bottleneck: the producer's patches would be costly
    (16 x 9 + 1 features x 9 taps x 64 positions per sample), its one channel is cheap for the consumer to read
    (10 x 64 values), so every sample is read."""
    model, X, y = build(Case(dims=2, kind="conv", size=8, channels=16, width=1, n=30))
    limited = gather_bottlenecks(model, [0], X, y, _loss, chunk_size=8, rows=[11])
    assert limited[0] == pytest.approx(gather_bottlenecks(model, [0], X, y, _loss, chunk_size=8)[0], rel=1e-12)


@pytest.mark.parametrize("n", [0, 1, 7])
@pytest.mark.parametrize(("shape", "kernel", "stride", "padding"), [
    ((3, 1, 11), (1, 5), (1, 1), (0, 2)),  # Conv1d as a 1 x L grid
    ((2, 6, 6), (3, 3), (1, 1), (1, 1)),
    ((4, 9, 11), (3, 5), (2, 3), (1, 2)),
    ((2, 8, 8), (2, 2), (2, 2), (0, 0)),
], ids=str)
def test_strided_window_unfold_equals_im2col_bit_for_bit(n, shape, kernel, stride, padding) -> None:
    """``Window.unfold`` and ``columns_with_ones`` (a strided view copied once) against torch's im2col,
    including an empty shard (a process without rows in a chunk)."""
    from torch.nn import functional as F

    from tinydeploy.growth.pairs import Window, columns_with_ones, windows, with_ones_channel

    x = torch.randn(n, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    window = Window(kernel, stride, padding)
    expected = F.unfold(x, kernel, padding=padding, stride=stride)
    assert torch.equal(window.unfold(x), expected)
    padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    patches = windows(padded, kernel, stride)
    out = window.out_size(tuple(shape[1:]))
    assert tuple(patches.shape) == (n, shape[0], *kernel, *out)
    assert torch.equal(columns_with_ones(patches, (out[0] * out[1],)), with_ones_channel(expected))
    D = shape[0] * kernel[0] * kernel[1] + 1
    assert torch.equal(columns_with_ones(patches, out), with_ones_channel(expected).reshape(n, D, *out))


@pytest.mark.parametrize("n", [0, 5])
@pytest.mark.parametrize(("grid_size", "window"), [
    ((1, 11), ((1, 5), (1, 1), (0, 2))),  # Conv1d consumer
    ((9, 11), ((3, 5), (2, 3), (1, 2))),  # strided, padded Conv2d consumer
    ((6, 6), ((1, 1), (1, 1), (0, 0))),  # one tap
    ((4, 3), ((4, 3), (1, 1), (0, 0))),  # a linear consumer after flatten: the whole grid
], ids=str)
def test_cross_moment_without_unfolding_equals_the_product_with_unfolded_patches(n, grid_size, window) -> None:
    """sum_il B^t_il^T M_il from the grid (a convolution's weight gradient, or a product with the grid) equals
    the product with B^t unfolded, columns ordered (output channel, tap)."""
    from tinydeploy.growth.pairs import Window
    from tinydeploy.growth.statistics import _Views

    gen = torch.Generator().manual_seed(n)
    grid = torch.randn(n, 4, *grid_size, dtype=torch.float64, generator=gen)
    w = Window(*window)
    out = w.out_size(grid_size)
    M = torch.randn(n, 3, out[0] * out[1], dtype=torch.float64, generator=gen)
    views = _Views(torch.empty(0), M, grid, w, ())
    expected = torch.einsum("idpl,iml->dmp", views.U, M).reshape(4, -1)
    torch.testing.assert_close(views.cross(M), expected, rtol=1e-12, atol=1e-12)
    assert views.cross(M).shape == (4, 3 * w.taps)


def test_projected_cross_moment_with_taps_subtracts_dW_from_each_taps_block() -> None:
    """N[:, (m, p)] = N_v[:, (m, p)] - sum_h dW[m, h] S_ph[:, (h, p)]; one tap (the default): N_v - S_ph dW^T."""
    gen = torch.Generator().manual_seed(3)
    D, h1, o, taps = 4, 5, 3, 2
    N_v = torch.randn(D, o * taps, dtype=torch.float64, generator=gen)
    S_ph = torch.randn(D, h1 * taps, dtype=torch.float64, generator=gen)
    dW = torch.randn(o, h1, dtype=torch.float64, generator=gen)
    expected = N_v.clone().reshape(D, o, taps)
    for m in range(o):
        for p in range(taps):
            expected[:, m, p] -= sum(dW[m, h] * S_ph.reshape(D, h1, taps)[:, h, p] for h in range(h1))
    torch.testing.assert_close(linalg.projected_cross_moment(N_v, S_ph, dW, taps), expected.reshape(D, -1))
    torch.testing.assert_close(linalg.projected_cross_moment(N_v[:, :o], S_ph[:, :h1], dW), N_v[:, :o] - S_ph[:, :h1] @ dW.T)


def test_probe_counts_each_pairs_values_per_sample_and_picks_its_projection() -> None:
    """``_probe`` on mnist1d's CNN shape. Views per sample: B_h (8 * 5 + 1) x 20 = 820, 3 V = 3 x 13 x 20,
    3 B^t = 3 x 6 x 5 x 20 (counted whether or not it is formed), the grid 6 x 20: 3,520; recorded: the
    input 40, the consumer's input 8 x 20 and its gradient 13 x 20: 460. Consumer side only: 820 + 780. The
    flatten -> linear pair reads a 41 x 10 grid through 10 taps (its second pass is cheaper than S_ph).
    A pair whose consumer reads 32 channels through 2 taps into 4 outputs projects in a second pass."""
    from torch import nn

    from tinydeploy.growth.pairs import pairs_of
    from tinydeploy.model.build import ReLU
    from tinydeploy.model.pooling import AvgPool1d

    model = nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), ReLU(), AvgPool1d(2), nn.Conv1d(8, 13, 5, padding=2), ReLU(),
                          AvgPool1d(2), nn.Flatten(), nn.Linear(130, 10), ReLU(), nn.Linear(10, 10))
    X, y = torch.randn(3, 1, 40), torch.tensor([0, 1, 2])
    pairs = dict(enumerate(pairs_of(model, [0, 3, 7])))
    found = statistics._probe(model, pairs, X, y, _loss, set())
    assert [(p.views, p.recorded, p.taps, p.projects_later) for p in found.values()] == [
        (3520, 460, 5, False), (131 + 3 * 10 + 3 * 41 * 10 + 41 * 10, 300, 10, True), (11 + 3 * 10 + 3 * 131 + 131, 150, 1, False)]
    assert [p.views for p in statistics._probe(model, pairs, X, y, _loss, set(pairs)).values()] == [1600, 161, 41]
    mixed = statistics._probe(model, pairs, X, y, _loss, {1})  # one pair consumer-side only
    assert [(p.views, p.taps) for p in mixed.values()] == [(3520, 5), (161, 1), (11 + 3 * 10 + 3 * 131 + 131, 1)]
    wide = nn.Sequential(nn.Conv1d(2, 32, 5, padding=2), ReLU(), nn.Conv1d(32, 4, 2), nn.Flatten(), nn.Linear(36, 3))
    probe = statistics._probe(wide, dict(enumerate(pairs_of(wide, [0]))), torch.randn(2, 2, 10), y[:2], _loss, set())[0]
    assert probe.taps == 2 and probe.projects_later


def test_a_round_gathers_the_consumer_side_of_other_layers_in_the_same_pass() -> None:
    """gather_round: the moments of the layers it grows are gather_moments' (same draws), and Psi of every
    layer, the consumer-side-only ones included (a conv -> conv pair, a flatten -> linear pair), is
    gather_bottlenecks' on the same samples."""
    from torch import nn

    from tinydeploy.model.build import ReLU
    from tinydeploy.model.pooling import AvgPool1d

    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv1d(1, 4, 5, padding=2), ReLU(), AvgPool1d(2), nn.Conv1d(4, 5, 3, padding=1), ReLU(),
                          AvgPool1d(2), nn.Flatten(), nn.Linear(50, 6), ReLU(), nn.Linear(6, 3)).double()
    X, y = torch.randn(30, 1, 40, dtype=torch.float64), torch.randint(0, 3, (30,))
    options = {"chunk_size": 7, "rows": [20]}
    moments, psi = statistics.gather_round(model, [0], [3, 7], X, y, _loss, generator=torch.Generator().manual_seed(1),
                                           **options)
    (alone,) = gather_moments(model, [0], X, y, _loss, generator=torch.Generator().manual_seed(1), **options)
    for name in ("S", "N_v", "N_z", "S_h", "N_h", "VV"):
        assert torch.equal(getattr(moments[0], name), getattr(alone, name)), name
    expected = gather_bottlenecks(model, [0, 3, 7], X, y, _loss, chunk_size=7)
    assert sorted(psi) == [0, 3, 7]
    assert all(psi[i] == pytest.approx(expected[i], rel=1e-10) for i in (3, 7))
    assert psi[0] == pytest.approx(statistics.psi(alone.S_h, alone.N_h, alone.VV), rel=0)
    assert psi[0] == pytest.approx(gather_bottlenecks(model, [0], X[: alone.n], y[: alone.n], _loss)[0], rel=1e-10)


def test_a_rounds_consumer_only_layers_read_all_samples_even_with_costly_views() -> None:
    """``rows`` limits only the layers it names: a consumer-only layer of a round (its consumer's views
    over 4,096 values per sample here) reads all of X, as ``gather_bottlenecks`` without rows does."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(512, 3)).double()
    X, y = torch.randn(40, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (40,))
    probe = statistics._probe(model, dict(enumerate(statistics.pairs_of(model, [0]))), X, y, _loss, {0})
    assert probe[0].views > statistics.CHEAP_VIEWS
    _, psi = statistics.gather_round(model, [2], [0], X, y, _loss, rows=[10])
    assert psi[0] == pytest.approx(gather_bottlenecks(model, [0], X, y, _loss)[0], rel=1e-12)
    assert psi[0] != pytest.approx(gather_bottlenecks(model, [0], X, y, _loss, rows=[10])[0], rel=1e-6)
