"""Per-model optimizers for a batch of N models.

``mbcompile.optimizer(batched, torch.optim.X, **hparams)`` returns a :class:`BatchedOptimizer`, a
``torch.optim.Optimizer`` with one param group per model.  Its step is one vectorised update over the
stacked ``[n, *shape]`` parameters: per-model hyperparameters become ``[n]`` tensors broadcast against the
model dim, shared ones stay Python scalars, and there is no loop over models and no reduction across
models anywhere in the tensor work.  Model ``i`` follows exactly (bit for bit on CPU) the trajectory
``torch.optim.X(model_i.parameters(), **its hyperparameters)`` would take.

How the arithmetic is kept identical to torch's ``_single_tensor_*`` implementations:

* everything torch computes in Python floats (bias corrections, step sizes, ``1 - beta``) is computed in
  Python floats here too, per model, with the very same expressions; a value that is equal for all models
  stays a Python scalar and goes through the very op torch uses;
* a per-model value goes into the tensor op that rounds the same way as torch's scalar op:
  ``x.add(y, alpha=a)`` (one fused multiply-add) becomes ``x.addcmul(y, a_n)``;
  ``x.addcmul(t1, t2, value=v)`` becomes ``x.addcmul(t1 * v_n, t2)``;
  ``x.addcdiv(t1, t2, value=v)`` becomes ``x.addcdiv(t1 * v_n, t2)``; ``v / x`` (Python scalar over a tensor
  is ``x.reciprocal() * v`` in torch) stays ``x.reciprocal() * v_n``; ``mul``/``div``/``add``/``lerp`` take
  the ``[n, 1, ...]`` tensor directly.  ``v_n`` is cast to the parameter dtype first, as torch casts a
  Python scalar;
* a per-model Python branch (``if weight_decay != 0``, ``if momentum > 0``, a model whose step is skipped
  or frozen) becomes ``torch.where`` on the model dim, so the branch not taken never touches that model.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import math
import types
from collections import defaultdict
from collections.abc import MutableMapping
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor
from . import flatstep
from .errors import InvalidInputError, InvalidTypeError, OutOfRangeError, StateError

try:  # the core package defines the common base class
    from .errors import MBCompileError
except ImportError:  # pragma: no cover - before mbcompile/errors.py exists
    class MBCompileError(Exception):
        """Base class of mbcompile's errors."""


__all__ = [
    "BatchedOptimizer",
    "ReduceLROnPlateau",
    "UnsupportedOptimizerError",
    "optimizer",
    "shrink_",
    "supported_optimizers",
]


class UnsupportedOptimizerError(MBCompileError, ValueError):
    """An optimizer class or option that the per-model optimizer does not implement."""


# Options that choose torch's implementation, not the algorithm.  They must be shared.
_IMPL_KEYS = ("foreach", "fused", "capturable", "differentiable")


# --------------------------------------------------------------------------------------------------
# hyperparameter handling
# --------------------------------------------------------------------------------------------------
def _model_count(batched) -> int:
    n = getattr(batched, "n", None)
    if isinstance(batched, (list, tuple)) or hasattr(batched, "__next__"):
        raise InvalidTypeError(
            "mbcompile.optimizer takes the batched module (from mbcompile.batch), not parameters or param groups: "
            "it makes one param group per model (param_groups[i] holds model i's hyperparameters), so settings "
            "are not given as groups; for settings per parameter set (no weight decay for biases and norms) make one "
            "optimizer per set with params=: mbcompile.optimizer(batched, torch.optim.AdamW, params=lambda name: "
            "name.endswith('bias'), weight_decay=0.0, lr=[...]) and another for the rest, and step both"
        )
    if not isinstance(n, int) or n < 1:
        raise InvalidTypeError(
            "expected a batched module (from mbcompile.batch) with an integer attribute `n`, got "
            f"{type(batched).__name__}"
        )
    return n


def _to_python(v):
    """A hyperparameter value as torch would store it for one model (tensors -> Python numbers)."""
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise InvalidInputError(f"expected a single number, got a tensor of shape {tuple(v.shape)}")
        return v.item()
    if isinstance(v, list):  # one model's betas given as [b1, b2]
        return tuple(_to_python(x) for x in v)
    if isinstance(v, tuple):
        return tuple(_to_python(x) for x in v)
    return v


def _split_per_model(name: str, value, n: int) -> list:
    """n values of one hyperparameter: a list / 1-D tensor of length n is per model, anything else shared."""
    kind = "list"
    if isinstance(value, Tensor) and value.dim() == 1:
        value, kind = value.tolist(), "1-D tensor"
    elif not isinstance(value, Tensor) and getattr(value, "ndim", None) == 1 and hasattr(value, "tolist"):
        value, kind = value.tolist(), "1-D array"  # numpy
    if isinstance(value, tuple) and name != "betas" and all(isinstance(v, (int, float)) for v in value):
        raise InvalidTypeError(f"hyperparameter {name!r} is a tuple {value!r}; per-model values are a list (or a "
                               f"1-D tensor) of n={n} values, a shared value is one number")
    if isinstance(value, list):
        if len(value) != n:
            raise InvalidInputError(
                f"hyperparameter {name!r} is a {kind} of {len(value)} values; a per-model hyperparameter "
                f"needs one value per model (n={n})"
            )
        return [_to_python(v) for v in value]
    if isinstance(value, Tensor) and value.dim() > 1:
        raise InvalidInputError(
            f"hyperparameter {name!r}: expected a number, a list or a 1-D tensor of length n={n}, got a "
            f"tensor of shape {tuple(value.shape)}"
        )
    return [_to_python(value)] * n


_PLAIN = frozenset((float, int, bool, type(None), str))


def _same(values: Sequence) -> bool:
    """True when all values are the same number (bitwise: 0.0 and -0.0 differ, nan never matches
    another nan object). Runs every step over n values per hyperparameter, hence list.count."""
    first = values[0]
    try:
        if list(values).count(first) != len(values):       # identity or ==, in C
            return False
        zero = first == 0
    except Exception:  # pragma: no cover - exotic values
        return False
    if zero:                                                # 0.0 == -0.0: compare the signs
        return len(set(map(math.copysign, itertools.repeat(1.0, len(values)), values))) == 1
    return True


def _collapse(values: list):
    """A per-model list, or the single value when every model has the same one."""
    return values[0] if _same(values) else values


# --------------------------------------------------------------------------------------------------
# per-model scalar arithmetic (Python, exactly torch's expressions) and vectorised tensor ops
# --------------------------------------------------------------------------------------------------
PER_MODEL_CALLS_NUMEL = 1 << 14   # elements per model from which a per-model scalar goes op by op (CPU)


class _Ctx:
    """What one step needs: the model count, which models step, caches for [n] operands, and a
    workspace of reusable scratch tensors (fresh allocations of large tensors cost page faults on the
    CPU, so every temporary of the update goes into a named scratch slot)."""

    def __init__(self, n: int, active: list | None, tensor_mode: bool = False, workspace: dict | None = None):
        self.n = n
        self.active = active  # None: every model steps; else list[bool] (or a bool tensor in tensor mode)
        self.inactive = set() if active is None else {i for i, a in enumerate(active) if not a}
        self.ip = active is None and not tensor_mode  # may update state tensors in place
        self.tensor_mode = tensor_mode
        self.ws = None if tensor_mode else workspace
        self._cache: dict = {}

    # ---- per-model Python scalars -------------------------------------------------------------
    def pm(self, fn: Callable, *args):
        """fn applied per model; an argument that is not a list is shared.  Returns a shared value
        when every model gets the same one.  Models that do not step this time may raise (e.g. a
        division by a zero bias correction at step 0): they get 0.0, which is never used."""
        lists = [a for a in args if isinstance(a, list)]
        if not lists:
            return fn(*args)
        out = []
        for i in range(self.n):
            vals = [a[i] if isinstance(a, list) else a for a in args]
            if i in self.inactive:
                try:
                    out.append(fn(*vals))
                except (ArithmeticError, ValueError, TypeError):
                    out.append(0.0)
            else:
                out.append(fn(*vals))
        return _collapse(out)

    # ---- tensors ------------------------------------------------------------------------------
    @staticmethod
    def opdtype(like: Tensor) -> torch.dtype:
        if like.dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return like.dtype

    def s(self, like: Tensor, slot):
        """A scratch tensor shaped like `like` (None: let the op allocate)."""
        if slot is None or self.ws is None or like.dtype not in (torch.float32, torch.float64):
            return None
        key = (slot, like.dtype, like.device)
        buf = self.ws.get(key)
        numel = like.numel()
        if buf is None or buf.numel() < numel:
            buf = self.ws[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(like.shape)

    def t(self, v, like: Tensor, rounded: bool = False):
        """v as an operand against `like` ([n, *shape]): a Python scalar stays as it is, a per-model
        list becomes a [n, 1, ...] tensor in like's dtype (as torch casts a Python scalar).
        ``rounded``: for float16/bfloat16 `like`, each value rounded to like's dtype first, as torch's
        CPU add does with its alpha / scalar operand (mul, div and lerp keep a float32 scalar)."""
        rounded = rounded and self._low(like)
        if isinstance(v, Tensor):
            v = v.to(like.dtype) if rounded else v
            base = _h2d(v.to(dtype=self.opdtype(like)), like.device)
        elif isinstance(v, list):
            dtype = self.opdtype(like)
            key = ("f", tuple(v), dtype, like.device, rounded and like.dtype)
            base = self._cache.get(key)
            if base is None:
                f64 = torch.tensor(v, dtype=torch.float64)
                base = _h2d((f64.to(like.dtype) if rounded else f64).to(dtype), like.device)
                self._cache[key] = base
        else:
            return v
        return base.view(self.n, *([1] * (like.dim() - 1)))

    def mask(self, cond, like: Tensor) -> Tensor:
        """A per-model boolean (list or tensor) as a [n, 1, ...] bool tensor on like's device."""
        if isinstance(cond, Tensor):
            base = _h2d(cond.to(dtype=torch.bool), like.device)
        else:
            key = ("b", tuple(bool(c) for c in cond), like.device)
            base = self._cache.get(key)
            if base is None:
                base = _h2d(torch.tensor([bool(c) for c in cond], dtype=torch.bool), like.device)
                self._cache[key] = base
        return base.view(self.n, *([1] * (like.dim() - 1)))

    @staticmethod
    def is_true(cond) -> bool:
        if isinstance(cond, Tensor):
            return False
        if isinstance(cond, list):
            return all(cond)
        return bool(cond)

    @staticmethod
    def is_false(cond) -> bool:
        if isinstance(cond, Tensor):
            return False
        if isinstance(cond, list):
            return not any(cond)
        return not bool(cond)

    def select(self, cond, a, b, out=None):
        """Per-model `a if cond else b`; a and b are tensors or zero-argument callables."""
        if self.is_true(cond):
            return a() if callable(a) else a
        if self.is_false(cond):
            return b() if callable(b) else b
        a = a() if callable(a) else a
        b = b() if callable(b) else b
        return torch.where(self.mask(cond, a), a, b, out=self.s(a, out))

    # ---- the ops torch's optimizers use, with a per-model scalar --------------------------------
    # `inplace` updates x; otherwise the result goes into scratch slot `out` (or a new tensor).
    # float16 / bfloat16 tensors with a per-model operand are computed in float32 and rounded once, as
    # torch's kernels do with a Python scalar (their "opmath" type).
    @staticmethod
    def _low(x) -> bool:
        return x.dtype in (torch.float16, torch.bfloat16)

    @staticmethod
    def _back(x, r, inplace):
        r = r.to(x.dtype)
        return x.copy_(r) if inplace else r

    def add_scaled(self, x, y, a, inplace=False, out=None):
        """x + a * y, rounded like torch's x.add(y, alpha=a) (a fused multiply-add)."""
        if isinstance(a, (list, Tensor)):
            at = self.t(a, x, rounded=True)
            if self._low(x):
                return self._back(x, torch.addcmul(x.float(), y.float(), at), inplace)
            return x.addcmul_(y, at) if inplace else torch.addcmul(x, y, at, out=self.s(x, out))
        return x.add_(y, alpha=a) if inplace else torch.add(x, y, alpha=a, out=self.s(x, out))

    def mul(self, x, v, inplace=False, out=None):
        v = self.t(v, x)
        if isinstance(v, Tensor) and self._low(x):
            return self._back(x, x.float() * v, inplace)
        return x.mul_(v) if inplace else torch.mul(x, v, out=self.s(x, out))

    def div(self, x, v, inplace=False, out=None):
        v = self.t(v, x)
        if isinstance(v, Tensor) and self._low(x):
            return self._back(x, x.float() / v, inplace)
        return x.div_(v) if inplace else torch.div(x, v, out=self.s(x, out))

    def add(self, x, v, inplace=False, out=None):
        v = self.t(v, x, rounded=True)
        if isinstance(v, Tensor) and self._low(x):
            return self._back(x, x.float() + v, inplace)
        return x.add_(v) if inplace else torch.add(x, v, out=self.s(x, out))

    def sqrt(self, x, out=None):
        return torch.sqrt(x, out=self.s(x, out))

    def rdiv(self, v, x, out=None):
        """v / x for a Python scalar v: torch evaluates it as x.reciprocal() * v."""
        r = torch.reciprocal(x, out=self.s(x, out))
        return self.mul(r, v, inplace=True)

    def lerp(self, x, y, w, inplace=False, out=None):
        if isinstance(w, (list, Tensor)):
            w = self.t(w, x)
            if self._low(x):
                return self._back(x, torch.lerp(x.float(), y.float(), w), inplace)
        return x.lerp_(y, w) if inplace else torch.lerp(x, y, w, out=self.s(x, out))

    def _pointwise(self, name, x, t1, t2, v, inplace, out, tmp):
        """x + v * t1 (* or /) t2; torch rounds v * t1 first."""
        op = getattr(torch, name)
        if isinstance(v, list) and self._per_model_calls(x, t1, t2):
            # large CPU tensors: one call per model with its own Python scalar, torch's very op, costs
            # n dispatches instead of a pass over memory for v * t1
            res = x if inplace else self.s(x, out)
            if res is None:
                res = torch.empty_like(x)
            for i in range(self.n):
                if inplace:
                    getattr(x[i], name + "_")(t1[i], t2[i], value=v[i])
                else:
                    op(x[i], t1[i], t2[i], value=v[i], out=res[i])
            return res
        if isinstance(v, (list, Tensor)):
            if self._low(x):
                return self._back(x, op(x.float(), t1.float() * self.t(v, x), t2.float()), inplace)
            t1 = torch.mul(t1, self.t(v, t1), out=self.s(t1, tmp))
            v = 1
        if inplace:
            return getattr(x, name + "_")(t1, t2, value=v)
        return op(x, t1, t2, value=v, out=self.s(x, out))

    def _per_model_calls(self, x, t1, t2) -> bool:
        return (x.device.type == "cpu" and not self.tensor_mode and not self._low(x) and x.dim() > 0
                and x.shape[0] == self.n and x.numel() >= self.n * PER_MODEL_CALLS_NUMEL
                and t1.shape == x.shape and t2.shape == x.shape)

    def addcmul(self, x, t1, t2, v, inplace=False, out=None, tmp=None):
        """x + v * t1 * t2 (torch rounds v * t1 first)."""
        return self._pointwise("addcmul", x, t1, t2, v, inplace, out, tmp)

    def addcdiv(self, x, t1, t2, v, inplace=False, out=None, tmp=None):
        """x + v * t1 / t2 (torch rounds v * t1 first)."""
        return self._pointwise("addcdiv", x, t1, t2, v, inplace, out, tmp)

    def neg_if(self, cond, g, out="g_neg"):
        return self.select(cond, lambda: torch.neg(g, out=self.s(g, out)), g, out="g_neg_sel")

    def commit(self, dst: Tensor, new: Tensor, only=None):
        """Store new into dst for the models that step (and, if given, satisfy `only`)."""
        if new is dst and only is None:
            return
        cond = None
        if self.active is not None:
            cond = self.active
        if only is not None and not self.is_true(only):
            if cond is None:
                cond = only
            elif isinstance(only, Tensor) or isinstance(cond, Tensor):
                cond = self.mask(cond, dst).flatten() & self.mask(only, dst).flatten()
            else:
                only_l = only if isinstance(only, list) else [bool(only)] * self.n
                cond = [a and b for a, b in zip(cond, only_l)]
        if cond is None or self.is_true(cond):
            if new is not dst:
                dst.copy_(new)
            return
        if self.is_false(cond):
            return
        if new is dst:  # pragma: no cover - in-place updates only run when every model steps
            raise AssertionError("masked commit of an in-place update")
        torch.where(self.mask(cond, dst), new.to(dst.dtype), dst, out=dst)


# per-model scalar state ([n] tensors on the CPU): read and written by the host side of a step only
# (``prep`` / ``scalar_state``), never by ``apply``
_HOST_STATE = frozenset({"step", "mu_product", "momentum_buffer_init"})


def _device_state_keys(st: dict) -> tuple:
    """The keys of a parameter's state that ``rule.apply`` reads and writes (tensors shaped like it)."""
    return tuple(k for k, v in st.items() if k not in _HOST_STATE and isinstance(v, Tensor))


def _scalar_dtype() -> torch.dtype:
    # torch.optim.optimizer._get_scalar_dtype(): the dtype of the per-param `step` tensors
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _zeros_step(n: int) -> Tensor:
    return torch.zeros(n, dtype=_scalar_dtype())


# --------------------------------------------------------------------------------------------------
# the update rules, one per torch.optim class; each mirrors torch's _single_tensor_<name>
# --------------------------------------------------------------------------------------------------
class _Rule:
    cls: type
    keys: tuple = ()  # hyperparameters read from the param groups every step
    uses_step = True
    # per-model flags that change with the step count or the active mask: always tensors when the
    # step is compiled, so that they do not cause recompiles
    tensor_keys: tuple = ()

    def init_state(self, opt: "BatchedOptimizer", p: Tensor, st: dict, hp: dict) -> None:
        raise NotImplementedError

    def eager_init(self, opt: "BatchedOptimizer") -> None:
        """State torch creates in the constructor (Adagrad)."""

    def prep(self, c: _Ctx, hp: dict, steps) -> dict:
        raise NotImplementedError

    def scalar_state(self, c: _Ctx, p: Tensor, st: dict, sc: dict) -> dict:
        """Eager, per parameter, before `apply`: create state that is missing and update per-model
        scalar state (kept on the CPU), returning what `apply` needs.  `apply` is tensor work only."""
        return sc

    def apply(self, c: _Ctx, p: Tensor, g: Tensor, st: dict, sc: dict) -> None:
        raise NotImplementedError

    def validate_group(self, group: dict) -> None:
        pass


class _SGD(_Rule):
    cls = torch.optim.SGD
    keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
    uses_step = False
    tensor_keys = ("init",)

    def init_state(self, opt, p, st, hp):
        # models whose momentum buffer exists (torch creates it, as a copy of the gradient, at the
        # first step taken with momentum != 0)
        st["momentum_buffer_init"] = torch.zeros(opt.n, dtype=torch.bool)

    def prep(self, c, hp, steps):
        pm = c.pm
        m_on = pm(lambda m: m != 0, hp["momentum"])
        return {
            "maximize": hp["maximize"],
            "wd": hp["weight_decay"],
            "wd_on": pm(lambda wd: wd != 0, hp["weight_decay"]),
            "m": hp["momentum"],
            "m_on": m_on,
            # models that step with momentum now
            "m_step": m_on if c.active is None else pm(lambda a, m: bool(a and m), list(c.active), m_on),
            "damp": pm(lambda d: 1 - d, hp["dampening"]),
            "nesterov": hp["nesterov"],
            "neg_lr": pm(lambda lr: -lr, hp["lr"]),
        }

    def scalar_state(self, c, p, st, sc):
        if c.is_false(sc["m_on"]):
            return sc
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        init_t = st["momentum_buffer_init"]
        sc = dict(sc)
        sc["init"] = _collapse([bool(x) for x in init_t.tolist()])
        stepped = sc["m_step"]
        if isinstance(stepped, list):
            init_t |= torch.tensor(stepped, dtype=torch.bool)
        elif stepped:
            init_t.fill_(True)
        return sc

    def apply(self, c, p, g, st, sc):
        ip = c.ip
        g = c.neg_if(sc["maximize"], g)
        g = c.select(sc["wd_on"], lambda: c.add_scaled(g, p, sc["wd"], out="g_wd"), g, out="g_wd_sel")
        m_on = sc["m_on"]
        if not c.is_false(m_on):
            buf = st["momentum_buffer"]
            init = sc["init"]
            if c.is_false(init):
                nb = g  # torch: buf = grad.clone(); commit copies it into the buffer
            else:
                ip_buf = ip and c.is_true(init) and c.is_true(m_on)
                t = c.mul(buf, sc["m"], inplace=ip_buf, out="buf_m")
                t = c.add_scaled(t, g, sc["damp"], inplace=True)  # t is buf (in place) or scratch
                nb = t if c.is_true(init) else c.select(init, t, g, out="buf_sel")
            c.commit(buf, nb, only=m_on)
            g_m = c.select(sc["nesterov"], lambda: c.add_scaled(g, nb, sc["m"], out="g_nest"), nb,
                           out="g_nest_sel")
            g = c.select(m_on, g_m, g, out="g_m_sel")
        c.commit(p, c.add_scaled(p, g, sc["neg_lr"], inplace=ip, out="p_new"))


def _weight_decay(c, p, g, sc):
    """Adam / NAdam / RAdam: decoupled decay scales the parameter, coupled decay adds to the grad."""
    p_new = p
    dec_on, cpl_on = sc["dec_on"], sc["cpl_on"]
    if not c.is_false(dec_on):
        p_new = c.select(dec_on, lambda: c.mul(p, sc["decay"], inplace=c.ip and c.is_true(dec_on), out="p_dec"),
                         p, out="p_dec_sel")
    if not c.is_false(cpl_on):
        g = c.select(cpl_on, lambda: c.add_scaled(g, p, sc["wd"], out="g_wd"), g, out="g_wd_sel")
    return p_new, g


def _moments(c, st, g, sc):
    """exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)."""
    ip = c.ip
    ea, eas = st["exp_avg"], st["exp_avg_sq"]
    ea_new = c.lerp(ea, g, sc["one_m_b1"], inplace=ip, out="ea")
    eas_new = c.addcmul(c.mul(eas, sc["b2"], inplace=ip, out="eas"), g, g, sc["one_m_b2"], inplace=True, tmp="g_v")
    c.commit(ea, ea_new)
    c.commit(eas, eas_new)
    return ea_new, eas_new


def _wd_prep(pm, hp, lr, wd, decoupled):
    return {
        "wd": wd,
        "dec_on": pm(lambda d, wd: bool(d and wd != 0), decoupled, wd),
        "cpl_on": pm(lambda d, wd: bool((not d) and wd != 0), decoupled, wd),
        "decay": pm(lambda lr, wd: 1 - lr * wd, lr, wd),
    }


def _adam_state(opt, p, st):
    """step [n], exp_avg and exp_avg_sq like p: the state of Adam and its relatives."""
    st["step"] = _zeros_step(opt.n)
    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _adam_prep(pm, hp, steps):
    """The per-model scalars Adam and RAdam share, and their bias corrections (bc1, bc2)."""
    lr, b1, b2 = hp["lr"], hp["beta1"], hp["beta2"]
    bc1 = pm(lambda b1, s: 1 - b1**s, b1, steps)
    bc2 = pm(lambda b2, s: 1 - b2**s, b2, steps)
    sc = {"maximize": hp["maximize"], **_wd_prep(pm, hp, lr, hp["weight_decay"], hp["decoupled_weight_decay"]),
          "one_m_b1": pm(lambda b: 1 - b, b1), "b2": b2, "one_m_b2": pm(lambda b: 1 - b, b2),
          "bc2_sqrt": pm(lambda b: b**0.5, bc2), "eps": hp["eps"]}
    return sc, bc1, bc2


class _Adam(_Rule):
    cls = torch.optim.Adam
    keys = ("lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay")

    def init_state(self, opt, p, st, hp):
        _adam_state(opt, p, st)

    def prep(self, c, hp, steps):
        pm = c.pm
        sc, bc1, _ = _adam_prep(pm, hp, steps)
        step_size = pm(lambda lr, bc1: lr / bc1, hp["lr"], bc1)
        return {**sc, "neg_step_size": pm(lambda s: -s, step_size), "amsgrad": hp["amsgrad"]}

    def scalar_state(self, c, p, st, sc):
        if not c.is_false(sc["amsgrad"]) and "max_exp_avg_sq" not in st:
            st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return sc

    def apply(self, c, p, g, st, sc):
        ip = c.ip
        g = c.neg_if(sc["maximize"], g)
        p_new, g = _weight_decay(c, p, g, sc)
        ea, eas = _moments(c, st, g, sc)
        ams = sc["amsgrad"]

        def plain():  # (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            return c.add(c.div(c.sqrt(eas, out="denom"), sc["bc2_sqrt"], inplace=True), sc["eps"], inplace=True)

        if c.is_false(ams):
            denom = plain()
        else:
            mx = st["max_exp_avg_sq"]
            if ip:
                mx_new = torch.maximum(mx, eas, out=mx)
            else:
                mx_new = torch.maximum(mx, eas, out=c.s(mx, "mx"))
                c.commit(mx, mx_new)

            def with_max():
                return c.add(c.div(c.sqrt(mx_new, out="denom_mx"), sc["bc2_sqrt"], inplace=True), sc["eps"],
                             inplace=True)

            denom = c.select(ams, with_max, plain, out="denom_sel")
        p_new = c.addcdiv(p_new, ea, denom, sc["neg_step_size"], inplace=ip or p_new is not p, out="p_new",
                          tmp="ea_v")
        c.commit(p, p_new)


class _AdamW(_Adam):
    cls = torch.optim.AdamW


class _RMSprop(_Rule):
    cls = torch.optim.RMSprop
    keys = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize")

    def init_state(self, opt, p, st, hp):
        st["step"] = _zeros_step(opt.n)
        st["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def prep(self, c, hp, steps):
        pm = c.pm
        return {
            "maximize": hp["maximize"],
            "wd": hp["weight_decay"],
            "wd_on": pm(lambda wd: wd != 0, hp["weight_decay"]),
            "alpha": hp["alpha"],
            "one_m_alpha": pm(lambda a: 1 - a, hp["alpha"]),
            "centered": hp["centered"],
            "eps": hp["eps"],
            "m": hp["momentum"],
            "m_on": pm(lambda m: m > 0, hp["momentum"]),
            "neg_lr": pm(lambda lr: -lr, hp["lr"]),
        }

    def scalar_state(self, c, p, st, sc):
        # torch creates these at the first step; here also if momentum / centered is switched on later
        if not c.is_false(sc["m_on"]) and "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if not c.is_false(sc["centered"]) and "grad_avg" not in st:
            st["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return sc

    def apply(self, c, p, g, st, sc):
        ip = c.ip
        g = c.neg_if(sc["maximize"], g)
        g = c.select(sc["wd_on"], lambda: c.add_scaled(g, p, sc["wd"], out="g_wd"), g, out="g_wd_sel")
        sq = st["square_avg"]
        sq_new = c.addcmul(c.mul(sq, sc["alpha"], inplace=ip, out="sq"), g, g, sc["one_m_alpha"], inplace=True,
                           tmp="g_v")
        c.commit(sq, sq_new)
        cen = sc["centered"]

        def plain():
            return c.sqrt(sq_new, out="avg")

        if c.is_false(cen):
            avg = plain()
        else:
            ga = st["grad_avg"]
            ga_new = c.lerp(ga, g, sc["one_m_alpha"], inplace=ip, out="ga")
            c.commit(ga, ga_new)

            def centered():  # square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
                return c.addcmul(sq_new, ga_new, ga_new, -1, out="avg_c").sqrt_()

            avg = c.select(cen, centered, plain, out="avg_sel")
        avg = c.add(avg, sc["eps"], inplace=True)
        m_on = sc["m_on"]

        def with_momentum():  # buf.mul_(momentum).addcdiv_(grad, avg); param.add_(buf, alpha=-lr)
            buf = st["momentum_buffer"]
            ip_buf = ip and c.is_true(m_on)
            b = c.mul(buf, sc["m"], inplace=ip_buf, out="buf_m").addcdiv_(g, avg)
            c.commit(buf, b, only=m_on)
            return c.add_scaled(p, b, sc["neg_lr"], inplace=ip_buf, out="p_mom")

        def without():  # param.addcdiv_(grad, avg, value=-lr)
            return c.addcdiv(p, g, avg, sc["neg_lr"], inplace=ip and c.is_false(m_on), out="p_plain", tmp="g_lr")

        c.commit(p, c.select(m_on, with_momentum, without, out="p_sel"))


class _Adagrad(_Rule):
    cls = torch.optim.Adagrad
    keys = ("lr", "lr_decay", "weight_decay", "eps", "maximize", "initial_accumulator_value")

    def init_state(self, opt, p, st, hp):
        st["step"] = _zeros_step(opt.n)
        v = hp["initial_accumulator_value"]
        if p.is_complex():                     # torch.optim.Adagrad: complex(v, v) for a complex parameter
            v = [complex(a, a) for a in v] if isinstance(v, list) else complex(v, v)
        if isinstance(v, list):
            st["sum"] = (
                torch.tensor(v, dtype=torch.complex128 if p.is_complex() else torch.float64)
                .to(device=p.device, dtype=p.dtype)
                .view(opt.n, *([1] * (p.dim() - 1)))
                .expand_as(p)
                .clone(memory_format=torch.preserve_format)
            )
        else:
            st["sum"] = torch.full_like(p, v, memory_format=torch.preserve_format)

    def eager_init(self, opt):
        # torch.optim.Adagrad creates its state in the constructor, for every parameter
        hp = opt._gather_hparams()
        for p in opt._params:
            st = opt.state[p]
            if not st:
                self.init_state(opt, p, st, hp)

    def prep(self, c, hp, steps):
        pm = c.pm
        return {
            "maximize": hp["maximize"],
            "wd": hp["weight_decay"],
            "wd_on": pm(lambda wd: wd != 0, hp["weight_decay"]),
            "neg_clr": pm(lambda lr, s, d: -(lr / (1 + (s - 1) * d)), hp["lr"], steps, hp["lr_decay"]),
            "eps": hp["eps"],
        }

    def apply(self, c, p, g, st, sc):
        ip = c.ip
        g = c.neg_if(sc["maximize"], g)
        g = c.select(sc["wd_on"], lambda: c.add_scaled(g, p, sc["wd"], out="g_wd"), g, out="g_wd_sel")
        s = st["sum"]
        s_new = c.addcmul(s, g, g, 1, inplace=ip, out="sum")  # state_sum.addcmul_(grad, grad, value=1)
        c.commit(s, s_new)
        std = c.add(c.sqrt(s_new, out="std"), sc["eps"], inplace=True)
        c.commit(p, c.addcdiv(p, g, std, sc["neg_clr"], inplace=ip, out="p_new", tmp="g_lr"))


class _Adamax(_Rule):
    cls = torch.optim.Adamax
    keys = ("lr", "beta1", "beta2", "eps", "weight_decay", "maximize")

    def init_state(self, opt, p, st, hp):
        st["step"] = _zeros_step(opt.n)
        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["exp_inf"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def prep(self, c, hp, steps):
        pm = c.pm
        bc = pm(lambda b1, s: 1 - b1**s, hp["beta1"], steps)
        return {
            "maximize": hp["maximize"],
            "wd": hp["weight_decay"],
            "wd_on": pm(lambda wd: wd != 0, hp["weight_decay"]),
            "one_m_b1": pm(lambda b: 1 - b, hp["beta1"]),
            "b2": hp["beta2"],
            "eps": hp["eps"],
            "neg_clr": pm(lambda lr, bc: -(lr / bc), hp["lr"], bc),
        }

    def apply(self, c, p, g, st, sc):
        ip = c.ip
        g = c.neg_if(sc["maximize"], g)
        g = c.select(sc["wd_on"], lambda: c.add_scaled(g, p, sc["wd"], out="g_wd"), g, out="g_wd_sel")
        ea, ei = st["exp_avg"], st["exp_inf"]
        ea_new = c.lerp(ea, g, sc["one_m_b1"], inplace=ip, out="ea")
        c.commit(ea, ea_new)
        # torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)
        scaled = c.mul(ei, sc["b2"], inplace=ip, out="ei_scaled")
        gabs = c.add(torch.abs(g, out=c.s(g, "g_abs")), sc["eps"], inplace=True)
        ei_new = torch.maximum(scaled, gabs, out=ei if ip else c.s(ei, "ei"))
        c.commit(ei, ei_new)
        c.commit(p, c.addcdiv(p, ea_new, ei_new, sc["neg_clr"], inplace=ip, out="p_new", tmp="ea_v"))


class _NAdam(_Rule):
    cls = torch.optim.NAdam
    keys = ("lr", "beta1", "beta2", "eps", "weight_decay", "momentum_decay", "decoupled_weight_decay", "maximize")

    def init_state(self, opt, p, st, hp):
        st["step"] = _zeros_step(opt.n)
        st["mu_product"] = torch.ones(opt.n, dtype=_scalar_dtype())
        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def prep(self, c, hp, steps):
        pm = c.pm
        lr, b1, b2, wd, md = hp["lr"], hp["beta1"], hp["beta2"], hp["weight_decay"], hp["momentum_decay"]
        return {
            "maximize": hp["maximize"],
            "lr": lr,
            **_wd_prep(pm, hp, lr, wd, hp["decoupled_weight_decay"]),
            "bc2": pm(lambda b2, s: 1 - b2**s, b2, steps),
            "mu": pm(lambda b1, s, md: b1 * (1.0 - 0.5 * (0.96 ** (s * md))), b1, steps, md),
            "mu_next": pm(lambda b1, s, md: b1 * (1.0 - 0.5 * (0.96 ** ((s + 1) * md))), b1, steps, md),
            "one_m_b1": pm(lambda b: 1 - b, b1),
            "b2": b2,
            "one_m_b2": pm(lambda b: 1 - b, b2),
            "eps": hp["eps"],
        }

    def scalar_state(self, c, p, st, sc):
        """mu_product *= mu (a [n] tensor in the scalar dtype, like torch's 0-dim one), then the two
        step sizes, which depend on its new value."""
        mp = st["mu_product"]
        mu = sc["mu"]
        new = mp * (torch.tensor(mu, dtype=torch.float64).to(mp.dtype) if isinstance(mu, list) else mu)
        c.commit(mp, new)
        mpl = _collapse(mp.tolist())
        lr, mu_next = sc["lr"], sc["mu_next"]
        sc = dict(sc)
        sc["v1"] = c.pm(lambda lr, mu, mp: -lr * (1.0 - mu) / (1.0 - mp), lr, mu, mpl)
        sc["v2"] = c.pm(lambda lr, mn, mp: (-lr * mn) / (1.0 - mp * mn), lr, mu_next, mpl)
        return sc

    def apply(self, c, p, g, st, sc):
        ip = c.ip
        g = c.neg_if(sc["maximize"], g)
        p_new, g = _weight_decay(c, p, g, sc)
        ea, eas = _moments(c, st, g, sc)
        denom = c.div(eas, sc["bc2"], out="denom").sqrt_()  # exp_avg_sq.div(bias_correction2).sqrt()
        denom = c.add(denom, sc["eps"], inplace=True)
        p_new = c.addcdiv(p_new, g, denom, sc["v1"], inplace=ip or p_new is not p, out="p_new", tmp="g_v1")
        p_new = c.addcdiv(p_new, ea, denom, sc["v2"], inplace=True, tmp="ea_v2")
        c.commit(p, p_new)


class _RAdam(_Rule):
    cls = torch.optim.RAdam
    keys = ("lr", "beta1", "beta2", "eps", "weight_decay", "decoupled_weight_decay", "maximize")
    tensor_keys = ("rect_on",)

    def init_state(self, opt, p, st, hp):
        _adam_state(opt, p, st)

    def prep(self, c, hp, steps):
        pm = c.pm
        b2 = hp["beta2"]
        sc, bc1, bc2 = _adam_prep(pm, hp, steps)
        rho_inf = pm(lambda b2: 2 / (1 - b2) - 1, b2)
        rho_t = pm(lambda ri, s, b2, bc2: ri - 2 * s * (b2**s) / bc2, rho_inf, steps, b2, bc2)

        def rect(rt, ri):
            if not rt > 5.0:
                return 0.0  # not used: this model takes the un-rectified branch
            return ((rt - 4) * (rt - 2) * ri / ((ri - 4) * (ri - 2) * rt)) ** 0.5

        return {**sc, "lr": hp["lr"], "bc1": bc1, "rect_on": pm(lambda rt: rt > 5.0, rho_t),
                "rect": pm(rect, rho_t, rho_inf)}

    def apply(self, c, p, g, st, sc):
        ip = c.ip
        g = c.neg_if(sc["maximize"], g)
        p_new, g = _weight_decay(c, p, g, sc)
        ea, eas = _moments(c, st, g, sc)
        # bias_corrected_exp_avg * lr
        scaled = c.mul(c.div(ea, sc["bc1"], out="bce"), sc["lr"], inplace=True)

        def rectified():  # bias_corrected_exp_avg * lr * adaptive_lr * rect
            adaptive = c.rdiv(sc["bc2_sqrt"], c.add(c.sqrt(eas, out="eas_sqrt"), sc["eps"], inplace=True),
                              out="adaptive")
            return c.mul(torch.mul(scaled, adaptive, out=c.s(scaled, "upd")), sc["rect"], inplace=True)

        upd = c.select(sc["rect_on"], rectified, scaled, out="upd_sel")
        if ip or p_new is not p:
            p_new = p_new.add_(upd, alpha=-1.0)
        else:
            p_new = torch.add(p_new, upd, alpha=-1.0, out=c.s(p_new, "p_new"))
        c.commit(p, p_new)


_RULES: dict[type, _Rule] = {
    r.cls: r
    for r in (_SGD(), _Adam(), _AdamW(), _RMSprop(), _Adagrad(), _Adamax(), _NAdam(), _RAdam())
}


_FUSED = (torch.optim.Adam, torch.optim.AdamW)   # fused=True: torch's fused kernel per model (CPU)


def supported_optimizers() -> list[type]:
    """The torch.optim classes mbcompile.optimizer accepts."""
    return list(_RULES)


# --------------------------------------------------------------------------------------------------
# the optimizer
# --------------------------------------------------------------------------------------------------
class _RealState(MutableMapping):
    """A complex parameter's state seen as real (``view_as_real``: ...,2), as torch.optim steps complex
    parameters: each real and imaginary part is its own element. State a rule creates while it
    applies (shaped like the real view) is stored back complex, as torch.optim keeps it."""

    def __init__(self, st: dict, shape):
        self.st, self.shape = st, shape

    def __getitem__(self, k):
        v = self.st[k]
        return torch.view_as_real(v) if isinstance(v, Tensor) and v.is_complex() else v

    def __setitem__(self, k, v):
        if isinstance(v, Tensor) and v.is_floating_point() and v.shape == self.shape:
            v = torch.view_as_complex(v)
        self.st[k] = v

    def __delitem__(self, k):
        del self.st[k]

    def __iter__(self):
        return iter(self.st)

    def __len__(self):
        return len(self.st)


def _as_real(p: Tensor, g: Tensor, st: dict):
    """``(p, g, st)`` for a rule: a complex parameter, its gradient and its state as real views."""
    if not p.is_complex():
        return p, g, st
    pr = torch.view_as_real(p)
    return pr, torch.view_as_real(g), _RealState(st, pr.shape)


def _apply_all(rule, n, params, grads, states, packed, mask):
    """Tensor part of a step over every parameter, in tensor mode (for torch.compile and
    mbcompile.train_step): ``packed`` is :func:`_pack_prepped`'s (its layout a constant of the graph)."""
    layout, floats, bools, extra, sidx = packed
    unpacked = _unpack_scalars(layout, floats, bools, extra)
    c = _Ctx(n, None, tensor_mode=True)
    c.active = mask  # a bool [n] tensor
    for p, g, st, j in zip(params, grads, states, sidx):
        rule.apply(c, *_as_real(p, g, st), unpacked[j])


def tensor_update(opt, params: list, act: list | None):
    """The host side of a step over ``params`` done now (state, step counters, per-model scalars) and
    the tensor side as a function of tensors (for a compiled program: train_step's): returns
    ``(tail, key, update)``; ``update(params, grads, tail)`` runs :func:`_apply_all` and ``key`` says
    when a program built for one step fits another. The state tensors in ``tail`` are unaliased."""
    flatstep.unflatten(opt)
    _, prepped = opt._host_prep(params, act)
    dev = params[0].device
    skeys = tuple(_device_state_keys(st) for _, st, _ in prepped)
    states = [st[k] for (_, st, _), keys in zip(prepped, skeys) for k in keys]
    layout, floats, bools, extra, sidx = _pack_prepped([sc for _, _, sc in prepped], opt.n,
                                                       opt._rule.tensor_keys, dev)
    rule, n, ns, ne = opt._rule, opt.n, len(states), len(extra)

    def update(ps, grads, tail):
        st_t, floats_t, bools_t = tail[:ns], tail[ns], tail[ns + 1]
        extra_t, mask_t = list(tail[ns + 2:ns + 2 + ne]), tail[ns + 2 + ne]
        it = iter(st_t)
        sts = [{k: next(it) for k in keys} for keys in skeys]
        _apply_all(rule, n, ps, grads, sts, (layout, floats_t, bools_t, extra_t, sidx), mask_t)
    key = (n, skeys, layout, sidx, tuple((e.shape, e.dtype) for e in extra))
    return states + [floats, bools] + extra + [opt._mask(act, dev)], key, update


class BatchedOptimizer(torch.optim.Optimizer):
    """A torch.optim.Optimizer over the stacked parameters of n models, one param group per model.

    Param group ``i`` holds model ``i``'s hyperparameters (``param_groups[i]["lr"]`` and so on, which
    torch's LR schedulers change per model).  Group 0 lists the stacked parameters, so that code that
    loops over ``param_groups`` (``zero_grad``, ``state_dict``) sees each tensor once; groups ``1..n-1``
    have ``params == []``.  Each group's hyperparameters apply to its model's slice of every stacked
    parameter.

    Extra API: :meth:`freeze` / :meth:`unfreeze` / :attr:`frozen` (a frozen model's parameters and
    optimizer state do not change), ``step(closure=None, *, active=None)`` where ``active`` is a bool
    ``[n]`` mask of the models that take this step (used by :class:`mbcompile.GradScaler` to skip only the
    models whose gradients overflowed), and ``_shrink_(keep)`` (see :func:`shrink_`).
    """

    _mbcompile_per_model = True

    def __init__(self, params: list[Tensor], n: int, optim_cls: type, groups: list[dict], *,
                 compile: bool = False, param_names: list[str] | None = None):
        if optim_cls not in _RULES:
            raise UnsupportedOptimizerError(_unsupported_msg(optim_cls))
        self.n = n
        self._optim_cls = optim_cls
        self._rule = _RULES[optim_cls]
        self._params = list(params)
        self._param_names = list(param_names) if param_names is not None else None
        self._frozen = [False] * n
        self._compile = bool(compile)
        self._compiled = None
        self._workspace: dict = {}  # scratch tensors reused by every step (see _Ctx.s)
        self._init_done = False
        pgs = []
        for i, g in enumerate(groups):
            d = dict(g)
            d["params"] = list(self._params) if i == 0 else []
            pgs.append(d)
        defaults = {k: v for k, v in groups[0].items() if k != "params"}
        super().__init__(pgs, defaults)
        self._init_done = True
        self._rule.eager_init(self)

    # ---- torch.optim.Optimizer API ------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_init_done", False):
            raise UnsupportedOptimizerError(
                "a per-model optimizer has exactly one param group per model; add_param_group is not "
                "supported (build a new optimizer with mbcompile.optimizer instead)"
            )
        super().add_param_group(param_group)

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_compiled"] = None  # compiled functions and scratch space are rebuilt on demand
        d["_workspace"], d["_masks"], d["_flat"], d["_flat_owner"] = {}, {}, {}, {}
        return d

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def __repr__(self) -> str:
        return f"BatchedOptimizer({self._optim_cls.__name__}, n={self.n}, params={len(self._params)})"

    def _gather_hparams(self) -> dict:
        """Every hyperparameter the rule reads: a shared value, or a list with one value per model."""
        groups = self.param_groups
        if len(groups) != self.n:
            raise StateError(
                f"the per-model optimizer has {len(groups)} param groups but {self.n} models; param "
                "groups must not be added or removed (use mbcompile.shrink_ to drop models)"
            )
        hp = {}
        for key in self._rule.keys:
            if key in ("beta1", "beta2"):
                j = 0 if key == "beta1" else 1
                vals = [g["betas"][j] for g in groups]
            else:
                vals = [g[key] for g in groups]
            if not _PLAIN.issuperset(map(type, vals)):        # a tensor hyperparameter: as numbers
                vals = [_num(v) for v in vals]
            hp[key] = _collapse(vals)
        return hp

    def _active_list(self, active) -> list | None:
        act = [not f for f in self._frozen]
        if active is not None:
            if isinstance(active, Tensor):
                if active.shape != (self.n,):
                    raise InvalidInputError(f"active must be a bool tensor of shape [n] (n={self.n}), got "
                                            f"{tuple(active.shape)}")
                extra = [bool(a) for a in active.tolist()]
            else:
                extra = [bool(a) for a in active]
                if len(extra) != self.n:
                    raise InvalidInputError(f"active must have one entry per model (n={self.n}), got {len(extra)}")
            act = [a and b for a, b in zip(act, extra)]
        return None if all(act) else act

    def fused_cpu(self) -> bool:
        """Whether steps run torch's fused CPU kernel (``fused=True``; parameters contiguous on CPU)."""
        return bool(self.param_groups[0].get("fused")) and all(
            p.device.type == "cpu" and p.is_contiguous() for p in self._params)

    @torch.no_grad()
    def step(self, closure: Callable | None = None, *, active=None, grad_scale: Tensor | None = None):
        """One optimizer step for every model (that is not frozen and, if given, is in `active`).
        ``grad_scale`` ([n], from mbcompile.GradScaler.step): the gradients are still scaled, and the
        fused kernel divides them by it, as torch's GradScaler has a fused optimizer do."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        act = self._active_list(active)
        if act is not None and not any(act):
            return loss
        params, grads = [], []
        for p in self._params:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise StateError(f"{self._optim_cls.__name__} (per model) does not support sparse gradients")
            if g.shape != p.shape:
                raise StateError(
                    f"gradient of shape {tuple(g.shape)} for a stacked parameter of shape {tuple(p.shape)}"
                )
            params.append(p)
            grads.append(g)
        if not params:
            return loss
        if self.fused_cpu():
            self._fused_step(params, grads, act, grad_scale)
            return loss
        if grad_scale is not None:
            raise StateError("grad_scale is for fused=True optimizers on CPU (mbcompile.GradScaler passes it)")
        c, prepped = self._host_prep(params, act)
        todo = [(p, g, st, sc) for (p, st, sc), g in zip(prepped, grads)]
        if self._compile:
            self._run_compiled(todo, act)
            return loss
        chunks, rest = ([], todo) if self.__dict__.get("_flat_off") else flatstep.plan(todo, _device_state_keys)
        for chunk in chunks:                    # parameters that share their scalars: one update
            flatstep.run(self, c, chunk, _device_state_keys)
        for p, g, st, sc in rest:
            self._rule.apply(c, *_as_real(p, g, st), sc)
        return loss

    def _fused_step(self, params: list[Tensor], grads: list[Tensor], act: list | None, grad_scale=None):
        """``fused=True`` on CPU: torch's own fused kernel (``torch._fused_adam_`` / ``_fused_adamw_``,
        what ``torch.optim.Adam(fused=True)`` runs) on each model's slices, one call per set of models
        that share every hyperparameter. Model i's update is bit for bit that of its own fused optimizer."""
        hp = self._gather_hparams()
        keys = self._rule.keys                 # lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled
        sts = [st for _, st, _ in self._host_prep(params, act, hp)[1]]   # state, steps advanced, amsgrad's max
        scales = [None] * self.n if grad_scale is None else grad_scale.tolist()
        sets: dict = {}
        for i in range(self.n):
            if act is None or act[i]:
                vals = tuple(v[i] if isinstance(v, list) else v for v in map(hp.get, keys))
                sets.setdefault(vals + (scales[i],), []).append(i)
        for vals, models in sets.items():
            h = dict(zip(keys, vals))
            scale = None if vals[-1] is None else torch.tensor(vals[-1], dtype=torch.float32)

            def each(ts, contiguous=False):     # model after model, as n separate optimizers would see them
                return [t[i].contiguous() if contiguous else t[i] for i in models for t in ts]

            fn = torch._fused_adamw_ if h["decoupled_weight_decay"] else torch._fused_adam_
            mx = each([st["max_exp_avg_sq"] for st in sts]) if h["amsgrad"] else []
            fn(each(params), each(grads, contiguous=True), each([st["exp_avg"] for st in sts]),
               each([st["exp_avg_sq"] for st in sts]), mx,
               [st["step"][i:i + 1] for i in models for st in sts], lr=h["lr"], beta1=h["beta1"], beta2=h["beta2"],
               weight_decay=h["weight_decay"], eps=h["eps"], amsgrad=h["amsgrad"], maximize=h["maximize"],
               grad_scale=scale)

    def _host_prep(self, params: list[Tensor], act: list | None, hp: dict | None = None):
        """The host-side part of a step over ``params`` (the parameters that have a gradient), for the
        models ``act`` (None: all; from :meth:`_active_list`, not all False): create missing state,
        advance the step counters of the stepping models, compute the per-model scalars
        (``rule.prep``, ``rule.scalar_state``).  Returns the context and ``[(p, state, sc)]``; what is
        left is the tensor work, ``rule.apply`` per parameter (eagerly, or :func:`_apply_all` in a
        compiled program: ``step(compile=True)`` and :func:`mbcompile.train_step`)."""
        hp = self._gather_hparams() if hp is None else hp
        rule = self._rule
        c = _Ctx(self.n, act, workspace=self._workspace)
        act_cpu = None if act is None else torch.tensor(act)
        prep_cache: dict = {}
        out = []
        sts = [self.state[p] for p in params]
        for p, st in zip(params, sts):
            if len(st) == 0:
                rule.init_state(self, p, st, hp)
        all_steps = self._advance_steps(sts, act_cpu) if rule.uses_step else None
        for k, (p, st) in enumerate(zip(params, sts)):
            steps = None if all_steps is None else _collapse(all_steps[k])
            key = steps if not isinstance(steps, list) else tuple(steps)
            sc = prep_cache.get(key)
            if sc is None:
                sc = prep_cache[key] = rule.prep(c, hp, steps)
            sc = rule.scalar_state(c, p, st, sc)
            out.append((p, st, sc))
        return c, out

    @staticmethod
    def _advance_steps(sts: list, act_cpu) -> list:
        """Advance every parameter's [n] step counter (by 1, or by the active mask) and return their
        values, one list per parameter: one foreach op and one read for all of them when they share a
        dtype (the usual case), else one each."""
        ts = [st["step"] for st in sts]
        if act_cpu is None:
            torch._foreach_add_(ts, 1)
        else:
            torch._foreach_add_(ts, [act_cpu.to(t.dtype) for t in ts])
        try:
            return torch.stack(ts).tolist()
        except RuntimeError:                     # mixed dtypes or shapes (a hand-edited state)
            return [t.tolist() for t in ts]

    def _run_compiled(self, todo, act):
        flatstep.unflatten(self)                # the compiled step's state inputs must not alias
        if self._compiled is None:
            # dynamo caches compiled graphs per code object: give each optimizer its own, so that many
            # compiled optimizers in one process do not share (and exhaust) one recompile budget
            code = _apply_all.__code__.replace(co_name=f"_apply_all_{self._optim_cls.__name__}_{id(self):x}")
            fn = types.FunctionType(code, _apply_all.__globals__, code.co_name)
            self._compiled = torch.compile(fn, dynamic=False)
        dev = todo[0][0].device
        packed = _pack_prepped([t[3] for t in todo], self.n, self._rule.tensor_keys, dev)
        self._compiled(self._rule, self.n, [t[0] for t in todo], [t[1] for t in todo],
                       [t[2] for t in todo], packed, self._mask(act, dev))

    def _mask(self, act, device) -> Tensor:
        """The bool [n] tensor of the models that step (``act`` from :meth:`_active_list`), cached."""
        masks = self.__dict__.setdefault("_masks", {})
        key = (self.n, None if act is None else tuple(act), str(device))
        m = masks.get(key)
        if m is None:
            m = masks[key] = torch.tensor([True] * self.n if act is None else act, dtype=torch.bool,
                                                device=device)
        return m

    # ---- freezing -----------------------------------------------------------------------------
    def freeze(self, models) -> None:
        """Freeze model(s) (an index or indices): their parameters and optimizer state stay as they
        are on every step until :meth:`unfreeze`.  LR schedulers still change their group's lr."""
        for i in _indices(models, self.n):
            self._frozen[i] = True

    def unfreeze(self, models) -> None:
        for i in _indices(models, self.n):
            self._frozen[i] = False

    @property
    def frozen(self) -> Tensor:
        """bool [n]: which models are frozen."""
        return torch.tensor(self._frozen, dtype=torch.bool)

    # ---- state_dict ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        index = {id(p): i for i, p in enumerate(self._params)}
        flat = flatstep.flat_view_ids(self)     # views of a shared buffer: saved as their own tensors
        state = {index[id(p)]: {k: v.clone() if id(v) in flat else v for k, v in st.items()}
                 for p, st in self.state.items() if id(p) in index and st}
        groups = []
        for i, g in enumerate(self.param_groups):
            d = {k: v for k, v in g.items() if k != "params"}
            d["params"] = list(range(len(self._params))) if i == 0 else []
            groups.append(d)
        sd = {
            "state": state,
            "param_groups": groups,
            "mbcompile": {
                "n": self.n,
                "optimizer": self._optim_cls.__name__,
                "frozen": list(self._frozen),
                "param_names": self._param_names,
                "shapes": [tuple(p.shape) for p in self._params],
            },
        }
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, sd)
            if out is not None:
                sd = out
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        meta = state_dict.get("mbcompile")
        if meta is None:
            raise InvalidInputError("not a state dict of a per-model optimizer (no 'mbcompile' entry)")
        if meta["n"] != self.n:
            raise InvalidInputError(f"state dict is for n={meta['n']} models, this optimizer has n={self.n}")
        if meta["optimizer"] != self._optim_cls.__name__:
            raise InvalidInputError(f"state dict is for {meta['optimizer']}, this optimizer is "
                                    f"{self._optim_cls.__name__}")
        shapes = [tuple(s) for s in meta.get("shapes", [])]
        if shapes and shapes != [tuple(p.shape) for p in self._params]:
            raise InvalidInputError("state dict parameter shapes differ from this optimizer's parameters")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise InvalidInputError("state dict has a different number of param groups")
        state: defaultdict = defaultdict(dict)
        for idx, st in state_dict["state"].items():
            p = self._params[int(idx)]
            state[p] = {k: _load_value(p, k, v) for k, v in st.items()}
        self.state = state
        for g, sg in zip(self.param_groups, saved_groups):
            params = g["params"]
            g.clear()
            g.update({k: copy.deepcopy(v) for k, v in sg.items() if k != "params"})
            g["params"] = params
        self._frozen = [bool(f) for f in meta.get("frozen", [False] * self.n)]
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    # ---- shrinking ----------------------------------------------------------------------------
    def _shrink_(self, keep: list[int]) -> None:
        """Keep only the models `keep` (narrows state, param groups and the frozen mask)."""
        keep = _check_keep(keep, self.n)
        idx = torch.tensor(keep, dtype=torch.long)
        n_old = self.n
        for p, st in self.state.items():
            for k, v in list(st.items()):
                if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == n_old:
                    st[k] = v.index_select(0, idx.to(v.device))
        groups = [self.param_groups[i] for i in keep]
        for i, g in enumerate(groups):
            g["params"] = list(self._params) if i == 0 else []
        self.param_groups[:] = groups
        self._frozen = [self._frozen[i] for i in keep]
        self.n = len(keep)
        self._compiled = None
        self._workspace = {}
        for k in ("_flat", "_flat_owner"):
            self.__dict__.pop(k, None)


def _num(v):
    if isinstance(v, Tensor):
        return v.item()
    return v


def _scalar_kind(v) -> str:
    """How a compiled step (:func:`_pack_scalars`) takes a value of ``sc``: "tensor" (as it is),
    "bool" (a per-model bool list: a bool [n] tensor), "float" (a per-model list or a shared number: a float64 [n] tensor) or
    "const" (a bool or None: structural, a Python constant of the compiled graph)."""
    if isinstance(v, Tensor):
        return "tensor"
    if isinstance(v, list):
        return "bool" if all(isinstance(x, bool) for x in v) else "float"
    if isinstance(v, bool) or v is None:
        return "const"
    return "float"


def _pack_scalars(scs: list, n: int, tensor_keys: tuple, device):
    """The values of several ``sc`` dicts as a compiled step takes them (per-model numbers and shared
    floats as float64 rows, per-model bools and the rule's ``tensor_keys`` as bool rows; bools and None
    stay constants), packed into one float64 ``[F, n]`` and one bool ``[B, n]`` tensor instead of one
    small tensor per value (a step has dozens).  Returns ``(layout, floats, bools, extra)``:
    ``layout`` (hashable: the structure and the constants, so it belongs in a compile cache key) says,
    per dict and key, which row or constant; ``extra`` are values that already were tensors.  :func:`_unpack_scalars` inverts it."""
    frows, brows, extra, layout = [], [], [], []
    for sc in scs:
        ent = []
        for k, v in sc.items():
            kind = _scalar_kind(v)
            if kind == "const" and isinstance(v, bool) and k in tensor_keys:
                kind, v = "bool", [v] * n
            if kind == "tensor":
                ent.append((k, "t", len(extra)))
                extra.append(v)
            elif kind == "bool":
                ent.append((k, "b", len(brows)))
                brows.append(v)
            elif kind == "float":
                ent.append((k, "f", len(frows)))
                frows.append([float(x) for x in v] if isinstance(v, list) else [float(v)] * n)
            else:
                ent.append((k, "c", v))
        layout.append(tuple(ent))
    floats = torch.tensor(frows, dtype=torch.float64).reshape(len(frows), n)
    bools = torch.tensor(brows, dtype=torch.bool).reshape(len(brows), n)
    return tuple(layout), _h2d(floats, device), _h2d(bools, device), extra


def _h2d(t: Tensor, device) -> Tensor:
    """``t`` on ``device``. A host tensor goes to CUDA through pinned memory, non-blocking: a copy from
    pageable memory first waits for the stream to drain, so per-step scalars would stall the host
    behind the GPU every step (no overlap of the next step's Python with this step's kernels)."""
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _pack_prepped(scs: list, n: int, tensor_keys: tuple, device) -> tuple:
    """:func:`_pack_scalars` of one step's per-parameter ``sc`` dicts (parameters that share one dict
    share its rows): ``(layout, floats, bools, extra, sidx)``, ``sidx[i]`` the dict of parameter i."""
    ids, uniq, sidx = {}, [], []
    for sc in scs:
        j = ids.get(id(sc))
        if j is None:
            j = ids[id(sc)] = len(uniq)
            uniq.append(sc)
        sidx.append(j)
    return (*_pack_scalars(uniq, n, tensor_keys, device), tuple(sidx))


def _unpack_scalars(layout, floats: Tensor, bools: Tensor, extra) -> list[dict]:
    """The ``sc`` dicts that :func:`_pack_scalars` packed (rows as [n] tensors)."""
    src = {"f": floats, "b": bools, "t": extra}
    return [{k: (v if how == "c" else src[how][v]) for k, how, v in ent} for ent in layout]


def _load_value(p: Tensor, key: str, v):
    if not isinstance(v, Tensor):
        return copy.deepcopy(v)
    if key in ("step", "mu_product") or v.dtype == torch.bool or (v.dim() == 1 and p.dim() >= 1
                                                                   and v.shape != p.shape):
        return v.detach().clone()  # per-model scalars stay on the CPU in their own dtype
    if p.is_floating_point() and v.is_floating_point():
        return v.detach().to(device=p.device, dtype=p.dtype, copy=True)
    return v.detach().to(device=p.device, copy=True)


def _indices(models, n) -> list[int]:
    if isinstance(models, int):
        models = [models]
    elif isinstance(models, Tensor):
        if models.dtype == torch.bool:
            models = torch.nonzero(models).flatten()
        models = models.tolist()
    out = []
    for i in models:
        i = int(i)
        if not -n <= i < n:
            raise OutOfRangeError(f"model index {i} out of range for n={n}")
        out.append(i % n)
    return out


def _check_keep(keep, n) -> list[int]:
    keep = _indices(keep, n)
    if len(keep) == 0:
        raise InvalidInputError("shrink_ needs at least one model to keep")
    if len(set(keep)) != len(keep):
        raise InvalidInputError(f"shrink_: duplicate model indices in keep={keep}")
    return keep


def _unsupported_msg(cls) -> str:
    names = ", ".join(f"torch.optim.{c.__name__}" for c in _RULES)
    return (
        f"mbcompile.optimizer does not support {getattr(cls, '__module__', '')}.{getattr(cls, '__name__', cls)}; "
        f"supported: {names}"
    )


def optimizer(batched, optim_cls: type, /, *, compile: bool = False, params=None, **hparams) -> BatchedOptimizer:
    """A per-model ``optim_cls`` over the stacked parameters of ``batched`` (one param group per model).

    A hyperparameter given as a ``list`` or 1-D tensor of length ``n`` is per model; anything else (a
    float, the usual tuple for ``betas``) is shared by every model.  Per-model tuples are a list of
    tuples.  ``compile=True`` runs the tensor part of the step through ``torch.compile`` (faster for
    large batches; equal to torch.optim within floating-point tolerance rather than bit for bit).

    ``params`` (default: all) takes only some of the parameters: names as ``named_parameters()`` gives
    them, the stacked parameters themselves, or a function ``name -> bool``. Two optimizers over
    disjoint sets are what torch's param groups per parameter set are (no weight decay for biases and
    norms); step both.
    """
    n = _model_count(batched)
    if not isinstance(optim_cls, type):
        raise InvalidTypeError(f"mbcompile.optimizer takes a torch.optim class such as torch.optim.AdamW, "
                               f"not {optim_cls!r}")
    if optim_cls not in _RULES:
        raise UnsupportedOptimizerError(_unsupported_msg(optim_cls))
    sig = inspect.signature(optim_cls.__init__)
    allowed = [k for k in sig.parameters if k not in ("self", "params")]
    for k in hparams:
        if k not in allowed:
            raise UnsupportedOptimizerError(
                f"torch.optim.{optim_cls.__name__} has no option {k!r} (its options: {', '.join(allowed)})"
            )
    per_key = {k: _split_per_model(k, v, n) for k, v in hparams.items()}
    for k in _IMPL_KEYS:
        if k in per_key:
            vals = per_key[k]
            if not _same(vals):
                raise UnsupportedOptimizerError(f"{k!r} selects torch's implementation and must be shared")
            if k == "fused" and vals[0] and optim_cls in _FUSED:
                if compile:
                    raise UnsupportedOptimizerError(
                        "fused=True and compile=True both choose how the step runs: pass one of them")
            elif k != "foreach" and vals[0]:
                fused = ", ".join(f"torch.optim.{c.__name__}" for c in _FUSED)
                raise UnsupportedOptimizerError(
                    f"{k}=True is not supported by the per-model optimizer of torch.optim.{optim_cls.__name__} "
                    f"(fused=True is, for {fused}); its step is already one vectorised update; use "
                    f"compile=True to run it through torch.compile"
                )
    if "betas" in per_key:
        for i, b in enumerate(per_key["betas"]):
            if not (isinstance(b, tuple) and len(b) == 2 and all(isinstance(v, (int, float, Tensor)) for v in b)):
                raise InvalidInputError(
                    f"betas for model {i} is {b!r}; per-model betas are a list of n={n} (beta1, beta2) tuples"
                )
    groups = []
    dummy = torch.zeros(1, requires_grad=True)
    for i in range(n):
        kw = {k: v[i] for k, v in per_key.items()}
        try:
            ref = optim_cls([dummy], **kw)  # torch's own validation and defaults
        except (ValueError, TypeError, RuntimeError) as e:
            raise (InvalidTypeError if isinstance(e, TypeError) else InvalidInputError)(f"model {i}: {e}") from e
        g = dict(ref.defaults)
        if "betas" in g:
            g["betas"] = tuple(_num(b) for b in g["betas"])
        for k in ("lr",):
            if isinstance(g.get(k), Tensor):
                g[k] = g[k].item()
        groups.append(g)
    named = _selected(batched, params)
    for name, p in named:
        if p.dim() == 0 or p.shape[0] != n:
            raise InvalidInputError(f"parameter {name!r} of shape {tuple(p.shape)} has no leading model dim of size "
                                    f"n={n}")
    _refuse_sparse(batched, named, optim_cls, groups)
    return BatchedOptimizer([p for _, p in named], n, optim_cls, groups, compile=compile,
                            param_names=[name for name, _ in named])


def _refuse_sparse(batched, named, optim_cls, groups) -> None:
    """An ``nn.Embedding(sparse=True)`` gives each model alone a sparse gradient, which torch's optimizers
    other than SGD and Adagrad, and those two with weight decay, refuse at their first step. The batched
    gradient is dense (the same numbers), so refuse here what each model alone could not run."""
    wd = any(g.get("weight_decay", 0) != 0 for g in groups)
    if optim_cls in (torch.optim.SGD, torch.optim.Adagrad) and not wd:
        return
    sparse = {f"{k}.weight" if k else "weight" for k, m in batched.named_modules()
              if isinstance(m, torch.nn.Embedding) and m.sparse}
    hit = [name for name, _ in named if name in sparse]
    if hit:
        why = {torch.optim.Adagrad: "weight_decay option is not compatible with sparse gradients",
               torch.optim.SGD: "add(sparse, dense) is not supported (weight decay on sparse gradients)"}.get(
            optim_cls, f"{optim_cls.__name__} does not support sparse gradients")
        raise UnsupportedOptimizerError(
            f"{hit[0]!r} is the weight of an nn.Embedding(sparse=True): alone, each model's torch.optim."
            f"{optim_cls.__name__} would raise '{why}'. Use sparse=False, or SGD / Adagrad (without weight "
            f"decay), as for one model")


def _selected(batched, params) -> list:
    """[(name, stacked parameter)] of ``batched`` that ``params`` selects (None: all)."""
    named = list(batched.named_parameters())
    if params is None:
        return named
    if callable(params):
        chosen = [(k, p) for k, p in named if params(k)]
    else:
        if isinstance(params, (str, Tensor)):
            params = [params]
        by_name, by_id = dict(named), {id(p): k for k, p in named}
        wanted = set()
        params = list(params)
        if any(isinstance(q, dict) for q in params):
            raise InvalidInputError(
                "params: torch-style param groups ({'params': [...], 'weight_decay': ...}) are not taken: the "
                "per-model optimizer has one param group per model. Make one mbcompile.optimizer per set of "
                "parameters, each with its own settings, and step both (docs/optimizers.md, 'Settings per "
                "parameter set'): optimizer(b, AdamW, params=decay, weight_decay=0.1) and "
                "optimizer(b, AdamW, params=no_decay, weight_decay=0.0)")
        for q in params:
            k = q if isinstance(q, str) else by_id.get(id(q))
            if k not in by_name:
                what = repr(q) if isinstance(q, str) else f"a tensor of shape {tuple(q.shape)}" \
                    if isinstance(q, Tensor) else type(q).__name__
                raise InvalidInputError(f"params: {what} is not a parameter of the batched module (its names: "
                                        f"{', '.join(list(by_name)[:8])}{', ...' if len(by_name) > 8 else ''})")
            wanted.add(k)
        chosen = [(k, p) for k, p in named if k in wanted]
    if not chosen:
        raise InvalidInputError("params selects no parameter of the batched module")
    return chosen


# --------------------------------------------------------------------------------------------------
# ReduceLROnPlateau per model
# --------------------------------------------------------------------------------------------------
class _GroupView(torch.optim.Optimizer):
    """One model's param group seen as an optimizer (for torch's per-optimizer schedulers)."""

    def __init__(self, opt: BatchedOptimizer, i: int):  # noqa: D401 - no Optimizer.__init__ on purpose
        self.defaults = opt.defaults
        self.param_groups = [opt.param_groups[i]]
        self.state = {}

    def step(self, closure=None):  # pragma: no cover - never stepped
        raise StateError("a per-model view of an optimizer cannot step")


class ReduceLROnPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
    """torch's ReduceLROnPlateau, one per model: ``step(metrics)`` takes ``[n]`` metrics (a tensor or a
    list), and model ``i``'s lr follows exactly what a torch ReduceLROnPlateau on model ``i``'s own
    optimizer would do with ``metrics[i]``.  ``min_lr`` may be per model (a list of length n).

    (torch's own ReduceLROnPlateau on a per-model optimizer takes one number and so reduces every
    model's lr together; passing it an ``[n]`` tensor fails in ``float()``.)
    """

    def __init__(self, optimizer: BatchedOptimizer, mode="min", factor=0.1, patience=10, threshold=1e-4,
                 threshold_mode="rel", cooldown=0, min_lr=0, eps=1e-8):
        if not getattr(optimizer, "_mbcompile_per_model", False):
            raise InvalidTypeError("mbcompile.optim.ReduceLROnPlateau needs a per-model optimizer "
                                   "(mbcompile.optimizer)")
        n = optimizer.n
        min_lrs = _split_per_model("min_lr", min_lr, n)
        self.optimizer = optimizer
        self.n = n
        self._scheds = [
            torch.optim.lr_scheduler.ReduceLROnPlateau(
                _GroupView(optimizer, i), mode=mode, factor=factor, patience=patience, threshold=threshold,
                threshold_mode=threshold_mode, cooldown=cooldown, min_lr=min_lrs[i], eps=eps,
            )
            for i in range(n)
        ]
        self.last_epoch = 0
        self._last_lr = [g["lr"] for g in optimizer.param_groups]

    def step(self, metrics, epoch=None):  # type: ignore[override]
        if isinstance(metrics, Tensor):
            if metrics.dim() != 1 or metrics.shape[0] != self.n:
                raise InvalidInputError(f"per-model ReduceLROnPlateau.step needs [n] metrics (n={self.n}), "
                                        f"got shape {tuple(metrics.shape)}")
            metrics = metrics.tolist()
        if not isinstance(metrics, (list, tuple)):
            raise InvalidInputError(f"per-model ReduceLROnPlateau.step needs one metric per model (a list or [n] "
                                    f"tensor, n={self.n}), got {type(metrics).__name__} {metrics!r}")
        metrics = list(metrics)
        if len(metrics) != self.n:
            raise InvalidInputError(f"per-model ReduceLROnPlateau.step needs n={self.n} metrics, got {len(metrics)}")
        for s, m in zip(self._scheds, metrics):
            s.step(m, epoch) if epoch is not None else s.step(m)
        self.last_epoch = self._scheds[0].last_epoch
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def get_last_lr(self):
        return list(self._last_lr)

    @property
    def num_bad_epochs_per_model(self) -> list[int]:
        return [s.num_bad_epochs for s in self._scheds]

    def state_dict(self):
        return {
            "per_model": [{k: v for k, v in s.__dict__.items() if k != "optimizer"} for s in self._scheds],
            "last_epoch": self.last_epoch,
            "_last_lr": list(self._last_lr),
        }

    def load_state_dict(self, state_dict):
        per = state_dict["per_model"]
        if len(per) != self.n:
            raise InvalidInputError(f"state dict is for {len(per)} models, this scheduler has n={self.n}")
        for s, d in zip(self._scheds, per):
            s.__dict__.update(copy.deepcopy(d))
        self.last_epoch = state_dict["last_epoch"]
        self._last_lr = list(state_dict["_last_lr"])

    def _shrink_(self, keep):
        keep = _check_keep(keep, self.n)
        self._scheds = [self._scheds[i] for i in keep]
        self._last_lr = [self._last_lr[i] for i in keep]
        self.n = len(keep)


# --------------------------------------------------------------------------------------------------
# shrinking the batch
# --------------------------------------------------------------------------------------------------
# LR scheduler attributes that hold one entry per param group
_SCHED_PER_GROUP = ("base_lrs", "_last_lr", "lr_lambdas", "min_lrs", "max_lrs", "base_momentums", "max_momentums")


def _shrink_scheduler(s, keep: list[int], n_old: int) -> None:
    if hasattr(s, "_shrink_") and callable(s._shrink_):
        s._shrink_(keep)
        return
    for name in _SCHED_PER_GROUP:
        v = getattr(s, name, None)
        if isinstance(v, (list, tuple)) and len(v) == n_old:
            setattr(s, name, type(v)(v[i] for i in keep) if isinstance(v, tuple) else [v[i] for i in keep])
    for sub in getattr(s, "_schedulers", None) or ():
        _shrink_scheduler(sub, keep, n_old)


def shrink_(keep, batched, optimizer=None, scaler=None, schedulers=()) -> None:
    """Keep only the models ``keep`` (indices into the current batch, in the order given), in place.

    Narrows the batched module (parameters, buffers, RNG streams: ``batched._shrink_(keep)``), the
    per-model optimizer's state and param groups, the per-model GradScaler's scales and trackers, and the
    schedulers' per-group lists (``base_lrs``, ``_last_lr``, ``lr_lambdas``, ...).  Parameters keep their
    identity, so the optimizer, scaler and schedulers go on working; the kept models continue exactly as
    if they had never been batched with the others.
    """
    n_old = _model_count(batched)
    keep = _check_keep(keep, n_old)
    if isinstance(schedulers, (torch.optim.lr_scheduler.LRScheduler, ReduceLROnPlateau)) or not isinstance(
        schedulers, Iterable
    ):
        schedulers = (schedulers,)
    schedulers = list(schedulers)
    if optimizer is not None and getattr(optimizer, "n", None) != n_old:
        raise InvalidInputError(f"optimizer has n={getattr(optimizer, 'n', None)}, the batch has n={n_old}")
    if scaler is not None and getattr(scaler, "n", None) != n_old:
        raise InvalidInputError(f"scaler has n={getattr(scaler, 'n', None)}, the batch has n={n_old}")
    for s in schedulers:
        if optimizer is not None and getattr(s, "optimizer", optimizer) is not optimizer:
            raise InvalidInputError("every scheduler passed to shrink_ must belong to the optimizer passed to it")
    params = list(dict.fromkeys(batched.parameters()))
    batched._shrink_(keep)
    # gradients: narrow them if _shrink_ left them at the old size
    idx = torch.tensor(keep, dtype=torch.long)
    for p in params:
        # a leaf's AccumulateGrad node survives a change of shape through .data while an old graph (the
        # last step's loss, still referenced) holds it, and would check the next backward's gradients
        # against the old shape; torch drops it when .data changes dtype: change it there and back
        if p.requires_grad:
            data = p.data
            p.data = torch.empty(0, dtype=torch.float32 if data.dtype == torch.float64 else torch.float64,
                                 device=data.device)
            p.data = data
        if p.grad is not None and p.grad.shape != p.shape:
            if p.grad.dim() >= 1 and p.grad.shape[0] == n_old:
                p.grad = p.grad.index_select(0, idx.to(p.grad.device))
            else:
                p.grad = None
    if optimizer is not None:
        optimizer._shrink_(keep)
    if scaler is not None:
        scaler._shrink_(keep)
    for s in schedulers:
        _shrink_scheduler(s, keep, n_old)
