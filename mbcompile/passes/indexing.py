"""Gather/scatter-style indexing. Indices may be shared or per model.

Per-model advanced indices get ``arange(n)`` as one more index in front, so each model picks from
its own slice:  x: n,A,C  [ar(n,1), i(n,I)]  ->  n,I,C.
"""
from __future__ import annotations

import torch

from ..errors import CaptureError, source_line
from .axes import front, front_padded, pdim
from .registry import aten, rule


def _rank(x, d):
    return x.dim() - (d is not None)


def _target(x, d, n):
    """The tensor an out-of-place scatter writes into, n,...: a shared one is materialised (eager
    copies it anyway; Inductor would write every model's values into the one expanded buffer)."""
    return front(x, d, n).contiguous() if d is None else front(x, d, n)


@rule(aten.index_select.default)
def index_select(ctx, args, dims, kwargs):
    x, dim, idx = args
    dx, _, di = dims
    n = ctx.n
    if _rank(x, dx) == 0:                            # a scalar indexes as a 1-element vector
        out, _ = index_select(ctx, (front(x, dx, n).unsqueeze(1), 0, idx), (0, None, di), kwargs)
        return out.reshape(n, *ctx.val.shape), 0
    r = _rank(x, dx)
    if di is None:                                   # n,A,C  index_select(0, shared i) -> n,I,C
        return x.index_select(pdim(dim, r, dx), idx), dx
    return gather_like(ctx, x, dx, dim, idx, di)


def gather_like(ctx, x, dx, dim, idx, di):
    """Per-model indices: flatten models into the indexed dim with offsets. n,A,C + n,I -> n,I,C."""
    n = ctx.n
    r = _rank(x, dx)
    x = front(x, dx, n)
    dim = dim + r if dim < 0 else dim
    idx = front(idx, di, n).reshape(n, -1)           # n,I (a 0-d index is one element)
    xm = x.movedim(dim + 1, 1)                       # n,A,...
    a = xm.shape[1]
    flat = xm.flatten(0, 1)                          # (n*A),...
    off = torch.arange(n, device=idx.device).view(n, 1) * a
    out = flat.index_select(0, (idx + off).reshape(-1))  # (n*I),...
    out = out.unflatten(0, (n, idx.shape[1])).movedim(1, dim + 1)
    return out, 0


@rule(aten.gather.default)
def gather(ctx, args, dims, kwargs):
    """n,A,B gather(dim, n,I,B) -> n,I,B (shared parts expanded)."""
    x, dim, idx = args[:3]
    dx, _, di = dims[:3]
    r = max(_rank(x, dx), 1)
    return torch.gather(front(x, dx, ctx.n), pdim(dim, r, 0), front(idx, di, ctx.n), *args[3:], **kwargs), 0


@rule(aten.scatter.src, aten.scatter.value, aten.scatter_add.default, aten.scatter.reduce,
      aten.scatter.value_reduce, aten.scatter_reduce.two)
def scatter(ctx, args, dims, kwargs):
    x, dim = args[0], args[1]
    r = max(_rank(x, dims[0]), 1)
    args = [_target(x, dims[0], ctx.n), pdim(dim, r, 0)] + [
        front(a, dd, ctx.n) if isinstance(a, torch.Tensor) else a for a, dd in zip(args[2:], dims[2:])]
    return ctx.op(*args, **kwargs), 0


def _advanced(indices, idims, n):
    """Indices for n models with arange(n) in front. Returns (full, bshape, p, moved): bshape is the
    unbatched broadcast index shape, p the first indexed dim, ``moved`` when the unbatched result
    keeps the index dims at p but the batched call puts them first (x[:, i] with per-model i)."""
    ts = [(t, d) for t, d in zip(indices, idims) if t is not None]
    if any(t.dtype in (torch.bool, torch.uint8) for t, _ in ts):
        raise NotImplementedError("boolean mask indices")
    bshape = torch.broadcast_shapes(*[tuple(s for j, s in enumerate(t.shape) if j != d) for t, d in ts])
    rank = len(bshape)
    full = [torch.arange(n, device=ts[0][0].device).view(n, *([1] * rank))]
    full += [None if t is None else front_padded(t, d, rank, n) for t, d in zip(indices, idims)]
    pos = [k for k, t in enumerate(indices) if t is not None]
    p = pos[0]
    return full, bshape, p, pos == list(range(p, pos[-1] + 1)) and p > 0


@rule(aten.index.Tensor)
def index(ctx, args, dims, kwargs):
    """x[i0, :, i2]: shared indices index every model alike (n goes first as a full slice); per-model
    indices get an arange(n) index in front so each model picks from its own slice."""
    x, indices = args
    dx, di = dims
    n = ctx.n
    x = front(x, dx, n)
    if all(dd is None for dd in di):
        out = aten.index.Tensor(x, [None] + list(indices))
        # advanced indices that are not adjacent move to the front, ahead of n
        pos = [k for k, t in enumerate(indices) if t is not None]
        adjacent = pos == list(range(pos[0], pos[-1] + 1)) if pos else True
        if adjacent:
            return out, 0
        bshape = torch.broadcast_shapes(*[t.shape for t in indices if t is not None])
        return out, len(bshape)
    full, bshape, p, moved = _advanced(indices, di, n)
    out = aten.index.Tensor(x, full)                 # n,*b,(slices)
    if moved:                                        # n,*b,pre,..  ->  n,pre,*b,..
        lb = len(bshape)
        out = out.movedim(tuple(range(1, 1 + lb)), tuple(range(1 + p, 1 + p + lb)))
    return out, 0


@rule(aten.index_put.default)
def index_put(ctx, args, dims, kwargs):
    """x[indices] = values for each model: arange(n) in front of the indices (shared ones broadcast);
    values are laid out like the batched x[full] (n,*b,..)."""
    x, indices, values = args[:3]
    dx, di, dv = dims[:3]
    n = ctx.n
    x = _target(x, dx, n)
    shape = x.shape[1:]
    if len(indices) == 1 and indices[0] is not None and indices[0].dtype == torch.bool:
        return _mask_put(ctx, x, indices[0], di[0], values, dv, *args[3:]), 0
    full, bshape, p, moved = _advanced(indices, di, n)
    k = len(indices)
    pos = [j for j, t in enumerate(indices) if t is not None]
    if pos == list(range(pos[0], pos[-1] + 1)):      # adjacent: index dims replace the indexed ones
        res = tuple(shape[:p]) + tuple(bshape) + tuple(shape[pos[-1] + 1:])
    else:                                            # index dims first, then every sliced dim
        res = tuple(bshape) + tuple(s for j, s in enumerate(shape) if j >= k or indices[j] is None)
    v = front_padded(values, dv, len(res), n) if dv is not None else values
    v = v.expand(n, *res)                            # n,*res
    if moved:                                        # n,pre,*b,..  ->  n,*b,pre,..
        lb = len(bshape)
        v = v.movedim(tuple(range(1 + p, 1 + p + lb)), tuple(range(1, 1 + lb)))
    return aten.index_put.default(x, full, v, *args[3:], **kwargs), 0


@rule(aten.masked_scatter.default)
def masked_scatter(ctx, args, dims, kwargs):
    """Each model reads its own source from the start: position = cumsum(mask) - 1 within the model.
    x: n,..  mask: n,..  source: n,S  ->  where(mask, source[pos], x)."""
    x, mask, src = args
    n, shape = ctx.n, tuple(ctx.val.shape)
    rank = len(shape)
    x = front_padded(x, dims[0], rank, n).expand(n, *shape).reshape(n, -1)
    m = front_padded(mask, dims[1], rank, n).expand(n, *shape).reshape(n, -1)
    s = front(src, dims[2], n).reshape(n, -1)
    if s.shape[1] == 0:
        return x.reshape(n, *shape), 0
    pos = (m.long().cumsum(1) - 1).clamp(0, s.shape[1] - 1)
    return torch.where(m, s.gather(1, pos), x).reshape(n, *shape), 0


def _mask_put(ctx, x, mask, dm, values, dv, accumulate=False):
    """x[mask] = values with values that broadcast over the selected rows (so no count is needed):
    where(mask[..,1..], values, x).  x: n,*M,*R  mask: (n,)*M  values: (n,)*R."""
    n, shape = ctx.n, x.shape[1:]
    m = mask.dim() - (dm is not None)
    rest = len(shape) - m
    vshape = [s for j, s in enumerate(values.shape) if j != dv]
    if len(vshape) > rest:
        if len(vshape) != rest + 1 or vshape[0] != 1:
            raise NotImplementedError("boolean-mask index_put with one value per selected row")
        values, dv = (values.squeeze(0), None) if dv is None else (front(values, dv, n).squeeze(1), 0)
    mask = front_padded(mask, dm, m, n)
    mask = mask.reshape(*mask.shape, *([1] * rest))
    v = front_padded(values, dv, m + rest, n).to(x.dtype)
    out = x + torch.where(mask, v, torch.zeros((), dtype=x.dtype)) if accumulate else torch.where(mask, v, x)
    return out.expand(n, *shape)


@rule(aten.index_reduce.default)
def index_reduce(ctx, args, dims, kwargs):
    """Models flatten into the indexed dim with offsets i*A:  n,A,.. <- n,I,..  as (n*A),.. <- (n*I),.."""
    x, dim, idx, src = args[:4]
    n = ctx.n
    r = _rank(x, dims[0])
    if r == 0:                                       # scalars index as 1-element vectors
        x, src = front(x, dims[0], n).reshape(n, 1), front(src, dims[3], n).reshape(n, 1)
        dims = (0, None, dims[2], 0)
        out, _ = index_reduce(ctx, (x, 0, idx) + (src,) + tuple(args[4:]), dims, kwargs)
        return out.reshape(n, *ctx.val.shape), 0
    dim = dim + r if dim < 0 else dim
    xm = front(x, dims[0], n).movedim(dim + 1, 1)   # n,A,..
    sm = front(src, dims[3], n).movedim(dim + 1, 1)  # n,I,..
    a = xm.shape[1]
    i = front(idx, dims[2], n).reshape(n, -1) + torch.arange(n, device=xm.device).view(n, 1) * a
    out = aten.index_reduce(xm.flatten(0, 1), 0, i.reshape(-1), sm.flatten(0, 1), *args[4:], **kwargs)
    return out.unflatten(0, (n, a)).movedim(1, dim + 1), 0


@rule(aten.put.default)
def put(ctx, args, dims, kwargs):
    """Flat indices per model get offsets i*numel:  n,(..) .put(n,K + off, n,K)."""
    x, idx, src = args[:3]
    n, shape = ctx.n, tuple(ctx.val.shape)
    xf = front(x, dims[0], n).reshape(n, -1)
    numel = xf.shape[1]
    i = front(idx, dims[1], n).reshape(n, -1)
    i = torch.where(i < 0, i + numel, i) + torch.arange(n, device=i.device).view(n, 1) * numel
    out = aten.put(xf.reshape(-1), i.reshape(-1), front(src, dims[2], n).reshape(-1), *args[3:], **kwargs)
    return out.view(n, *shape), 0


@rule(aten.searchsorted.Tensor, aten.bucketize.Tensor)
def searchsorted(ctx, args, dims, kwargs):
    """Shared 1-d boundaries act elementwise on the values (model dim stays); per-model boundaries
    n,M search values flattened per model:  n,M + n,(..) -> n,(..)."""
    n = ctx.n
    if ctx.op is aten.bucketize.Tensor:
        (x, dx), (seq, ds) = (args[0], dims[0]), (args[1], dims[1])
        kw = {"out_int32": kwargs.get("out_int32", False), "right": kwargs.get("right", False)}
    else:
        (seq, ds), (x, dx), kw = (args[0], dims[0]), (args[1], dims[1]), dict(kwargs)
        if kw.get("sorter") is not None:
            raise NotImplementedError("searchsorted with a sorter")
    rs = seq.dim() - (ds is not None)
    if ds is None and rs == 1:
        return ctx.op(*args, **kwargs), dx
    seq, x = front(seq, ds, n), front(x, dx, n)
    if rs == 1:                                      # n,M  +  n,(..)
        return aten.searchsorted.Tensor(seq, x.reshape(n, -1), **kw).reshape(x.shape), 0
    return aten.searchsorted.Tensor(seq, x, **kw), 0


@rule(aten._local_scalar_dense.default, aten.item.default)
def local_scalar_dense(ctx, args, dims, kwargs):
    """A Python number read out of a per-model tensor (.item(), int(t), t used as a size or a slice bound):
    each model may read its own, which one static graph cannot hold (``table[step]`` is rewritten at capture
    to index with the tensor itself). Shared tensors never reach here: they run as they are."""
    raise CaptureError(
        f"forward reads a number out of a per-model tensor (.item(), int(t), float(t), or a tensor used as a "
        f"size, a slice bound or a Python index), at {source_line(ctx.node)}: each model may read a different "
        f"value, which one batched graph cannot hold. Compute with the tensor itself instead: index with it "
        f"(x[t] for a 0-d integer t, x.index_select(d, t.view(1)), torch.gather), use it in arithmetic "
        f"(x * t, not x * t.item()), or keep the number a plain Python attribute.")
