"""Per-model losses: a [n] tensor whose entry i is fn(out[i], target_i)."""
from __future__ import annotations

import warnings

import torch
from torch.utils import _pytree as pytree
import torch.nn as nn
import torch.nn.functional as F
from .errors import InvalidInputError, InvalidTypeError


def loss(fn, out, target, *, target_in_dim="auto", **kwargs):
    """``fn(out[i], target_i)`` for every model, as one vectorised call when possible.

    ``target`` is shared ([B, ...]) or per model ([n, B, ...]); with ``target_in_dim="auto"`` a
    leading size of n (different from B) means per model, B means shared, and n == B is ambiguous.
    ``out`` may also be a tuple / dict of [n, ...] tensors (a model with several outputs): the loss
    then gets model i's outputs in that structure."""
    if not isinstance(out, torch.Tensor):
        return _tree_loss(fn, out, target, target_in_dim, kwargs)
    n = out.shape[0]
    target_in_dim = _target_dim(n, out.shape[1] if out.dim() > 1 else None, target, target_in_dim)
    fast = _fast(fn)
    if fast is not None and not kwargs and isinstance(target, torch.Tensor):
        res = fast(out, target, target_in_dim)
        if res is not None:
            return res
    try:
        res = _vmap(lambda o, t: fn(o, t, **kwargs), (0, target_in_dim), out, target)
        if res.shape == (n,):
            return res
    except Exception:  # noqa: BLE001 - a loss vmap cannot batch: loop over models
        pass
    res = []
    for i in range(n):
        t = _pick(target, target_in_dim, i)
        try:
            res.append(fn(out[i], t, **kwargs))
        except Exception as e:  # noqa: BLE001 - what the loss says of model i alone, with the shapes
            if i or _traced_data(e):
                raise
            shape = lambda v: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__  # noqa: E731
            how = (f"per model (target_in_dim=0): target[0] {shape(t)}" if target_in_dim == 0 else
                   f"shared by every model: {shape(t)}")
            raise InvalidInputError(
                f"mbcompile.loss: the loss failed on model 0's output {shape(out[0])} and its target, "
                f"{how}: {type(e).__name__}: {e}. A shared target is what one model's loss takes "
                f"([B, ...], B={out.shape[1] if out.dim() > 1 else '-'}); a per-model one adds a leading n={n}") from e
    return torch.stack(res)


def _traced_data(e) -> bool:
    """Whether ``e`` is a tracer's refusal of a value that depends on the data (the loss checked its
    inputs' values in Python while train_step traced it): the loss's own error, not a shape problem."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
    return isinstance(e, (DataDependentOutputException, DynamicOutputShapeException, GuardOnDataDependentSymNode))


def _vmap(f, in_dims, out, target):
    """torch.vmap(f) without torch's "no batching rule ... performance drop" warning: a loss that
    vmap runs op by op (kl_div, the margin losses, ctc_loss) is what the user asked for, and the
    warning names a vmap the user never wrote."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        return torch.vmap(f, in_dims=in_dims)(out, target)


def _target_dim(n, b, target, target_in_dim):
    """0 (a target per model) or None (shared): "auto" reads the target's leading size (n: per model,
    anything else: shared; n == the batch size b is ambiguous and refused). A target that is a tuple /
    list / dict of tensors gets one such dim per tensor (a pytree of them, as vmap's in_dims)."""
    if not isinstance(target, torch.Tensor):
        leaves, spec = pytree.tree_flatten(target)
        if any(isinstance(t, torch.Tensor) for t in leaves):
            if target_in_dim not in ("auto", None, 0):
                raise InvalidInputError(f"target_in_dim must be 'auto', 0 or None, got {target_in_dim!r}")
            dims = [_target_dim(n, b, t, target_in_dim) if isinstance(t, torch.Tensor) else None for t in leaves]
            return None if all(d is None for d in dims) else pytree.tree_unflatten(dims, spec)
    if target_in_dim == "auto":
        if not isinstance(target, torch.Tensor) or target.dim() == 0:
            return None
        lead = target.shape[0]
        if lead == n and lead == b:                     # as the contract says: never guessed
            raise InvalidInputError(f"mbcompile.loss: the target's leading size {lead} equals both n and the batch "
                                    f"size; say which it is with target_in_dim=0 (per model) or None (shared)")
        return 0 if lead == n else None
    if target_in_dim not in (None, 0):
        raise InvalidInputError(f"target_in_dim must be 'auto', 0 or None, got {target_in_dim!r}")
    if target_in_dim == 0 and (not isinstance(target, torch.Tensor) or target.dim() == 0 or target.shape[0] != n):
        got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise InvalidInputError(f"mbcompile.loss: target_in_dim=0 means one target per model, with a leading size "
                                f"of n={n}; got {got}")
    return target_in_dim


def _pick(target, tdim, i):
    """Model i's target: its slice of every per-model tensor (tdim 0, or a pytree of 0 / None)."""
    if tdim is None:
        return target
    if tdim == 0 and isinstance(target, torch.Tensor):
        return target[i]
    dims = pytree.tree_leaves(tdim, is_leaf=lambda d: d is None)
    leaves, spec = pytree.tree_flatten(target)
    return pytree.tree_unflatten([t[i] if d == 0 else t for t, d in zip(leaves, dims)], spec)


def _tree_loss(fn, out, target, target_in_dim, kwargs):
    """Several outputs (a tuple, dict or dataclass of [n, ...] tensors, e.g. logits and an auxiliary
    loss): entry i is fn(model i's outputs in the same structure, target_i)."""
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]   # None, numbers: as they are
    if not leaves or not all(t.dim() > 0 for t in leaves):
        raise InvalidTypeError(f"mbcompile.loss takes the [n, ...] output (a tensor, or a tuple / dict of them) the "
                               f"loss applies to, got {type(out).__name__}"
                               + (" holding a 0-dim tensor" if leaves else " holding no tensor"))
    n = leaves[0].shape[0]
    if any(t.shape[0] != n for t in leaves):
        raise InvalidInputError(f"mbcompile.loss: the outputs' leading sizes differ ({[t.shape[0] for t in leaves]}); "
                                f"each must be n")
    first = next((t for t in leaves if t.dim() > 1), leaves[0])
    tdim = _target_dim(n, first.shape[1] if first.dim() > 1 else None, target, target_in_dim)

    def one(i):
        mine = pytree.tree_map(lambda t: t[i] if isinstance(t, torch.Tensor) else t, out)
        return fn(mine, _pick(target, tdim, i), **kwargs)
    try:
        res = _vmap(lambda o, t: fn(o, t, **kwargs), (0, tdim), out, target)
        if isinstance(res, torch.Tensor) and res.shape == (n,):
            return res
    except Exception:  # noqa: BLE001 - a loss vmap cannot batch: loop over models
        pass
    try:
        return torch.stack([one(i) for i in range(n)])
    except Exception as e:
        if _traced_data(e):
            raise
        raise InvalidTypeError(
            f"mbcompile.loss called the loss with model i's outputs as a {type(out).__name__} (the structure the "
            f"model returns) and it failed: {type(e).__name__}: {e}. If the loss takes one tensor, pass that "
            f"output (out[0], out['logits'])") from e


def _cross_entropy(out, target, tdim, ignore_index=-100):
    """n,B,C + B (or n,B) class indices -> [n]: one flat call, mean over each model's own samples."""
    if out.dim() != 3 or target.is_floating_point() or target.dim() != (2 if tdim == 0 else 1):
        return None
    n, b, c = out.shape
    if target.shape != ((n, b) if tdim == 0 else (b,)):
        return None                    # the loss's own error, from the general path
    tgt = target if tdim == 0 else target.unsqueeze(0).expand(n, b)
    per = F.cross_entropy(out.reshape(n * b, c), tgt.reshape(n * b), reduction="none",
                          ignore_index=ignore_index).view(n, b)
    if tdim is None:                   # a shared target: one count for every model
        return per.sum(1) / (target != ignore_index).sum().to(per.dtype)
    return per.sum(1) / (target != ignore_index).to(per.dtype).sum(1)


def _mse(out, target, tdim):
    """n,... + (n,)... -> [n]: mean squared error per model."""
    t = target if tdim == 0 else target.unsqueeze(0)
    if t.dim() != out.dim() or any(a != b and b != 1 for a, b in zip(out.shape, t.shape)):
        return None
    return (out - t).square().flatten(1).mean(1)


_FAST = {F.cross_entropy: _cross_entropy, F.mse_loss: _mse}


def _fast(fn):
    """The one-call form of ``fn`` when there is one: F.cross_entropy / F.mse_loss, or an
    nn.CrossEntropyLoss / nn.MSELoss with the options those forms compute (read at every call, so
    options changed later are seen; anything else takes the vmap path)."""
    if isinstance(fn, nn.Module):
        if type(fn) is nn.CrossEntropyLoss and fn.weight is None and fn.reduction == "mean" \
                and fn.label_smoothing == 0.0:
            return lambda out, target, tdim: _cross_entropy(out, target, tdim, fn.ignore_index)
        if type(fn) is nn.MSELoss and fn.reduction == "mean":
            return _mse
        return None
    try:
        return _FAST.get(fn)
    except TypeError:                  # an unhashable callable
        return None
