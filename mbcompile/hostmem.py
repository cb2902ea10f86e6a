"""Host memory: keep glibc from handing big tensors fresh pages on every step.

glibc's malloc serves requests above ``M_MMAP_THRESHOLD`` (128 KiB, raised dynamically up to 32 MiB)
with a fresh ``mmap`` and returns them with ``munmap`` on free, so every such tensor costs page
faults and kernel zeroing on each use. One model's activations stay under the threshold; the batched
program's are n times bigger and do not. Measured on this project's CPU (2-core EPYC, ResNet-8, n=16,
batch 32, forward+backward): the batched program 367-401 ms with glibc's defaults, 222 ms with big
blocks kept in the heap; 16 models one after another 224-228 ms either way.

``tune()`` sets ``M_MMAP_MAX=0`` (no mmap'd blocks: big tensors come from the heap and their pages
are reused) and ``M_TRIM_THRESHOLD`` to 2 GiB, the most mallopt takes (freed heap is kept, as PyTorch's
CUDA caching allocator keeps device memory). It is process-wide, so mbcompile calls it once, when it
first builds a CPU program (before any lowering is timed, so the timings see the memory behaviour the
program will run with), says so in ``explain()``, and never with ``MBCOMPILE_MALLOC=0`` (or off
glibc). The cost: freed blocks stay resident (holes in the heap are not returned to the OS);
``release()`` (glibc's ``malloc_trim``) hands free pages back, e.g. between two sweeps in one process.
``workers_arena()`` and ``in_main_arena()`` put cores.py's worker threads in the main arena, where
these settings hold (a thread's own arena unmaps each heap that empties: page faults on every step).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
TRIM_BYTES = 2**31 - 1     # mallopt takes a C int
_STATE = {"done": None}      # None: not tried; else the note (str) saying what happened


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def tune() -> str:
    """Apply the settings once per process; return a note for explain()."""
    if _STATE["done"] is not None:
        return _STATE["done"]
    if os.environ.get("MBCOMPILE_MALLOC", "").strip() == "0":
        note = "glibc malloc left as is (MBCOMPILE_MALLOC=0)"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        note = "host malloc left as is (not glibc)"
    else:
        try:
            libc = _libc()
            ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_BYTES) == 1
            note = ("glibc malloc tuned for big tensors: M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB (heap pages "
                    "are reused instead of fresh mmaps; MBCOMPILE_MALLOC=0 turns this off)") if ok else \
                "glibc mallopt refused the settings; malloc left as is"
        except (OSError, AttributeError) as e:
            note = f"glibc malloc left as is ({type(e).__name__})"
    _STATE["done"] = note
    return note



def workers_arena() -> bool:
    """Before mbcompile's worker threads start (cores.py): ``M_ARENA_MAX=1``, so that a thread
    started from now on takes an existing arena instead of a new one (glibc fixes that limit the first
    time a thread looks for an arena: from here on, for every new thread of the process). Only where
    ``tune`` applied its settings; returns whether the workers should check for the main arena."""
    if not (_STATE["done"] or "").startswith("glibc malloc tuned"):
        return False
    try:
        return _libc().mallopt(M_ARENA_MAX, 1) == 1
    except (OSError, AttributeError):
        return False


def in_main_arena(ptr: int) -> bool:
    """Whether address ``ptr`` (a block malloc returned with mmap off) lies in the brk heap, the main
    arena's; other arenas live in mmap'd regions."""
    try:
        with open("/proc/self/maps") as f:
            for ln in f:
                if ln.rstrip().endswith("[heap]"):
                    lo, hi = (int(v, 16) for v in ln.split()[0].split("-"))
                    if lo <= ptr < hi:
                        return True
    except OSError:
        pass
    return False


def release() -> bool:
    """Return the heap's free pages to the OS (glibc ``malloc_trim(0)``); False where unavailable."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(_libc().malloc_trim(0))
    except (OSError, AttributeError):
        return False
