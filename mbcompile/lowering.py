"""Choice between lowerings of heavy ops, per device, dtype, shape and n.

Conv: one grouped conv (groups = n*g) or a loop of n per-model convs. On CPU, oneDNN's grouped conv is
often several times slower than the same work as separate convs, so the choice is measured once per
signature on the real device and cached (``MBCOMPILE_LOWERING=grouped|loop`` forces one).
"""
from __future__ import annotations

import os
import time

import torch

_CACHE: dict = {}


def _time(fn, reps=3):
    fn()
    best = float("inf")
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def choose_conv(ctx, x, dx, w, stride, padding, dilation, transposed, groups):
    forced = os.environ.get("MBCOMPILE_LOWERING")
    if forced in ("grouped", "loop"):
        return forced
    n = ctx.n
    if n == 1:
        return "grouped"
    key = ("conv", x.device.type, x.dtype, tuple(x.shape), dx, tuple(w.shape), tuple(stride),
           tuple(padding), tuple(dilation), transposed, groups)
    if key in _CACHE:
        return _CACHE[key]
    if isinstance(x, torch._subclasses.FakeTensor) or _is_fake(x):
        choice = _measure(key, x, dx, w, stride, padding, dilation, transposed, groups, n)
    else:
        choice = _measure(key, x, dx, w, stride, padding, dilation, transposed, groups, n)
    _CACHE[key] = choice
    return choice


def _is_fake(t):
    return isinstance(t, torch._subclasses.FakeTensor) or type(t).__name__ in ("FunctionalTensor",)


def _measure(key, x, dx, w, stride, padding, dilation, transposed, groups, n):
    """Time forward+backward of both lowerings on real random tensors of the same shapes."""
    dev = x.device if x.device.type != "meta" else torch.device("cpu")
    with torch.utils._python_dispatch._disable_current_modes(), torch.enable_grad():
        xs = torch.randn(x.shape, dtype=x.dtype, device=dev)
        ws = torch.randn(w.shape, dtype=w.dtype, device=dev, requires_grad=True)
        if dx is not None:
            xs = xs.movedim(dx, 0)
        else:
            xs = xs.unsqueeze(0).expand(n, *xs.shape)
        xs = xs.contiguous().requires_grad_(True)

        def grouped():
            xf = xs.movedim(0, 1).flatten(1, 2)
            out = torch.ops.aten.convolution(xf, ws.flatten(0, 1), None, stride, padding, dilation,
                                             transposed, [0] * len(stride), n * groups)
            out.sum().backward()

        def loop():
            outs = [torch.ops.aten.convolution(xs[i], ws[i], None, stride, padding, dilation, transposed,
                                               [0] * len(stride), groups) for i in range(n)]
            torch.stack(outs, 1).sum().backward()

        tg, tl = _time(grouped), _time(loop)
    return "grouped" if tg <= tl else "loop"
