"""The heap setting of ``tinydeploy grow`` (training.host_memory): freed large CPU buffers are reused
without page faults. Measured in fresh processes, since the setting is process-wide."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from tinydeploy.training import host_memory

PROGRAM = """
import ctypes, json, sys, torch
from tinydeploy.training.host_memory import keep_freed_buffers

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
applied = keep_freed_buffers() if sys.argv[1] == "set" else None
if sys.argv[1] == "grow":  # a short grow job, which sets it for its process
    import pathlib, tempfile
    from tinydeploy.training.config import GrowConfig
    from tinydeploy.training.job import prepare_grow
    with tempfile.TemporaryDirectory() as tmp:
        cfg = GrowConfig(dataset="moons", device="cpu", max_growth_epochs=0.1, final_epochs=0.1)
        prepare_grow(cfg, pathlib.Path(tmp) / "run").run()
x = torch.randn(1024, 1024)
before = mallinfo2()
a, b, c = x * 2, x * 3, x * 4  # 4 MiB each: above glibc's default mmap threshold (128 KiB)
live = mallinfo2()
del a, b, c
freed = mallinfo2()
print(json.dumps({"applied": applied, "mapped": live.hblks - before.hblks, "unmapped": live.hblks - freed.hblks,
                  "free_heap_mib": freed.fordblks / 2**20}))
"""

HAS_MALLINFO2 = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and tuple(
    int(v) for v in platform.libc_ver()[1].split(".")[:2]) >= (2, 33)
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def heap_after(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not HAS_MALLINFO2, reason="needs glibc >= 2.33 (mallinfo2) to read the heap's state")
def test_freed_buffers_stay_in_the_heap() -> None:
    """Three 4 MiB tensors: with glibc's defaults each is its own mmap (page-faulted on first write, unmapped
    when freed, so the next one faults again); with the setting they come from the heap and, once freed,
    stay there (12 MiB of free heap) for the next tensors to reuse without faults."""
    default, kept = heap_after("default"), heap_after("set")
    assert (default["applied"], default["mapped"], default["unmapped"]) == (None, 3, 3)
    assert (kept["applied"], kept["mapped"], kept["unmapped"]) == (True, 0, 0)
    assert kept["free_heap_mib"] >= 12 > default["free_heap_mib"]


@pytest.mark.skipif(not HAS_MALLINFO2, reason="needs glibc >= 2.33 (mallinfo2) to read the heap's state")
def test_a_grow_job_keeps_freed_buffers() -> None:
    assert {k: v for k, v in heap_after("grow").items() if k != "free_heap_mib"} == {
        "applied": None, "mapped": 0, "unmapped": 0}


def test_keep_freed_buffers_says_whether_it_applied() -> None:
    assert host_memory.keep_freed_buffers() is GLIBC
    assert host_memory.keep_freed_buffers() is GLIBC  # idempotent
    assert host_memory.MMAP_THRESHOLD == 32 * 1024 * 1024  # glibc's largest on 64-bit systems
