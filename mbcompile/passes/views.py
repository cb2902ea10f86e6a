"""View and shape ops. Sizes in the graph are the unbatched ones; the rule prepends n (or keeps the
model dim where it is when the op cannot move it: transpose, select, slice)."""
from __future__ import annotations

import torch
from torch._subclasses.fake_impls import _compute_stride   # ATen's computeStride

from .axes import front, front_padded, memory_order, pdim
from .registry import aten, rule


def _rank(x, d):
    return x.dim() - (d is not None)


@rule(aten.view, aten.reshape, aten._unsafe_view)
def view(ctx, args, dims, kwargs):
    """n,...  view(sizes)  ->  n,*sizes (a copy only when the layout needs one: mbcompile::relayout,
    whose gradient keeps the input's layout, e.g. B,n,C,H,W channels-last from a conv chain)."""
    x = front(args[0], dims[0], ctx.n)
    shape = torch._prims_common.infer_size((ctx.n, *args[1]), x.numel())
    # a failed view inside make_fx would leave its node in the graph: ask computeStride first
    if _compute_stride(x.shape, x.stride(), shape) is None and \
            torch._prims_common.is_non_overlapping_and_dense_or_false(x):
        x = torch.ops.mbcompile.relayout(x, False)
    return x.reshape(shape), 0


@rule(aten.permute)
def permute(ctx, args, dims, kwargs):
    x, d = args[0], dims[0]
    r = _rank(x, d)
    return front(x, d, ctx.n).permute(0, *[p % r + 1 if r else 1 for p in args[1]]), 0


@rule(aten.transpose.int)
def transpose(ctx, args, dims, kwargs):
    """B,n,T,C  transpose(-1,-2)  ->  B,n,C,T : the model dim stays put."""
    x, d = args[0], dims[0]
    r = _rank(x, d)
    if r == 0:
        return x, d
    return x.transpose(pdim(args[1], r, d), pdim(args[2], r, d)), d


@rule(aten.t.default)
def t(ctx, args, dims, kwargs):
    x, d = args[0], dims[0]
    r = _rank(x, d)
    return (x.transpose(pdim(0, r, d), pdim(1, r, d)), d) if r == 2 else (x, d)


@rule(aten.expand.default)
def expand(ctx, args, dims, kwargs):
    """n,C  expand(B,C)  ->  n,B,C."""
    size = list(args[1])
    x = front_padded(args[0], dims[0], len(size), ctx.n)
    return x.expand(ctx.n, *size), 0


@rule(aten.unsqueeze.default)
def unsqueeze(ctx, args, dims, kwargs):
    x, d = args[0], dims[0]
    r = _rank(x, d) + 1
    dim = args[1] + r if args[1] < 0 else args[1]
    return front(x, d, ctx.n).unsqueeze(dim + 1), 0


@rule(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def squeeze(ctx, args, dims, kwargs):
    """Squeeze the logical dims of size one (never the model dim, even when n == 1)."""
    x, d = args[0], dims[0]
    x = front(x, d, ctx.n)
    shape = x.shape[1:]
    r = len(shape)
    if len(args) == 1:
        which = [i for i, s in enumerate(shape) if s == 1]
    else:
        which = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
        which = [(w + r if w < 0 else w) for w in which] if r else []
        which = [w for w in which if shape[w] == 1]
    return (x.squeeze([w + 1 for w in which]) if which else x), 0


@rule(aten.select.int)
def select(ctx, args, dims, kwargs):
    """n,B,C  select(-1, i)  ->  n,B."""
    x, d = args[0], dims[0]
    r = _rank(x, d)
    p = pdim(args[1], r, d)
    return x.select(p, args[2]), (d - 1 if p < d else d)


@rule(aten.slice.Tensor)
def slice_(ctx, args, dims, kwargs):
    x, d = args[0], dims[0]
    a = list(args) + [None] * (5 - len(args))
    dim = a[1] if len(args) > 1 else kwargs.get("dim", 0)
    start = a[2] if len(args) > 2 else kwargs.get("start")
    end = a[3] if len(args) > 3 else kwargs.get("end")
    step = a[4] if len(args) > 4 else kwargs.get("step", 1)
    return aten.slice.Tensor(x, pdim(dim, _rank(x, d), d), start, end, step or 1), d


@rule(aten.cat.default)
def cat(ctx, args, dims, kwargs):
    """[n,A,C ; shared B,C] cat(0) -> n,(A+B),C : shared parts are expanded (a view)."""
    tensors, tdims = args[0], dims[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    ranks = [_rank(t, dd) for t, dd in zip(tensors, tdims)]
    r = max(ranks)
    parts = [front(t, dd, ctx.n) for t, dd, rk in zip(tensors, tdims, ranks) if not (rk == 1 and t.shape[-1] == 0 and r > 1)]
    at = (dim + r if dim < 0 else dim) + 1
    perm = memory_order(parts[0])
    if perm is not None and all(memory_order(t) == perm for t in parts[1:]):
        # in memory order: channels-last B,n,C,H,W parts give a channels-last result (a U-Net's skip
        # concatenation), not a contiguous one that the next conv copies back and whose gradient mixes
        inv = sorted(range(len(perm)), key=perm.__getitem__)
        return torch.cat([t.permute(perm) for t in parts], perm.index(at)).permute(inv), 0
    return torch.cat(parts, at), 0


@rule(aten.stack.default)
def stack(ctx, args, dims, kwargs):
    tensors, tdims = args[0], dims[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    r = _rank(tensors[0], tdims[0]) + 1
    return torch.stack([front(t, dd, ctx.n) for t, dd in zip(tensors, tdims)], (dim + r if dim < 0 else dim) + 1), 0


@rule(aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default,
      aten.tensor_split.sections, aten.tensor_split.indices, aten.split.sizes)
def split(ctx, args, dims, kwargs):
    """n,...  split(s, dim)  ->  tuple of n,... ."""
    x, d = args[0], dims[0]
    r = _rank(x, d)
    x = front(x, d, ctx.n)
    args, kwargs = list(args), dict(kwargs)
    at = 1 if ctx.op.overloadpacket is aten.unbind else 2
    dim = args[at] if len(args) > at else kwargs.pop("dim", 0)
    args = [x] + args[1:]
    if len(args) > at:
        args[at] = (dim + r if dim < 0 else dim) + 1
    else:
        kwargs = {**kwargs, "dim": (dim + r if dim < 0 else dim) + 1}
    out = ctx.op(*args, **kwargs)
    return out, tuple(0 for _ in out)


@rule(aten.repeat.default)
def repeat(ctx, args, dims, kwargs):
    """n,C  repeat(B,2)  ->  n,B,2C."""
    reps = list(args[1])
    return front_padded(args[0], dims[0], len(reps), ctx.n).repeat(1, *reps), 0


@rule(aten.flip.default, aten.roll.default)
def flip_roll(ctx, args, dims, kwargs):
    x, d = args[0], dims[0]
    r = _rank(x, d)
    x = front(x, d, ctx.n)
    if ctx.op.overloadpacket is aten.flip:
        return x.flip([pdim(k, r, 0) for k in args[1]]), 0
    shifts, ds = args[1], (args[2] if len(args) > 2 else kwargs.get("dims", []))
    if not ds:  # roll over the flattened tensor
        return x.reshape(ctx.n, -1).roll(shifts, 1).reshape(x.shape), 0
    return x.roll(shifts, [pdim(k, r, 0) for k in ds]), 0


@rule(aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full, aten.new_empty_strided)
def new_like(ctx, args, dims, kwargs):
    """Only the dtype/device of ``self`` matter: the result is shared by all models."""
    return ctx.op(*args, **kwargs), None


@rule(aten.diagonal.default, aten.diag_embed.default, aten.tril.default, aten.triu.default,
      aten.unfold.default, aten.movedim.int, aten.narrow.default, aten.constant_pad_nd.default)
def leading_batch(ctx, args, dims, kwargs):
    """Ops that treat leading dims as batch dims or index dims from the end: n goes in front and the
    op's own dims are translated."""
    x, d = args[0], dims[0]
    r = _rank(x, d)
    x = front(x, d, ctx.n)
    packet = ctx.op.overloadpacket
    args = list(args)
    if packet is aten.diagonal:
        a = args + [0, 0, 1][len(args) - 1:]
        return aten.diagonal(x, a[1], pdim(a[2], r, 0), pdim(a[3], r, 0)), 0
    if packet is aten.diag_embed:
        a = args + [0, -2, -1][len(args) - 1:]
        ro = r + 1
        return aten.diag_embed(x, a[1], pdim(a[2], ro, 0), pdim(a[3], ro, 0)), 0
    if packet is aten.unfold and r == 0:                 # a scalar unfolds as a 1-element vector
        return x.unsqueeze(1).unfold(1, *args[2:]).reshape(ctx.n, *ctx.val.shape), 0
    if packet in (aten.unfold, aten.narrow, aten.movedim):
        args[1] = pdim(args[1], r, 0)
        if packet is aten.movedim:
            args[2] = pdim(args[2], r, 0)
        return ctx.op(x, *args[1:], **kwargs), 0
    return ctx.op(x, *args[1:], **kwargs), 0        # tril/triu/constant_pad_nd: trailing dims only


@rule(aten._assert_tensor_metadata.default)
def assert_tensor_metadata(ctx, args, dims, kwargs):
    """Export's check before a dtype cast (transformers' logits.float()): dtype/device/layout still
    hold for the batched value, the unbatched size/stride do not, so only those are checked."""
    dtype = args[3] if len(args) > 3 else kwargs.get("dtype")
    aten._assert_tensor_metadata(args[0], None, None, dtype, device=kwargs.get("device"),
                                 layout=kwargs.get("layout"))
    return None, None


@rule(aten._assert_async.default, aten._assert_async.msg, aten._functional_assert_async.msg)
def assert_async(ctx, args, dims, kwargs):
    """A check of a per-model condition (one_hot's class range): n,.. -> one check over every model's
    values. Returns nothing (the functional variant: its dependency token, shared)."""
    cond = front(args[0], dims[0], ctx.n).all()
    return ctx.op(cond, *args[1:], **kwargs), None


def _copy_ops():
    """x_copy -> x for every view op with a rule (functionalized graphs use the copy variants)."""
    from .registry import RULES
    from .pointwise import aten_packets
    pairs = {}
    for name, packet in aten_packets():
        if name.endswith("_copy") and not name.startswith("_"):
            base = getattr(aten, name[:-5], None)
            if isinstance(packet, torch._ops.OpOverloadPacket) and base is not None:
                for ov in packet.overloads():
                    if "out" not in ov and hasattr(base, ov) and getattr(base, ov) in RULES:
                        pairs[getattr(packet, ov)] = getattr(base, ov)
    return pairs


_COPIES = _copy_ops()


@rule(*_COPIES)
def view_copy(ctx, args, dims, kwargs):
    """The view's own rule, then a copy."""
    from .registry import RULES
    ctx.op = _COPIES[ctx.op]
    out, d = RULES[ctx.op](ctx, args, dims, kwargs)
    return (type(out)(t.clone() for t in out) if isinstance(out, (tuple, list)) else out.clone()), d


@rule(aten.view_as_real.default)
def view_as_real(ctx, args, dims, kwargs):
    """..n..  -> ..n..,2 : the new dim is last, the model dim stays."""
    return aten.view_as_real(args[0]), dims[0]


@rule(aten.view_as_complex.default)
def view_as_complex(ctx, args, dims, kwargs):
    """n,..,2 -> n,.. (copied first when the model dim breaks the layout view_as_complex needs)."""
    x = front(args[0], dims[0], ctx.n)
    if x.stride(-1) != 1 or any(s % 2 for s in x.stride()[:-1]):
        x = x.contiguous()
    return aten.view_as_complex(x), 0


@rule(aten.slice_scatter.default, aten.select_scatter.default, aten.diagonal_scatter.default)
def scatter_into_view(ctx, args, dims, kwargs):
    """out = self with src written into one of its views:  self n,A,C  src n,a,C  ->  n,A,C."""
    x, src = args[0], args[1]
    r = _rank(x, dims[0])
    x, src = front(x, dims[0], ctx.n), front(src, dims[1], ctx.n)
    a = list(args[2:])
    if ctx.op is aten.diagonal_scatter.default:
        a = a + [0, 0, 1][len(a):]                      # offset, dim1, dim2
        a[1], a[2] = pdim(a[1], r, 0), pdim(a[2], r, 0)
    else:
        if not a:
            a = [kwargs.pop("dim", 0)] if "dim" in kwargs else [0]
        a[0] = pdim(a[0], r, 0)
    x = x.contiguous() if x.stride(0) == 0 else x
    if x.is_complex():       # autograd has no complex *_scatter: n,A,C,2 real views, the same positions
        sr = torch.view_as_real(src.to(x.dtype))
        sr = sr.movedim(-1, -2) if ctx.op is aten.diagonal_scatter.default else sr   # diagonal last
        out = ctx.op(torch.view_as_real(x), sr, *a, **kwargs)
        return torch.view_as_complex(out if out.stride(-1) == 1 else out.contiguous()), 0
    return ctx.op(x, src, *a, **kwargs), 0
