"""Real processes for the crash and multi-process tests, started cheaply.

Each process is forked from a multiprocessing fork server that imported torch and the training stack
once (fresh interpreters cost seconds of imports each here). The processes are real: they are
SIGKILLed, they talk gloo over loopback TCP, and they write real run directories.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from typing import Any

_PRELOAD = ["process_helpers", "tinydeploy.training.job", "tinydeploy.training.distributed", "torch._dynamo"]
_context: Any = None


def context() -> Any:
    """The fork-server context (started on first use, shared by the test modules of this process)."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    return _context


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(target: Any, *args: Any) -> Any:
    process = context().Process(target=target, args=args)
    process.start()
    return process


def join_all(processes: list[Any], timeout: float = 240.0) -> list[int | None]:
    """Exit codes (negative: killed by that signal); a process still running after ``timeout`` is killed."""
    codes = []
    for process in processes:
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
        codes.append(process.exitcode)
    return codes


def _as_rank(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives its processes."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


# ----- targets (run in the forked processes) --------------------------------------------------------
def grow(config: dict[str, Any], out: str, crash: str | None, resume: bool, rank: int = 0, world: int = 1,
         port: int = 0) -> None:
    """A grow run (or ``--resume``) as the CLI does it, optionally killed at a crash point."""
    from tinydeploy.training import crashpoints
    from tinydeploy.training.config import GrowConfig
    from tinydeploy.training.job import prepare_grow, prepare_resume

    if port:
        _as_rank(rank, world, port)
    crashpoints.arm(crash)
    job = prepare_resume(out) if resume else prepare_grow(GrowConfig(**config), out, force=True)
    job.run()


def moments(rank: int, world: int, port: int, out: str) -> None:
    """This rank's moments of its shard of the batch in ``distributed_case``, all-reduced, and their neurons."""
    import torch
    from safetensors.torch import save_file

    from tinydeploy.growth.statistics import gather_moments
    from tinydeploy.training import distributed

    _as_rank(rank, world, port)
    group = distributed.join(torch.device("cpu"))
    model, X, y, loss_fn, generator = distributed_case()
    local = gather_moments(model, [0, 2], X, y, loss_fn, chunk_size=CASE_CHUNK, generator=generator,
                           shard=(rank, world))
    save_file(moment_tensors(group.sum_moments(local)), out)
    group.close()


# ----- the shared moments case ----------------------------------------------------------------------
CASE_SAMPLES, CASE_CHUNK = 301, 64


def distributed_case():
    """A fixed MLP, batch and generator: the same in every process."""
    import torch
    from torch import nn

    from tinydeploy.model.losses import per_sample_loss

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    X = torch.randn(CASE_SAMPLES, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (CASE_SAMPLES,))
    return model, X, y, per_sample_loss("classification"), torch.Generator().manual_seed(11)


def moment_tensors(moments: list[Any]) -> dict[str, Any]:
    """Every moment and the TINY neurons of every layer, flattened for safetensors."""
    import dataclasses

    import torch

    from tinydeploy.growth import linalg
    from tinydeploy.growth.candidates import tiny

    tensors = {}
    for m in moments:
        for f in dataclasses.fields(m):
            value = getattr(m, f.name)
            if torch.is_tensor(value):
                tensors[f"{m.in_index}.{f.name}"] = value.contiguous()
        tensors[f"{m.in_index}.n"] = torch.tensor(float(m.n))
        dW = linalg.best_update(m.S_h, m.N_h)
        neurons = linalg.new_neurons(linalg.psd_inverse_sqrt(m.S), linalg.projected_cross_moment(m.N_v, m.S_ph, dW))
        tensors[f"{m.in_index}.lambdas"] = neurons.lambdas.contiguous()
        tensors[f"{m.in_index}.alpha"] = neurons.alpha.contiguous()
        tensors[f"{m.in_index}.omega"] = neurons.omega.contiguous()
        tensors[f"{m.in_index}.lambda_null"] = torch.tensor(tiny(m, 100).lambda_null)  # the significance test (uses N_z)
    return tensors
