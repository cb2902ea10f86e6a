"""Data routing for a batch of n models.

Three ways to feed n models (``fit(..., data=...)``):

- ``"shared"`` (default): one batch ``(x [B, ...], y [B, ...])`` for every model.
- ``"per_model"``: each model its own batch ``(x [n, B, ...], y [n, B, ...])``, e.g. its own shuffle or a
  bootstrap resample (:class:`PerModelLoader`). Batch the model with ``in_dims=0``.
- ``"weights"``: one shared batch plus per-model sample weights ``(x [B, ...], y [B, ...], w [n, B])``;
  a bool mask is 0/1 weights (``"mask"`` is an alias). Model i's loss is the weighted mean of the
  per-sample losses over *its own* samples, ``sum_b w_ib l_ib / sum_b w_ib``, so nothing is padded and a
  sample a model does not own neither counts in its loss nor in its denominator. A model that owns no
  sample of a batch gets no gradient and its loss for that batch is reported as nan (not averaged in).

Loaders here are deterministic in ``(seed, epoch)`` and expose ``set_epoch`` (like
``DistributedSampler``), which makes a run resumable mid-epoch without saving the loader.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from .errors import InvalidInputError

MODES = ("shared", "per_model", "weights", "mask")


def _mix(seed: int, epoch: int) -> int:
    """One generator seed per (seed, epoch); distinct pairs give unrelated streams."""
    return (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (2**63 - 1)


def per_model_indices(num_samples: int, seeds, *, epoch: int = 0, bootstrap: bool = False) -> torch.Tensor:
    """One index stream per model, ``[n, num_samples]`` int64: model i's own permutation of the dataset
    (or, with ``bootstrap=True``, ``num_samples`` draws with replacement), reproducible from
    ``(seeds[i], epoch)`` and independent of every other model."""
    rows = []
    for s in seeds:
        g = torch.Generator().manual_seed(_mix(s, epoch))
        rows.append(torch.randint(0, num_samples, (num_samples,), generator=g) if bootstrap
                    else torch.randperm(num_samples, generator=g))
    return torch.stack(rows)


def bootstrap_weights(num_samples: int, seeds, *, dtype=torch.float64) -> torch.Tensor:
    """``[n, num_samples]`` bootstrap counts (how often model i's resample contains each sample) as
    weights for ``data="weights"``: a weighted mean with these counts is the mean over the resample."""
    idx = per_model_indices(num_samples, seeds, bootstrap=True)
    w = torch.zeros(len(seeds), num_samples, dtype=dtype)
    return w.scatter_add_(1, idx, torch.ones_like(idx, dtype=dtype))


def kfold_masks(num_samples: int, k: int, *, seed: int = 0) -> torch.Tensor:
    """``[k, num_samples]`` bool: row i is True on the samples model i trains on (all folds but fold i);
    ``~masks`` are the validation folds. Folds are a seeded random partition of near-equal sizes."""
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(_mix(seed, 0)))
    fold = torch.empty(num_samples, dtype=torch.long)
    fold[perm] = torch.arange(num_samples) % k
    return fold[None, :] != torch.arange(k)[:, None]


class _Loader:
    """Batches over in-memory tensors; iterating is deterministic in (seed, epoch)."""

    def __init__(self, tensors, batch_size, drop_last):
        self.tensors = tuple(tensors)
        if not self.tensors:
            raise InvalidInputError("a loader needs at least one tensor")
        self.num_samples = self.tensors[0].shape[0]
        if any(t.shape[0] != self.num_samples for t in self.tensors):
            sizes = [t.shape[0] for t in self.tensors]
            raise InvalidInputError(f"all tensors must have the same first size, got {sizes}")
        self.batch_size, self.drop_last, self.epoch = int(batch_size), drop_last, 0

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def __len__(self):
        f = math.floor if self.drop_last else math.ceil
        return int(f(self.num_samples / self.batch_size))

    def _spans(self):
        for k in range(len(self)):
            yield slice(k * self.batch_size, min((k + 1) * self.batch_size, self.num_samples))


class SharedLoader(_Loader):
    """One shared stream of batches ``(t[idx] for t in tensors)``; with ``weights`` ([n, N], bool or
    float) each batch also carries ``weights[:, idx]`` for ``data="weights"``."""

    def __init__(self, *tensors, batch_size, shuffle=True, seed=0, weights=None, drop_last=False):
        super().__init__(tensors, batch_size, drop_last)
        self.shuffle, self.seed, self.weights = shuffle, int(seed), weights
        if weights is not None and (weights.dim() != 2 or weights.shape[1] != self.num_samples):
            raise InvalidInputError(f"weights must be [n, {self.num_samples}], got {tuple(weights.shape)}")

    def __iter__(self):
        order = (torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(_mix(self.seed, self.epoch)))
                 if self.shuffle else torch.arange(self.num_samples))
        for sl in self._spans():
            idx = order[sl]
            batch = tuple(t[idx] for t in self.tensors)
            yield batch + ((self.weights[:, idx],) if self.weights is not None else ())


class PerModelLoader(_Loader):
    """Each model its own stream: batch k is ``t[idx[:, k*B:(k+1)*B]]`` -> ``[n, B, ...]`` per tensor,
    where ``idx = per_model_indices(N, seeds, epoch=epoch, bootstrap=bootstrap)`` (a fresh shuffle or
    bootstrap resample per model and epoch). Feed it to ``fit(..., data="per_model")``."""

    def __init__(self, *tensors, batch_size, seeds, bootstrap=False, drop_last=False):
        super().__init__(tensors, batch_size, drop_last)
        self.seeds, self.bootstrap = [int(s) for s in seeds], bootstrap

    @property
    def n(self):
        return len(self.seeds)

    def __iter__(self):
        idx = per_model_indices(self.num_samples, self.seeds, epoch=self.epoch, bootstrap=self.bootstrap)
        for sl in self._spans():
            yield tuple(t[idx[:, sl]] for t in self.tensors)  # N,... -> n,B,...


# ---- per-model losses from a batch -----------------------------------------------------------------
def per_sample_losses(fn, out, target, target_in_dim=None):
    """``[n, B]``: entry (i, b) is ``fn(out[i, b:b+1], target_i[b:b+1])``, the loss of one sample."""
    n, b = out.shape[:2]
    t = target if target_in_dim == 0 else target.expand(n, *target.shape)
    o2, t2 = out.reshape(n * b, *out.shape[2:]), t.reshape(n * b, *t.shape[2:])  # n,B,... -> (n*B),...
    try:
        res = torch.vmap(lambda o, tt: fn(o[None], tt[None]))(o2, t2)
    except Exception:  # noqa: BLE001 - a loss vmap cannot batch: loop over samples
        res = torch.stack([fn(o2[k:k + 1], t2[k:k + 1]) for k in range(n * b)])
    return res.reshape(n, b)


def _ignore_index(fn):
    """The class index ``fn`` leaves out of its mean (cross entropy / NLL), or None."""
    if isinstance(fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return fn.ignore_index
    if fn in (F.cross_entropy, F.nll_loss):
        return -100
    return None


def weighted_losses(fn, out, target, weights, target_in_dim=None):
    """Per-model weighted mean over each model's own samples -> (loss [n], count [n]).

    Samples with weight 0 are excluded with ``where`` (so a nan/inf in a sample a model does not own
    cannot leak into it); a model with total weight 0 gets loss 0 with zero gradient, and its count 0
    tells the caller to report nan."""
    w = weights.to(out.dtype)
    per = per_sample_losses(fn, out, target, target_in_dim)  # n,B
    ig = _ignore_index(fn)
    if ig is not None and isinstance(target, torch.Tensor) and not target.is_floating_point():
        # a class target equal to ignore_index counts for nothing, as in torch's mean over the subset: a
        # sample weighs by its valid targets (a sequence's tokens; 0 or 1 for one class per sample)
        n, b = out.shape[:2]
        t = target if target_in_dim == 0 else target.expand(n, *target.shape)
        w = w * (t != ig).reshape(n, b, -1).sum(-1).to(w.dtype)
    owned = w != 0
    num = torch.where(owned, per, torch.zeros((), dtype=per.dtype)).mul(w).sum(1)
    den = w.sum(1)
    return num / torch.where(den != 0, den, torch.ones((), dtype=den.dtype)), den
