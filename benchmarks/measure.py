"""Clocks, memory and machine facts, the same on CPU and CUDA."""
from __future__ import annotations

import ctypes
import gc
import os
import platform
import resource
import statistics
import sys
import time

import torch


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """Seconds one call of fn takes, with the device synchronised on both sides."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def summary(times):
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def machine(device):
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(device),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda_version"] = torch.version.cuda
        info["float32_matmul_precision"] = torch.get_float32_matmul_precision()
        info["cuda_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    try:
        import mbcompile
        info["mbcompile_version"] = getattr(mbcompile, "__version__", "?")
    except Exception as e:  # noqa: BLE001 - reported, the suite still runs the torch baselines
        info["mbcompile_version"] = f"import failed: {e}"
    return info


def matmul_peak(device, size=None, reps=5):
    """FLOP/s of a large fp32 matmul on this device right now (best of ``reps``): the ceiling that the
    achieved FLOP/s of each method is compared against."""
    cuda = torch.device(device).type == "cuda"
    size = size or (8192 if cuda else 2048)
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b  # warm-up
    best = min(timed(lambda: a @ b, device) for _ in range(reps))
    return {"size": size, "dtype": "float32", "seconds": best, "flops_per_s": 2 * size**3 / best}


# ---- memory ----------------------------------------------------------------------------------------
class Memory:
    """Peak memory of a stretch of work above what was resident when ``start()`` was called.

    CUDA: torch.cuda.max_memory_allocated. CPU: the process's resident-set high-water mark (VmHWM),
    reset through /proc/self/clear_refs and read from /proc/self/status, with freed heap returned to
    the OS first (malloc_trim) so that earlier methods' leftovers do not hide new allocations. Where
    /proc is not writable it falls back to getrusage's ru_maxrss, which only grows (then 0 = unknown)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.kind = "cuda.max_memory_allocated" if self.cuda else "VmHWM (resident set high-water mark)"
        self.base = 0

    def start(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        _malloc_trim()
        self.base = _proc_status("VmRSS")
        if self.base is None or not _reset_hwm():
            self.kind = "ru_maxrss delta (lower bound)"
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def reset_peak(self):
        """Forget the peak so far (e.g. compilation), keeping the baseline."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.kind.startswith("VmHWM"):
            _malloc_trim()
            _reset_hwm()

    def peak(self):
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        if self.kind.startswith("VmHWM"):
            return _proc_status("VmHWM") - self.base
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base


def _proc_status(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
