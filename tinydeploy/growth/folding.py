"""Growing by Folding (J. Kang, talk, 2024) for shallow ReLU MLPs (input - Linear - ReLU - Linear).

The talk's algorithm, step by step, in its names (A: the hidden layer, B: the output layer):

1. find_typical_mis_predicted_instance: the per-sample losses l_i of a sample of the training set
   weight a k-means clustering of the samples (``weighted_kmeans``); the cluster with the highest mean
   loss is the kind of mistake the model makes most; x_t is its member closest to the centroid.
2. find_activate_linear_segment: at x_t the network is the affine map W_act x + b_act with
   W_act = W_B D W_A, b_act = W_B D b_A + b_B, D = diag(W_A x_t + b_A > 0) (``activated_segment``).
3. fold point: the decision boundary of that segment between x_t's class y and its rival c (the
   predicted class, or the runner-up when x_t is predicted right) is the hyperplane w.x + b = 0 with
   w = W_act[y] - W_act[c]; x_f is its point closest to x_t, x_t - (w.x_t + b) w / (w.w) (the talk's
   closed form).
4. hidden_layer_broaden: one new hidden neuron with fan-out 0 (the function is unchanged) and fan-in
   (a, -a.x_f), so that its pre-activation a.(x - x_f) is 0 at x_f: the fold can only happen there.

Choices where the talk leaves a step open (its "next milestones" list three open problems):

* The fold point may not lie on the activated segment (open problem 2): x_f is a point of the
  *segment's* boundary, which the network only realises inside x_t's activation region. When x_f is
  outside it, we walk from x_t towards x_f (and on, up to 4 times as far) and take the first point where
  the network's actual margin f_y - f_c is 0 (bisection on that piecewise-linear function): a point of
  the network's real decision boundary. When the margin never reaches 0 on the way, the talk's x_f is
  kept. (``fold_point``)
* The direction of a (open problem 1, and the talk's two "gradient criteria", GradMax's gradient norm
  and the alignment with x_t - x_f): a new neuron with fan-out 0 receives a gradient only on its
  fan-out, G(a) = ||(1/n) sum_i v_i relu(a.(x_i - x_f))||^2 (v_i = -dl_i/d outputs), which is the
  GradMax criterion for it. We maximise G over unit directions within 60 degrees of x_t - x_f (the
  alignment criterion as a constraint; it also puts x_t strictly on the active side), among
  x_t - x_f itself and ``DIRECTIONS`` random directions of that cone. (``fold_direction``)
* Constrained optimisation (open problem 3) is thus avoided: the hyperplane constraint fixes the
  bias, the direction is a search over a cone. |a| is the mean norm of the existing fan-in rows.
* Which cluster gives x_t (the talk takes the highest mean loss, and requires x_f ~ D): (A) the fold
  point must lie in the input domain, taken as the bounding box of the sampled instances; (B) it must
  not already be a fold point of the network, i.e. no existing hidden unit's hyperplane passes within
  ``FOLDED_FRACTION`` (2%) of that box's diagonal of it (the talk's fold points are where the activation
  pattern changes; a second neuron through the same point adds no new linear segment). The clusters
  are tried from the highest mean loss down and the first whose fold point passes both is folded; when
  none does, the talk's own pick (the highest-loss cluster) is folded, so that the budget, not this
  rule, ends growth (with "no neuron" instead, growth stopped at 12 to 66 units of a 79-unit budget). Why: a new neuron has fan-out 0, so the step after a fold
  (a quarter epoch later in the default recipe, where the talk trains to convergence) usually finds
  the same mistake and would fold on the same line again, and the segment's closest boundary point is
  often far outside the data (x_f = (-9.7, 1.1) with the data in [-1.7, 1.7]^2 on quadratic2d), where the new hyperplane
  does not cross the data at all. ``benchmarks/folding_regions.py`` measures this rule against the
  talk's (its ``--rules domain,talk``). Tried in exploratory runs and not kept, as none gave more
  regions: k = 16 or 24 clusters, the direction x_t - x_f itself (a cone of 0 degrees) or any direction
  with x_t on the active side (89 degrees), and two epochs of training between folds.
* How many: one neuron per growth step (the talk grows 2-2-2 into 2-3-2 by one fold), none when no
  sampled instance is mis-predicted. k = ``CLUSTERS`` clusters (the talk does not say how many).
* When x_t lies where every hidden unit is off, the segment is constant and has no boundary: x_f is
  then the midpoint between x_t and the mean of the samples outside its cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tinydeploy.errors import TinyDeployError
from tinydeploy.growth.candidates import Candidate, Context, bottleneck
from tinydeploy.growth.statistics import LayerMoments

#: Clusters of the loss-weighted k-means.
CLUSTERS = 8
#: Lloyd iterations at most (it stops earlier when no assignment changes).
KMEANS_ITERATIONS = 100
#: Half-angle of the cone around x_t - x_f in which the fan-in direction is searched.
CONE_DEGREES = 60.0
#: Random directions of that cone tried besides x_t - x_f.
DIRECTIONS = 256
#: How far (in multiples of x_f - x_t) the walk from x_t looks for the network's boundary, in brackets.
WALK = (1.0, 2.0, 4.0)
#: Bisection steps for the margin's zero on the way.
BISECTION_STEPS = 60
#: A fold point closer than this fraction of the samples' bounding-box diagonal to an existing hidden
#: unit's hyperplane is already a fold point of the network (choice B of the module docstring).
FOLDED_FRACTION = 0.02


def check_model(model: nn.Sequential, growable: list[int], task: str) -> None:
    """A one-line error unless ``model`` is Linear - ReLU - Linear and the task is classification."""
    kinds = [type(module).__name__ for module in model]
    shallow = (len(model) == 3 and isinstance(model[0], nn.Linear) and isinstance(model[1], nn.ReLU)
               and isinstance(model[2], nn.Linear))
    if not shallow:
        raise TinyDeployError(f"--method folding grows shallow ReLU MLPs with one hidden layer, this network is "
                              f"{' - '.join(kinds)}: pass --arch mlp --activation relu and one initial width, "
                              "e.g. --init-widths 2")
    if task != "classification":
        raise TinyDeployError("--method folding folds decision boundaries and needs a classification dataset: "
                              "use another --method for regression")


# ----- 1. typical mis-predicted instance -------------------------------------------------------------
def weighted_kmeans(X: torch.Tensor, weights: torch.Tensor, k: int, generator: torch.Generator | None = None,
                    iterations: int = KMEANS_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on the rows of X where sample i counts ``weights[i]`` times: centroids are
    weighted means, seeds drawn by weighted k-means++ (probability of x_i proportional to w_i times its
    squared distance to the nearest seed). Returns (centroids (k, d), assignments (n,))."""
    n = X.shape[0]
    k = min(k, n)
    w = weights.clamp_min(0).to(X.dtype)
    w = w if float(w.sum()) > 0 else torch.ones_like(w)
    device = generator.device if generator is not None else X.device
    first = int(torch.multinomial(w.to(device), 1, generator=generator))
    centroids = X[first : first + 1]
    for _ in range(1, k):
        p = w * torch.cdist(X, centroids).min(dim=1).values.pow(2)
        if float(p.sum()) <= 0:
            break
        centroids = torch.cat([centroids, X[int(torch.multinomial(p.to(device), 1, generator=generator))][None]])
    labels = torch.cdist(X, centroids).argmin(dim=1)
    for _ in range(iterations):
        mass = torch.zeros(centroids.shape[0], dtype=X.dtype, device=X.device).index_add_(0, labels, w)
        sums = torch.zeros_like(centroids).index_add_(0, labels, w[:, None] * X)
        centroids = torch.where(mass[:, None] > 0, sums / mass.clamp_min(torch.finfo(X.dtype).tiny)[:, None],
                                centroids)
        new = torch.cdist(X, centroids).argmin(dim=1)
        if torch.equal(new, labels):
            break
        labels = new
    return centroids, labels


@dataclass(frozen=True)
class Typical:
    """The typical mis-predicted instance: its row in the sample, its cluster (a boolean mask over the
    sample) and that cluster's mean loss."""

    index: int
    cluster: torch.Tensor
    mean_loss: float


def typical_instances(X: torch.Tensor, losses: torch.Tensor, k: int = CLUSTERS,
                      generator: torch.Generator | None = None) -> list[Typical]:
    """find_typical_mis_predicted_instance for every non-empty cluster of the loss-weighted k-means, from
    the highest mean loss down: each cluster's member closest to its centroid."""
    centroids, labels = weighted_kmeans(X, losses, k, generator)
    mean = torch.zeros(centroids.shape[0], dtype=losses.dtype, device=losses.device).index_add_(0, labels, losses)
    count = torch.bincount(labels, minlength=centroids.shape[0]).to(losses.dtype)
    mean = mean / count.clamp_min(1)
    out = []
    for c in sorted((c for c in range(centroids.shape[0]) if count[c] > 0), key=lambda c: -float(mean[c])):
        members = torch.nonzero(labels == c).flatten()
        index = int(members[(X[members] - centroids[c]).pow(2).sum(dim=1).argmin()])
        out.append(Typical(index, labels == c, float(mean[c])))
    return out


def typical_instance(X: torch.Tensor, losses: torch.Tensor, k: int = CLUSTERS,
                     generator: torch.Generator | None = None) -> Typical:
    """find_typical_mis_predicted_instance: loss-weighted k-means, the cluster with the highest mean loss,
    its member closest to the centroid."""
    return typical_instances(X, losses, k, generator)[0]


# ----- 2-3. activated linear segment, fold point ------------------------------------------------------
def activated_segment(model: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_act (o, d), b_act (o,)): the affine map the shallow ReLU MLP computes around ``x`` (d,)."""
    A, B = model[0], model[2]
    on = (A.weight.double() @ x + A.bias.double()) > 0
    W_B = B.weight.double()[:, on]
    return W_B @ A.weight.double()[on], W_B @ A.bias.double()[on] + B.bias.double()


def rival_class(logits: torch.Tensor, label: int) -> int:
    """The predicted class when it is not ``label``, else the runner-up."""
    order = torch.argsort(logits, descending=True)
    return int(order[0]) if int(order[0]) != label else int(order[1])


def _margin(model: nn.Sequential, x: torch.Tensor, label: int, rival: int) -> float:
    out = model(x[None].to(model[0].weight.dtype)).double()[0]
    return float(out[label] - out[rival])


def _pattern(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    return (model[0].weight.double() @ x + model[0].bias.double()) > 0


@torch.no_grad()
def fold_point(model: nn.Sequential, x_t: torch.Tensor, label: int, rival: int) -> tuple[torch.Tensor, str] | None:
    """x_f for the instance ``x_t`` (float64) of class ``label`` and its ``rival`` (module docstring, step 3
    and open problem 2), with how it was found: "segment" (the talk's point, inside x_t's region),
    "boundary" (the network's boundary on the way to it, or up to 4 times as far) or "extension" (the
    talk's point, outside the region; the margin never reaches 0 on the way). None when the segment has no boundary (W_act[label] = W_act[rival])."""
    W_act, b_act = activated_segment(model, x_t)
    w, b = W_act[label] - W_act[rival], b_act[label] - b_act[rival]
    if float(w @ w) <= torch.finfo(w.dtype).eps * float(W_act.pow(2).sum()):
        return None
    x_p = x_t - (w @ x_t + b) / (w @ w) * w
    if torch.equal(_pattern(model, x_p), _pattern(model, x_t)):
        return x_p, "segment"
    start = _margin(model, x_t, label, rival)
    lo, hi = 0.0, None
    for reach in WALK:
        if start != 0.0 and (_margin(model, x_t + reach * (x_p - x_t), label, rival) > 0) != (start > 0):
            hi = reach
            break
        lo = reach
    if hi is None:
        return x_p, "extension"
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        if (_margin(model, x_t + mid * (x_p - x_t), label, rival) > 0) == (start > 0):
            lo = mid
        else:
            hi = mid
    return x_t + hi * (x_p - x_t), "boundary"


def in_domain(x_f: torch.Tensor, X: torch.Tensor) -> bool:
    """Whether ``x_f`` lies in the bounding box of the samples X (the talk's x_f ~ D)."""
    return bool(((x_f >= X.min(dim=0).values) & (x_f <= X.max(dim=0).values)).all())


def fold_distance(model: nn.Sequential, x: torch.Tensor) -> float:
    """The distance from ``x`` to the nearest hyperplane of the existing hidden units (where the network
    already folds)."""
    W, b = model[0].weight.detach().double(), model[0].bias.detach().double()
    return float(((W @ x + b).abs() / W.norm(dim=1).clamp_min(torch.finfo(W.dtype).tiny)).min())


@dataclass(frozen=True)
class Fold:
    """Where to fold: the typical instance x_t of the cluster ranked ``rank`` by mean loss (0: the highest),
    its class ``label`` and ``rival``, the fold point x_f and how it was found (``fold_point``); ``passed``:
    whether x_f lies in the data's box and is not a fold yet."""

    typical: Typical
    x_t: torch.Tensor
    label: int
    rival: int
    x_f: torch.Tensor
    how: str
    rank: int
    passed: bool


def choose_fold(model: nn.Sequential, X: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, losses: torch.Tensor,
                generator: torch.Generator | None = None) -> Fold:
    """The fold of the cluster of highest mean loss whose fold point lies in the samples' box (x_f ~ D) and
    is not already a fold of the network (module docstring, choices A and B); when no cluster has one,
    the talk's own pick, the highest-loss cluster (``Fold.passed`` False)."""
    tolerance = FOLDED_FRACTION * float((X.max(dim=0).values - X.min(dim=0).values).norm())
    first = None
    for rank, typical in enumerate(typical_instances(X, losses, CLUSTERS, generator)):
        x_t, label = X[typical.index], int(y[typical.index])
        rival = rival_class(logits[typical.index], label)
        found = fold_point(model, x_t, label, rival)
        if found is None:
            outside = X[~typical.cluster] if bool((~typical.cluster).any()) else X
            x_f, how = (x_t + outside.mean(dim=0)) / 2, "dead-region"
        else:
            x_f, how = found
        passed = in_domain(x_f, X) and fold_distance(model, x_f) >= tolerance
        fold = Fold(typical, x_t, label, rival, x_f, how, rank, passed)
        if passed:
            return fold
        first = first or fold
    assert first is not None  # k-means has at least one non-empty cluster
    return first


# ----- 4. direction of the new neuron -----------------------------------------------------------------
def fan_out_gradient(X: torch.Tensor, V: torch.Tensor, x_f: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """G(a) = ||(1/n) sum_i v_i relu(a.(x_i - x_f))||^2 for each row a of ``directions`` (K, d): the squared
    norm of the gradient the fan-out of a new neuron through x_f receives (V: (n, o), v_i = -dl_i/d out)."""
    H = torch.relu((X - x_f) @ directions.T)
    return (V.T @ H / X.shape[0]).pow(2).sum(dim=0)


def cone_directions(u: torch.Tensor, count: int, degrees: float, generator: torch.Generator | None = None
                    ) -> torch.Tensor:
    """``u`` (a unit vector) and ``count`` random unit vectors at most ``degrees`` from it, as rows."""
    device = generator.device if generator is not None else u.device
    r = torch.randn(count, u.shape[0], dtype=u.dtype, device=device, generator=generator).to(u.device)
    r = r - (r @ u)[:, None] * u
    r = r / r.norm(dim=1, keepdim=True).clamp_min(torch.finfo(u.dtype).tiny)
    angle = torch.rand(count, 1, dtype=u.dtype, device=device, generator=generator).to(u.device)
    angle = angle * math.radians(degrees)
    return torch.cat([u[None], torch.cos(angle) * u + torch.sin(angle) * r])


def fold_direction(X: torch.Tensor, V: torch.Tensor, x_t: torch.Tensor, x_f: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """The unit direction a (and G(a)) maximising the fan-out gradient G over the cone of half-angle
    ``CONE_DEGREES`` around x_t - x_f (module docstring)."""
    u = (x_t - x_f) / (x_t - x_f).norm()
    candidates = cone_directions(u, DIRECTIONS if X.shape[1] > 1 else 0, CONE_DEGREES, generator)
    G = fan_out_gradient(X, V, x_f, candidates)
    best = int(G.argmax())
    return candidates[best], float(G[best])


def _goal(model: nn.Sequential, X: torch.Tensor, y: torch.Tensor, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample losses, V = -dl_i/d outputs) of ``model`` on (X, y), in float64."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            out = model(X).detach().requires_grad_(True)
            losses = loss_fn(out, y)
            (grad,) = torch.autograd.grad(losses.sum(), out)
    finally:
        model.train(was_training)
    return losses.detach().double(), -grad.double()


def folding(m: LayerMoments, max_neurons: int, context: Context, generator: torch.Generator | None = None
            ) -> Candidate:
    """One fold (module docstring): fan-in (a, -a.x_f), fan-out 0; no neuron when ``max_neurons`` is 0 or
    no sampled instance is mis-predicted."""
    model = context.model
    X = context.X.double()
    losses, V = _goal(model, context.X, context.y, context.loss_fn)
    d, o = X.shape[1], V.shape[1]
    empty = Candidate("folding", m.in_index, m.out_index, X.new_zeros(0, d + 1), X.new_zeros(o, 0), None, [],
                      None, bottleneck(m), 0.0, False, False)
    with torch.no_grad():
        logits = model(context.X).double()
    wrong = logits.argmax(dim=1) != context.y
    if max_neurons < 1 or not bool(wrong.any()):
        return empty
    fold = choose_fold(model, X, context.y, logits, losses, generator)
    x_t, x_f = fold.x_t, fold.x_f
    if float((x_t - x_f).norm()) == 0.0:
        return empty
    direction, gain = fold_direction(X, V, x_t, x_f, generator)
    weight = model[0].weight.detach().double()
    a = direction * weight.norm(dim=1).mean()
    alpha = torch.cat([a, -(a @ x_f)[None]])[None]
    return Candidate(
        method="folding",
        in_index=m.in_index,
        out_index=m.out_index,
        alpha=alpha.to(m.S.dtype),
        omega=m.S.new_zeros(o, 1),
        dW=None,
        lambdas=[math.sqrt(gain) * float(a.norm())],
        lambda_null=None,
        psi=bottleneck(m),
        gain=gain * float(a @ a),
        signed_amplitude=False,
        searches_amplitude=False,
        details={"x_t": x_t.tolist(), "x_f": x_f.tolist(), "label": fold.label, "rival": fold.rival,
                 "fold": fold.how, "cluster_mean_loss": fold.typical.mean_loss, "cluster_rank": fold.rank,
                 "x_f_in_data_and_new": fold.passed,
                 "cluster_size": int(fold.typical.cluster.sum())},
    )
