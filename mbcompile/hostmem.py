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
``one_arena()`` (``M_ARENA_MAX=1``, on ``import mbcompile`` and in ``tune``) keeps threads that start
after it in the main arena, where these settings apply (see its doc: cores.py's worker threads).
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
    """glibc, or None (off Linux/glibc, or with MBCOMPILE_MALLOC=0)."""
    if os.environ.get("MBCOMPILE_MALLOC", "").strip() == "0" or platform.system() != "Linux" \
            or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def one_arena() -> bool:
    """``M_ARENA_MAX=1``: threads that have not allocated yet share the main arena (called on import).
    A thread's own arena grows in 64 MiB heaps that glibc unmaps whenever one empties, so a worker
    thread of cores.py holding more than that (eight oneDNN LSTM workspaces of 7.7 MiB) paid page
    faults on every step: 1,200-4,700 a step on the char-LSTM benchmark, 45.7 against 42.4 ms. In the
    main arena the settings of ``tune`` apply, and nothing is unmapped."""
    libc = _libc()
    try:
        return libc is not None and libc.mallopt(M_ARENA_MAX, 1) == 1
    except AttributeError:
        return False


def tune() -> str:
    """Apply the settings once per process; return a note for explain()."""
    if _STATE["done"] is not None:
        return _STATE["done"]
    libc = _libc()
    if libc is None:
        note = ("glibc malloc left as is (MBCOMPILE_MALLOC=0)" if os.environ.get("MBCOMPILE_MALLOC", "").strip()
                == "0" else "host malloc left as is (not glibc)")
    else:
        try:
            ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_BYTES) == 1
            one_arena()
            note = ("glibc malloc tuned for big tensors: M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB (heap pages "
                    "are reused instead of fresh mmaps; MBCOMPILE_MALLOC=0 turns this off)") if ok else \
                "glibc mallopt refused the settings; malloc left as is"
        except AttributeError as e:
            note = f"glibc malloc left as is ({type(e).__name__})"
    _STATE["done"] = note
    return note



def release() -> bool:
    """Return the heap's free pages to the OS (glibc ``malloc_trim(0)``); False where unavailable."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
