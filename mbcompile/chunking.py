"""Program-level lowering: run the batched program over groups of models ("chunks") when that is faster.

Per-op measurement (lowering.py) cannot see what happens *between* ops. On a CPU, once a batched
activation is several times the last-level cache, bn, relu and the residual adds stream every tensor
from DRAM, and grouped convs over many groups lose locality. Measured (2-core EPYC, 32 MB L3, glibc
malloc tuned by hostmem.py, ResNet-8, batch 32, forward+backward): at n=16 (largest batched tensor
32 MB) one batch 205 ms, 4 chunks of 4 205 ms: no gain; at n=64 (128 MB) one batch 1253 ms, 4 chunks
of 16 891 ms, 8 of 8 916 ms, 64 models one after another 1084 ms. Nets heavy in elementwise ops and
norms go the other way (n=16, 64 MB; stop 14): a squeeze-excitation CNN whole 192 ms, 2 chunks of 8
186 ms, 16 chunks of 1 148 ms (sequential ~190 ms); a style-transfer net whole 293, chunks of 1 243.

The same holds at small n: at n=4 (largest activation 12-18 MB, under the 64 MB this chooser once
required) the squeeze-excitation net ran 0.96x sequential whole and 1.16x in chunks of one model, the
style-transfer net 0.73x and 0.96x (2-core EPYC, 2 threads, stop 15); MIN_BYTES is now 8 MB.

So when a CPU program's largest batched activation is at least MIN_BYTES, its first eager call with
gradients times the whole program against chunks whose largest activation is about TARGET_BYTES and
about SMALL_BYTES (forward+backward on the call's own inputs, detached; the user's .grad and random
streams untouched; a warm-up run first, then a timed one) and keeps the fastest. Where that small size is
one model, chunks of one model with the default lowerings (each model's own ops in its own layout) are
timed as well: per-op timing cannot see the layout copies between ops (a style-transfer net at n=16,
1 thread: its measured channels-last program in chunks of 1 477 ms, the same with default lowerings
383 ms, sequential training 447 ms a step). A chunked program is
one traced graph: inputs split along the model dim, the batched graph once per chunk (n=k, with the
lowerings chosen for size k), outputs concatenated; the split's backward is one cat per parameter.
Model i computes what it computes in the whole program, and the sequential random streams (states[i])
are per model, so chunking changes no result beyond the floating-point summation order of the
lowerings chosen for size k.

``train_step`` compiles the chunked trace of such a program with the size this measured in eager mode
(``compiled_chunk``; timing compiled candidates would mean compiling each). Not chunked: ``compile=True`` and
``torch.compile(batched)`` (they use ``Program.gm``, the whole program),
programs with fallbacks, per-model constants (lists of n values baked into the graph), random ops
outside ``randomness="sequential"``, and other devices. ``MBCOMPILE_LOWERING=default`` never chunks;
``MBCOMPILE_LOWERING=program=chunks4`` forces chunks of 4 (where chunking is allowed), ``program=whole``
never chunks.
"""
from __future__ import annotations

import math
import time

import torch

from . import lowering, ops

MIN_BYTES = 8 << 20        # consider chunking when the largest batched activation is at least this big
TARGET_BYTES = 32 << 20    # the chunk sizes timed: their largest activation about this big (a grouped
SMALL_BYTES = 4 << 20      # conv still has several models), and about this (one model's tensors stay
                           # in cache between ops; elementwise- and norm-heavy nets)
WARMUP_ONLY_S = 30.0       # warm-ups that took longer than this decide alone (no timed round after)


def chunk_sizes(n, k):
    """[k, k, ..., rest]: n models in chunks of at most k."""
    return [k] * (n // k) + ([n % k] if n % k else [])


def largest_activation(gm):
    """Bytes of the largest tensor the traced program computes (from make_fx's fake values)."""
    best = 0
    for nd in gm.graph.nodes:
        v = nd.meta.get("val")
        vals = v if isinstance(v, (list, tuple)) else [v]
        for t in vals:
            if isinstance(t, torch.Tensor):
                best = max(best, t.numel() * t.element_size())
    return best


def candidate(n, biggest, target=TARGET_BYTES):
    """A chunk size to time: its largest activation nearest ``target``, preferring divisors of n
    (all chunks then share one program shape); an uneven last chunk when no divisor is near."""
    want = max(1.0, n * target / biggest)
    divs = [d for d in range(1, n // 2 + 1) if n % d == 0]
    k0 = min(divs, key=lambda d: abs(math.log(d / want)))
    if abs(math.log(k0 / want)) > math.log(2) and round(want) <= n // 2:
        k0 = int(round(want))
    return k0


def allowed(prog, device, n, consts, randomness):
    """Whether this program may run in chunks: CPU, n >= 2, no fallbacks, no per-model constants
    (lists of n values baked into the graph), random ops only with per-model sequential streams."""
    return (n >= 2 and device.type == "cpu" and not any(r.how.startswith("FALLBACK") for r in prog.records)
            and not consts and (randomness == "sequential" or not _has_random(prog.gm)))


def _plan(n):
    """What MBCOMPILE_LOWERING / lowering.force say: ("whole", None), ("forced", k) or ("measure", None)."""
    setting = lowering._setting("program")
    if setting.startswith("chunks") and setting[6:].isdigit():
        k = int(setting[6:])
        return ("forced", k) if k < n else ("whole", None)
    return ("whole", None) if setting in ("default", "whole") else ("measure", None)


COMPILED_MARGIN = 1.15   # chunks for a compiled program only when they beat whole by this much in eager


def compiled_chunk(prog, n, vals=None):
    """The chunk size ``train_step`` compiles a big CPU program with, or None (whole): what the eager
    chooser measured (timing its candidates now, on ``vals``, if it has not run yet: compiling each
    candidate would cost far more). PLAIN (chunks of 1, default lowerings) when that won. MLP 784 at
    n=16 (its 12 MB fc1 weight over MIN_BYTES): the eager chooser picked whole (8.4 against 9.6 ms) and
    the compiled step agrees (10.1 against 10.8 ms in chunks of 8, which this chose blind before).
    Eager timings within COMPILED_MARGIN of whole (3.47 against 3.31 ms, chunks won another time by
    noise) give whole: chunks cost a compiled program fusion and copies (9.2 whole, 10.3-10.8 ms)."""
    how, k = _plan(n)
    if prog.chunked is None or how == "whole":
        return None
    if how == "forced":
        return k
    if prog.chunk is None and isinstance(prog.call, Chooser) and vals is not None:
        prog.call = prog.call._decide(vals, backward=True)
    if prog.chunk is None:                       # not measured (eval-mode program): the size it would time
        biggest = largest_activation(prog.gm)
        return candidate(n, biggest) if biggest >= MIN_BYTES else None
    if prog.chunk == n or prog.chunk_gain < COMPILED_MARGIN:
        return None                              # a close eager call: whole, which Inductor fuses across
    return prog.chunk


def _has_random(gm):
    def random(nd):
        return torch.Tag.nondeterministic_seeded in getattr(nd.target, "tags", ()) or "draw" in str(nd.target)
    return any(nd.op == "call_function" and random(nd) for nd in gm.graph.nodes)


class Chooser:
    """``Program.call`` until the first eager call with gradients (or in eval mode) has measured."""

    def __init__(self, prog, n, training):
        self.prog, self.n, self.training = prog, n, training

    def __call__(self, *vals):
        grad = torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad for v in vals)
        if self.training and not grad:                 # measure where backward runs: not yet
            return self.prog.eager(*vals)
        self.prog.call = self._decide(vals, backward=grad)
        return self.prog.call(*vals)

    def _decide(self, vals, backward):
        prog, n = self.prog, self.n
        gm = prog.eager
        how, forced = _plan(n)
        biggest = largest_activation(prog.gm)
        if how == "whole" or (forced is None and biggest < MIN_BYTES):
            prog.chunk = n
            return gm
        t0 = time.perf_counter()
        ks = [forced] if forced else sorted({candidate(n, biggest), candidate(n, biggest, SMALL_BYTES)})
        recs = {k: [] for k in ks}
        progs = {n: gm, **{k: ops.eager_module(traced(prog, n, k, vals, recs[k])) for k in ks}}
        if 1 in ks and not forced:
            # one model at a time with the default lowerings: at n=1 those are the model's own ops in
            # its own layout. Each op's measured lowering can still lose there, by the layout copies
            # between ops that no single op's timing sees (a channels-last conv chain through
            # instance norms: 4 transposing copies of ~1 ms a model), so this, each model's own
            # program, is timed too: the chunked program is then never slower than running the
            # models one after another (up to timing noise)
            recs[PLAIN] = []
            progs[PLAIN] = ops.eager_module(traced(prog, n, PLAIN, vals, recs[PLAIN]))
        if forced:
            best, why = forced, "forced by MBCOMPILE_LOWERING / lowering.force"
        else:
            timings = _measure(progs, vals, backward)
            best = min(timings, key=timings.get)
            prog.chunk_gain = timings[n] / max(timings[best], 1e-12)
            what = "fwd+bwd" if backward else "fwd"
            why = f"measured {what} on cpu: " + ", ".join(
                f"{_label(n, k)} {timings[k] * 1e3:.3g} ms" for k in sorted(timings, key=timings.get))
        prog.times["chunk_s"] = time.perf_counter() - t0
        prog.notes.append(f"program: {_label(n, best)} ({why}; largest batched activation "
                          f"{biggest / 2**20:.1f} MB)")
        if best != n:
            prog.records[:] = recs[best]                 # explain() shows the ops of one chunk
        prog.chunk = best
        return progs[best]


PLAIN = 0    # the key of "chunks of one model, default lowerings" among the timed programs


def traced(prog, n, k, vals, recs):
    """The program over chunks of k models (PLAIN: of one model, with the default lowerings)."""
    if k == PLAIN:
        with lowering.force("default"):
            return prog.chunked(chunk_sizes(n, 1), vals, recs)
    return prog.chunked(chunk_sizes(n, k), vals, recs)


def _label(n, k):
    if k == n:
        return "whole"
    if k == PLAIN:
        return f"{n} chunks of 1, default lowerings"
    sizes = chunk_sizes(n, k)
    return f"{len(sizes)} chunks of {k}" + (f" (last {sizes[-1]})" if sizes[-1] != k else "")


def _measure(progs, vals, backward, rounds=2):
    """Seconds per call (+ backward) of each program, best of interleaved rounds after a warm-up,
    on detached copies of the inputs (the user's .grad and random streams are not touched)."""
    def run(gm):
        xs = [v.detach().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v for v in vals]
        xs[-1] = xs[-1].clone()                        # the per-model random states, advanced in place
        with torch.enable_grad() if backward else torch.no_grad():
            t0 = time.perf_counter()
            outs = gm(*xs)
            if backward:
                loss = sum(o.float().sum() for o in outs if isinstance(o, torch.Tensor) and o.requires_grad)
                if isinstance(loss, torch.Tensor):
                    loss.backward()
            return time.perf_counter() - t0

    best = {k: run(gm) for k, gm in progs.items()}                  # warm-up
    total = sum(best.values())
    if total < WARMUP_ONLY_S:   # a first run is no measure (chunks of 1 model: 3.8 s, then 0.24 s a step)
        best = {k: float("inf") for k in progs}
        for _ in range(rounds if total < 1.0 else 1):
            for k, gm in progs.items():
                best[k] = min(best[k], run(gm))
    return best
