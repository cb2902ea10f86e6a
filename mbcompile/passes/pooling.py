"""Pooling, upsampling, padding and other ops that take (N,)C,spatial inputs: models fold into N.
n,B,C,H,W -> (n*B),C,H,W -> op -> n,B,C,H',W'  (an unbatched C,H,W input uses n as its N)."""
from __future__ import annotations

import torch

from .axes import front
from .reductions import mem_order
from .registry import aten, rule

SPATIAL = {}
GLOBAL_AVG = {aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d}   # composite ops


def channelfold(ctx, args, kwargs):
    """Per-channel ops on B,n,C,H,W (the layout conv and batch norm leave): fold n into the channels,
    a view, so a conv/bn/relu/pool chain runs without copies:  B,n,C,H,W -> B,(n*C),H,W -> B,n,C,H',W'."""
    args = [a.flatten(1, 2) if isinstance(a, torch.Tensor) else a for a in args]
    if ctx.op.overloadpacket in GLOBAL_AVG and all(s == 1 for s in args[1]):   # ATen: a mean over H,W
        k = args[0].dim()
        out = mem_order(lambda t, ds, keep: t.mean(ds, keep), args[0], list(range(k - len(args[1]), k)), True)
    else:
        out = ctx.op(*args, **kwargs)
    if isinstance(out, (tuple, list)):
        return tuple(t.unflatten(1, (ctx.n, -1)) for t in out), tuple(1 for _ in out)
    return out.unflatten(1, (ctx.n, -1)), 1


def defbatchfold(spatial, *ops):
    """Ops whose first argument is N,C,*spatial (or C,*spatial)."""
    for op in ops:
        SPATIAL[op] = spatial
    rule(*ops)(batchfold)


def batchfold(ctx, args, dims, kwargs):
    """Every tensor operand (input, indices, grid, grad) folds the same way; shared ones are expanded."""
    if any(isinstance(a, (list, tuple)) and dd is not None and any(e is not None for e in dd)
           for a, dd in zip(args, dims)):
        raise NotImplementedError("per-model tensors in a list argument")
    n = ctx.n
    spatial = SPATIAL[ctx.op.overloadpacket]
    has_batch = args[0].dim() - (dims[0] is not None) == spatial + 2
    if has_batch and ctx.op.overloadpacket in CHANNELWISE and all(
            d == 1 for a, d in zip(args, dims) if isinstance(a, torch.Tensor)):
        return channelfold(ctx, args, kwargs)
    fold = (lambda t, d: front(t, d, n).flatten(0, 1)) if has_batch else (lambda t, d: front(t, d, n))  # noqa: E731
    args = [fold(a, d) if isinstance(a, torch.Tensor) else a for a, d in zip(args, dims)]
    out = ctx.op(*args, **kwargs)
    fix = (lambda t: t.unflatten(0, (n, -1))) if has_batch else (lambda t: t)
    if isinstance(out, (tuple, list)):
        return tuple(fix(t) for t in out), tuple(0 for _ in out)
    return fix(out), 0


defbatchfold(1, aten.avg_pool1d, aten.adaptive_avg_pool1d, aten.adaptive_max_pool1d, aten.max_pool1d,
             aten.max_pool1d_with_indices, aten.reflection_pad1d, aten.replication_pad1d,
             aten.upsample_nearest1d, aten.upsample_linear1d, aten._upsample_nearest_exact1d,
             aten.col2im)  # col2im: N,(C*kh*kw),L -> N,C,H,W
defbatchfold(2, aten.max_pool2d_with_indices, aten.avg_pool2d, aten.adaptive_avg_pool2d,
             aten._adaptive_avg_pool2d, aten.adaptive_max_pool2d, aten.max_pool2d, aten.reflection_pad2d,
             aten.replication_pad2d, aten.upsample_nearest2d, aten.upsample_bilinear2d,
             aten.upsample_bicubic2d, aten._upsample_nearest_exact2d, aten.im2col,
             aten.pixel_shuffle, aten.pixel_unshuffle, aten.channel_shuffle, aten.max_unpool2d,
             aten.grid_sampler_2d, aten._upsample_bilinear2d_aa, aten._upsample_bicubic2d_aa,
             aten.max_pool2d_with_indices_backward, aten.avg_pool2d_backward)
defbatchfold(3, aten.max_pool3d_with_indices, aten.avg_pool3d, aten.adaptive_avg_pool3d,
             aten._adaptive_avg_pool3d, aten.adaptive_max_pool3d, aten.max_pool3d, aten.reflection_pad3d,
             aten.replication_pad3d, aten.upsample_nearest3d, aten.upsample_trilinear3d, aten.grid_sampler_3d,
             aten.max_unpool3d, aten._upsample_nearest_exact3d)
CHANNELWISE = {aten.max_pool1d, aten.max_pool1d_with_indices, aten.avg_pool1d, aten.adaptive_avg_pool1d,
               aten.adaptive_max_pool1d, aten.max_pool2d, aten.max_pool2d_with_indices, aten.avg_pool2d,
               aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d, aten.adaptive_max_pool2d,
               aten.max_pool2d_with_indices_backward, aten.avg_pool2d_backward, aten.max_pool3d,
               aten.max_pool3d_with_indices, aten.avg_pool3d, aten.adaptive_avg_pool3d,
               aten._adaptive_avg_pool3d, aten.adaptive_max_pool3d, aten.reflection_pad1d,
               aten.replication_pad1d, aten.reflection_pad2d, aten.replication_pad2d, aten.reflection_pad3d,
               aten.replication_pad3d, aten.upsample_nearest1d, aten.upsample_linear1d,
               aten._upsample_nearest_exact1d, aten.upsample_nearest2d, aten.upsample_bilinear2d,
               aten.upsample_bicubic2d, aten._upsample_nearest_exact2d, aten.upsample_nearest3d,
               aten.upsample_trilinear3d, aten._upsample_nearest_exact3d}   # no channel mixing
