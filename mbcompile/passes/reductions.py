"""Reductions and scans: the model dim goes to the front and logical dims shift by one.

``defreduce(op, dim_at)`` makes an op whose ``args[dim_at]`` is a dim (int, list, or None = all)
batch in one line:  n,B,C  sum(dim=-1)  ->  n,B.
"""
from __future__ import annotations

import torch

from .. import ops  # noqa: F401 - mbcompile::relayout
from .axes import front, front_padded, memory_order
from .registry import aten, rule


def _pd(dim, rank):
    return (dim + rank if dim < 0 else dim) + 1


def defreduce(*ops, dim_at=1, multi=False, none_is="all"):
    """Register the reduction rule; ``multi``: the op takes a list of dims. ``none_is``: what an absent
    dim means: "all" (every dim), "flat" (reduce the flattened tensor: argmax) or an int (sort: -1)."""
    def reduce_rule(ctx, args, dims, kwargs):
        x, d = args[0], dims[0]
        if any(dd is not None for dd in dims[1:] if not isinstance(dd, (list, tuple))):
            raise NotImplementedError("a per-model tensor besides the input")
        n, rank = ctx.n, x.dim() - (d is not None)
        x = front(x, d, n)
        dim = args[dim_at] if len(args) > dim_at else kwargs.get("dim")
        if dim is None or (multi and len(dim) == 0 and none_is == "all"):
            dim = none_is if isinstance(none_is, int) else None
        if rank == 0 or (dim is None and none_is == "flat"):   # n -> n,1 / n,... -> n,(...)
            out = _call(ctx, x.reshape(n, -1), args, kwargs, dim_at, [1] if multi else 1)
            return _map(out, lambda t, v: t.reshape(n, *v.shape), ctx.val), _same(out, 0)
        if dim is None:
            dim = list(range(rank))
        pdims = [_pd(k, rank) for k in dim] if isinstance(dim, (list, tuple)) else _pd(dim, rank)
        out = _call(ctx, x, args, kwargs, dim_at, pdims)
        return out, _same(out, 0)
    rule(*ops)(reduce_rule)
    return reduce_rule


def mem_order(fn, x, dims, keepdim):
    """``fn(x, dims, keepdim)`` (a sum or mean) computed on x's memory-order view. Their backward
    expands the gradient and divides; for a channels-last x (B,H,W,(n*C) in memory) over the spatial
    dims that result came back NCHW, and every backward kernel after it (batch norm's 60x slower, relu's
    10x) then mixed layouts. On the memory-order view the gradient comes back in x's own layout."""
    perm = memory_order(x) if x.dim() >= 3 else None                          # outermost first
    if perm is None:
        return fn(x, dims, keepdim)
    at = {k: i for i, k in enumerate(perm)}
    out = fn(x.permute(perm), [at[k % x.dim()] for k in dims], True)            # memory order, kept dims
    out = out.permute([at[k] for k in range(x.dim())])                          # back to x's dim order
    out = out if keepdim else out.squeeze([k % x.dim() for k in dims])
    # a strided result: a contiguous copy whose gradient comes back in these strides (x's order), else
    # the expand in the backward would follow the order of whatever gradient arrives
    return out if out.is_contiguous() else torch.ops.mbcompile.relayout(out, False)


def _mem_order_rule(ctx, args, dims, kwargs):
    """sum/mean over dims: as defreduce, on the memory-order view (see mem_order)."""
    x, d = args[0], dims[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    rest = dict(kwargs)
    keepdim = args[2] if len(args) > 2 else rest.pop("keepdim", False)
    rest.pop("dim", None)
    if dim is None or len(dim) == 0 or len(args) > 3 or rest or any(
            dd is not None for dd in dims[1:] if not isinstance(dd, (list, tuple))):
        return _REDUCE(ctx, args, dims, kwargs)
    n, rank = ctx.n, x.dim() - (d is not None)
    x = front(x, d, n)
    out = mem_order(lambda t, ds, k: ctx.op(t, ds, k), x, [_pd(k, rank) for k in dim], keepdim)
    return out, 0


def _call(ctx, x, args, kwargs, dim_at, dim):
    args = [x] + list(args[1:])
    if len(args) > dim_at:
        args[dim_at] = dim
    else:
        kwargs = {**kwargs, "dim": dim}
    return ctx.op(*args, **kwargs)


def _same(out, d):
    return tuple(d for _ in out) if isinstance(out, (tuple, list)) else d


def _map(out, f, val):
    """Apply f(batched, unbatched example) to each output."""
    if isinstance(out, (tuple, list)):
        return type(out)(f(t, v) for t, v in zip(out, val))
    return f(out, val)


_REDUCE = defreduce(aten.sum.dim_IntList, aten.mean.dim)
rule(aten.sum.dim_IntList, aten.mean.dim)(_mem_order_rule)
defreduce(aten.amax, aten.amin, aten.any.dims, aten.all.dims,
          aten.var.correction, aten.std.correction, aten.var_mean.correction, aten.std_mean.correction,
          aten.logsumexp, aten.nansum, aten.count_nonzero.dim_IntList,
          multi=True)
defreduce(aten.linalg_vector_norm.default, dim_at=2, multi=True)
defreduce(aten.prod.dim_int, aten.any.dim, aten.all.dim, aten.max.dim, aten.min.dim, aten._softmax,
          aten._log_softmax, aten.softmax.int, aten.log_softmax.int, aten._safe_softmax, aten.cumsum, aten.cumprod,
          aten.logcumsumexp, aten.cummax, aten.cummin, aten.median.dim, aten.nanmedian.dim)
defreduce(aten.sort.default, aten.sort.stable, aten.mode, aten.argsort, none_is=-1)
defreduce(aten.argmax, aten.argmin, none_is="flat")
defreduce(aten.topk, aten.kthvalue, dim_at=2, none_is=-1)


@rule(aten._softmax_backward_data, aten._log_softmax_backward_data)
def softmax_backward(ctx, args, dims, kwargs):
    """n,..  (grad, out, dim)  ->  n,.. ; shared operands expanded."""
    g, out, dim = args[:3]
    rank = g.dim() - (dims[0] is not None)
    g, out = front(g, dims[0], ctx.n), front(out, dims[1], ctx.n)
    if rank == 0:                                     # n -> n,1
        return ctx.op(g.unsqueeze(1), out.unsqueeze(1), 1, *args[3:], **kwargs).squeeze(1), 0
    return ctx.op(g, out, _pd(dim, rank), *args[3:], **kwargs), 0


def _evenly(val, x):
    """n values picked from n,K (max/min/median .dim's, whose gradient goes to one index) with the gradient
    of the whole-tensor op, torch's evenly_distribute_backward: spread over every element equal to the
    value (every NaN when it is NaN). The value stays val bit for bit (g - g is 0); where g is not finite
    (tied infinities, NaNs) the .dim op's single-index gradient is kept."""
    if not x.is_floating_point():
        return val
    m = torch.where(val.isnan().unsqueeze(1), x.isnan(), x == val.unsqueeze(1))      # n,K ties (no grad)
    g = torch.where(m, x, 0).sum(1) / m.sum(1).to(x.dtype)                         # n, its grad m / count
    return torch.where(g.isfinite(), val.detach() + (g - g.detach()), val)


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
        return _evenly(getattr(aten, packet.__name__).dim(x, 1)[0], x), 0
    if packet is aten.count_nonzero:
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if dim is not None:                           # count_nonzero(x, dim): one dim, not all
            rank = args[0].dim() - (dims[0] is not None)
            return aten.count_nonzero.default(front(args[0], dims[0], ctx.n), _pd(dim, rank)), 0
        return aten.count_nonzero.dim_IntList(x, [1]), 0
    return getattr(aten, packet.__name__).dim(x, 1), 0


@rule(aten.dist.default)
def dist(ctx, args, dims, kwargs):
    """||a - b||_p per model:  n,.. - .. -> n,(..) -> vector_norm over dim 1 -> n."""
    a, b = args[:2]
    p = args[2] if len(args) > 2 else kwargs.get("p", 2)
    rank = max(a.dim() - (dims[0] is not None), b.dim() - (dims[1] is not None))
    diff = front_padded(a, dims[0], rank, ctx.n) - front_padded(b, dims[1], rank, ctx.n)
    return torch.linalg.vector_norm(diff.reshape(ctx.n, -1), p, dim=1), 0


@rule(aten._fft_r2c.default, aten._fft_c2c.default, aten._fft_c2r.default)
def fft(ctx, args, dims, kwargs):
    """Transforms over the listed dims: n in front, dims shifted by one.  n,B,T fft(dim=[-1]) -> n,B,F."""
    x, d = args[0], dims[0]
    rank = x.dim() - (d is not None)
    return ctx.op(front(x, d, ctx.n), [_pd(k, rank) for k in args[1]], *args[2:], **kwargs), 0
