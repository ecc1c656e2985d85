"""Growth on several processes (``torchrun --nproc-per-node N -m tinydeploy grow``): gloo on CPU, NCCL on GPU.

Every process holds the whole dataset, the same model and the same generator states, so it draws
the same global mini-batch, estimation batch and held-out batch as one process would, and works on
its shard (``shard_rows``) of each:

- training: DistributedDataParallel over the plain model, re-wrapped after each growth step (the
  parameters change); the per-shard loss is scaled so that the averaged gradient is the gradient of
  the global batch's mean loss, as in one process; Adam's state is carried over by the job as before;
- statistics: each process runs its rows of every chunk of the estimation batch, and
  ``growth.statistics.gather_moments(..., shard=, total=ProcessGroup.sum)`` adds the sums over the
  processes before the consumer's dW* (which a second pass of convolution pairs needs) and at the
  end, before any SVD: every process holds the union batch's moments, exactly;
- amplitude line search and held-out scores: sums of losses and metrics over the shards, all-reduced.

Every process then computes the same growth from the same all-reduced numbers (no broadcast of the
decision: the SVD and line search cost less than a round trip of their inputs, and every process
must take part in the line search's all-reduces anyway). A cheap check compares the widths and
amplitudes each process reached, and DDP's re-wrap copies rank 0's parameters to all, so any last-bit
difference of the new weights (e.g. different GPU models) cannot make the replicas drift.
Only rank 0 writes the run directory.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from tinydeploy.errors import TinyDeployError
from tinydeploy.growth.statistics import shard_rows

#: How long a collective waits for a silent peer before failing (a rank that died without closing its sockets).
TIMEOUT = datetime.timedelta(minutes=10)


@dataclass
class ProcessGroup:
    """This process's place in a torchrun job (implements ``growth.policy.DataParallel``)."""

    rank: int
    world: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This process's rows of a batch of ``n``."""
        return slice(*shard_rows(n, self.rank, self.world))

    def _reduce(self, values: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
        buffer = values.detach().to(self.device, copy=True)
        dist.all_reduce(buffer, op=op)
        return buffer.to(values.device)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over the processes (all-reduce)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: torch.Tensor) -> torch.Tensor:
        return self._reduce(values, dist.ReduceOp.MAX)

    def min(self, values: torch.Tensor) -> torch.Tensor:
        return self._reduce(values, dist.ReduceOp.MIN)

    def gather_scalar(self, value: torch.Tensor) -> torch.Tensor:
        """Every process's ``value`` (a 0-d tensor), in rank order, same dtype."""
        slots = torch.zeros(self.world, dtype=value.dtype)
        slots[self.rank] = value.detach().cpu()
        return self.sum(slots)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP over ``model`` (copies rank 0's parameters and buffers to every process)."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def check_same(self, what: str, values: list[float]) -> None:
        """Stop with a clear error unless every process has the same ``values`` (e.g. widths after growth)."""
        local = torch.tensor(values, dtype=torch.float64)
        low, high = self.min(local), self.max(local)
        if not torch.equal(low, high):
            raise TinyDeployError(
                f"rank {self.rank}: the processes computed different {what} ({low.tolist()} vs {high.tolist()}); "
                "run every process on the same kind of device and library versions"
            )

    def is_collective_error(self, exc: BaseException) -> bool:
        """Whether ``exc`` says a peer process is gone (gloo/NCCL), rather than a fault of this process."""
        text = str(exc)
        return isinstance(exc, dist.DistError) or any(word in text for word in ("gloo", "NCCL", "Connection reset"))

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def in_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets the env:// variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def join(device: torch.device) -> ProcessGroup:
    """Join the torchrun job: gloo for CPU devices, NCCL for CUDA (each process on its local GPU)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise TinyDeployError(f"rank {rank} wants GPU {local_rank} but {torch.cuda.device_count()} are visible: "
                                  "start at most one process per GPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
    return ProcessGroup(rank, world, local_rank, backend, device)


def launch(nproc: int, grow_args: list[str]) -> int:
    """``tinydeploy grow --nproc N``: run ``torchrun --standalone --nproc-per-node N -m tinydeploy grow ...``."""
    if nproc < 1:
        raise TinyDeployError(f"--nproc must be >= 1, got {nproc}")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "--monitor-interval=0.5", "-m", "tinydeploy", "grow", *grow_args]
    return subprocess.call(command, env=env)
