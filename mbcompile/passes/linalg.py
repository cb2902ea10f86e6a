"""Linear layers and matrix products.

linear, shared input:     B,I  x  n,O,I        -> one matmul on the concatenated weights -> B,n,O
linear, per-model input:  n,B,I  x  n,O,I      -> baddbmm                                -> n,B,O
"""
from __future__ import annotations

import torch

from .axes import front, front_padded
from .registry import aten, rule


@rule(aten.linear.default)
def linear(ctx, args, dims, kwargs):
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else kwargs.get("bias")
    dx, dw = dims[0], dims[1]
    db = dims[2] if len(dims) > 2 else None
    n = ctx.n
    if dw is None and db is None:                      # shared weights: model dim is a batch dim
        if dx is not None and dx == x.dim() - 1:
            x = x.movedim(dx, 0)
            dx = 0
        ctx.note("shared weights")
        return aten.linear(x, w, b), dx
    w = front(w, dw, n)                                # n,O,I
    o, i = w.shape[1], w.shape[2]
    if dx is None:                                     # B..,I @ (n*O),I^T -> B..,n,O
        ctx.note("shared input: one matmul on concatenated weights")
        bias = None if b is None else front(b, db, n).reshape(n * o)
        out = aten.linear(x, w.reshape(n * o, i), bias)
        return out.unflatten(-1, (n, o)), x.dim() - 1
    ctx.note("per-model input: baddbmm")
    x = front(x, dx, n)                                # n,B..,I
    lead = x.shape[1:-1]
    x3 = x.reshape(n, -1, i)
    wt = w.transpose(1, 2)                             # n,I,O
    if b is None:
        out = torch.bmm(x3, wt)
    else:
        out = torch.baddbmm(front(b, db, n).unsqueeze(1), x3, wt)
    return out.reshape(n, *lead, o), 0


def _mat(ctx, a, da, b, db):
    """Batched matrix product of two values whose unbatched ranks are the op's own."""
    n = ctx.n
    ra, rb = a.dim() - (da is not None), b.dim() - (db is not None)
    if db is None:                                      # n,..,M,K @ K,N
        return torch.matmul(front(a, da, n), b), 0
    if da is None and ra >= 2:                          # M,K @ n,..,K,N
        return torch.matmul(a, front(b, db, n)), 0
    return torch.matmul(front_padded(a, da, max(ra, rb), n), front_padded(b, db, max(ra, rb), n)), 0


@rule(aten.mm.default, aten.bmm.default, aten.matmul.default, aten.mv.default, aten.dot.default)
def mm(ctx, args, dims, kwargs):
    """n,M,K @ n,K,N -> n,M,N  (bmm: n,B,M,K @ n,B,K,N)."""
    a, b = args[0], args[1]
    da, db = dims[0], dims[1]
    if ctx.op in (aten.mv.default, aten.dot.default):
        out, d = _mat(ctx, a, da, b.unsqueeze(-1) if db is None else front(b, db, ctx.n).unsqueeze(-1), db)
        return out.squeeze(-1), d
    return _mat(ctx, a, da, b, db)


@rule(aten.addmm.default, aten.baddbmm.default, aten.addmv.default)
def addmm(ctx, args, dims, kwargs):
    """beta*c + alpha*(a@b), with the product batched as in mm."""
    c, a, b = args[:3]
    dc, da, db = dims[:3]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    mmop = {aten.addmm.default: aten.mm.default, aten.baddbmm.default: aten.bmm.default,
            aten.addmv.default: aten.mv.default}[ctx.op]
    ctx2 = type(ctx)(n=ctx.n, op=mmop)
    p, _ = mm(ctx2, (a, b), (da, db), {})
    if alpha != 1:
        p = p * alpha
    rank = p.dim() - 1
    c = front_padded(c, dc, rank, ctx.n)
    if beta != 1:
        c = c * beta
    return (p + c) if beta != 0 else p, 0


@rule(aten.bilinear.default)
def bilinear(ctx, args, dims, kwargs):
    """n,B,I x n,O,I,J x n,B,J -> n,B,O  (one einsum; shared inputs are expanded views)."""
    x1, x2, w = args[:3]
    b = args[3] if len(args) > 3 else None
    n = ctx.n
    rank = max(x1.dim() - (dims[0] is not None), x2.dim() - (dims[1] is not None))
    a1, a2 = front_padded(x1, dims[0], rank, n), front_padded(x2, dims[1], rank, n)
    a1 = a1 if dims[0] is not None else a1.unsqueeze(0)
    a2 = a2 if dims[1] is not None else a2.unsqueeze(0)
    out = torch.einsum("n...i,noij,n...j->n...o", a1.expand(n, *a1.shape[1:]), front(w, dims[2], n),
                       a2.expand(n, *a2.shape[1:]))
    if b is not None:
        out = out + front_padded(b, dims[3], rank, n)
    return out, 0
