"""Normalisation layers.

batch norm: models fold into channels, so per-model batch statistics and running stats come out of
            one call:  n,B,C,H,W -> B,(n*C),H,W ; weight/running stats n,C -> (n*C)
layer norm: normalise without affine over the trailing dims, then per-model affine (n,1..,*shape).
group norm: models fold into channels with n*G groups:  n,B,C,.. -> B,(n*C),.. , affine (n*C).
"""
from __future__ import annotations

import torch

from .. import lowering, ops  # noqa: F401 - mbcompile::relayout
from .axes import fold, front, front_padded, unfold
from .registry import aten, rule

mb = torch.ops.mbcompile


def _flat(t, d, n):
    return None if t is None else front(t, d, n).reshape(-1)


def _nc(t, n):
    return t.view(n, -1)


@rule(aten._native_batch_norm_legit_functional.default)
def batch_norm_functional(ctx, args, dims, kwargs):
    x, w, b, rm, rv, training, momentum, eps = args
    n = ctx.n
    xf = fold(x, dims[0], 1, n)                                      # B,(n*C),...
    out, sm, sr, nrm, nrv = aten._native_batch_norm_legit_functional(
        xf, _flat(w, dims[1], n), _flat(b, dims[2], n), _flat(rm, dims[3], n), _flat(rv, dims[4], n),
        training, momentum, eps)
    o, d = unfold(out, 1, n)
    return (o, _nc(sm, n), _nc(sr, n), _nc(nrm, n), _nc(nrv, n)), (d, 0, 0, 0, 0)


@rule(aten._native_batch_norm_legit_no_training.default)
def batch_norm_eval(ctx, args, dims, kwargs):
    x, w, b, rm, rv, momentum, eps = args
    n = ctx.n
    xf = fold(x, dims[0], 1, n)
    out, sm, sr = aten._native_batch_norm_legit_no_training(
        xf, _flat(w, dims[1], n), _flat(b, dims[2], n), _flat(rm, dims[3], n), _flat(rv, dims[4], n),
        momentum, eps)
    o, d = unfold(out, 1, n)
    return (o, sm, sr), (d, None, None)


@rule(aten._native_batch_norm_legit.no_stats)
def batch_norm_no_stats(ctx, args, dims, kwargs):
    x, w, b, training, momentum, eps = args
    n = ctx.n
    xf = fold(x, dims[0], 1, n)
    out, sm, sr = aten._native_batch_norm_legit.no_stats(xf, _flat(w, dims[1], n), _flat(b, dims[2], n),
                                                         training, momentum, eps)
    o, d = unfold(out, 1, n)
    return (o, _nc(sm, n), _nc(sr, n)), (d, 0, 0)


@rule(aten.layer_norm.default)
def layer_norm(ctx, args, dims, kwargs):
    x, shape = args[0], list(args[1])
    w = args[2] if len(args) > 2 else None
    b = args[3] if len(args) > 3 else None
    eps = args[4] if len(args) > 4 else 1e-5
    dx, dw = dims[0], dims[2] if len(dims) > 2 else None
    db = dims[3] if len(dims) > 3 else None
    n, k = ctx.n, len(shape)
    rank = x.dim() - (dx is not None)
    if dw is None and db is None:
        if dx is not None and dx >= x.dim() - k:
            x, dx = front(x, dx, n), 0
        ctx.note("shared affine")
        return aten.layer_norm(x, shape, w, b, eps), dx
    x = front(x, dx, n)                                               # n,B..,*shape
    y = aten.layer_norm(x, shape, None, None, eps)
    if w is not None:
        y = y * front_padded(w, dw, rank, n)
    if b is not None:
        y = y + front_padded(b, db, rank, n)
    ctx.note("normalise, then per-model affine")
    return y, 0


@rule(aten.native_layer_norm.default)
def native_layer_norm(ctx, args, dims, kwargs):
    x, shape, w, b, eps = args
    dx = dims[0]
    n = ctx.n
    x = front(x, dx, n)
    y, mean, rstd = aten.native_layer_norm(x, shape, None, None, eps)
    rank = x.dim() - 1
    if w is not None:
        y = y * front_padded(w, dims[2], rank, n)
    if b is not None:
        y = y + front_padded(b, dims[3], rank, n)
    return (y, mean, rstd), (0, 0, 0)


@rule(aten.group_norm.default)
def group_norm(ctx, args, dims, kwargs):
    """Groups are runs of channels, so models fold into channels with n*G groups, the affine included:
    one kernel, and the B,(n*C),H,W layout (channels-last in a conv chain) carries on."""
    x, groups = args[0], args[1]
    w = args[2] if len(args) > 2 else None
    b = args[3] if len(args) > 3 else None
    eps = args[4] if len(args) > 4 else 1e-5
    n = ctx.n
    xf = fold(x, dims[0], 1, n)                                                  # B,(n*C),..
    wf, bf = _flat(w, dims[2] if len(dims) > 2 else None, n), _flat(b, dims[3] if len(dims) > 3 else None, n)
    cands = {"as_is": lambda xf, wf, bf: aten.group_norm(xf, n * groups, wf, bf, eps)}
    if xf.device.type == "cpu" and xf.dim() > 2 and not xf.is_contiguous():
        # ATen's CPU group norm is slower channels-last (64 MB fwd+bwd: 78 against 46 ms): measured
        cands["nchw"] = lambda xf, wf, bf: aten.group_norm(mb.relayout(xf, False), n * groups, wf, bf, eps)
    choice = lowering.choose("group_norm", cands, (xf, wf, bf), n, grad=(lowering.input_needs_grad(ctx), True, True))
    ctx.note(choice.note("group_norm"))
    return unfold(cands[choice.name](xf, wf, bf), 1, n)


@rule(aten._batch_norm_with_update_functional.default)
def batch_norm_with_update(ctx, args, dims, kwargs):
    """As _native_batch_norm_legit_functional: models fold into channels.  B,(n*C),.. ; stats n,C."""
    x, w, b, rm, rv, momentum, eps = args
    n = ctx.n
    out, sm, sr, reserve, nrm, nrv = aten._batch_norm_with_update_functional(
        fold(x, dims[0], 1, n), _flat(w, dims[1], n), _flat(b, dims[2], n), _flat(rm, dims[3], n),
        _flat(rv, dims[4], n), momentum, eps)
    o, d = unfold(out, 1, n)
    return (o, _nc(sm, n), _nc(sr, n), reserve, _nc(nrm, n), _nc(nrv, n)), (d, 0, 0, None, 0, 0)


@rule(aten.native_group_norm.default)
def native_group_norm(ctx, args, dims, kwargs):
    """As group_norm: B,(n*C),.. with n*G groups; mean/rstd B,(n*G) -> B,n,G."""
    x, w, b, N, C, HxW, groups, eps = args
    n = ctx.n
    y, mean, rstd = aten.native_group_norm(fold(x, dims[0], 1, n), _flat(w, dims[1], n), _flat(b, dims[2], n),
                                           N, n * C, HxW, n * groups, eps)
    return (unfold(y, 1, n)[0], mean.unflatten(1, (n, groups)), rstd.unflatten(1, (n, groups))), (1, 1, 1)
