"""Control flow: torch.cond, whose branches are graphs batched like the forward itself.

cond(pred, true_fn, false_fn, ops), pred shared:     cond(pred, batched true_fn, batched false_fn, ops)
                                  pred per model:    n,.. = where(pred[n,1,..], true_fn(ops), false_fn(ops))
With a per-model predicate both branches run for every model and each model keeps its own branch's
values (torch.vmap's rule for cond does the same): a branch that produces inf/nan for the models that do
not take it still gives them zero gradient through where, unless its own backward meets 0 * inf.
"""
from __future__ import annotations

import torch

from .axes import front
from .registry import rule

_RANDOM = ("mbcompile.draw", "mbcompile.random_call", "mbcompile.dropout")


def _draws(gm) -> bool:
    return any(nd.op == "call_function" and str(nd.target).startswith(_RANDOM) for nd in gm.graph.nodes)


@rule(torch.ops.higher_order.cond)
def cond(ctx, args, dims, kwargs):
    from . import batch_pass
    pred, t_gm, f_gm, operands = args
    if kwargs or _draws(t_gm) or _draws(f_gm):
        raise NotImplementedError("random ops inside a cond branch")
    n, odims = ctx.n, list(dims[3])
    recs: list = []

    def branch(gm):
        def run(*ops):
            return tuple(batch_pass.run(gm, n, list(ops), odims, strict=ctx.strict, consts=ctx.consts,
                                        rng=ctx.rng, records=recs, fallback=not ctx.strict))
        return run

    if dims[0] is None:                        # one branch for every model: still a cond
        def keep(gm):
            run = branch(gm)
            return lambda *ops: tuple(t.clone() for t in run(*ops))   # cond's outputs may not alias inputs
        out = torch.ops.higher_order.cond(pred, keep(t_gm), keep(f_gm), tuple(operands))   # no dynamo
        ctx.note("shared predicate: one cond, both branches batched")
    else:                                      # each model its own branch
        p = front(pred, dims[0], n)
        t_out, f_out = branch(t_gm)(*operands), branch(f_gm)(*operands)
        out = tuple(torch.where(p.view(n, *[1] * (t.dim() - 1)), t, f) for t, f in zip(t_out, f_out))
        ctx.note("per-model predicate: both branches batched, each model's selected with where")
    fallbacks = [r.op for r in recs if r.how.startswith("FALLBACK")]
    if fallbacks:
        ctx.note(f"branch ops through the fallback: {', '.join(fallbacks)}")
    return tuple(out), tuple(0 for _ in out)
