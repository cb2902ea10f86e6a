"""Pointwise ops: one rule for the whole family (every aten op tagged ``pointwise``), plus a few
untagged ones that behave the same way (clone, to_copy, masked_fill, where, ...)."""
from __future__ import annotations

import torch

from .. import ops  # noqa: F401 - mbcompile::assigned
from .axes import front, front_padded
from .registry import RULES, aten, rule


def elementwise(ctx, args, dims, kwargs):
    """n-ary broadcasting. Keeps the model dim in place when every mapped input agrees on it and no
    shared input reaches over it; otherwise maps inputs to n,... padded to the output rank."""
    fmt = kwargs.get("memory_format")
    if fmt in (torch.channels_last, torch.channels_last_3d):
        kwargs = {k: v for k, v in kwargs.items() if k != "memory_format"}   # layout only; rank+1 now
    elif fmt is torch.contiguous_format or ctx.op is aten.contiguous.default:
        return ctx.op(front(args[0], dims[0], ctx.n), *args[1:], **kwargs), 0   # each model contiguous
    tensors = [(a, d) for a, d in zip(args, dims) if isinstance(a, torch.Tensor)]
    mapped = [(a, d) for a, d in tensors if d is not None]
    rank = max(a.dim() - (d is not None) for a, d in tensors)
    d0 = mapped[0][1]
    if all(d == d0 and a.dim() - 1 == rank for a, d in mapped) and all(
            a.dim() <= rank - d0 for a, d in tensors if d is None):
        return ctx.op(*args, **kwargs), d0                     # ..n..  op  shared(..)  -> ..n..
    big, at = max(mapped, key=lambda ad: ad[0].numel())
    if at != 0 and big.dim() - 1 == rank:
        # the others meet the largest input's model dim (views), so its layout carries on: a channels-
        # last B,n,C,H,W activation times an n,B,C,1,1 gate stays B,n,C,H,W (not n-major, a copy
        # and a layout switch for every kernel after it)
        args = [_put(a, d, rank, ctx.n, at) if isinstance(a, torch.Tensor) else a for a, d in zip(args, dims)]
        return ctx.op(*args, **kwargs), at                     # B,n,C,H,W  op  n,B,C,1,1 -> B,n,C,H,W
    args = [front_padded(a, d, rank, ctx.n) if isinstance(a, torch.Tensor) else a
            for a, d in zip(args, dims)]
    return ctx.op(*args, **kwargs), 0                          # n,1..,x  op  y  -> n,...


def _put(a, d, rank, n, at):
    """``a`` (model dim d, or shared) broadcastable against rank+1 dims with the model dim at ``at``."""
    if d is None:
        a = a.reshape((1,) * (rank - a.dim()) + a.shape)
        return a.unsqueeze(at)                                 # ..,1,.. : shared across models
    return front_padded(a, d, rank, n).movedim(0, at)


def defelementwise(*ops):
    """Register the broadcasting rule for each op (one line per family, as JAX's defbroadcasting)."""
    rule(*ops)(elementwise)


def aten_packets():
    """Every aten op packet (``dir(aten)`` lists only the ones loaded so far)."""
    names = {n[6:].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("aten::")}
    return [(name, getattr(aten, name)) for name in sorted(names) if hasattr(aten, name)]


def _tagged_pointwise():
    for name, packet in aten_packets():
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for ov_name in packet.overloads():
            ov = getattr(packet, ov_name)
            if torch.Tag.pointwise in ov.tags and not ov._schema.is_mutable and "out" not in ov_name:
                yield ov


defelementwise(*_tagged_pointwise())
defelementwise(aten.clone, aten.contiguous, aten._to_copy, aten.alias, aten.detach, aten.lift_fresh_copy,
               aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.where.ScalarSelf,
               aten.where.ScalarOther, aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like,
               aten.fill.Scalar, aten.fill.Tensor, aten.threshold_backward, aten.gelu, aten.hardtanh,
               aten.leaky_relu, aten.elu, aten.softplus, aten.hardswish, aten.hardsigmoid, aten.silu,
               aten.mish, aten.relu, aten.logit, aten.clamp, aten.clamp_min, aten.clamp_max,
               aten._conj, aten.positive, aten.to.dtype, aten.type_as, aten.native_dropout_backward,
               aten._conj_physical, aten.polar.default, aten.complex.default)
defelementwise(torch.ops.mbcompile.assigned.default)   # new's values, old's gradient (graph_fixes._assigned_params)


@rule(aten.masked_fill.Tensor)
def masked_fill(ctx, args, dims, kwargs):
    """A per-model fill value (n, where the op wants a 0-d tensor) goes through where():
    x: ..  mask: ..  value: n  ->  where(mask, value[n,1..], x) : n,.."""
    x, mask, value = args
    if dims[2] is None:
        return elementwise(ctx, args, dims, kwargs)
    rank = max(t.dim() - (d is not None) for t, d in zip(args[:2], dims[:2]))
    value = front_padded(value.to(x.dtype), dims[2], rank, ctx.n)
    out = aten.where.self(front_padded(mask, dims[1], rank, ctx.n), value, front_padded(x, dims[0], rank, ctx.n))
    return out.expand(ctx.n, *ctx.val.shape), 0


ELEMENTWISE = {op for op, fn in RULES.items() if fn is elementwise}


@rule(aten.copy.default)
def copy(ctx, args, dims, kwargs):
    """copy(self, src): self's shape and dtype, src's values (broadcast).  n,... <- n,1..,s"""
    x, src = args[0], args[1]
    rank = x.dim() - (dims[0] is not None)
    xf = front(x, dims[0], ctx.n)               # shared: an expanded view; empty_like makes it dense
    # functional aten.copy has no autograd formula in eager mode (circular padding's backward failed):
    # copy_ into a fresh tensor like self has one (gradient to src; self's values are overwritten)
    out = torch.empty_like(xf)
    out.copy_(front_padded(src, dims[1], rank, ctx.n), *args[2:], **kwargs)
    return out, 0
