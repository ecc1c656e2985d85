"""Convolutional statistics (App. C.2.2) against brute-force float64 products of explicitly unfolded
tensors, for Conv1d and Conv2d, kernels 1/3/5, strides 1/2, paddings 0/1 and every pair kind."""

from __future__ import annotations

import pytest
import torch

from conv_fixtures import Case, brute_force, build, cases, consumer_index, one_thread  # noqa: F401
from tinydeploy.growth import candidates, linalg, statistics
from tinydeploy.growth.statistics import gather_moments


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
    model, X, y = build(case)
    kept = gather_moments(model, [0], X, y, _loss, chunk_size=4)[0]
    monkeypatch.setattr(statistics, "KEEP_VALUES", 0)
    rerun = gather_moments(model, [0], X, y, _loss, chunk_size=4)[0]
    expected = brute_force(model, X, y)["N"]
    for m in (kept, rerun):
        torch.testing.assert_close(m.N, expected, rtol=1e-8, atol=1e-11)


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
