"""Choosing between lowerings of heavy ops, per (family, device, dtype, shapes, n).

A rule with several ways to compute the same op hands them to ``choose`` as candidates, each a
function of the op's tensors. The choice::

    MBCOMPILE_LOWERING unset or "measure"   time forward+backward of every candidate once, on real
                                            tensors of the op's shapes and strides, on the op's device;
                                            the fastest wins; cached per signature for the process;
                                            a candidate whose warm-up took 3x the best's (and > 20 ms)
                                            keeps that time and is not run again
    MBCOMPILE_LOWERING="default"            a fixed choice per family (DEFAULTS), no timing: deterministic
    MBCOMPILE_LOWERING="loop"               force a candidate name wherever a family has it
    MBCOMPILE_LOWERING="conv=loop,linear=baddbmm"    force per family

``force(**family_choice)`` does the same from Python (a context manager, for tests). Every choice says
why (``Choice.why``), and the rule passes that to ``explain()`` via ``ctx.note``.

Families and candidates (shapes: n models, B batch):
    conv                per-model input and weights: grouped (B,(n*C),H,W, groups=n*g) | grouped_nhwc (the
                        same, channels-last; 2-d) | loop (n convs)
                        | unfold (im2col + one batched matmul; 2-d, groups=1; offered when its buffer
                        fits conv.IM2COL_MAX_BYTES: 64 MB on CPU)
    conv_shared_input   shared input, per-model weights: concat (one conv, weights (n*O),C,k,k) |
                        concat_nhwc (the same, channels-last; 2-d) | loop
    linear              per-model input and weights: baddbmm | loop (n F.linear)
    attention           scaled_dot_product_attention without dropout, off CUDA: fused (torch's kernel) |
                        math (matmul, softmax, matmul)
    linear_shared_input shared input: concat (one matmul on (n*O),I weights) | concat_t (the same as
                        (n*O),I @ I,B: BLAS prefers the tall operand first) | bmm (input expanded) | loop
    rnn                 (passes/rnn.py, a cost rule, not timed; a plain CPU LSTM layer, float32 or bfloat16):
                        cells (unrolled batched cells) | fused (torch's oneDNN kernel, model after model) |
                        spread (the same, the models split over the cores: cores.py)
    program             (chunking.py, not through choose) the whole batched program | chunks of k
                        models (and, where k=1 is timed, chunks of 1 with the default lowerings):
                        MBCOMPILE_LOWERING="program=chunks4" / "program=whole"
A loop candidate is the sequential computation itself, so the measured choice is never slower than
sequential op by op (up to timing noise).
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import torch

DEFAULTS = {"conv": "grouped", "conv_shared_input": "concat", "linear": "baddbmm",
            "linear_shared_input": "concat", "attention": "fused", "rnn": "fused"}
_CACHE: dict = {}
_FORCED: dict = {}
SPENT = {"measure_s": 0.0}    # seconds spent timing candidates in this process
BUDGET_S = 0.15        # timing budget per candidate (after one warm-up run)
MAX_REPS = 5
BUSY_FACTOR = 3        # a busy machine (_busy): 3x the budget and reps, every candidate re-timed
LOSER_RATIO, LOSER_MIN_S = 3.0, 0.02   # not re-timed: warm-up 3x the best's and over 20 ms


@dataclass
class Choice:
    name: str
    why: str
    timings: dict = field(default_factory=dict)     # candidate -> seconds (fwd+bwd), when measured

    def note(self, family):
        return f"{family} lowering: {self.name} ({self.why})"


def _setting(family):
    if family in _FORCED:
        return _FORCED[family]
    if "*" in _FORCED:
        return _FORCED["*"]
    env = os.environ.get("MBCOMPILE_LOWERING", "").strip()
    if not env:
        return "measure"
    if "=" not in env:
        return env
    for part in env.split(","):
        fam, _, name = part.partition("=")
        if fam.strip() == family:
            return name.strip()
    return "measure"


def measured(family):
    """Whether ``family``'s lowering is chosen by timing (not fixed by "default" or a forced name)."""
    return _setting(family) == "measure"


def forced(family, name):
    """Whether MBCOMPILE_LOWERING / force() names candidate ``name`` for ``family``."""
    return _setting(family) == name


@contextlib.contextmanager
def force(mode=None, **per_family):
    """``with force("default")``, ``force("loop")`` or ``force(conv="unfold")``: override the choice
    (and MBCOMPILE_LOWERING) inside the block. Programs captured inside keep their choice."""
    saved = dict(_FORCED)
    if mode is not None:
        _FORCED["*"] = mode
    _FORCED.update(per_family)
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)


def _sig(t):
    if isinstance(t, torch.Tensor):
        return (tuple(t.shape), tuple(t.stride()))
    return t


def choose(family, candidates, tensors, n, extra=(), grad=None, prefer=None):
    """Pick one of ``candidates`` ({name: fn(*tensors) -> Tensor}, in order of preference for ties).
    ``tensors`` may be fake (inside make_fx): timing runs on fresh real tensors of the same shapes;
    ``grad`` says which of them need a gradient (default: all; a user's input does not).
    ``prefer=(name, r)``: that candidate wins while its eager time is within a factor r of the fastest
    (one that Inductor fuses, which eager timing cannot see)."""
    names = list(candidates)
    setting = _setting(family)
    if setting == "default":
        name = DEFAULTS.get(family, names[0])
        name = name if name in candidates else names[0]
        return Choice(name, "MBCOMPILE_LOWERING=default: fixed choice, not measured")
    if setting in candidates:                        # a forced name this family does not offer: measure
        return Choice(setting, "forced by MBCOMPILE_LOWERING / lowering.force")
    if len(names) == 1:
        return Choice(names[0], "only candidate")
    ref = next(t for t in tensors if isinstance(t, torch.Tensor))
    grad = tuple(grad) if grad is not None else (True,) * len(tensors)
    key = (family, ref.device.type, ref.dtype, n, tuple(_sig(t) for t in tensors), extra, tuple(names), grad,
           torch.get_num_threads(), prefer)
    hit = _CACHE.get(key)
    if hit is None:
        t0 = time.perf_counter()
        timings = _measure(candidates, tensors, grad)
        SPENT["measure_s"] += time.perf_counter() - t0
        best = min(names, key=lambda k: timings[k])
        ranked = ", ".join(f"{k} {timings[k] * 1e3:.3g} ms" for k in sorted(names, key=timings.get))
        why = f"measured fwd+bwd on {ref.device.type}: {ranked}"
        if prefer is not None and prefer[0] in timings and best != prefer[0] \
                and timings[prefer[0]] <= prefer[1] * timings[best]:
            best, why = prefer[0], f"{why}; {prefer[0]} preferred within {prefer[1]:g}x of the fastest"
        hit = _CACHE[key] = Choice(best, why, timings)
    return hit


def _real(t, grad, gens):
    """A real tensor like ``t`` (fake or not): same shape, dtype, device and, when dense, strides.
    Drawn from a private generator: measuring never moves the user's random streams."""
    dev = t.device if t.device.type != "meta" else torch.device("cpu")
    dense = torch._prims_common.is_non_overlapping_and_dense_or_false(t)
    r = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=dev) if dense else \
        torch.empty(t.shape, dtype=t.dtype, device=dev)
    if t.is_floating_point() or t.is_complex():
        if dev not in gens:
            gens[dev] = torch.Generator(device=dev).manual_seed(0)
        r.normal_(generator=gens[dev])
        return r.requires_grad_(grad)
    return r.zero_()


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _measure(candidates, tensors, grad):
    """Seconds per forward+backward of each candidate (best of a few interleaved runs)."""
    with torch.utils._python_dispatch._disable_current_modes(), torch.enable_grad():
        gens = {}
        real = [_real(t, g, gens) if isinstance(t, torch.Tensor) else t for t, g in zip(tensors, grad)]
        dev = next(t for t in real if isinstance(t, torch.Tensor)).device
        grads = {}

        def run(name):
            out = candidates[name](*real)
            if out.requires_grad:
                g = grads.get(name)
                if g is None:
                    g = grads[name] = torch.ones_like(out)
                out.backward(g)
            for t in real:
                if isinstance(t, torch.Tensor):
                    t.grad = None

        def timed(name):
            _sync(dev)
            t0 = time.perf_counter()
            run(name)
            _sync(dev)
            return time.perf_counter() - t0

        best, errors = {}, {}
        for name in candidates:                      # warm-up (oneDNN primitive creation, allocator)
            try:
                best[name] = timed(name)
            except RuntimeError as e:                # a kernel that refuses these strides (slow_conv2d's
                best[name], errors[name] = float("inf"), e   # backward on a 1x1 map): never chosen
        if all(v == float("inf") for v in best.values()):
            # every way of computing it fails: the inputs are wrong (a dtype mismatch), and the loop
            # (each model's own op) fails as the model alone would: that error, as torch raised it
            err = errors.get("loop") or next(iter(errors.values()))
            err.add_note(f"mbcompile: every lowering of this op ({', '.join(candidates)}) failed on these inputs")
            raise err
        busy = _busy()          # other processes on these cores: a sample may be a preempted one, so
        if min(best.values()) > BUDGET_S and not busy:   # no shortcut and more reps (best of them)
            return best                               # slow ops: the warm-up run is the measurement

        def loser(k):
            return k in errors or (not busy and best[k] > LOSER_RATIO * min(best.values()) and best[k] > LOSER_MIN_S)
        # a big candidate 3x slower than the best, on its warm-up and on one more run (a warm-up pays
        # one-time costs), keeps that time: timing it again would cost most of the measurement and
        # cannot change the choice (ResNet-8's im2col convs)
        for k in [k for k in candidates if loser(k) and k not in errors]:
            best[k] = min(best[k], timed(k))
        again = [k for k in candidates if not loser(k)]
        budget, cap = (BUSY_FACTOR * BUDGET_S, BUSY_FACTOR * MAX_REPS) if busy else (BUDGET_S, MAX_REPS)
        reps = max(2 if busy else 1, min(cap, int(budget / max(max(best[k] for k in again), 1e-6))))
        best = {k: (float("inf") if k in again else v) for k, v in best.items()}
        for _ in range(reps):
            for name in again:
                best[name] = min(best[name], timed(name))
    return best


def _busy() -> bool:
    """Whether other processes compete for this process's cores: more runnable tasks than torch's threads
    (least of three looks at /proc/loadavg; this process's OpenMP workers spin there after an op), or a
    1-minute load above the cores. Timings then take more, interleaved, samples."""
    try:
        looks = []
        for k in range(3):
            if k:
                time.sleep(0.001)
            with open("/proc/loadavg") as f:
                looks.append(f.read().split())
        if float(looks[0][0]) > len(os.sched_getaffinity(0)) + 0.5:
            return True
        return min(int(v[3].split("/")[0]) for v in looks) > max(torch.get_num_threads(), 1)
    except (OSError, ValueError, IndexError, AttributeError):
        return False


def clear_cache():
    _CACHE.clear()


def input_needs_grad(ctx, i=0):
    """Whether argument ``i`` of the node being batched is computed in the graph (so it gets a
    gradient in training) rather than a graph input such as the user's data."""
    node = ctx.node
    if node is None or len(node.args) <= i or not hasattr(node.args[i], "op"):
        return True
    return node.args[i].op != "placeholder"
