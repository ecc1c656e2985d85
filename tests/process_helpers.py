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


def moments(rank: int, world: int, port: int, out: str, case: str = "mlp") -> None:
    """This rank's statistics of its shard of the batch in ``distributed_case(case)``, summed over the
    ranks inside ``gather_moments``, and their TINY neurons."""
    import torch
    from safetensors.torch import save_file

    from tinydeploy.growth.statistics import gather_moments
    from tinydeploy.training import distributed

    _as_rank(rank, world, port)
    group = distributed.join(torch.device("cpu"))
    model, X, y, loss_fn, generator, chunk = distributed_case(case)
    reduced = gather_moments(model, [0, 2], X, y, loss_fn, chunk_size=chunk, generator=generator,
                             shard=(rank, world), total=group.sum)
    save_file(moment_tensors(reduced), out)
    group.close()


# ----- the shared moments case ----------------------------------------------------------------------
CASE_SAMPLES = 301


def distributed_case(case: str = "mlp"):
    """A fixed model, batch, generator and chunk size: the same in every process. ``mlp``: two vector
    pairs, chunks of 64. ``cnn``: conv -> conv and conv -> flatten -> linear (pairs with a spatial
    consumer window, whose projected N needs the summed dW* before a second pass), chunks of 3 rows
    (1 + 2 per process; the last chunk holds 1 row, so one process has none there)."""
    import torch
    from torch import nn

    from tinydeploy.model.losses import per_sample_loss

    torch.manual_seed(3)
    if case == "mlp":
        model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).double()
        X, chunk = torch.randn(CASE_SAMPLES, 5, dtype=torch.float64), 64
    else:
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(),
                              nn.Linear(2 * 4 * 4, 3)).double()
        X, chunk = torch.randn(CASE_SAMPLES, 2, 6, 6, dtype=torch.float64), 3
    y = torch.randint(0, 3, (CASE_SAMPLES,))
    return model, X, y, per_sample_loss("classification"), torch.Generator().manual_seed(11), chunk


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
                tensors[f"{m.in_index}.{f.name}"] = value.clone()  # S_h and the next S are one tensor
        tensors[f"{m.in_index}.n"] = torch.tensor(float(m.n))
        N = m.projected_cross_moment(linalg.best_update(m.S_h, m.N_h))
        neurons = linalg.new_neurons(linalg.psd_inverse_sqrt(m.S), N)
        tensors[f"{m.in_index}.lambdas"] = neurons.lambdas.contiguous()
        tensors[f"{m.in_index}.alpha"] = neurons.alpha.contiguous()
        tensors[f"{m.in_index}.omega"] = neurons.omega.contiguous()
        tensors[f"{m.in_index}.lambda_null"] = torch.tensor(tiny(m, 100).lambda_null)  # the significance test (uses N_z)
    return tensors
