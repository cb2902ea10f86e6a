"""A per-model gradient scaler: n independent ``torch.amp.GradScaler`` s in one.

Each model has its own scale, growth tracker and found-inf flag.  ``step(optimizer)`` skips only the
models whose gradients had an inf/nan (their parameters and optimizer state stay untouched); ``update()``
backs off or grows each model's scale exactly as ``torch._amp_update_scale_`` does for a model alone.
"""
from __future__ import annotations

from collections import abc, defaultdict
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from .optim import _check_keep, _model_count, _split_per_model
from .errors import InvalidInputError, InvalidTypeError, NotSupportedError, StateError

__all__ = ["GradScaler"]


class _Stage(Enum):
    READY = 0
    UNSCALED = 1
    STEPPED = 2


def _fresh_state() -> dict:
    return {"stage": _Stage.READY, "found_inf": None}


def _unique_params(optimizer) -> list[Tensor]:
    params = getattr(optimizer, "_params", None)
    if params is None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
    return list(dict.fromkeys(params))


class GradScaler:
    """Per-model ``torch.amp.GradScaler`` for a batch of ``n`` models.

    ``init_scale``, ``growth_factor``, ``backoff_factor`` and ``growth_interval`` may be per model (a list
    or 1-D tensor of length n).  ``scale(outputs)`` multiplies model ``i``'s slice of each output (which
    must have a leading model dim of size n, e.g. the ``[n]`` loss) by model ``i``'s scale.
    """

    def __init__(self, batched, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, enabled: bool = True):
        n = batched if isinstance(batched, int) else _model_count(batched)
        self.n = n
        self._enabled = bool(enabled)
        self._init_scale = [float(v) for v in _split_per_model("init_scale", init_scale, n)]
        self._growth_factor = [float(v) for v in _split_per_model("growth_factor", growth_factor, n)]
        self._backoff_factor = [float(v) for v in _split_per_model("backoff_factor", backoff_factor, n)]
        self._growth_interval = [int(v) for v in _split_per_model("growth_interval", growth_interval, n)]
        if self._enabled:
            for i in range(n):
                if not self._growth_factor[i] > 1.0:
                    raise InvalidInputError(f"model {i}: the growth factor must be > 1.0.")
                if not self._backoff_factor[i] < 1.0:
                    raise InvalidInputError(f"model {i}: the backoff factor must be < 1.0.")
        self._init_growth_tracker = [0] * n
        self._scale: Tensor | None = None  # float32 [n]
        self._growth_tracker: Tensor | None = None  # int32 [n]
        self._per_optimizer_states: dict[int, dict[str, Any]] = defaultdict(_fresh_state)

    # ---- helpers --------------------------------------------------------------------------------
    def _lazy_init(self, device) -> None:
        self._scale = torch.tensor(self._init_scale, dtype=torch.float32, device=device)
        self._growth_tracker = torch.tensor(self._init_growth_tracker, dtype=torch.int32, device=device)

    def _check(self, funcname: str):
        if self._scale is None:
            raise StateError(
                f"Attempted {funcname} but the scale is not initialised. This may indicate your script did "
                "not use scaler.scale(loss or outputs) earlier in the iteration."
            )
        return self._scale, self._growth_tracker

    def _view(self, t: Tensor, like: Tensor) -> Tensor:
        return t.view(self.n, *([1] * (like.dim() - 1)))

    # ---- API --------------------------------------------------------------------------------------
    def is_enabled(self) -> bool:
        return self._enabled

    def scale(self, outputs):
        """outputs (a tensor or an iterable of tensors with a leading model dim n) times the per-model
        scale."""
        if not self._enabled:
            return outputs

        def apply(val):
            if isinstance(val, Tensor):
                if val.dim() == 0 or val.shape[0] != self.n:
                    raise InvalidInputError(
                        f"GradScaler.scale needs per-model outputs with a leading model dim of size n={self.n} "
                        f"(e.g. the [n] loss from mbcompile.loss), got shape {tuple(val.shape)}"
                    )
                if self._scale is None:
                    self._lazy_init(val.device)
                return val * self._view(self._scale.to(device=val.device, non_blocking=True), val)
            if isinstance(val, abc.Iterable):
                it = map(apply, val)
                if isinstance(val, (list, tuple)):
                    return type(val)(it)
                return it
            raise InvalidInputError("outputs must be a Tensor or an iterable of Tensors")

        return apply(outputs)

    @torch.no_grad()
    def _unscale_grads_(self, optimizer, inv_scale: Tensor | None, allow_fp16: bool) -> Tensor:
        """Per-model check for inf/nan and multiply by inv_scale (None: check only); returns found_inf
        [n] float32."""
        found = torch.zeros(self.n, dtype=torch.float32, device=self._scale.device)
        seen = False
        for p in _unique_params(optimizer):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise NotSupportedError("the per-model GradScaler does not support sparse gradients")
            if (not allow_fp16) and g.dtype == torch.float16:
                raise InvalidInputError("Attempting to unscale FP16 gradients.")
            if g.dim() == 0 or g.shape[0] != self.n:
                raise InvalidInputError(f"gradient of shape {tuple(g.shape)} has no leading model dim of size "
                                        f"n={self.n}")
            seen = True
            bad = ~torch.isfinite(g).reshape(self.n, -1).all(dim=1)
            found = torch.maximum(found, bad.to(device=found.device, dtype=found.dtype))
            # torch multiplies by the float32 inv_scale in the gradient's precision (float for half types)
            if inv_scale is not None:
                g.mul_(self._view(inv_scale.to(g.device), g))
        if not seen:
            raise AssertionError("No inf checks were recorded for this optimizer.")
        return found

    def unscale_(self, optimizer) -> None:
        """Divide model i's gradients by model i's scale, recording which models had inf/nan."""
        if not self._enabled:
            return
        self._check("unscale_")
        st = self._per_optimizer_states[id(optimizer)]
        if st["stage"] is _Stage.UNSCALED:
            raise StateError("unscale_() has already been called on this optimizer since the last update().")
        if st["stage"] is _Stage.STEPPED:
            raise StateError("unscale_() is being called after step().")
        inv_scale = self._scale.double().reciprocal().float()
        st["found_inf"] = self._unscale_grads_(optimizer, inv_scale, allow_fp16=False)
        st["stage"] = _Stage.UNSCALED

    def step(self, optimizer, *args, **kwargs):
        """Unscale (unless done already) and step only the models whose gradients are finite."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise StateError("Closure use is not currently supported if GradScaler is enabled.")
        if not getattr(optimizer, "_mbcompile_per_model", False):
            raise InvalidTypeError(
                "mbcompile.GradScaler.step needs a per-model optimizer (mbcompile.optimizer(...)) so that it can "
                f"skip only the models that overflowed; got {type(optimizer).__name__}"
            )
        self._check("step")
        st = self._per_optimizer_states[id(optimizer)]
        if st["stage"] is _Stage.STEPPED:
            raise StateError("step() has already been called since the last update().")
        if st["stage"] is _Stage.READY and optimizer.fused_cpu():
            # as torch does for a fused optimizer: check only, and the fused kernel divides each
            # model's gradients by its scale (a division, not a product with the float32 reciprocal)
            st["found_inf"] = self._unscale_grads_(optimizer, None, allow_fp16=False)
            kwargs = {**kwargs, "grad_scale": self._scale}
        elif st["stage"] is _Stage.READY:
            self.unscale_(optimizer)
        found = st["found_inf"]
        retval = optimizer.step(*args, active=found == 0, **kwargs)
        st["stage"] = _Stage.STEPPED
        return retval

    @torch.no_grad()
    def update(self, new_scale=None) -> None:
        """Per model: back off the scale if it overflowed this iteration, else grow it after
        ``growth_interval`` consecutive finite steps (torch._amp_update_scale_, per model)."""
        if not self._enabled:
            return
        scale, tracker = self._check("update")
        if new_scale is not None:
            if isinstance(new_scale, (int, float)):
                scale.fill_(float(new_scale))
            else:
                new_scale = torch.as_tensor(new_scale, dtype=torch.float32, device=scale.device)
                if new_scale.numel() not in (1, self.n) or new_scale.requires_grad:
                    raise InvalidInputError("new_scale must be a float, or a 1- or n-element tensor without grad")
                scale.copy_(new_scale.expand(self.n) if new_scale.numel() == 1 else new_scale.reshape(self.n))
        else:
            founds = [s["found_inf"] for s in self._per_optimizer_states.values() if s["found_inf"] is not None]
            if not founds:
                raise AssertionError("No inf checks were recorded prior to update.")
            found = founds[0].to(scale.device)
            for f in founds[1:]:
                found = found + f.to(scale.device)
            dev = scale.device
            growth = torch.tensor(self._growth_factor, dtype=torch.float64, device=dev)
            backoff = torch.tensor(self._backoff_factor, dtype=torch.float64, device=dev)
            interval = torch.tensor(self._growth_interval, dtype=torch.int32, device=dev)
            overflow = found != 0
            # float * double in C++, stored back into the float32 scale
            backed_off = (scale.double() * backoff).float()
            successful = tracker + 1
            grow_now = successful == interval
            grown = (scale.double() * growth).float()
            grown = torch.where(torch.isfinite(grown), grown, scale)  # do not grow past fp32 bounds to inf
            new = torch.where(overflow, backed_off, torch.where(grow_now, grown, scale))
            new_tracker = torch.where(overflow | grow_now, torch.zeros_like(tracker), successful)
            scale.copy_(new)
            tracker.copy_(new_tracker)
        self._per_optimizer_states = defaultdict(_fresh_state)

    def get_scale(self) -> Tensor:
        """The per-model scales, a float32 ``[n]`` tensor (ones when disabled)."""
        if not self._enabled:
            return torch.ones(self.n, dtype=torch.float32)
        if self._scale is None:
            return torch.tensor(self._init_scale, dtype=torch.float32)
        return self._scale.detach().clone()

    def get_growth_factor(self):
        return _shared_or_list(self._growth_factor)

    def set_growth_factor(self, new_factor) -> None:
        self._growth_factor = [float(v) for v in _split_per_model("growth_factor", new_factor, self.n)]

    def get_backoff_factor(self):
        return _shared_or_list(self._backoff_factor)

    def set_backoff_factor(self, new_factor) -> None:
        self._backoff_factor = [float(v) for v in _split_per_model("backoff_factor", new_factor, self.n)]

    def get_growth_interval(self):
        return _shared_or_list(self._growth_interval)

    def set_growth_interval(self, new_interval) -> None:
        self._growth_interval = [int(v) for v in _split_per_model("growth_interval", new_interval, self.n)]

    def _get_growth_tracker(self) -> list[int]:
        if self._growth_tracker is None:
            return list(self._init_growth_tracker)
        return [int(v) for v in self._growth_tracker.tolist()]

    def found_inf(self, optimizer) -> Tensor | None:
        """bool [n]: the models whose gradients had an inf/nan in this iteration (after unscale_/step)."""
        st = self._per_optimizer_states.get(id(optimizer))
        if st is None or st["found_inf"] is None:
            return None
        return st["found_inf"] != 0

    # ---- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Like torch's, with a list of n values for the per-model entries."""
        if not self._enabled:
            return {}
        return {
            "scale": [float(v) for v in self.get_scale().tolist()],
            "growth_factor": list(self._growth_factor),
            "backoff_factor": list(self._backoff_factor),
            "growth_interval": list(self._growth_interval),
            "_growth_tracker": self._get_growth_tracker(),
            "n": self.n,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise StateError("The source state dict is empty, possibly because it was saved from a disabled "
                             "instance of GradScaler.")
        n = state_dict.get("n", self.n)
        if n != self.n:
            raise InvalidInputError(f"state dict is for n={n} models, this scaler has n={self.n}")
        self._init_scale = [float(v) for v in _split_per_model("scale", state_dict["scale"], self.n)]
        self._growth_factor = [float(v) for v in _split_per_model("growth_factor", state_dict["growth_factor"], self.n)]
        self._backoff_factor = [float(v) for v in _split_per_model("backoff_factor", state_dict["backoff_factor"], self.n)]
        self._growth_interval = [int(v) for v in _split_per_model("growth_interval", state_dict["growth_interval"], self.n)]
        self._init_growth_tracker = [int(v) for v in _split_per_model("_growth_tracker", state_dict["_growth_tracker"], self.n)]
        if self._scale is not None:
            self._scale.copy_(torch.tensor(self._init_scale, dtype=torch.float32))
            self._growth_tracker.copy_(torch.tensor(self._init_growth_tracker, dtype=torch.int32))

    def model_state_dict(self, i: int) -> dict:
        """Model i's state in the format of torch.amp.GradScaler.state_dict()."""
        sd = self.state_dict()
        if not sd:
            return {}
        return {k: sd[k][i] for k in ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")}

    def _shrink_(self, keep) -> None:
        keep = _check_keep(keep, self.n)
        pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
        self._init_scale = pick(self._init_scale)
        self._growth_factor = pick(self._growth_factor)
        self._backoff_factor = pick(self._backoff_factor)
        self._growth_interval = pick(self._growth_interval)
        self._init_growth_tracker = pick(self._init_growth_tracker)
        if self._scale is not None:
            idx = torch.tensor(keep, dtype=torch.long, device=self._scale.device)
            self._scale = self._scale.index_select(0, idx)
            self._growth_tracker = self._growth_tracker.index_select(0, idx)
        for st in self._per_optimizer_states.values():
            if st["found_inf"] is not None:
                f = st["found_inf"]
                st["found_inf"] = f.index_select(0, torch.tensor(keep, dtype=torch.long, device=f.device))
        self.n = len(keep)


def _shared_or_list(xs: list):
    return xs[0] if all(x == xs[0] for x in xs) else list(xs)
