"""Models side by side on the CPU's cores: a per-model kernel loop split over worker threads.

A lowering that runs torch's own kernel model after model (the fused oneDNN LSTM) gives each small
kernel all of torch's intra-op threads, and small kernels scale badly: on this project's 2-core CPU
one char-LSTM layer (T=32, B=32, H=128, forward+backward) takes 2.4 ms on two threads and 3.4 ms on
one, so 16 models one after another take 38 ms where two workers of one thread each, eight models
apiece, take 25 ms. ``map_models(fn, n)`` runs ``fn(i)`` for every model on ``workers(n)`` threads,
each with ``torch.get_num_threads() // workers`` OpenMP (and MKL) threads, and returns the results in
model order. Every model's kernel is the same as alone (nothing is reduced across models, no kernel
sees another model's data), so the numbers are too; tests/test_cores.py checks them bit for bit.

Worker threads start with none of the caller's thread-local state (grad mode, autocast, dispatch
modes): ``fn`` sets what its kernel needs. Where torch's threads are not OpenMP's, or with
``MBCOMPILE_SPREAD=0``, ``workers`` is 1 and the loop runs in the caller's thread.
"""
from __future__ import annotations

import ctypes
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

_LOCK = threading.Lock()
_STATE: dict = {"omp": None, "pool": None, "key": None, "pause": False}


def _omp() -> bool:
    """Whether torch runs its threads with OpenMP (whose thread count is per calling thread)."""
    if _STATE["omp"] is None:
        _STATE["omp"] = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    return _STATE["omp"]


def _pause():
    """libgomp's omp_pause_resource_all, or None. The threads of the caller's OpenMP team spin for
    milliseconds after each parallel region (GOMP's default wait policy) and would take a core from
    the workers: pausing ends them (the caller's next parallel region starts them again, ~50 us)."""
    if _STATE["pause"] is False:
        _STATE["pause"] = None
        try:
            with open("/proc/self/maps") as f:
                libs = sorted({ln.split()[-1] for ln in f if re.search(r"/libgomp[^/]*\.so", ln)})
            if libs:
                fn = ctypes.CDLL(libs[0]).omp_pause_resource_all
                fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
                _STATE["pause"] = fn
        except (OSError, AttributeError):
            pass
    return _STATE["pause"]


def workers(n: int) -> int:
    """How many threads a loop over ``n`` models can use here: min(n, torch's intra-op threads), or
    1 where the threads of a worker cannot be set (see the module doc)."""
    if n < 2 or os.environ.get("MBCOMPILE_SPREAD", "1") == "0" or not _omp():
        return 1
    return max(1, min(n, torch.get_num_threads()))


def _pool(k: int, per: int) -> ThreadPoolExecutor:
    key = (os.getpid(), k, per)                   # a forked child gets a pool of its own
    with _LOCK:
        if _STATE["key"] != key:
            old = _STATE["pool"]
            if old is not None and _STATE["key"][0] == key[0]:
                old.shutdown(wait=False)
            pool = ThreadPoolExecutor(k, thread_name_prefix="mbcompile-models")
            mine = torch.get_num_threads()
            ready = threading.Barrier(k)
            # each worker: `per` OpenMP and MKL threads (thread-local settings), after ATen's lazy
            # per-thread init (get_num_threads), which would set them back; set_num_threads also sets
            # ATen's process-wide default, which the caller's own call then puts back
            init = lambda: (torch.get_num_threads(), torch.set_num_threads(per), ready.wait())  # noqa: E731
            for f in [pool.submit(init) for _ in range(k)]:
                f.result()
            torch.set_num_threads(mine)
            _STATE["pool"], _STATE["key"] = pool, key
        return _STATE["pool"]


def map_models(fn: Callable[[int], object], n: int, k: int | None = None) -> list:
    """[fn(0), ..., fn(n-1)], the models split into ``k`` (default ``workers(n)``) contiguous runs,
    one per worker thread; in the caller's thread when k is 1."""
    k = workers(n) if k is None else min(k, n)
    if k <= 1:
        return [fn(i) for i in range(n)]
    per = max(1, torch.get_num_threads() // k)
    pool = _pool(k, per)
    pause = _pause()
    if pause is not None:
        pause(1)                                  # omp_pause_soft: the caller's idle team stops spinning
    bounds = [n * j // k for j in range(k + 1)]
    runs = [pool.submit(lambda lo, hi: [fn(i) for i in range(lo, hi)], bounds[j], bounds[j + 1])
            for j in range(k)]
    return [r for fut in runs for r in fut.result()]
