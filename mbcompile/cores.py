"""Models side by side on the CPU's cores: a per-model kernel loop split over worker threads.

A lowering that runs torch's own kernel model after model (the fused oneDNN LSTM) gives each small
kernel all of torch's intra-op threads, and small kernels scale badly: on this project's 2-core CPU
one char-LSTM layer (T=32, B=32, H=128, forward+backward) takes 2.4 ms on two threads and 3.4 ms on
one, so 16 models one after another take 38 ms where two workers of one thread each, eight models
apiece, take 25 ms. ``map_models(fn, n)`` runs ``fn(i)`` for every model on ``workers(n)`` threads,
each with ``torch.get_num_threads() // workers`` OpenMP (and MKL) threads, and returns the results in
model order. Every model's kernel is the same as alone (nothing is reduced across models, no kernel
sees another model's data), so the numbers are too; tests/test_cores.py checks them bit for bit.

Workers run ``fn`` with the caller's grad mode and inference mode; other thread-local state (autocast,
dispatch modes) is not carried over: ``fn`` sets what its kernel needs. They allocate from glibc's main
arena where hostmem tuned it (``_pool``). Where torch's threads are not OpenMP's, or with
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

from . import hostmem

_LOCK = threading.Lock()
_STATE: dict = {"omp": None, "pool": None, "key": None, "pause": None}
_WORKER = threading.local()                       # .on: this thread is one of the pool's


def _omp() -> bool:
    """Whether torch runs its threads with OpenMP (whose thread count is per calling thread)."""
    if _STATE["omp"] is None:
        _STATE["omp"] = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    return _STATE["omp"]


def _pauses() -> list:
    """omp_pause_resource_all of each libgomp in the process. The threads of the caller's OpenMP team
    spin for milliseconds after each parallel region (GOMP's default wait policy) and would take a
    core from the workers; pausing ends them. Measured: the char-LSTM layer's forward over 16 models,
    17.6 ms spread without it, 10.6 ms with it (15.6 ms one model after another, the same run).
    The cost: the caller's next parallel region starts its team again, usually in tens of microseconds,
    but now and then the new thread is queued on the caller's CPU behind the caller spinning at the
    region's barrier, and its parallel ops then take ~7 ms each until the scheduler moves one of them
    (docs/performance.md, stop 22). So a hand-off pays only for enough work: the callers' cost rules
    (ops.SPREAD_MIN_TOTAL, rnn.SPREAD_MIN_TOTAL_MACS) ask for ~10 ms of it on one thread."""
    if _STATE["pause"] is None:
        fns = []
        try:
            with open("/proc/self/maps") as f:
                libs = sorted({ln.split()[-1] for ln in f if re.search(r"/libgomp[^/]*\.so", ln)})
        except OSError:
            libs = []
        for lib in libs:
            try:
                fn = ctypes.CDLL(lib).omp_pause_resource_all
            except (OSError, AttributeError):
                continue
            fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
            fns.append(fn)
        _STATE["pause"] = fns
    return _STATE["pause"]


def workers(n: int) -> int:
    """How many threads a loop over ``n`` models can use here: min(n, torch's intra-op threads); 1
    where a worker's threads cannot be set (see the module doc) or inside a worker."""
    if n < 2 or os.environ.get("MBCOMPILE_SPREAD", "1") == "0" or not _omp() or getattr(_WORKER, "on", False):
        return 1
    return max(1, min(n, torch.get_num_threads()))


def _start(per: int) -> bool:
    """A worker's setup; returns whether it allocates from glibc's main arena."""
    _WORKER.on = True
    torch.get_num_threads()       # ATen's lazy per-thread init first: it would set the count back
    torch.set_num_threads(per)    # this thread's OpenMP and MKL counts (and ATen's process default)
    return hostmem.in_main_arena(torch.empty(1 << 18).data_ptr())


def _executor() -> ThreadPoolExecutor:
    _STATE["made"] = _STATE.get("made", 0) + 1
    return ThreadPoolExecutor(1, thread_name_prefix=f"mbcompile-models-{_STATE['made']}")


def _pool(k: int, per: int) -> list:
    """k single-thread executors. Where hostmem tuned glibc, each worker must allocate from the main
    arena (hostmem.workers_arena): a thread's own arena unmaps every emptied 64 MiB heap, so a worker
    holding LSTM workspaces page-faulted on every step (the word LM of docs/performance.md stop 21:
    36,000 faults a step, 499 ms against 443 in the main arena). New threads then take existing arenas
    in turn; one that got another (torch's OpenMP thread's) ends and the next is tried, and where a
    freed arena keeps coming back, it is kept idle instead. Up to 4k threads are tried."""
    key = (os.getpid(), k, per)                   # a forked child gets a pool of its own
    with _LOCK:
        if _STATE["key"] != key:
            if _STATE["key"] is not None and _STATE["key"][0] == key[0]:
                for ex in _STATE["pool"]:
                    ex.shutdown(wait=False)
            mine = torch.get_num_threads()
            check = hostmem.workers_arena()
            pool, parked = [], []
            for attempt in range(4 * k):
                ex = _executor()
                if ex.submit(_start, per).result() or not check:
                    pool.append(ex)
                elif attempt < 2 * k:             # let it end: its arena stays with the thread that had it
                    ex.shutdown(wait=True)
                else:                             # (a freed arena came back each time): keep it idle
                    parked.append(ex)
                if len(pool) == k:
                    break
            while len(pool) < k:                  # not found: workers on other arenas after all
                if not parked:
                    parked.append(_executor())
                    parked[-1].submit(_start, per).result()
                pool.append(parked.pop())
            _STATE["parked"] = _STATE.get("parked", []) + parked
            torch.set_num_threads(mine)           # ATen's process default back to the caller's
            _STATE["pool"], _STATE["key"] = pool, key
        return _STATE["pool"]


def _run(fn, lo, hi, grad, inference):
    with torch.inference_mode(inference), torch.set_grad_enabled(grad):   # the caller's modes
        return [fn(i) for i in range(lo, hi)]


def map_models(fn: Callable[[int], object], n: int, k: int | None = None) -> list:
    """[fn(0), ..., fn(n-1)], the models split into contiguous runs over ``workers(n)`` threads (at
    most ``k``); in the caller's thread when that is one."""
    k = workers(n) if k is None else min(k, workers(n))
    if k <= 1:
        return [fn(i) for i in range(n)]
    pool = _pool(k, max(1, torch.get_num_threads() // k))
    for pause in _pauses():
        pause(1)                                  # omp_pause_soft
    bounds = [n * j // k for j in range(k + 1)]
    modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    runs = [pool[j].submit(_run, fn, bounds[j], bounds[j + 1], *modes) for j in range(k)]
    return [r for fut in runs for r in fut.result()]
