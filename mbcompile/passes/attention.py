"""scaled_dot_product_attention: models fold into the batch dim.
q,k,v: n,B,H,L,E -> (n*B),H,L,E ; a mask broadcast to n,B,.. and folded the same way.
With dropout_p > 0 (training), CPU eager runs the math path with at::dropout on the attention
weights; the rule does the same with the per-model dropout rule, so masks match model by model.
Without dropout on CPU, the fused kernel and the math path are both candidates, chosen by measurement:
for short sequences the flash kernel's blocking costs far more than three small batched matmuls. For
very short ones (<= SHORT keys and queries) a third: the products as broadcast multiply-and-sum, since a
bmm over (n*B*H) tiny matrices runs at a few GFLOP/s (3 tokens, 16384 3x32 @ 32x3: 2.1 ms a call).
Eager timing sees little of that (12.1 against 12.6 ms); compiled, it fuses, so it is preferred when close."""
from __future__ import annotations

import math

import torch

from .axes import front, front_padded
from .registry import aten, rule
from . import random as _random
from .. import lowering

mb = torch.ops.mbcompile
SHORT = 8          # the longest query/key length offered the broadcast candidate
PREFER = 1.15      # ... which wins within this factor of the fastest in eager: Inductor fuses it into two
                   # reductions (train_step, 3 tokens: 187 ms a step against 207 with the math path)


def _fold(t, d, n, rank, lead):
    """n,.. -> (n*B),.. where lead = the unbatched leading batch shape of q."""
    t = front_padded(t, d, rank, n) if d is not None else t.reshape((1,) * (rank - t.dim()) + t.shape).unsqueeze(0)
    t = t.expand(n, *lead, *t.shape[1 + len(lead):]) if lead else t.expand(n, *t.shape[1:])
    return t.flatten(0, 1) if lead else t


@rule(aten.scaled_dot_product_attention.default, random=False)
def sdpa(ctx, args, dims, kwargs):
    q, k, v = args[:3]
    dq, dk, dv = dims[:3]
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    dm = dims[3] if len(dims) > 3 else None
    dropout_p = args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)
    is_causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
    scale = args[6] if len(args) > 6 else kwargs.get("scale")
    gqa = kwargs.get("enable_gqa", False)
    n = ctx.n
    rank = q.dim() - (dq is not None)
    qf = front(q, dq, n)
    lead = tuple(qf.shape[1:-2])[:1] if rank >= 3 else ()
    fold = lambda t, d: _fold(t, d, n, rank, lead)  # noqa: E731
    qf, kf, vf = fold(q, dq), fold(k, dk), fold(v, dv)
    if qf.device.type == "cuda":  # CUDA's efficient-attention backward rejects the strides a fold leaves
        qf, kf, vf = qf.contiguous(), kf.contiguous(), vf.contiguous()
    mf = None if mask is None else fold(mask, dm)
    ps = ctx.per_model("dropout") or [dropout_p]           # nn.MultiheadAttention(dropout=p_i) per model
    if any(p > 0 for p in ps):
        out = _math_with_dropout(ctx, qf, kf, vf, mf, ps, is_causal, scale, lead)
        ctx.note("math path with per-model dropout")
    elif qf.device.type == "cuda":
        out = _cuda_sdpa(ctx, qf, kf, vf, mf, is_causal, scale, gqa)
    else:
        cands = {"fused": lambda q, k, v, m: aten.scaled_dot_product_attention(
                     q, k, v, m, 0.0, is_causal, scale=scale, enable_gqa=gqa),
                 "math": lambda q, k, v, m: aten._scaled_dot_product_attention_math(
                     q, k, v, _float_mask(m, q), 0.0, is_causal, scale=scale, enable_gqa=gqa)[0]}
        if max(qf.shape[-2], kf.shape[-2]) <= SHORT and not gqa:
            cands["broadcast"] = lambda q, k, v, m: _broadcast_attention(q, k, v, m, is_causal, scale)
        # a per-model float mask may be learned (a relative-position bias, ALiBi slopes): the CPU flash
        # kernel has no gradient for attn_mask, the math and broadcast paths do
        learned = mf is not None and mf.is_floating_point() and dm is not None
        if learned:
            del cands["fused"]
        choice = lowering.choose("attention", cands, (qf, kf, vf, mf), n, extra=(is_causal, scale, gqa),
                                 grad=(True, True, True, learned), prefer=("broadcast", PREFER))
        ctx.note(choice.note("attention"))
        out = cands[choice.name](qf, kf, vf, mf)
    return (out.unflatten(0, (n, -1)) if lead else out), 0


def _broadcast_attention(q, k, v, mask, is_causal, scale):
    """The math path's arithmetic with both products as multiply-and-sum over broadcast operands.
    q: ..,L,E  k: ..,S,E  v: ..,S,Ev -> ..,L,Ev"""
    s = math.sqrt((1.0 / math.sqrt(q.shape[-1])) if scale is None else scale)   # as the math path: both
    scores = ((q * s).unsqueeze(-2) * (k * s).unsqueeze(-3)).sum(-1)           # sides scaled; ..,L,S
    attn = _masked_softmax(scores, mask, is_causal)
    return (attn.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2)                       # ..,L,S,Ev -> ..,L,Ev


def _masked_softmax(scores, mask, is_causal):
    """softmax over keys of ..,L,S scores after the causal and the given mask; a row with no key to
    attend gives 0s (a safe softmax), as eager's math path."""
    L, S = scores.shape[-2:]
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return aten._safe_softmax(scores, -1)


def _float_mask(mask, q):
    """A boolean mask (True: attend) as the additive float mask the math kernel takes."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))


def _cuda_sdpa(ctx, q, k, v, mask, is_causal, scale, gqa):
    """The batched program is traced under no_grad, where SDPA's own dispatch picks the
    memory-efficient kernel with compute_log_sumexp=False; the backward then fails ("LSE is not
    correctly aligned"). So call that kernel ourselves, keeping its logsumexp (float32's usual path);
    with a mask it would need SDPA's mask padding, so the math path runs instead."""
    params = torch.backends.cuda.SDPAParams(q, k, v, mask, 0.0, is_causal, gqa)
    if q.dtype in (torch.float16, torch.bfloat16) and torch.backends.cuda.can_use_flash_attention(params):
        return aten.scaled_dot_product_attention(q, k, v, mask, 0.0, is_causal, scale=scale, enable_gqa=gqa)
    if not torch.backends.cuda.can_use_efficient_attention(params):
        return aten.scaled_dot_product_attention(q, k, v, mask, 0.0, is_causal, scale=scale, enable_gqa=gqa)
    if mask is None and not gqa:
        ctx.note("CUDA memory-efficient kernel, logsumexp kept for the backward")
        return aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, is_causal, scale=scale)[0]
    ctx.note("math path (a mask or GQA on CUDA's memory-efficient kernel)")
    return aten._scaled_dot_product_attention_math(q, k, v, _float_mask(mask, q), 0.0, is_causal, scale=scale,
                                                   enable_gqa=gqa)[0]


def _math_with_dropout(ctx, q, k, v, mask, ps, is_causal, scale, lead):
    n = ctx.n
    s = (1.0 / math.sqrt(q.shape[-1])) if scale is None else scale
    attn = _masked_softmax((q @ k.transpose(-2, -1)) * s, mask, is_causal)
    # dropout on n,(B..),H,L,S with each model's own stream
    a = attn.unflatten(0, (n, -1)) if lead else attn
    fake_node = ctx.node
    ctx.node = None
    try:
        dropped, _ = _random.dropout(ctx, (a, list(ps), "plain"), (0, None, None), {})
    finally:
        ctx.node = fake_node
    dropped = dropped.flatten(0, 1) if lead else dropped
    return dropped @ v
