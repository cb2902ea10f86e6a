"""Issue 5 measurements (docs/performance.md): n=16 fp32 full training step (forward, backward, Adam step).

    python docs/performance_bench.py [tiny_mlp lenet5 mlp784]     # training-step table
    python docs/performance_bench.py --capture                     # ResNet-18 capture + rewrite time

Compares 16 sequential torch models (torch.optim.Adam each) with mbcompile (eager; compile=True; the
stacked Adam step torch.compile'd; mbcompile.backend.train_step) and torch.func.vmap (+torch.compile).
Interleaved rounds, median of the per-round medians. Env: T (threads, default 1), CLOCK (cpu: process
CPU time, the default, robust on a shared machine; wall), N (models, 16), ROUNDS (5), VARIANTS, OUTJSON.
"""
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    def forward(self, x):
        return self.net(x)

class MLP784(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    def forward(self, x):
        return self.net(x)

class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)
    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)

WORKLOADS = {
    "tiny_mlp": (TinyMLP, lambda B: torch.randn(B, 32), 32),
    "lenet5": (LeNet5, lambda B: torch.randn(B, 3, 32, 32), 64),
    "mlp784": (MLP784, lambda B: torch.randn(B, 784), 64),
}


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False); self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False); self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))
class ResNet18(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False); self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers.append(nn.Sequential(Block(cin, cout, stride), Block(cout, cout, 1))); cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(512, num_classes)
    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def capture_times():
    """ResNet-18 (hand-written, CIFAR-shaped) capture + rewrite, n=4, batch 2, fixed lowering."""
    from mbcompile import lowering
    m, x = ResNet18(), torch.randn(2, 3, 32, 32)
    with lowering.force("default"):
        mbcompile.batch(m, n=4)(x)                  # first export in a process pays one-time imports
        rows = []
        for _ in range(5):
            b = mbcompile.batch(m, n=4)
            t, c = time.perf_counter(), time.process_time()
            b(x)
            rows.append((time.perf_counter() - t, time.process_time() - c, mbcompile.explain(b).times))
    wall, cpu = sorted(r[0] for r in rows), sorted(r[1] for r in rows)
    print(f"ResNet-18 capture+rewrite: wall median {wall[2]:.3f} s (min {wall[0]:.3f}), "
          f"CPU median {cpu[2]:.3f} s (min {cpu[0]:.3f}); last: "
          f"{ {k: round(v, 3) for k, v in rows[-1][2].items()} }")


if "--capture" in sys.argv:
    import mbcompile
    torch.set_num_threads(int(os.environ.get("T", 1)))
    capture_times()
    sys.exit(0)

import mbcompile
from torch.func import functional_call, grad_and_value, vmap, stack_module_state
torch.set_num_threads(int(os.environ.get("T", 1)))
CLOCK = time.process_time if os.environ.get("CLOCK", "cpu") == "cpu" else time.perf_counter
N = int(os.environ.get("N", 16))
ROUNDS = int(os.environ.get("ROUNDS", 5))
which = [a for a in sys.argv[1:] if not a.startswith("-")] or list(WORKLOADS)
only = os.environ.get("VARIANTS")

def timeit(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = CLOCK(); fn(); ts.append(CLOCK() - t0)
    return statistics.median(ts)

results = {}
for name in which:
    cls, mk, B = WORKLOADS[name]
    torch.manual_seed(0)
    base = [cls() for _ in range(N)]
    x = mk(B); y = torch.randint(0, 10, (B,))
    V = {}
    models = copy.deepcopy(base); opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]
    def seq():
        for m, o in zip(models, opts):
            o.zero_grad(); F.cross_entropy(m(x), y).backward(); o.step()
    V["sequential"] = seq
    def mk_mb(compile_, copt):
        bm = mbcompile.batch(copy.deepcopy(base), compile=compile_)
        bo = torch.optim.Adam(bm.parameters(), lr=1e-3, foreach=True)
        ostep = torch.compile(bo.step) if copt else bo.step
        def step():
            bo.zero_grad(); mbcompile.loss(F.cross_entropy, bm(x), y).sum().backward(); ostep()
        step.bm = bm
        return step
    V["mb_eager"] = mk_mb(False, False)
    V["mb_eager+copt"] = mk_mb(False, True)
    V["mb_compile+copt"] = mk_mb(True, True)
    def mk_ts():
        from mbcompile.backend import train_step
        bm = mbcompile.batch(copy.deepcopy(base))
        bo = torch.optim.Adam(bm.parameters(), lr=1e-3)
        st = train_step(bm, F.cross_entropy, bo)
        def step():
            st(x, y)
        step.bm = bm
        return step
    V["mb_train_step"] = mk_ts()
    params, bufs = stack_module_state(copy.deepcopy(base))
    meta = copy.deepcopy(base[0]).to("meta")
    def lossf(p, b, x, y):
        return F.cross_entropy(functional_call(meta, (p, b), (x,)), y)
    def mk_vmap(comp):
        ps = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        vo = torch.optim.Adam(list(ps.values()), lr=1e-3, foreach=True)
        def fb(p, b, x, y):
            return vmap(grad_and_value(lossf), in_dims=(0, 0, None, None))(p, b, x, y)
        f = torch.compile(fb) if comp else fb
        ostep = torch.compile(vo.step) if comp else vo.step
        def step():
            g, l = f(ps, bufs, x, y)
            for k, p in ps.items(): p.grad = g[k]
            ostep()
        return step
    V["vmap"] = mk_vmap(False)
    V["vmap+compile"] = mk_vmap(True)
    if only:
        V = {k: v for k, v in V.items() if k in only.split(",") or k == "sequential"}
    for k, f in V.items():
        t0 = time.perf_counter(); f(); f(); f()
        print(f"# {name} {k}: warmup {time.perf_counter()-t0:.1f}s", file=sys.stderr, flush=True)
    one = timeit(V["sequential"], 1)
    reps = max(3, min(30, int(0.6 / max(one, 1e-4))))
    res = {k: [] for k in V}
    for r in range(ROUNDS):
        for k, f in V.items():
            res[k].append(timeit(f, reps) * 1e3)
    seqm = statistics.median(res["sequential"])
    results[name] = {}
    for k, v in res.items():
        m = statistics.median(v)
        results[name][k] = {"median_ms": m, "min_ms": min(v), "max_ms": max(v), "speedup": seqm / m}
        print(f"{name:9s} {k:16s} {m:9.3f} ms  (round medians {min(v):.3f}..{max(v):.3f})  vs sequential {seqm/m:6.2f}x", flush=True)
    for k in ("mb_eager", "mb_train_step"):
        if k in V and hasattr(V[k], "bm"):
            e = mbcompile.explain(V[k].bm)
            print(f"   {k}: times", {a: round(b, 3) for a, b in e.times.items()}, "copies", e.copies,
                  "|", "; ".join(n for r in e.records for n in r.notes if "lowering" in n), flush=True)
if os.environ.get("OUTJSON"):
    json.dump(results, open(os.environ["OUTJSON"], "w"), indent=1)
