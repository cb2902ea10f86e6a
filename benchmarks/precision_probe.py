"""How far each method's float32 gradients are from float64 ones, per parameter (no timing).

    python -m benchmarks.precision_probe [--device cuda] [--workloads mlp784,lenet5] [--n 16] [--ops] [--ieee]

``--ops`` also re-runs every float32 aten op that each method executes in float64 on the same (upcast)
inputs and lists the ops with the largest *local* error: an op whose own result is far from its
float64 twin is the cause, whatever its inputs' errors were. ``--ieee`` turns TF32 off everywhere
(cuBLAS and cuDNN) before measuring.

The suite's correctness check compares methods with sequential float32 training; this tells which side
is off when they disagree. Seen on an H200 (torch 2.11): sequential float32 within 3e-7 of float64 on
mlp784, vmap and mbcompile both up to 1.4e-1 (relative to each tensor's largest gradient), while
bmm/baddbmm of the same shapes are accurate to 7e-7 there; see docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from .methods import METHODS
from .workloads import WORKLOADS


def grads(method_cls, wl, models, x, y):
    m = method_cls(wl, models)
    m.step(x, y)
    return {k: g.detach() for k, g in m.grads().items()}


def _up(t):
    return t.double() if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t


def _clone(t):
    return t.clone() if isinstance(t, torch.Tensor) else t


class LocalError(TorchDispatchMode):
    """Records, for every aten op with a float32 result, max |out - op(float64 inputs)| / max |op(...)|."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        skip = (func.is_view or torch.Tag.nondeterministic_seeded in func.tags
                or "empty" in func.__name__)                       # uninitialised memory
        if not skip:
            args64, kwargs64 = tree_map(lambda t: _up(_clone(t)), (args, kwargs))
        out = func(*args, **kwargs)
        if skip:
            return out
        try:
            ref = func(*args64, **kwargs64)
        except Exception:  # noqa: BLE001 - some ops have no float64 kernel on this device
            return out
        outs, _ = tree_flatten(out)
        refs, _ = tree_flatten(ref)
        for o, r in zip(outs, refs):
            if isinstance(o, torch.Tensor) and o.dtype == torch.float32 and isinstance(r, torch.Tensor) \
                    and o.numel() and o.shape == r.shape:
                scale = r.double().abs().max().item()
                err = (o.double() - r.double()).abs().max().item() / max(scale, 1e-30)
                shapes = [(tuple(a.shape), tuple(a.stride())) for a in tree_flatten(args)[0]
                          if isinstance(a, torch.Tensor)]
                self.rows.append((err, str(func), shapes))
        return out


def local_errors(method_cls, wl, models, x, y, top=6):
    m = method_cls(wl, models)
    m.step(x, y)            # capture, lowering choice and compilation happen outside the mode
    with LocalError() as mode:
        m.step(x, y)
    return sorted(mode.rows, key=lambda r: -r[0])[:top]


class ReluSigns(TorchDispatchMode):
    """Collects every relu output, to count units whose on/off state differs between two runs."""

    def __init__(self):
        super().__init__()
        self.outs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.relu.default, torch.ops.aten.relu_.default) and not is_fake(out):
            self.outs.append(out.detach().clone())
        return out


def relu_flips(method_cls, wl, models, x, y):
    """Units on in float32 and off in float64 (or the reverse), the same method run in both."""
    res = []
    for ms, xx in ((models, x), ([copy.deepcopy(m).double() for m in models], _up(x))):
        with ReluSigns() as mode:
            method_cls(wl, ms).step(xx, y)
        res.append(mode.outs)
    flips = sum(int(((a > 0) != (b > 0)).sum()) for a, b in zip(*res))
    return flips, sum(a.numel() for a in res[0])


def smooth(wl):
    """The same workload with tanh instead of relu (no on/off units to flip)."""
    import torch.nn as nn
    make = wl.make_model

    def make_smooth():
        m = make()
        for name, child in list(m.named_modules()):
            for attr, sub in list(child.named_children()):
                if isinstance(sub, nn.ReLU):
                    setattr(child, attr, nn.Tanh())
        return m
    return dataclasses.replace(wl, make_model=make_smooth, name=wl.name + "_tanh")


def flags():
    b = torch.backends
    out = {"float32_matmul_precision": torch.get_float32_matmul_precision(),
           "cuda.matmul.allow_tf32": b.cuda.matmul.allow_tf32, "cudnn.allow_tf32": b.cudnn.allow_tf32}
    for name in ("fp32_precision",):
        for mod, label in ((b, ""), (b.cuda.matmul, "cuda.matmul."), (b.cudnn, "cudnn.")):
            if hasattr(mod, name):
                out[label + name] = getattr(mod, name)
    return out


def ieee():
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


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
    p.add_argument("--ops", action="store_true", help="list the ops with the largest local float32 error")
    p.add_argument("--ieee", action="store_true", help="turn TF32 off in cuBLAS and cuDNN first")
    p.add_argument("--flips", action="store_true", help="count relu units that flip between float32 and 64")
    p.add_argument("--smooth", action="store_true", help="also probe each workload with tanh for relu")
    a = p.parse_args(argv)
    if a.ieee:
        ieee()
    print("flags:", flags())
    for name in a.workloads.split(","):
        wls = [WORKLOADS[name]] + ([smooth(WORKLOADS[name])] if a.smooth else [])
        for wl in wls[1:]:
            for method, errs in probe(wl, a.n, a.device, a.methods.split(",")).items():
                worst = max(errs, key=errs.get) if not isinstance(errs, str) else None
                print(f"{wl.name:12s} {method:20s} " + (errs if worst is None else
                      f"max rel grad error vs float64 {errs[worst]:.1e} ({worst})"))
        if a.flips:
            x, y = WORKLOADS[name].data(a.device)
            for method in a.methods.split(","):
                f, tot = relu_flips(METHODS[method], WORKLOADS[name], WORKLOADS[name].models(a.n, a.device), x, y)
                print(f"{name:12s} {method:20s} relu units on/off differently in float32 and float64: {f} of {tot}")
        res = probe(WORKLOADS[name], a.n, a.device, a.methods.split(","))
        for method, errs in res.items():
            if isinstance(errs, str):
                print(f"{name:12s} {method:20s} {errs}")
                continue
            worst = max(errs, key=errs.get)
            print(f"{name:12s} {method:20s} max rel grad error vs float64 {errs[worst]:.1e} ({worst})")
        if a.ops:
            wl = WORKLOADS[name]
            x, y = wl.data(a.device)
            for method in a.methods.split(","):
                try:
                    rows = local_errors(METHODS[method], wl, wl.models(a.n, a.device), x, y)
                except Exception as e:  # noqa: BLE001
                    print(f"  {method}: local errors not measured ({type(e).__name__}: {e})"[:200])
                    continue
                print(f"  {method}: ops with the largest local error (op, relative error, input shapes/strides)")
                for err, op, shapes in rows:
                    print(f"    {err:.1e} {op} {shapes}"[:300])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
