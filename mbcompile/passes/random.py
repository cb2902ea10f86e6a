"""Randomness: dropout family and random ops inside forward.

"sequential": model i's slice is drawn from its own generator state (an input of the graph, advanced
              in place by mbcompile::draw_per_model), so its masks equal those of model i alone.
"different":  one draw over n,... from torch's generator (fast, not reproducible per model).
"same":       one draw of the unbatched shape, shared by every model.
Per-model dropout rates arrive as a list ``p`` (one entry: shared). Any other random op arrives as
mbcompile::random_call (capture's pre-pass), replayed per model with its stream in the default generator.
"""
from __future__ import annotations

import math

import torch

from .. import ops
from .axes import front
from .registry import rule
from ..errors import InvalidInputError

mb = torch.ops.mbcompile
ALPHA = 1.7580993408473766


def _col(vals, like, rank):
    """[n] python floats -> n,1,..,1 tensor in like's dtype/device (rank singleton dims)."""
    t = torch.tensor(vals, dtype=torch.float64).to(dtype=like.dtype, device=like.device)
    return t.view(len(vals), *([1] * rank))


def _mask(ctx, shape, stride, keep, like, scaled=False):
    """0/1 keep-mask: n,*shape (or *shape, shared, in "same" mode with one rate). ``scaled``: the
    per-model draw may return eager's noise instead (mask / keep, divided in place per model);
    returns (mask, its model dim, whether it is scaled)."""
    mode, n = ctx.rng.mode, ctx.n
    if mode == "sequential":
        kind = "bernoulli_keep_scaled" if scaled else "bernoulli_keep"
        if like.device.type == "cuda" and ctx.rng.fused_cuda:
            kind, scaled = "cuda_dropout_mask", False
        return mb.draw_per_model(None, 0, kind, keep, 0.0, list(shape), list(stride), like.dtype,
                                 like.device, ctx.rng.states), 0, scaled
    if mode == "same" and len(set(keep)) == 1:
        return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(keep[0]), None, False
    if mode == "same":
        u = torch.rand(shape, dtype=like.dtype, device=like.device)
        return (u.unsqueeze(0) < _col(keep, like, len(shape))).to(like.dtype), 0, False
    k = _col(keep * n if len(keep) == 1 else keep, like, len(shape))
    return torch.bernoulli(k.expand(n, *shape)), 0, False


@rule(mb.dropout.default, random=True)
def dropout(ctx, args, dims, kwargs):
    """x (n,B,..)  ->  x * mask/(1-p)   (alpha: x * mask*a + b), mask drawn per model."""
    x, p, mode = args
    d = dims[0]
    n = ctx.n
    ps = list(p) if len(p) > 1 else list(p) * n
    if any(not 0 <= v <= 1 for v in ps):
        raise InvalidInputError(f"dropout probability has to be between 0 and 1, got {ps}")
    xf = front(x, d, n)
    shape = xf.shape[1:]
    feature = mode.startswith("feature")
    nshape = list(shape[:2]) + [1] * (len(shape) - 2) if feature else list(shape)
    if feature:
        stride = torch.empty(nshape).stride()
    else:
        stride = _dense_stride(ctx, x, d)
    keep = [1.0 - v for v in ps]
    ctx.rng.fused_cuda = mode == "plain"
    plain = mode in ("plain", "feature")
    mask, md, scaled = _mask(ctx, nshape, stride, keep, xf, scaled=plain)
    rank = len(shape)
    if plain:                                   # eager: noise = mask / (1 - p); x * noise
        if scaled:
            return _back(xf * mask, d)
        div = _col([k if k > 0 else 1.0 for k in keep], xf, rank)
        noise = mask / div if md == 0 else mask.unsqueeze(0) / div
        return _back(xf * noise, d)
    a = [1.0 / math.sqrt((ALPHA * ALPHA * v + 1) * (1 - v)) if v < 1 else 0.0 for v in ps]
    aa = _col([ALPHA * ai for ai in a], xf, rank)
    aap = _col([ALPHA * ai * v for ai, v in zip(a, ps)], xf, rank)
    m = mask if md == 0 else mask.unsqueeze(0)
    b = (m - 1) * aa + aap
    out = xf * (m * _col(a, xf, rank)) + b
    zero = [v == 0 for v in ps]
    if any(zero):  # p == 0: eager returns x untouched
        out = torch.where(_col([1.0 if z else 0.0 for z in zero], xf, rank) > 0, xf, out)
    return _back(out, d)


def _back(out, d):
    """n,.. -> the input's model dim (a view): a B,n,C,H,W channels-last activation stays one, so the
    pooling or conv after dropout folds it without a copy."""
    return (out, 0) if not d else (out.movedim(0, d), d)


def _dense_stride(ctx, x, d):
    """Strides eager's empty_like(x) gives the unbatched x (its own when dense, else contiguous)."""
    val = ctx.node.args[0].meta.get("val") if ctx.node is not None else None
    if val is not None and torch._prims_common.is_non_overlapping_and_dense_or_false(val):
        return list(val.stride())
    shape = x.shape if d is None else x.movedim(d, 0).shape[1:]
    return list(torch.empty(shape, device="meta").stride())


@rule(mb.draw.default, random=True)
def draw(ctx, args, dims, kwargs):
    like, kind, a, b, shape, stride, dtype, device = args
    dl = dims[0]
    n, mode = ctx.n, ctx.rng.mode
    if mode == "sequential":                      # n,*shape, model i from states[i]
        lk = None if like is None else front(like, dl, n).detach()   # torch: no gradient into p
        return mb.draw_per_model(lk, 0, kind, [a], b, shape, stride, dtype, device, ctx.rng.states), 0
    if mode == "same" and dl is None:
        return mb.draw(like, kind, a, b, shape, stride, dtype, device), None
    if mode == "same":                            # a per-model `like`: one draw, every model's the same
        if kind == "bernoulli_t":                 # n,.. probabilities against one shared uniform draw
            p = front(like, dl, n).detach()
            return (torch.rand(p.shape[1:], dtype=p.dtype, device=p.device) < p).to(dtype), 0
        one = mb.draw(None, kind, a, b, shape, stride, dtype, device)
        return one.unsqueeze(0).expand(n, *one.shape).contiguous(), 0
    full = [n, *shape]
    t = torch.empty(full, dtype=dtype, device=device)
    if kind == "bernoulli":
        return t.bernoulli_(a), 0
    if kind == "bernoulli_t":
        return torch.bernoulli(front(like, dl, n)), 0
    if kind == "uniform":
        return t.uniform_(a, b), 0
    return t.normal_(a, b), 0


@rule(mb.leaky_relu.default)
def leaky_relu(ctx, args, dims, kwargs):
    """Per-model negative slope: where(x > 0, x, x * slope[n,1..])."""
    x, slope = args
    xf = front(x, dims[0], ctx.n)
    s = slope * ctx.n if len(slope) == 1 else slope
    return torch.where(xf > 0, xf, xf * _col(s, xf, xf.dim() - 1)), 0


_STATE_SIZE: dict = {}


@rule(mb.random_call.default, random=True)
def random_call(ctx, args, dims, kwargs):
    """Any other random op (randperm, randint, multinomial, exponential_, rrelu's noise, ...), which
    the pre-pass registered: "sequential" replays it for model i on its slices with its own stream;
    "different" runs it once per model from torch's generator; "same" once when every input is shared."""
    key, tensors = args
    n, mode = ctx.n, ctx.rng.mode
    mapped = [d is not None for d in dims[1]]
    ts = [front(t, d, n) if d is not None else t for t, d in zip(tensors, dims[1])]
    if mode == "sequential":
        dev = str(ops.call_device(key))
        if dev not in _STATE_SIZE:
            _STATE_SIZE[dev] = torch.Generator(device=dev).get_state().numel()
        if ctx.rng.states.shape[-1] != _STATE_SIZE[dev]:
            raise NotImplementedError(f"random op on {dev}, a device without per-model generator states")
        out, states = mb.random_call_per_model(key, ts, mapped, ctx.rng.states)
        ctx.rng.states.copy_(states)
        return out, 0
    if mode == "same" and not any(mapped):
        return mb.random_call(key, ts), None
    return torch.stack([mb.random_call(key, [t[i] if m else t for t, m in zip(ts, mapped)]) for i in range(n)]), 0
