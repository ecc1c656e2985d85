"""Keep freed CPU tensor buffers in the process heap instead of handing them back to the system.

With glibc's defaults, every CPU tensor of at least 128 KiB (a 4,096 x 256 float32 activation is
4 MiB) is a fresh ``mmap``: its first write page-faults once per 4 KiB page. Statistics passes and
full-batch evaluations allocate such tensors by the hundred, and on a shared virtual machine the
faults cost more than the arithmetic: 3,000 faults per call made ``a @ b; relu; add`` at those sizes
3-4x slower (``benchmarks/step_scaling.py`` measures a growth step with and without this setting).
Raising glibc's mmap threshold to its maximum (32 MiB) and the heap trim threshold to
``TRIM_THRESHOLD`` lets freed buffers be reused without faults; what a process holds at its peak
it then keeps (up to ``TRIM_THRESHOLD`` of free heap).
"""

from __future__ import annotations

import ctypes
import platform

#: glibc's ``mallopt`` parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: The largest mmap threshold glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free heap kept before glibc trims it back to the system.
TRIM_THRESHOLD = 512 * 1024 * 1024


def keep_freed_buffers() -> bool:
    """Set the two thresholds for this process (glibc only; elsewhere nothing changes). Idempotent.
    Returns whether glibc accepted both."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
