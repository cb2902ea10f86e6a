"""Convolutions (1-3d, transposed, grouped).

shared input:    B,C,H,W  *  n,O,C,k,k      -> conv with weights (n*O),C,k,k        -> B,(n*O),H,W
per-model input: B,(n*C),H,W * (n*O),C/g,k,k -> grouped conv, groups = n*g          -> B,(n*O),H,W
The output keeps the model dim folded into channels' neighbourhood: B,n,O,H,W (a free view).
Lowering choice (grouped conv vs a loop of per-model convs) lives in lowering.py.
"""
from __future__ import annotations

import torch

from .axes import fold, front
from .registry import aten, rule
from .. import lowering


@rule(aten.convolution.default)
def convolution(ctx, args, dims, kwargs):
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = args
    dx, dw, db = dims[:3]
    n = ctx.n
    unbatched_x = x.dim() - (dx is not None) == w.dim() - (dw is not None) - 1
    if unbatched_x:                                      # C,H,W input: add a batch dim of 1
        x = x.unsqueeze(0 if dx is None else 0)
        dx = None if dx is None else dx + 1
        out, d = convolution(ctx, (x, w, b, stride, padding, dilation, transposed, output_padding, groups),
                             (dx, dw, db), kwargs)
        return out.select(0 if d != 0 else 1, 0), (d - 1 if d != 0 else 0)
    if dw is None and db is None:                        # shared weights: fold n into the batch dim
        x = front(x, dx, n).flatten(0, 1)
        out = aten.convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups)
        ctx.note("shared weights: models folded into the batch")
        return out.unflatten(0, (n, -1)), 0
    w = front(w, dw, n)                                  # n,O,C/g,k..  (transposed: n,C,O/g,k..)
    bias = None if b is None else front(b, db, n)
    choice = lowering.choose_conv(ctx, x, dx, w, stride, padding, dilation, transposed, groups)
    if choice == "loop":
        ctx.note("per-model conv loop (measured faster than one grouped conv here)")
        xs = front(x, dx, n)
        outs = [aten.convolution(xs[i], w[i], None if bias is None else bias[i], stride, padding, dilation,
                                 transposed, output_padding, groups) for i in range(n)]
        return torch.stack(outs, 1), 1
    if dx is None and groups == 1 and not transposed:
        ctx.note("shared input: one conv on concatenated weights")
        out = aten.convolution(x, w.flatten(0, 1), None if bias is None else bias.flatten(),
                               stride, padding, dilation, False, output_padding, 1)
        return out.unflatten(1, (n, -1)), 1
    ctx.note(f"grouped conv, groups={n}*{groups}")
    xf = fold(x, dx, 1, n)                               # B,(n*C),H,W
    out = aten.convolution(xf, w.flatten(0, 1), None if bias is None else bias.flatten(),
                           stride, padding, dilation, transposed, output_padding, n * groups)
    return out.unflatten(1, (n, -1)), 1
