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


_BAG_DEFAULTS = (False, 0, False, None, False, -1)   # scale_grad_by_freq, mode, sparse, per_sample_weights,
                                                     # include_last_offset, padding_idx


@rule(aten._embedding_bag.default, aten._embedding_bag_forward_only.default)
def embedding_bag(ctx, args, dims, kwargs):
    """Bags of every model in one call: n,V,D -> (n*V),D; indices i*V + idx (padding entries stay at
    padding_idx, which the kernel skips); offsets i*L + off; per_sample_weights concatenated.
    -> out n,B,D ; offset2bag n,L (bags counted per model) ; bag_size n,B ; max_indices n,B,D (rows per model)."""
    w, idx, off = args[:3]
    names = ("scale_grad_by_freq", "mode", "sparse", "per_sample_weights", "include_last_offset", "padding_idx")
    opts = [args[3 + k] if len(args) > 3 + k else kwargs.get(name, d) for k, (name, d) in enumerate(zip(names,
                                                                                                      _BAG_DEFAULTS))]
    scale_grad, mode, sparse, psw, include_last, padding_idx = opts
    dw, di, doff = dims[0], dims[1], dims[2]
    dpsw = dims[6] if len(dims) > 6 else None
    if sparse:
        raise NotImplementedError("embedding_bag with sparse=True (per-model sparse gradients)")
    if scale_grad:        # the bag backward's frequency scaling did not match per model on the flat table
        raise NotImplementedError("embedding_bag with scale_grad_by_freq=True")
    n = ctx.n
    idx_n = front(idx, di, n) if di is not None else idx.unsqueeze(0).expand(n, -1)          # n,L
    off_n = front(off, doff, n) if doff is not None else off.unsqueeze(0).expand(n, -1)      # n,B(+1)
    length = idx_n.shape[1]
    models = torch.arange(n, device=idx.device).view(n, 1)
    if dw is None:
        table, v = w, 0
        flat_idx = idx_n
    else:
        table = front(w, dw, n)
        v = table.shape[1]
        table = table.reshape(n * v, -1)
        flat_idx = idx_n + models * v
        if padding_idx is not None and padding_idx >= 0:
            flat_idx = torch.where(idx_n == padding_idx, idx_n, flat_idx)
    starts = off_n[:, :-1] if include_last else off_n
    flat_off = (starts + models * length).reshape(-1)
    if include_last:
        flat_off = torch.cat([flat_off, flat_off.new_full((1,), n * length)])
    flat_psw = None
    if psw is not None:
        flat_psw = (front(psw, dpsw, n) if dpsw is not None else psw.unsqueeze(0).expand(n, -1)).reshape(-1)
    # capture records the forward-only op when it saw no grad (a table computed in forward can still need
    # one when the program runs): the op with a backward computes the same values
    out, o2b, bag_size, max_idx = aten._embedding_bag(table, flat_idx.reshape(-1), flat_off, scale_grad, mode, False,
                                                      flat_psw, include_last, padding_idx)
    bags = starts.shape[1]
    o2b_d = bag_d = max_d = None
    if o2b.numel() == n * length:
        o2b, o2b_d = o2b.view(n, length) - models * bags, 0
    if bag_size.numel() == n * bags:
        bag_size, bag_d = bag_size.view(n, bags), 0
    if max_idx.dim() == 2 and max_idx.shape[0] == n * bags:
        max_idx, max_d = max_idx.view(n, bags, -1) - models.view(n, 1, 1) * v, 0
    ctx.note("flat table with per-model offsets" if dw is not None else "shared table, bags of every model")
    return (out.view(n, bags, -1), o2b, bag_size, max_idx), (0, o2b_d, bag_d, max_d)
