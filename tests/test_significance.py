"""The significance test refuses noise (issue 15): with labels independent of the inputs a TINY step
keeps at most 2 neurons per layer (measured: 0); with labels that depend on the inputs it keeps some."""

from __future__ import annotations

import torch

from growth_fixtures import small_problem
from tinydeploy.growth import candidates
from tinydeploy.growth.statistics import gather_moments


def _kept(random_labels: bool, seed: int) -> list[int]:
    _, model, X, y, loss_fn = small_problem(widths=(8, 8), n=2000, d=12, classes=5, seed=seed)
    model, X = model.float(), X.float()
    if random_labels:
        y = torch.randint(0, 5, y.shape, generator=torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(seed)
    moments = gather_moments(model, [0, 2], X, y, loss_fn, generator=generator)
    return [candidates.tiny(m, 16).n_neurons for m in moments]


def test_random_labels_add_at_most_two_neurons_per_layer_and_real_labels_add_more():
    for seed in (0, 1, 2):
        assert max(_kept(True, seed)) <= 2, seed
    assert min(_kept(False, 0)) >= 1  # the same step finds the signal when there is one
