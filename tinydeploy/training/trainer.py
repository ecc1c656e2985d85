"""Plain mini-batch training and evaluation of a (growing) model."""

from __future__ import annotations

import torch
from torch import nn

from tinydeploy.model.losses import LossFn, task_metric


class Trainer:
    """Adam on shuffled mini-batches; counts progress in (fractional) epochs across growth steps.

    ``input_noise`` adds Gaussian noise of that standard deviation to each (standardised) training
    batch: a cheap regulariser for small datasets. ``max_shift`` translates each image (signal) of a
    training batch by a random whole number of pixels in [-max_shift, max_shift] per spatial axis,
    repeating the edge pixels. Growth statistics always use clean inputs.
    """

    def __init__(
        self,
        model: nn.Module,
        X: torch.Tensor,
        y: torch.Tensor,
        loss_fn: LossFn,
        *,
        lr: float,
        batch_size: int,
        weight_decay: float = 0.0,
        input_noise: float = 0.0,
        max_shift: int = 0,
        generator: torch.Generator | None = None,
    ):
        self.model = model
        self.input_noise = input_noise
        self.max_shift = max_shift if X.dim() in (3, 4) else 0
        self.X, self.y, self.loss_fn = X, y, loss_fn
        self.batch_size = min(batch_size, X.shape[0])
        self.generator = generator
        self.optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.steps_done = 0
        self._order = torch.empty(0, dtype=torch.long)

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.X.shape[0] // self.batch_size)

    @property
    def epoch(self) -> float:
        return self.steps_done / self.steps_per_epoch

    def replace_model(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Continue training a grown model with its carried-over optimizer."""
        self.model, self.optimizer = model, optimizer

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        position = (self.steps_done % self.steps_per_epoch) * self.batch_size
        if position == 0:
            self._order = torch.randperm(self.X.shape[0], generator=self.generator).to(self.X.device)
        index = self._order[position : position + self.batch_size]
        return self.X[index], self.y[index]

    def train_steps(self, n_steps: int) -> float:
        """Run ``n_steps`` optimizer steps; returns the mean training loss over them."""
        self.model.train()
        total = torch.zeros((), device=self.X.device)
        for _ in range(n_steps):
            xb, yb = self._next_batch()
            if self.max_shift > 0:
                xb = random_shift(xb, self.max_shift, self.generator)
            if self.input_noise > 0:
                xb = xb + self.input_noise * torch.randn(xb.shape, generator=self.generator).to(xb.device)
            loss = self.loss_fn(self.model(xb), yb).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.detach()
            self.steps_done += 1
        return float(total) / max(n_steps, 1)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each sample of (n, C, L) or (n, C, H, W) translated by its own random offset in
    [-max_shift, max_shift] along every spatial axis, edge pixels repeated into the gap."""
    n, spatial = x.shape[0], x.shape[2:]
    pad = [max_shift] * (2 * len(spatial))
    padded = torch.nn.functional.pad(x, pad, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (n, len(spatial)), generator=generator).to(x.device)
    index = [torch.arange(n, device=x.device).view(n, *[1] * len(spatial))]
    for axis, size in enumerate(spatial):
        shape = [n] + [1] * len(spatial)
        shape[axis + 1] = size
        index.append((offsets[:, axis, None] + torch.arange(size, device=x.device)).view(shape))
    moved = padded.movedim(1, -1)  # (n, *spatial, C): advanced indexing on the leading axes
    return moved[tuple(index)].movedim(-1, 1).contiguous()


@torch.no_grad()
def evaluate(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, task: str, batch_size: int = 8192
) -> tuple[float, float]:
    """(mean loss, accuracy or MSE) over (X, y), in batches."""
    model.eval()
    outputs = torch.cat([model(X[i : i + batch_size]) for i in range(0, X.shape[0], batch_size)])
    return float(loss_fn(outputs, y).mean()), task_metric(task, outputs, y)
