"""Amplitude factor of new neurons by line search on a held-out batch (Eq. 14, App. E.3.2)."""

from __future__ import annotations

import math
from typing import Callable

#: Amplitudes tried before refinement: 2^k for k in [-12, 6] (earlier appendix D.4 uses 2^-k).
GRID_EXPONENTS = range(-12, 7)
#: Golden-section iterations refining the best grid point in log-amplitude.
REFINE_STEPS = 8


def line_search(loss_at: Callable[[float], float], signed: bool = False) -> tuple[float, float]:
    """g* = argmin_g loss_at(g) over g >= 0 (TINY), or over both signs (Random; Eq. 14).

    Evaluates a log-spaced grid, then refines the best grid point by golden-section search on
    log|g| between its neighbours. Returns (g*, loss_at(g*)); g* = 0 when nothing beats no change.
    """
    best_gamma, best_loss = 0.0, loss_at(0.0)
    for sign in (1.0, -1.0) if signed else (1.0,):
        grid = [sign * 2.0**k for k in GRID_EXPONENTS]
        losses = [loss_at(g) for g in grid]
        i = min(range(len(grid)), key=losses.__getitem__)
        if losses[i] < best_loss:
            best_gamma, best_loss = grid[i], losses[i]
        lo, hi = math.log2(abs(grid[max(i - 1, 0)])), math.log2(abs(grid[min(i + 1, len(grid) - 1)]))
        gamma, loss = _golden(lambda t: loss_at(sign * 2.0**t), lo, hi)
        if loss < best_loss:
            best_gamma, best_loss = sign * 2.0**gamma, loss
    return best_gamma, best_loss


def _golden(f: Callable[[float], float], lo: float, hi: float) -> tuple[float, float]:
    """Golden-section minimisation of f on [lo, hi]; returns (argmin, min) of the points visited."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(REFINE_STEPS):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = f(b)
    return (a, fa) if fa < fb else (b, fb)
