"""Named helpers that move, fold and unfold the model dim. Every rule uses these."""
from __future__ import annotations

import torch


def front(x, d, n):
    """Model dim to the front; a shared value is expanded (a view, no copy).  ...n... -> n,..."""
    if d is None:
        return x.unsqueeze(0).expand(n, *x.shape)
    return x if d == 0 else x.movedim(d, 0)


def per_model(x, shared, n):
    """Model i's value for every i: a shared x n times (no copy), else x's slices along its model dim 0."""
    return [x] * n if shared else x.unbind(0)


def front_padded(x, d, rank, n=None):
    """n,... with singleton dims inserted after n so the unbatched part has ``rank`` dims
    (for broadcasting against a mapped value of that rank). Shared values stay as they are."""
    if d is None:
        return x
    x = front(x, d, n)
    missing = rank - (x.dim() - 1)
    if missing > 0:
        x = x.reshape(x.shape[:1] + (1,) * missing + x.shape[1:])
    return x


def fold(x, d, into, n):
    """Merge the model dim into logical axis ``into`` (model-major):  n,B,C,H,W -> B,(n*C),H,W."""
    if d == into:                                       # B,n,C,H,W already: a view
        return x.flatten(into, into + 1)
    x = front(x, d, n)
    x = x.movedim(0, into)  # B,..,n,C,.. with n just before logical axis `into`
    return x.flatten(into, into + 1)


def unfold(x, at, n):
    """Split axis ``at`` into (n, rest); returns the value and its model dim:  B,(n*C),H,W -> B,n,C,H,W."""
    return x.unflatten(at, (n, x.shape[at] // n)), at


def pdim(dim, rank, d=0):
    """Physical position of logical dim ``dim`` (may be negative) when the model dim sits at ``d``."""
    dim = dim + rank if dim < 0 else dim
    return dim + 1 if d is not None and dim >= d else dim


def to_dim(x, d, target):
    """Move the model dim from ``d`` to ``target``."""
    return x if d == target else x.movedim(d, target)


def memory_order(x):
    """The permutation that makes a dense x contiguous (outermost dim first), or None when x is
    contiguous already or not dense (expanded, overlapping)."""
    if x.dim() < 2 or x.is_contiguous() or not torch._prims_common.is_non_overlapping_and_dense_or_false(x):
        return None
    return sorted(range(x.dim()), key=lambda k: (-x.stride(k), -x.shape[k]))
