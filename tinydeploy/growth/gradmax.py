"""GradMax (Evci et al., ICLR 2022), as the TINY paper restates it (App. B.1, E.3.1).

New neurons get fan-in alpha = 0 and the fan-out Omega* = argmax ||N~ Omega|| s.t. ||Omega|| <= c
(Eq. 23): the top eigenvectors of N~^T N~, N~ = B_prev V_goal^T / n with the *unprojected* goal.
With sigma(0) = 0 the function is unchanged at insertion, so no amplitude is searched.

The activation at 0. After insertion the only non-zero gradient of a new neuron k is on its fan-in:
d(sum_i l_i)/d alpha_k = -n sigma'(0) N~ omega_k, of squared norm n^2 sigma'(0)^2 ||omega_k||^2 e_k
(e_k the eigenvalue of N~^T N~ that GradMax maximised). The derivation therefore assumes
sigma'(0) != 0, and GradMax's reference code (google-research/growneuron) makes it hold for ReLU: the
layers it grows use a ReLU written as max(x, 0) whose gradient at 0 is 1 ("relu1", commented "to
ensure gradient is 1 at 0 for relu"), not the framework's default 0. tinydeploy's ReLU does the same
(``tinydeploy.model.build.ReLU``: right derivative 1 at 0, values unchanged, exported as a plain Relu);
with torch's default derivative 0 the new neurons would never leave 0 (measured on digits before this
choice: 149 of 155 GradMax neurons still had an all-zero fan-in after training, 18.8% test accuracy).
tanh, SELU and GELU have sigma'(0) = 1, ~1.05 and 0.5. The same holds for convolutions: a new kernel's
gradient is the correlation of the producer's patches with omega_k's view of V_goal.
"""

from __future__ import annotations

import torch

from tinydeploy.growth import linalg
from tinydeploy.growth.candidates import Candidate, bottleneck, fan_out, gaussian_like_goal
from tinydeploy.growth.statistics import LayerMoments

#: Fan-out scale (App. E.3.1, Eq. 195): root-mean-square of the new fan-out entries.
FAN_OUT_RMS = 1e-3


def first_step_signs(m: LayerMoments, omega: torch.Tensor) -> torch.Tensor:
    """+-1 per column of ``omega``: the eigenvector sign GradMax leaves free, chosen so that the first
    gradient step turns the neuron on where the layer's inputs are on average. That step moves alpha_k
    along n sigma'(0) N~ omega_k, so the mean new pre-activation is proportional to b_mean^T N~ omega_k
    (b_mean = S[:, -1], the mean input with its ones entry): with the other sign it is negative, and
    on non-negative inputs (every layer after a ReLU) the neuron is then off on nearly every sample
    and stays dead."""
    signs = torch.sign(m.S[:, -1] @ m.N_v @ omega)
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def gradmax(m: LayerMoments, max_neurons: int) -> Candidate:
    """GradMax neurons for the pair of ``m``: fan-in 0, fan-out the top eigenvectors of N~^T N~ (Eq. 23)
    scaled to RMS ``FAN_OUT_RMS`` (Eq. 195) with the signs of ``first_step_signs``, kept where sqrt(e_k)
    exceeds the null threshold computed like TINY's (a Gaussian goal with V_goal's covariance,
    independent of the inputs)."""
    psi = bottleneck(m)
    rank = min(m.N_v.shape)
    omega, eigenvalues = linalg.gradmax_fan_out(m.N_v, min(max_neurons, rank))
    null = gaussian_like_goal(m, m.VV)
    lambda_null = float(torch.linalg.matrix_norm(null, ord=2))
    lambdas = eigenvalues.sqrt()
    k = int((lambdas > lambda_null).sum())
    omega, lambdas = omega[:, :k], lambdas[:k]
    if k:
        omega = omega * (FAN_OUT_RMS / omega.pow(2).mean().sqrt())
        omega = omega * first_step_signs(m, omega)
    return Candidate(
        method="gradmax",
        in_index=m.in_index,
        out_index=m.out_index,
        alpha=torch.zeros(k, m.S.shape[0], dtype=m.S.dtype, device=m.S.device),
        omega=fan_out(omega, m),
        dW=None,
        lambdas=[float(v) for v in lambdas],
        lambda_null=lambda_null,
        psi=psi,
        gain=float((lambdas**2).sum()),
        signed_amplitude=False,
        searches_amplitude=False,
    )
