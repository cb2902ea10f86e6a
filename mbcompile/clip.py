"""Per-model gradient clipping: ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` for each model.

The norm of model ``i`` is taken over model ``i``'s slices of all stacked gradients only; no number of one
model ever enters another model's clipping.  The arithmetic is torch's: per-tensor
``vector_norm``, then the ``vector_norm`` of those, ``clip_coef = max_norm / (total_norm + 1e-6)``
clamped to 1.0, gradients multiplied by it.
"""
from __future__ import annotations


import torch
from torch import Tensor

from .optim import _split_per_model
from .errors import InvalidInputError, NotSupportedError, StateError

__all__ = ["clip_grad_norm_", "clip_grad_value_"]


def _params_and_n(parameters) -> tuple[list[Tensor], int | None]:
    n = None
    if isinstance(parameters, torch.nn.Module):
        n = getattr(parameters, "n", None)
        params = list(parameters.parameters())
    elif getattr(parameters, "_mbcompile_per_model", False):  # a per-model optimizer
        n = parameters.n
        params = list(parameters._params)
    elif isinstance(parameters, Tensor):
        params = [parameters]
    else:
        params = list(parameters)
    params = list(dict.fromkeys(params))
    if n is None:
        for p in params:
            if p.dim() >= 1:
                n = p.shape[0]
                break
    return params, n


def _view(t: Tensor, n: int, like: Tensor) -> Tensor:
    return t.view(n, *([1] * (like.dim() - 1)))


@torch.no_grad()
def total_norms(grads: list[Tensor], n: int, norm_type: float = 2.0) -> Tensor:
    """[n]: model i's norm over its slices of every stacked gradient (torch's two-level vector_norm);
    also used inside mbcompile.train_step's program."""
    norms = [torch.linalg.vector_norm(g.reshape(n, -1), norm_type, dim=1) for g in grads]
    return torch.linalg.vector_norm(torch.stack([nm.to(grads[0].device) for nm in norms], dim=1), norm_type, dim=1)


def clip_grad_norm_(parameters, max_norm, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach=None) -> Tensor:
    """Clip each model's gradient norm (over all of that model's parameters) to ``max_norm``.

    ``parameters`` is a batched module, a per-model optimizer, or an iterable of stacked ``[n, ...]``
    parameters.  ``max_norm`` may be per model (a list or 1-D tensor of length n).  Returns the ``[n]``
    per-model total norms (before clipping), like ``torch.nn.utils.clip_grad_norm_`` returns one.
    ``foreach`` is accepted for signature compatibility and ignored (the computation is already batched).
    """
    params, n = _params_and_n(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    norm_type = float(norm_type)
    if n is None or len(grads) == 0:
        return torch.zeros(n or 0)
    for g in grads:
        if g.dim() == 0 or g.shape[0] != n:
            raise InvalidInputError(f"gradient of shape {tuple(g.shape)} has no leading model dim of size n={n}")
        if g.is_sparse:
            raise NotSupportedError("per-model clipping does not support sparse gradients")
    total_norm = total_norms(grads, n, norm_type)
    if error_if_nonfinite:
        bad = torch.logical_or(total_norm.isnan(), total_norm.isinf())
        if bad.any():
            models = torch.nonzero(bad).flatten().tolist()
            raise StateError(
                f"The total norm of order {norm_type} for gradients of models {models} is non-finite, so it "
                "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
                "anyway, set `error_if_nonfinite=False`"
            )
    per = _split_per_model("max_norm", max_norm, n)
    if all(v == per[0] for v in per):
        clip_coef = float(per[0]) / (total_norm + 1e-6)  # torch: Tensor.__rtruediv__ = reciprocal() * max_norm
    else:
        mx = torch.tensor([float(v) for v in per], dtype=torch.float64).to(device=total_norm.device,
                                                                           dtype=total_norm.dtype)
        clip_coef = (total_norm + 1e-6).reciprocal() * mx
    clip_coef_clamped = torch.clamp(clip_coef, max=1.0)
    for g in grads:
        g.mul_(_view(clip_coef_clamped.to(g.device), n, g))
    return total_norm


@torch.no_grad()
def clip_grad_value_(parameters, clip_value, foreach=None) -> None:
    """Clamp each model's gradients to ``[-clip_value, clip_value]`` (``clip_value`` may be per model)."""
    params, n = _params_and_n(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    if n is None or not grads:
        return
    per = _split_per_model("clip_value", clip_value, n)
    if all(v == per[0] for v in per):
        cv = float(per[0])
        for g in grads:
            g.clamp_(min=-cv, max=cv)
        return
    cv = torch.tensor([float(v) for v in per], dtype=torch.float64)
    for g in grads:
        c = _view(cv.to(device=g.device, dtype=g.dtype if g.is_floating_point() else torch.float32), n, g)
        g.clamp_(min=-c, max=c)
