"""NORTH-pre (Maile et al., 2022), as the TINY paper states it (App. B.2): new neurons whose
pre-activations on the estimation batch are orthogonal to the existing ones, with fan-out 0.

Notation of App. B.2 (one column per sample, ones row last): B (D, n) the producer's inputs, W (h, D) the
existing fan-in with the bias last, A = W B the existing pre-activations, S = B B^T / n. NORTH draws a
random vector z = V r in the kernel of the pre-activations (z in R^n with A z = 0) and takes the
fan-in whose pre-activation alpha^T B is the least-squares fit of z: alpha = S^+ B z / n (B.2:
alpha_i = S^-1 B V r_i). Writing z = (I - A^T (A A^T)^+ A) g for a standard Gaussian g and u = B g / n:

    alpha = S^+ (u - S W^T (W S W^T)^+ W u),    u ~ N(0, S / n),

so only the moment S is needed, u being drawn as S^(1/2) xi. Then W S alpha = 0: the new pre-activation
is orthogonal to every existing one over the batch (exactly, up to rounding). Each further new neuron
is drawn in the kernel of the existing *and* the previously drawn ones (NORTH draws its r_i
independently and keeps the candidates whose activations are most orthogonal; drawing them mutually
orthogonal gives that directly, without candidates to discard). Each alpha_k is scaled so that its
pre-activation has the mean root-mean-square of the existing neurons' (sqrt(alpha^T S alpha) =
mean_j sqrt(W_j S W_j^T)). Fan-out 0: the function is unchanged at insertion; the new fan-out gets the
gradient E[V_goal sigma(alpha^T b)] and trains first.

How many: NORTH's activation trigger T_act = M (phi_a(f) - gamma_a phi_a(f_0)), phi_a = (number of
singular values of H / sqrt(n) above eps) / M, H the layer's M post-activations (for convolutions,
over samples and positions; the first ``TRIGGER_SAMPLES`` samples of the estimation batch), eps = 0.01, gamma_a = 0.9 (NORTH's values). phi_a(f_0), the initial
network's, is 1 for tinydeploy's starting networks (live units whose activations are independent),
so T_act = count - gamma_a M. NORTH rounds T_act down, which can never grow a layer narrower than
1 / (1 - gamma_a) = 10 (count <= M); tinydeploy starts at width 1, so we round up: a layer grows by
ceil(count - 0.9 M) neurons (one while it is narrow and all its directions are independent, about 10%
of its width when wide), and by none once more than 10% of its directions are redundant.

For convolutional pairs S is the moment of the patches as the consumer sees them (Lemma C.2:
pooled, weighted by how many output positions read each pixel), so orthogonality holds in that inner
product; for vector pairs it is the plain one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tinydeploy.growth import linalg
from tinydeploy.growth.candidates import Candidate, Context, bottleneck, fan_out
from tinydeploy.growth.pairs import Pair, pair_at
from tinydeploy.growth.statistics import LayerMoments
from tinydeploy.model.build import GlobalAvgPool

#: NORTH's effective-dimension threshold eps on the singular values of H / sqrt(n).
EPSILON = 0.01
#: NORTH's trigger threshold gamma_a.
GAMMA = 0.9
#: Samples of the estimation batch on which the trigger's effective dimension is measured.
TRIGGER_SAMPLES = 512
#: A drawn direction whose pre-activation keeps less than this fraction of its size after the projection
#: lies in the span of the existing pre-activations: the kernel is exhausted.
EXHAUSTED = 1e-6


def fan_in_matrix(producer: nn.Module) -> torch.Tensor:
    """W (h, D): the producer's fan-in in the order of a candidate's alpha (weights flattened, bias last)."""
    weight = producer.weight.detach()
    return torch.cat([weight.reshape(weight.shape[0], -1), producer.bias.detach()[:, None]], dim=1).double()


def kernel_fan_in(S: torch.Tensor, W: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """B.2: alpha_k = S^+ (u_k - S W_k^T (W_k S W_k^T)^+ W_k u_k) for each column u_k of U (D, K), where
    W_k is W with alpha_1 .. alpha_(k-1) appended: the pre-activation of alpha_k is orthogonal (over the
    batch S came from) to the existing ones and to the earlier new ones. Stops at the first draw whose
    pre-activation vanishes (the kernel is exhausted); returns (K', D), K' <= K, unscaled."""
    S_pinv = linalg.psd_pinv(S)
    rows, basis = [], W
    for u in U.T:
        G = basis @ S @ basis.T
        alpha = S_pinv @ (u - S @ basis.T @ linalg.psd_pinv(G) @ (basis @ u))
        if float(alpha @ S @ alpha) <= EXHAUSTED**2 * float(u @ S_pinv @ u):
            break
        rows.append(alpha)
        basis = torch.cat([basis, alpha[None]], dim=0)
    return torch.stack(rows) if rows else U.new_zeros(0, S.shape[0])


def effective_dimension(gram: torch.Tensor, eps: float = EPSILON) -> int:
    """phi_a * M: the number of singular values of H / sqrt(n) above ``eps``, from gram = H H^T / n."""
    return int((torch.linalg.eigvalsh(gram).clamp_min(0).sqrt() > eps).sum())


def trigger(count: int, width: int, gamma: float = GAMMA, phi_0: float = 1.0) -> int:
    """NORTH's T_act = M (phi_a - gamma_a phi_a(f_0)) with M phi_a = ``count``, rounded up (see the module
    docstring), at least 0."""
    return max(0, math.ceil(count - gamma * width * phi_0 - 1e-9))


@torch.no_grad()
def post_activation_gram(model: nn.Sequential, pair: Pair, X: torch.Tensor) -> torch.Tensor:
    """H H^T / N for the layer's post-activations H (channels x samples and positions) on ``X``: the
    modules between producer and consumer applied, except those that merge positions or channels."""
    was_training = model.training
    model.eval()
    try:
        h = model[: pair.in_index + 1](X)
        for module in pair.between(model):
            if not isinstance(module, (nn.Flatten, GlobalAvgPool)):
                h = module(h)
    finally:
        model.train(was_training)
    H = h.transpose(0, 1).reshape(h.shape[1], -1).double()
    return H @ H.T / H.shape[1]


def north(m: LayerMoments, max_neurons: int, context: Context, generator: torch.Generator | None = None) -> Candidate:
    """NORTH-pre neurons for the pair of ``m`` (module docstring): as many as NORTH's trigger asks, within
    ``max_neurons`` and the kernel's dimension, fan-in in the kernel of the pre-activations, fan-out 0."""
    pair = pair_at(context.model, m.in_index)
    W = fan_in_matrix(pair.producer(context.model)).to(m.S.device)
    gram = post_activation_gram(context.model, pair, context.X[:TRIGGER_SAMPLES])
    count = effective_dimension(gram.to(m.S.device))
    wanted = min(max_neurons, trigger(count, W.shape[0]))
    xi = torch.randn(m.S.shape[0], wanted, dtype=m.S.dtype, device=m.S.device, generator=generator)
    alpha = kernel_fan_in(m.S, W, linalg.psd_sqrt(m.S) @ xi)
    existing_rms = torch.einsum("hd,de,he->h", W, m.S, W).clamp_min(0).sqrt().mean()
    rms = torch.einsum("kd,de,ke->k", alpha, m.S, alpha).sqrt()
    alpha = alpha * (existing_rms if existing_rms > 0 else 1.0) / rms[:, None]
    k = alpha.shape[0]
    gradient = (m.N_v.T @ alpha.T).pow(2).sum(dim=0)  # ||E[V b^T] alpha_k||^2: the fan-out's first gradient
    return Candidate(
        method="north",
        in_index=m.in_index,
        out_index=m.out_index,
        alpha=alpha,
        omega=fan_out(m.N_v.new_zeros(m.N_v.shape[1], k), m),
        dW=None,
        lambdas=[float(g.sqrt()) for g in gradient],
        lambda_null=None,
        psi=bottleneck(m),
        gain=float(gradient.sum()),
        signed_amplitude=False,
        searches_amplitude=False,
        details={"effective_dimension": count, "width": W.shape[0], "trigger": trigger(count, W.shape[0])},
    )
