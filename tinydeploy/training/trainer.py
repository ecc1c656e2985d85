"""Plain mini-batch training and evaluation of a (growing) model, on one process or several (DDP)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from tinydeploy.model.losses import LossFn, task_metric

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training steps: None (float32) on CPU and for "fp32"; "auto" on CUDA is
    bfloat16 where the GPU supports it, else float16."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return _AMP_DTYPES[precision]


class Trainer:
    """Adam (or plain SGD) on shuffled mini-batches; counts progress in (fractional) epochs across growth steps.

    ``input_noise`` adds Gaussian noise of that standard deviation to each (standardised) training
    batch: a cheap regulariser for small datasets. ``max_shift`` translates each image (signal) of a
    training batch by a random whole number of pixels in [-max_shift, max_shift] per spatial axis,
    repeating the edge pixels (a random crop of the padded image); ``hflip`` mirrors half of the images.
    Growth statistics always use clean inputs.

    The data stay on the model's device, and on a GPU every random draw (epoch order, shifts, flips,
    noise) is made there with ``device_generator``, so a training step makes no host copy or
    synchronisation; the loss is summed on the device and read with ``mean_loss`` (logging). On CUDA
    the forward and backward passes run under autocast (``precision``: bfloat16 where supported, with a
    gradient scaler for float16) and image models use the channels_last memory format. On CPU the
    draws use ``generator`` and the arithmetic is float32, bit-identical from run to run.

    With ``parallel`` (a ``training.distributed.ProcessGroup``) every process draws the same global
    batch (and noise, and shifts) and trains on its rows of it through DDP; ``batch_size`` is global.
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
        hflip: bool = False,
        optimizer: str = "adam",
        precision: str = "auto",
        generator: torch.Generator | None = None,
        device_generator: torch.Generator | None = None,
        parallel: Any = None,
    ):
        self.input_noise = input_noise
        self.max_shift = max_shift if X.dim() in (3, 4) else 0
        self.hflip = hflip and X.dim() == 4
        self.X, self.y, self.loss_fn = X, y, loss_fn
        self.batch_size = min(batch_size, X.shape[0])
        self.generator = generator
        on_gpu = X.device.type == "cuda"
        #: where the random draws of training are made: on the GPU with its own generator, else on the CPU
        self.rng = device_generator if on_gpu and device_generator is not None else generator
        self.amp = amp_dtype(precision, X.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        self.channels_last = on_gpu and X.dim() == 4
        self.optimizer_name = optimizer
        self.lr, self.weight_decay = lr, weight_decay
        self.parallel = parallel
        self.steps_done = 0
        self._order = torch.empty(0, dtype=torch.long)
        self._loss_sum = torch.zeros((), device=X.device)
        self._loss_steps = 0
        self.replace_model(model, self.new_optimizer(model))

    def new_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer this trainer uses, fresh over ``model``'s parameters: plain SGD as in the paper's
        ResNet protocol (App. F.1), or Adam on its fused path (one kernel per step for all parameters; on
        CPU 0.52 vs 0.72 ms per batch-16 step of a [32,32] MLP, where the default single-tensor path runs
        one small kernel per parameter and operation)."""
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay, fused=True)

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.X.shape[0] // self.batch_size)

    @property
    def epoch(self) -> float:
        return self.steps_done / self.steps_per_epoch

    def replace_model(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Continue training a grown model with its carried-over optimizer (DDP re-wrapped around it)."""
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)  # in place: the optimizer keeps its parameters
        self.model, self.optimizer = model, optimizer
        self._forward = self.parallel.wrap(model) if self.parallel is not None else model

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        position = (self.steps_done % self.steps_per_epoch) * self.batch_size
        if position == 0:
            self._order = torch.randperm(self.X.shape[0], generator=self.rng, device=_device(self.rng)).to(self.X.device)
        index = self._order[position : position + self.batch_size]
        return self.X[index], self.y[index]

    def augment(self, xb: torch.Tensor) -> torch.Tensor:
        """A training batch with its random shifts (crops), flips and noise, drawn where ``rng`` lives."""
        if self.max_shift > 0:
            xb = random_shift(xb, self.max_shift, self.rng)
        if self.hflip:
            flip = torch.rand(xb.shape[0], generator=self.rng, device=_device(self.rng)).to(xb.device) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        if self.input_noise > 0:
            xb = xb + self.input_noise * torch.randn(xb.shape, generator=self.rng, device=_device(self.rng)).to(xb.device)
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.X.device.type, dtype=self.amp)

    def train_steps(self, n_steps: int) -> None:
        """Run ``n_steps`` optimizer steps, adding their losses to the running sum (see ``mean_loss``)."""
        self._forward.train()
        for _ in range(n_steps):
            xb, yb = self._next_batch()
            xb = self.augment(xb)
            with self._autocast():
                if self.parallel is None or self.parallel.world == 1:
                    loss = self.loss_fn(self._forward(xb), yb).float().mean()
                    reported = loss.detach()
                else:  # this process's rows; DDP averages over processes, so scale to the global batch mean
                    rows = self.parallel.rows(xb.shape[0])
                    local = self.loss_fn(self._forward(xb[rows]), yb[rows]).float().sum() / xb.shape[0]
                    loss, reported = local * self.parallel.world, local.detach()
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            self._loss_sum += reported
            self._loss_steps += 1
            self.steps_done += 1

    def mean_loss(self) -> float:
        """Mean training loss over the steps since the last call (over all processes), and reset."""
        total = self._loss_sum if self.parallel is None else self.parallel.sum(self._loss_sum.double())
        mean = float(total) / max(self._loss_steps, 1)
        self._loss_sum = torch.zeros((), device=self.X.device)
        self._loss_steps = 0
        return mean

    # ----- resume -----------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Where the trainer stands (epoch order, loss sum so far) as tensors and JSON. With several
        processes every one must call it (their running loss sums are gathered, one per process)."""
        loss_sum = self._loss_sum if self.parallel is None else self.parallel.gather_scalar(self._loss_sum)
        return ({"trainer.order": self._order, "trainer.loss_sum": loss_sum},
                {"steps_done": self.steps_done, "loss_steps": self._loss_steps})

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self._order = tensors["trainer.order"].to(self.X.device)
        sums = tensors["trainer.loss_sum"]
        rank, world = (self.parallel.rank, self.parallel.world) if self.parallel is not None else (0, 1)
        if sums.dim() == 1 and sums.numel() == world:
            loss_sum = sums[rank]  # the same number of processes: each takes its own
        else:
            loss_sum = sums.sum() if rank == 0 else torch.zeros_like(sums.sum())
        self._loss_sum = loss_sum.to(self.X.device)
        self.steps_done, self._loss_steps = int(state["steps_done"]), int(state["loss_steps"])


def _device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each sample of (n, C, L) or (n, C, H, W) translated by its own random offset in
    [-max_shift, max_shift] along every spatial axis, edge pixels repeated into the gap: a random crop
    of the image padded by ``max_shift`` on every side. The offsets are drawn on ``generator``'s device."""
    n, spatial = x.shape[0], x.shape[2:]
    pad = [max_shift] * (2 * len(spatial))
    padded = torch.nn.functional.pad(x, pad, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (n, len(spatial)), generator=generator,
                            device=_device(generator)).to(x.device)
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
