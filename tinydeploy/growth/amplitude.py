"""Amplitude factor of new neurons by line search on a held-out batch (Eq. 14, App. E.3.2)."""

from __future__ import annotations

from collections.abc import Callable

#: Amplitudes tried before refinement: 2^k for k in [-12, 6] (earlier appendix D.4 uses 2^-k).
GRID_EXPONENTS = range(-12, 7)
#: Refinement rounds after the grid, and the log-amplitudes each one tries inside its bracket.
REFINE_ROUNDS = 3
REFINE_POINTS = 5

Losses = Callable[[list[float]], list[float]]


def pointwise(loss_at: Callable[[float], float]) -> Losses:
    """The ``losses_at`` of a function of one amplitude."""
    return lambda gammas: [loss_at(g) for g in gammas]


def line_search(losses_at: Losses, signed: bool = False) -> tuple[float, float]:
    """g* = argmin_g loss(g) over g >= 0 (TINY), or over both signs (Random; Eq. 14).

    ``losses_at`` gives the losses of a list of amplitudes (in one pass where the caller can: each
    stage below is one call). Evaluates g = 0 and a log-spaced grid, then refines around the best grid
    point of each sign: ``REFINE_ROUNDS`` times, ``REFINE_POINTS`` evenly spaced values of log|g|
    strictly between the neighbours of the best point so far (the bracket then shrinks to the new best
    point's neighbours). Returns (g*, loss(g*)); g* = 0 when nothing beats no change.
    """
    signs = (1.0, -1.0) if signed else (1.0,)
    exponents = list(GRID_EXPONENTS)
    values = losses_at([0.0] + [sign * 2.0**k for sign in signs for k in exponents])
    best_gamma, best_loss = 0.0, values[0]
    brackets = []
    for s, sign in enumerate(signs):
        losses = values[1 + s * len(exponents) : 1 + (s + 1) * len(exponents)]
        i = min(range(len(losses)), key=losses.__getitem__)
        if losses[i] < best_loss:
            best_gamma, best_loss = sign * 2.0**exponents[i], losses[i]
        brackets.append((exponents[max(i - 1, 0)], exponents[min(i + 1, len(exponents) - 1)]))
    for _ in range(REFINE_ROUNDS):
        points = [[lo + (hi - lo) * j / (REFINE_POINTS + 1) for j in range(1, REFINE_POINTS + 1)]
                  for lo, hi in brackets]
        values = losses_at([sign * 2.0**t for sign, ts in zip(signs, points) for t in ts])
        for s, (sign, ts) in enumerate(zip(signs, points)):
            losses = values[s * REFINE_POINTS : (s + 1) * REFINE_POINTS]
            j = min(range(len(losses)), key=losses.__getitem__)
            if losses[j] < best_loss:
                best_gamma, best_loss = sign * 2.0**ts[j], losses[j]
            step = ts[1] - ts[0]
            brackets[s] = (ts[j] - step, ts[j] + step)
    return best_gamma, best_loss
