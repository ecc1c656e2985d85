"""Convolutional statistics (App. C.2.2) against brute-force float64 products of explicitly unfolded
tensors, for Conv1d and Conv2d, kernels 1/3/5, strides 1/2, paddings 0/1 and every pair kind."""

from __future__ import annotations

import pytest
import torch

from conv_fixtures import Case, brute_force, build, cases, consumer_index, one_thread  # noqa: F401
from tinydeploy.growth import linalg
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
