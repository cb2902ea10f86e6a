"""Benchmark: the optimizer step alone, per-model optimizer vs n stock torch.optim optimizers.

n MLPs (784-256-256-10 by default).  The per-model optimizer (``mbcompile.optimizer``) updates the stacked
``[n, *shape]`` parameters in one vectorised step with a different learning rate per model; the baseline
is n ``torch.optim.<X>(model_i.parameters(), foreach=True)`` instances stepped one after the other, the
way a sweep over n models is usually run.  Both get the same fixed gradients; only ``step()`` is timed.

    python -m benchmarks.optim_step [--n 16] [--optim adam] [--device cpu] [--repeat 30] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn

from mbcompile.optim import optimizer as per_model_optimizer

OPTIMS = {
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {"weight_decay": 0.01}),
    "sgd": (torch.optim.SGD, {"momentum": 0.9}),
    "rmsprop": (torch.optim.RMSprop, {}),
    "adagrad": (torch.optim.Adagrad, {}),
}


def mlp(sizes):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class StackedParams(nn.Module):
    """The parameters of n same-architecture models stacked to [n, *shape] under their original names
    (what mbcompile.batch exposes); enough for the optimizer, which never runs the forward."""

    def __init__(self, models):
        super().__init__()
        self.n = len(models)
        for name, _ in models[0].named_parameters():
            mod = self
            *path, leaf = name.split(".")
            for part in path:
                if part not in mod._modules:
                    mod.add_module(part, nn.Module())
                mod = mod._modules[part]
            mod.register_parameter(leaf, nn.Parameter(torch.stack([m.get_parameter(name).detach()
                                                                   for m in models]).clone()))


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, warmup, repeat):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, min(times) * 1e3


def run(n=16, sizes=(784, 256, 256, 10), optim="adam", device="cpu", dtype=torch.float32, warmup=5,
        repeat=30, per_model_lr=True, compile=False, threads=None, fused=False):
    if threads:
        torch.set_num_threads(threads)
    cls, extra = OPTIMS[optim]
    torch.manual_seed(0)
    models = [mlp(sizes).to(device=device, dtype=dtype) for _ in range(n)]
    lrs = [1e-3 * (1 + i) / n for i in range(n)] if per_model_lr else 1e-3
    # baseline: n stock optimizers, foreach=True (the fastest stock setting that accepts a float lr), or
    # fused=True against mbcompile's fused=True (Adam, AdamW)
    impl = {"fused": True} if fused else {"foreach": True}
    refs = [cls(m.parameters(), lr=(lrs[i] if per_model_lr else lrs), **impl, **extra)
            for i, m in enumerate(models)]
    for m in models:
        for p in m.parameters():
            p.grad = torch.randn_like(p) * 1e-2
    stacked = StackedParams(models)
    opt = per_model_optimizer(stacked, cls, lr=lrs, compile=compile, **({"fused": True} if fused else {}), **extra)
    for name, p in stacked.named_parameters():
        p.grad = torch.stack([m.get_parameter(name).grad for m in models])

    def baseline():
        for o in refs:
            o.step()

    ours_ms, ours_min = _time(opt.step, device, warmup, repeat)
    base_ms, base_min = _time(baseline, device, warmup, repeat)
    numel = sum(p.numel() for p in models[0].parameters())
    return {
        "benchmark": "optim_step",
        "optimizer": cls.__name__,
        "n": n,
        "sizes": list(sizes),
        "params_per_model": numel,
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "device_name": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "per_model_lr": per_model_lr,
        "compile": compile,
        "fused": fused,
        "baseline": f"{n} x torch.optim.{cls.__name__}({next(iter(impl))}=True)",
        "mbcompile_ms": ours_ms,
        "mbcompile_min_ms": ours_min,
        "torch_foreach_ms": base_ms,
        "torch_foreach_min_ms": base_min,
        "speedup": base_ms / ours_ms,
        "torch": torch.__version__,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--sizes", default="784,256,256,10")
    ap.add_argument("--optim", choices=sorted(OPTIMS), default="adam")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--shared-lr", action="store_true", help="one lr for every model (default: one per model)")
    ap.add_argument("--compile", action="store_true", help="run the per-model step through torch.compile")
    ap.add_argument("--fused", action="store_true",
                    help="fused=True for both (Adam, AdamW: torch's fused kernel per model)")
    ap.add_argument("--json", default=None, help="also write the result to this file")
    args = ap.parse_args(argv)
    res = run(n=args.n, sizes=tuple(int(s) for s in args.sizes.split(",")), optim=args.optim,
              device=args.device, dtype=getattr(torch, args.dtype), warmup=args.warmup, repeat=args.repeat,
              per_model_lr=not args.shared_lr, compile=args.compile, threads=args.threads,
              fused=args.fused)
    print(f"optimizer step, {res['optimizer']}, n={res['n']} MLPs {res['sizes']} ({res['params_per_model']} "
          f"params each), {res['dtype']} on {res['device']} ({res['device_name']}, {res['threads']} threads)")
    how = ", compiled" if res["compile"] else ", fused=True" if res["fused"] else ""
    print(f"  mbcompile.optimizer (one vectorised step{how}, "
          f"{'per-model' if res['per_model_lr'] else 'shared'} lr): {res['mbcompile_ms']:8.3f} ms median")
    print(f"  {res['baseline']}:{' ' * 13}{res['torch_foreach_ms']:8.3f} ms median")
    print(f"  speedup (torch / mbcompile): {res['speedup']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
