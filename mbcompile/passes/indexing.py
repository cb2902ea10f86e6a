"""Gather/scatter-style indexing. Indices may be shared or per model."""
from __future__ import annotations

import torch

from .axes import front, front_padded, pdim
from .registry import aten, rule


def _rank(x, d):
    return x.dim() - (d is not None)


@rule(aten.index_select.default)
def index_select(ctx, args, dims, kwargs):
    x, dim, idx = args
    dx, _, di = dims
    r = _rank(x, dx)
    if di is None:                                   # n,A,C  index_select(0, shared i) -> n,I,C
        return x.index_select(pdim(dim, r, dx), idx) if r else x, dx
    return gather_like(ctx, x, dx, dim, idx.unsqueeze(-1) if False else idx, di, kind="index_select")


def gather_like(ctx, x, dx, dim, idx, di, kind):
    """Per-model indices: flatten models into the indexed dim with offsets. n,A,C + n,I -> n,I,C."""
    n = ctx.n
    r = _rank(x, dx)
    x = front(x, dx, n)
    dim = dim + r if dim < 0 else dim
    idx = front(idx, di, n)
    xm = x.movedim(dim + 1, 1)                       # n,A,...
    a = xm.shape[1]
    flat = xm.flatten(0, 1)                          # (n*A),...
    off = (torch.arange(n, device=idx.device) * a).view(n, *([1] * (idx.dim() - 1)))
    out = flat.index_select(0, (idx + off).reshape(-1))  # (n*I),...
    out = out.unflatten(0, (n, idx.shape[1])).movedim(1, dim + 1)
    return out, 0


@rule(aten.gather.default)
def gather(ctx, args, dims, kwargs):
    """n,A,B gather(dim, n,I,B) -> n,I,B (shared parts expanded)."""
    x, dim, idx = args[:3]
    dx, _, di = dims[:3]
    r = max(_rank(x, dx), 1)
    return torch.gather(front(x, dx, ctx.n), pdim(dim, r, 0), front(idx, di, ctx.n)), 0


@rule(aten.scatter.src, aten.scatter.value, aten.scatter_add.default, aten.scatter.reduce,
      aten.scatter.value_reduce, aten.scatter_reduce.two)
def scatter(ctx, args, dims, kwargs):
    x, dim = args[0], args[1]
    r = max(_rank(x, dims[0]), 1)
    args = [front(a, dd, ctx.n) if isinstance(a, torch.Tensor) else a for a, dd in zip(args, dims)]
    args[1] = pdim(dim, r, 0)
    return ctx.op(*args, **kwargs), 0


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
    # per-model indices: broadcast every index to n,... and add arange(n) as the first index
    idx_rank = max(t.dim() - (dd is not None) for t, dd in zip(indices, di) if t is not None)
    ar = torch.arange(n, device=x.device).view(n, *([1] * idx_rank))
    full = []
    for t, dd in zip(indices, di):
        full.append(None if t is None else front_padded(t, dd, idx_rank, n))
    # None (full slice) entries between advanced ones are not supported by this path: fall back
    pos = [k for k, t in enumerate(full) if t is not None]
    if pos != list(range(pos[0], pos[-1] + 1)) or pos[0] != 0:
        full = [torch.arange(x.shape[k + 1], device=x.device) if t is None else t for k, t in enumerate(full)]
        raise NotImplementedError("per-model indices mixed with slices")
    return aten.index.Tensor(x, [ar] + full), 0


@rule(aten.index_put.default)
def index_put(ctx, args, dims, kwargs):
    x, indices, values = args[:3]
    dx, di, dv = dims[:3]
    n = ctx.n
    if all(dd is None for dd in di):
        x = front(x, dx, n)
        if dv is not None:
            values = front_padded(values, dv, values.dim() - 1, n)
            # values broadcast against x[:, idx...]: the model dim must lead
        else:
            values = values
        return aten.index_put.default(x, [None] + list(indices), values, *args[3:]), 0
    raise NotImplementedError("index_put with per-model indices")


@rule(aten.masked_scatter.default)
def masked_scatter(ctx, args, dims, kwargs):
    raise NotImplementedError("masked_scatter")
