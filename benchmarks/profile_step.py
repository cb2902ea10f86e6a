"""Where one training step's time goes, per method (torch.profiler; no correctness check).

    python -m benchmarks.profile_step [--device cuda] [--workloads lenet5] [--n 64] \
        [--methods vmap_compiled,mbcompile_step] [--steps 5] [--rows 25]

Prints, per (workload, n, method), the ops with the largest self time (device time on CUDA, CPU time
otherwise) over ``--steps`` profiled steps after two warm-up steps, and the step's median wall time.
"""
from __future__ import annotations

import argparse
import time

import torch

from .methods import METHODS
from .workloads import WORKLOADS


def profile(cls, wl, n, device, steps, rows):
    models = wl.models(n, device)
    x, y = wl.data(device)
    m = cls(wl, models)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        m.step(x, y)
    while m.settling():                                 # train_step(path="auto") still timing both paths
        m.step(x, y)
    sync()
    walls = []
    for _ in range(steps):
        t = time.perf_counter()
        m.step(x, y)
        sync()
        walls.append(time.perf_counter() - t)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            m.step(x, y)
        sync()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    walls.sort()
    print(f"\n## {wl.name} n={n} {cls.name}: median step {1e3 * walls[len(walls) // 2]:.2f} ms "
          f"(profiled {steps} steps; times below are totals over them)")
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workloads", default="lenet5")
    ap.add_argument("--n", default="16")
    ap.add_argument("--methods", default="vmap_compiled,mbcompile_step")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    for w in a.workloads.split(","):
        for n in [int(v) for v in a.n.split(",")]:
            for name in a.methods.split(","):
                try:
                    profile(METHODS[name], WORKLOADS[w], n, a.device, a.steps, a.rows)
                except Exception as e:  # noqa: BLE001 - report and go on with the next method
                    print(f"\n## {w} n={n} {name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")


if __name__ == "__main__":
    main()
