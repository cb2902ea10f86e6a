"""Per-model losses: a [n] tensor whose entry i is fn(out[i], target_i)."""
from __future__ import annotations

import torch


def loss(fn, out, target, *, target_in_dim="auto", **kwargs):
    """``fn(out[i], target_i)`` for every model, as one vectorised call when possible.

    ``target`` is shared ([B, ...]) or per model ([n, B, ...]); with ``target_in_dim="auto"`` a
    leading size of n (different from B) means per model, B means shared, and n == B is ambiguous."""
    n = out.shape[0]
    if target_in_dim == "auto":
        if not isinstance(target, torch.Tensor) or target.dim() == 0:
            target_in_dim = None
        else:
            b = out.shape[1] if out.dim() > 1 else None
            lead = target.shape[0]
            if lead == n and lead == b and target.dim() == out.dim() - (0 if target.is_floating_point() else 1):
                raise ValueError(f"mbcompile.loss: the target's leading size {lead} equals both n and the batch "
                                 f"size; say which it is with target_in_dim=0 (per model) or None (shared)")
            if lead == n and lead == b:
                target_in_dim = 0 if target.dim() == out.dim() - (0 if target.is_floating_point() else 1) else None
            else:
                target_in_dim = 0 if lead == n and lead != b else None
    if target_in_dim not in (None, 0):
        raise ValueError(f"target_in_dim must be 'auto', 0 or None, got {target_in_dim!r}")
    try:
        res = torch.vmap(lambda o, t: fn(o, t, **kwargs), in_dims=(0, target_in_dim))(out, target)
        if res.shape == (n,):
            return res
    except Exception:  # noqa: BLE001 - a loss vmap cannot batch: loop over models
        pass
    return torch.stack([fn(out[i], target[i] if target_in_dim == 0 else target, **kwargs) for i in range(n)])
