"""How far each method's float32 gradients are from float64 ones, per parameter (no timing).

    python -m benchmarks.precision_probe [--device cuda] [--workloads mlp784,lenet5] [--n 16]

The suite's correctness check compares methods with sequential float32 training; this tells which side
is off when they disagree. Seen on an H200 (torch 2.11): sequential float32 within 3e-7 of float64 on
mlp784, vmap and mbcompile both up to 1.4e-1 (relative to each tensor's largest gradient), while
bmm/baddbmm of the same shapes are accurate to 7e-7 there; see docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import copy

import torch

from .methods import METHODS
from .workloads import WORKLOADS


def grads(method_cls, wl, models, x, y):
    m = method_cls(wl, models)
    m.step(x, y)
    return {k: g.detach() for k, g in m.grads().items()}


def probe(wl, n, device, methods):
    x, y = wl.data(device)
    models = wl.models(n, device)
    m64 = [copy.deepcopy(m).double() for m in models]
    x64 = x.double() if x.is_floating_point() else x
    ref = grads(METHODS["sequential"], wl, m64, x64, y)
    out = {}
    for name in methods:
        try:
            g = grads(METHODS[name], wl, models, x, y)
        except Exception as e:  # noqa: BLE001
            out[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            continue
        out[name] = {k: float((g[k].double() - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-30))
                     for k in ref}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workloads", default="mlp784,lenet5")
    p.add_argument("--methods", default="sequential,vmap,mbcompile")
    p.add_argument("--n", type=int, default=16)
    a = p.parse_args(argv)
    for name in a.workloads.split(","):
        res = probe(WORKLOADS[name], a.n, a.device, a.methods.split(","))
        for method, errs in res.items():
            if isinstance(errs, str):
                print(f"{name:12s} {method:20s} {errs}")
                continue
            worst = max(errs, key=errs.get)
            print(f"{name:12s} {method:20s} max rel grad error vs float64 {errs[worst]:.1e} ({worst})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
