"""Pooling, upsampling, padding and other ops that take (N,)C,spatial inputs: models fold into N.
n,B,C,H,W -> (n*B),C,H,W -> op -> n,B,C,H',W'  (an unbatched C,H,W input uses n as its N)."""
from __future__ import annotations

import torch

from .axes import front
from .registry import aten, rule

SPATIAL = {}


def defbatchfold(spatial, *ops):
    """Ops whose first argument is N,C,*spatial (or C,*spatial)."""
    for op in ops:
        SPATIAL[op] = spatial
    rule(*ops)(batchfold)


def batchfold(ctx, args, dims, kwargs):
    x, d = args[0], dims[0]
    if any(dd is not None for dd in _tensor_dims(dims[1:])):
        raise NotImplementedError("per-model tensors besides the input")
    n = ctx.n
    x = front(x, d, n)
    spatial = SPATIAL[ctx.op.overloadpacket]
    has_batch = x.dim() - 1 == spatial + 2
    xin = x.flatten(0, 1) if has_batch else x
    out = ctx.op(xin, *args[1:], **kwargs)
    fix = (lambda t: t.unflatten(0, (n, -1))) if has_batch else (lambda t: t)
    if isinstance(out, (tuple, list)):
        return tuple(fix(t) for t in out), tuple(0 for _ in out)
    return fix(out), 0


def _tensor_dims(dims):
    for dd in dims:
        if isinstance(dd, (list, tuple)):
            yield from dd
        else:
            yield dd


defbatchfold(1, aten.avg_pool1d, aten.adaptive_avg_pool1d, aten.adaptive_max_pool1d, aten.max_pool1d,
             aten.max_pool1d_with_indices, aten.reflection_pad1d, aten.replication_pad1d,
             aten.upsample_nearest1d, aten.upsample_linear1d, aten._upsample_nearest_exact1d)
defbatchfold(2, aten.max_pool2d_with_indices, aten.avg_pool2d, aten.adaptive_avg_pool2d,
             aten._adaptive_avg_pool2d, aten.adaptive_max_pool2d, aten.max_pool2d, aten.reflection_pad2d,
             aten.replication_pad2d, aten.upsample_nearest2d, aten.upsample_bilinear2d,
             aten.upsample_bicubic2d, aten._upsample_nearest_exact2d, aten.im2col, aten.col2im,
             aten.pixel_shuffle, aten.pixel_unshuffle, aten.channel_shuffle, aten.max_unpool2d)
defbatchfold(3, aten.max_pool3d_with_indices, aten.avg_pool3d, aten.adaptive_avg_pool3d,
             aten._adaptive_avg_pool3d, aten.adaptive_max_pool3d, aten.max_pool3d, aten.reflection_pad3d,
             aten.replication_pad3d, aten.upsample_nearest3d, aten.upsample_trilinear3d)
