"""Reductions and scans: the model dim goes to the front and logical dims shift by one.

``defreduce(op, dim_at)`` makes an op whose ``args[dim_at]`` is a dim (int, list, or None = all)
batch in one line:  n,B,C  sum(dim=-1)  ->  n,B.
"""
from __future__ import annotations

import torch

from .axes import front
from .registry import aten, rule


def _pd(dim, rank):
    return (dim + rank if dim < 0 else dim) + 1


def defreduce(*ops, dim_at=1, multi=False, none_is_all=True):
    """Register the reduction rule; ``multi``: the op takes a list of dims."""
    def reduce_rule(ctx, args, dims, kwargs):
        x, d = args[0], dims[0]
        rank = x.dim() - 1
        x = front(x, d, ctx.n)
        args = list(args)
        dim = args[dim_at] if len(args) > dim_at else kwargs.get("dim")
        if rank == 0:                           # n  -> n,1 : a scalar reduces over a dim of size 1
            x = x.unsqueeze(1)
            out = _call(ctx, x, args, kwargs, dim_at, [1] if multi else 1, 1)
            return _map(out, lambda t: t.reshape(ctx.n)), _same(out, 0)
        if dim is None or (multi and len(dim) == 0):
            if not none_is_all:
                x = x.reshape(ctx.n, -1)        # n,... -> n,(...) for ops that flatten on dim=None
                out = _call(ctx, x, args, kwargs, dim_at, 0, 1)
                keep = _keepdim(args, kwargs, dim_at)
                return _map(out, lambda t: t.reshape((ctx.n,) + (1,) * rank if keep else (ctx.n,))), _same(out, 0)
            dim = list(range(rank))
        pdims = [_pd(k, rank) for k in dim] if isinstance(dim, (list, tuple)) else _pd(dim, rank)
        out = _call(ctx, x, args, kwargs, dim_at, pdims, None)
        return out, _same(out, 0)
    rule(*ops)(reduce_rule)


def _keepdim(args, kwargs, dim_at):
    return bool(args[dim_at + 1]) if len(args) > dim_at + 1 and isinstance(args[dim_at + 1], bool) \
        else bool(kwargs.get("keepdim", False))


def _call(ctx, x, args, kwargs, dim_at, dim, _):
    args = [x] + list(args[1:])
    if len(args) > dim_at:
        args[dim_at] = dim
    else:
        kwargs = {**kwargs, "dim": dim}
    return ctx.op(*args, **kwargs)


def _same(out, d):
    return tuple(d for _ in out) if isinstance(out, (tuple, list)) else d


def _map(out, f):
    return type(out)(f(t) for t in out) if isinstance(out, (tuple, list)) else f(out)


defreduce(aten.sum.dim_IntList, aten.mean.dim, aten.amax, aten.amin, aten.any.dims, aten.all.dims,
          aten.var.correction, aten.std.correction, aten.var_mean.correction, aten.std_mean.correction,
          aten.logsumexp, aten.nansum, aten.count_nonzero.dim_IntList,
          multi=True)
defreduce(aten.linalg_vector_norm.default, dim_at=2, multi=True)
defreduce(aten.prod.dim_int, aten.any.dim, aten.all.dim, aten.max.dim, aten.min.dim, aten._softmax,
          aten._log_softmax, aten.softmax.int, aten.log_softmax.int, aten.cumsum, aten.cumprod,
          aten.logcumsumexp, aten.cummax, aten.cummin, aten.sort.default,
          aten.median.dim, aten.mode, aten.nanmedian.dim,
          aten._softmax_backward_data, aten._log_softmax_backward_data)
defreduce(aten.argmax, aten.argmin, none_is_all=False)
defreduce(aten.topk, aten.kthvalue, dim_at=2)


@rule(aten.sum.default, aten.mean.default, aten.max.default, aten.min.default,
      aten.prod.default, aten.any.default, aten.all.default, aten.median.default, aten.nanmedian.default,
      aten.count_nonzero.default)
def full_reduce(ctx, args, dims, kwargs):
    """n,...  op()  ->  n : flatten each model's values and reduce over them."""
    x = front(args[0], dims[0], ctx.n).reshape(ctx.n, -1)
    packet = ctx.op.overloadpacket
    if packet in (aten.sum, aten.mean, aten.prod):
        dim_op = {aten.sum: aten.sum.dim_IntList, aten.mean: aten.mean.dim, aten.prod: aten.prod.dim_int}[packet]
        return dim_op(x, [1] if packet is not aten.prod else 1, False, **kwargs), 0
    if packet in (aten.max, aten.min, aten.median, aten.nanmedian):
        return getattr(aten, packet.__name__).dim(x, 1)[0], 0
    if packet is aten.count_nonzero:
        return aten.count_nonzero.dim_IntList(x, [1]), 0
    return getattr(aten, packet.__name__).dim(x, 1), 0
