"""How the statistics are computed: shared covariances, the second pass of vector pairs, float32
products accumulated in float64, and the significance test's probe drawn from S instead of from a
per-sample Gaussian."""

from __future__ import annotations

import pytest
import torch
from growth_fixtures import explicit_activities, moments_for, small_problem

from tinydeploy.growth import candidates, linalg, statistics
from tinydeploy.growth.statistics import gather_moments


def _explicit_moments(model, X, y, loss_fn, layer, i_out):
    B_prev, B_h, V = explicit_activities(model, X, y, loss_fn, layer, i_out)
    n = X.shape[0]
    dW = (B_h @ V.T / n).T @ torch.linalg.pinv(B_h @ B_h.T / n, hermitian=True, rtol=1e-10)
    return {"S": B_prev @ B_prev.T / n, "N_v": B_prev @ V.T / n, "S_h": B_h @ B_h.T / n, "N_h": B_h @ V.T / n,
            "VV": V @ V.T / n, "N": B_prev @ (V - dW @ B_h).T / n, "S_ph": B_prev @ B_h.T / n}


def test_wide_layers_shared_covariance_and_second_pass_match_explicit_products():
    """Hidden widths >= statistics.SPLIT_WIDTH (A^T A from three blocks); the second layer's projected N
    from a second pass (wide inputs, 3 outputs: cheaper than S_ph); its S is the first layer's S_h."""
    _, model, X, y, loss_fn = small_problem(widths=(130, 140), n=300, classes=3)
    assert min(model[0].out_features, model[2].out_features) >= statistics.SPLIT_WIDTH
    first = moments_for(model, X, y, loss_fn, 0, chunk_size=128)
    second = moments_for(model, X, y, loss_fn, 2, chunk_size=128)
    assert first.S_ph is not None and first.N is None  # S_ph costs 7 x 131 per sample, a second pass 131 x 140
    assert second.S_ph is None and second.N is not None and second.dW is not None
    for layer, m in ((0, first), (2, second)):
        expected = _explicit_moments(model, X, y, loss_fn, layer, layer + 2)
        for name in ("S", "N_v", "S_h", "N_h", "VV"):
            torch.testing.assert_close(getattr(m, name), expected[name], rtol=1e-10, atol=1e-12, msg=name)
        N = m.projected_cross_moment(m.best_update())
        torch.testing.assert_close(N, expected["N"], rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(second.S, first.S_h, rtol=0, atol=0)




def test_two_vector_pairs_projected_in_the_second_pass_both_match_explicit_products():
    """Widths (40, 3, 40), 3 classes: the first and the last pair both project N in the second pass (a narrow
    consumer), and each gets its own projected N, equal to the explicit B_prev (V - dW* B_h)^T / n."""
    _, model, X, y, loss_fn = small_problem(widths=(40, 3, 40), n=300, d=30, classes=3)
    found = gather_moments(model, [0, 2, 4], X, y, loss_fn, chunk_size=64, generator=torch.Generator().manual_seed(0))
    assert [m.N is not None for m in found] == [True, False, True]
    for m in found:
        expected = _explicit_moments(model, X, y, loss_fn, m.in_index, m.out_index)
        torch.testing.assert_close(m.projected_cross_moment(m.best_update()), expected["N"], rtol=1e-8, atol=1e-11)
    first = found[0]  # its dW* was computed (without a ridge) for the second pass and is kept
    assert first.best_update() is first.dW
    ridged = first.N_h.T @ torch.linalg.inv(linalg.ridged(first.S_h, 0.5))
    torch.testing.assert_close(first.best_update(0.5), ridged, rtol=1e-9, atol=1e-12)

def test_one_eigendecomposition_for_the_matrix_that_is_one_layers_S_h_and_the_next_layers_S():
    """A layer's S_h and the next layer's S are one tensor with one ``linalg.Spectrum`` (eigh runs once),
    and S^+, S^(-1/2) (with and without ridge) from that spectrum equal those of the matrix itself."""
    _, model, X, y, loss_fn = small_problem(widths=(12, 9), n=200, classes=3)
    first, second = gather_moments(model, [0, 2], X, y, loss_fn, generator=torch.Generator().manual_seed(0))
    assert second.S is first.S_h
    spectrum = first.spectrum(first.S_h)
    assert second.spectrum(second.S) is spectrum and first.spectrum(first.S) is not spectrum
    for ridge in (0.0, 0.3):
        torch.testing.assert_close(linalg.psd_inverse_sqrt(spectrum, 1e-6, ridge),
                                   linalg.psd_inverse_sqrt(linalg.ridged(second.S, ridge), 1e-6), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(linalg.psd_pinv(spectrum, 1e-6, ridge),
                                   linalg.psd_pinv(linalg.ridged(second.S, ridge), 1e-6), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(first.best_update(), first.N_h.T @ torch.linalg.pinv(first.S_h, hermitian=True,
                                                                                     rtol=1e-10), rtol=1e-8, atol=1e-11)

def _float32_case():
    _, model, X, y, loss_fn = small_problem(widths=(24, 20), n=3000, d=12, classes=6)
    return model.float(), X.float(), y, loss_fn


def test_float32_products_stay_within_the_measured_error_of_float64():
    """A float32 model's moments (float32 products of chunks of 512, float64 sums) against float64
    products of the same float32 activities: relative error < 1e-5 (measured: ~1e-7); the new neurons'
    lambdas agree with those of a float64 copy of the model to 1e-4 (measured: ~1e-6)."""
    model, X, y, loss_fn = _float32_case()
    reference = model.double()
    for layer in (0, 2):
        m = moments_for(model.float(), X, y, loss_fn, layer, chunk_size=512)
        B_prev, B_h, V = (t.double() for t in explicit_activities(model.float(), X, y, loss_fn, layer, layer + 2))
        n = X.shape[0]
        for name, value in {"S": B_prev @ B_prev.T, "N_h": B_h @ V.T, "VV": V @ V.T, "S_h": B_h @ B_h.T}.items():
            error = float((getattr(m, name) - value / n).abs().max() / (value / n).abs().max())
            assert error < 1e-5, (name, error)
        exact = moments_for(reference.double(), X.double(), y, loss_fn, layer)
        lambdas = [linalg.new_neurons(linalg.psd_inverse_sqrt(k.S), k.projected_cross_moment(k.best_update())).lambdas
                   for k in (m, exact)]
        top = lambdas[1][lambdas[1] > 1e-3 * lambdas[1][0]]
        torch.testing.assert_close(lambdas[0][: len(top)], top, rtol=1e-4, atol=0)


def test_derived_probe_has_the_distribution_of_the_per_sample_gaussian_probe():
    """Given B, N_z = B Z^T / n (Z standard Gaussian, per sample) is N(0, S / n) per column; the probe
    drawn as S^(1/2) G / sqrt(n) must give the same null threshold distribution: two samples of 300
    lambda_- each (explicit Z vs derived), Kolmogorov-Smirnov distance below its 0.1% critical value,
    and the mean of N_z N_z^T equal to (o / n) S within its sampling error."""
    torch.manual_seed(0)
    n, d, o = 400, 9, 5
    B = torch.cat([torch.randn(n, d, dtype=torch.float64) * torch.linspace(0.1, 3, d, dtype=torch.float64),
                   torch.ones(n, 1, dtype=torch.float64)], 1)
    B[:, 1] = B[:, 0] * 0.9 + 0.1 * B[:, 1]  # correlated inputs
    S = B.T @ B / n
    cov = torch.diag(torch.linspace(0.5, 2.0, o, dtype=torch.float64))
    L = linalg.psd_factor(cov)
    S_inv_sqrt = linalg.psd_inverse_sqrt(S)
    generator = torch.Generator().manual_seed(1)
    explicit, derived, second = [], [], torch.zeros(d + 1, d + 1, dtype=torch.float64)
    for _ in range(300):
        Z = torch.randn(n, o, dtype=torch.float64, generator=generator)
        explicit.append(float(linalg.null_threshold(S_inv_sqrt, (B.T @ Z / n) @ L.T)))
        N_z = statistics.derived_probe(S, o, n, generator)
        derived.append(float(linalg.null_threshold(S_inv_sqrt, N_z @ L.T)))
        second += N_z @ N_z.T / 300
    a, b = torch.tensor(sorted(explicit)), torch.tensor(sorted(derived))
    grid = torch.cat([a, b])
    ks = float(((torch.searchsorted(a, grid, right=True) - torch.searchsorted(b, grid, right=True)).abs().max()) / 300)
    assert ks < 1.95 * (2 / 300) ** 0.5  # two-sample KS critical value at alpha = 0.001
    expected = o * S / n  # E[N_z N_z^T]; each entry's sampling sd ~ sqrt(o (S_ii S_jj + S_ij^2) / 300) / n
    sd = (o * (torch.outer(S.diagonal(), S.diagonal()) + S**2) / 300).sqrt() / n
    assert float(((second - expected).abs() / sd).max()) < 5.0


def test_one_tap_probe_is_drawn_from_S_and_spatial_pairs_keep_theirs():
    """The moments' N_z of a vector pair is S^(1/2) G / sqrt(n) for the generator's next draw G."""
    _, model, X, y, loss_fn = small_problem(widths=(3, 4), n=200)
    generator = torch.Generator().manual_seed(5)
    moments = gather_moments(model, [0, 2], X, y, loss_fn, generator=generator)
    replay = torch.Generator().manual_seed(5)
    for m in moments:
        expected = statistics.derived_probe(m.S, m.n_outputs, m.n, replay)
        torch.testing.assert_close(m.N_z, expected, rtol=0, atol=0)


@pytest.mark.parametrize("width", [1, 3])
def test_psd_factor_is_a_square_root_also_of_singular_matrices(width):
    A = torch.randn(5, width, dtype=torch.float64)
    S = A @ A.T  # rank <= width < 5
    C = linalg.psd_factor(S)
    torch.testing.assert_close(C @ C.T, S, rtol=0, atol=1e-12 * float(S.abs().max()))


def test_new_neurons_fan_in_stays_bounded_on_ill_conditioned_float32_inputs():
    """Five informative inputs and five nearly constant ones (std 1e-4 of the others: relative eigenvalues
    ~1e-8 of S, above the old constant cut 1e-10 but below B's numerical rank at float32, ``rank_cut``):
    with the rank cut the largest fan-in weight stays O(1); with the constant cut those directions get
    weights ~ sigma^(-1/2) (measured: 546). The top lambda, carried by the informative directions, is unchanged."""
    torch.manual_seed(0)
    n = 2000
    X = torch.randn(n, 10)
    X[:, 5:] *= 1e-4
    y = (X[:, :2].pow(2).sum(1) * 2 + X[:, 2]).long().clamp(0, 4)
    _, model, _, _, loss_fn = small_problem(widths=(3, 4), d=10)
    model = model.float()
    m = moments_for(model, X, y, loss_fn, 0)
    assert m.eps == torch.finfo(torch.float32).eps
    cut = linalg.rank_cut(m.n, m.S.shape[0], m.eps)
    sigma = torch.linalg.eigvalsh(m.S)
    assert ((sigma > 1e-10 * sigma.max()) & (sigma < cut * sigma.max())).sum() >= 5
    N = m.projected_cross_moment(m.best_update())
    bounded = linalg.new_neurons(linalg.psd_inverse_sqrt(m.S, cut), N)
    constant = linalg.new_neurons(linalg.psd_inverse_sqrt(m.S), N)
    assert float(bounded.alpha.abs().max()) < 10.0
    assert float(constant.alpha.abs().max()) > 100.0
    torch.testing.assert_close(bounded.lambdas[0], constant.lambdas[0], rtol=1e-2, atol=0)
    candidate = candidates.tiny(m, 16)
    assert candidate.alpha.numel() and float(candidate.alpha.abs().max()) < 10.0
