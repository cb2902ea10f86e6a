"""Embedding: every model's table is one block of a flat (n*V),D table; indices get offsets i*V.
n,V,D + B,T -> n,B,T,D. padding_idx rows take no gradient, as in torch; scale_grad_by_freq counts
each model's own indices (they are distinct rows of the flat table)."""
from __future__ import annotations

import torch

from .axes import front
from .registry import aten, rule


@rule(aten.embedding.default)
def embedding(ctx, args, dims, kwargs):
    w, idx = args[0], args[1]
    padding_idx = args[2] if len(args) > 2 else kwargs.get("padding_idx", -1)
    scale_grad = args[3] if len(args) > 3 else kwargs.get("scale_grad_by_freq", False)
    dw, di = dims[0], dims[1]
    n = ctx.n
    if dw is None:                                        # shared table, per-model indices
        if scale_grad and di is not None and w.requires_grad:
            raise NotImplementedError("a shared table with scale_grad_by_freq=True and per-model indices")
        return aten.embedding(w, idx, padding_idx, scale_grad), di
    w = front(w, dw, n)
    v = w.shape[1]
    if padding_idx is not None and padding_idx >= 0:      # no gradient into the padding row
        row = torch.zeros(v, 1, dtype=torch.bool, device=w.device)
        row[padding_idx] = True
        w = torch.where(row, w.detach(), w)
    off = torch.arange(n, device=idx.device) * v
    if di is None:
        flat_idx = idx.unsqueeze(0) + off.view(n, *([1] * idx.dim()))
    else:
        fi = front(idx, di, n)
        flat_idx = fi + off.view(n, *([1] * (fi.dim() - 1)))
    ctx.note("flat table with per-model offsets")
    return aten.embedding(w.reshape(n * v, -1), flat_idx, -1, scale_grad), 0


@rule(aten.embedding_renorm.default)
def embedding_renorm(ctx, args, dims, kwargs):
    """max_norm: rows each model looks up are rescaled in its own block of the flat table.
    n,V,D + (n,)B,T -> (n*V),D renorm at idx + i*V -> n,V,D."""
    w, idx = args[0], args[1]
    n = ctx.n
    w = front(w, dims[0], n)
    v = w.shape[1]
    fi = front(idx, dims[1], n).reshape(n, -1) + (torch.arange(n, device=idx.device) * v).view(n, 1)
    out = aten.embedding_renorm(w.reshape(n * v, -1), fi.reshape(-1), *args[2:], **kwargs).view(n, v, -1)
    # eager renormalises the parameter in place under no_grad, so the lookup's gradient still reaches the
    # weight: the renormed values, with the identity as gradient (w - w.detach() is exactly zero)
    return w - w.detach() + out.detach(), 0
