"""The batched model's submodules ("shells"): they hold the n models' stacked tensors under the original
names, and are instances of a subclass of each original class, so that code which walks ``modules()``
by type sees what it would see in one model (``isinstance(m, nn.BatchNorm2d)``: swa_utils.update_bn,
freezing every BatchNorm, weight-decay exclusions by type).

What the original class overrides of nn.Module's machinery (``_apply``, ``__setattr__``, state-dict
hooks, ...) is put back to nn.Module's own on the shell: those overrides act on one model's tensors
(``RNNBase._apply`` flattens cuDNN weights). ``train`` and ``extra_repr`` stay the class's own.
``forward`` refuses: the shell's tensors are [n, ...], the batched model runs the captured program
(hooks registered on a shell warn that they never run).

Plain attributes (numbers, bools, strings, None, tuples of them: ``momentum``, ``eps``, ``p``) are copied
from the model, nothing else (a config object shared with the captured module could change unseen);
setting one on a shell bumps :data:`EPOCH`, and the batched model then copies it onto the module it
captures (every model's value from then on) and captures again; a numpy scalar counts as its number,
any other value warns that the program does not see it. ``reset_parameters`` refuses and ``apply``
warns: an initialisation there would treat the stacked [n, ...] tensors as one tensor (fans, rows).

The class is named ``Batched<Name>`` (``_get_name`` still says ``<Name>``), so that a registry kept by
the original class's ``__init_subclass__`` gains an entry instead of losing the class's own.
"""
from __future__ import annotations

import numbers
import warnings

import torch
import torch.nn as nn

from .errors import InvalidInputError

INTERNAL = frozenset(vars(nn.Module()))          # nn.Module's own bookkeeping (_parameters, hooks, training)
EPOCH = [0]                                      # bumped when a plain attribute of any shell is set
SET = "_mbcompile_set"                           # a shell's attributes set since the batched model looked
_KEEP = {"__init__", "train", "extra_repr", "forward"}
_DUNDERS = {"__call__", "__getstate__", "__setstate__", "__getattr__", "__setattr__", "__delattr__", "__repr__",
            "__dir__"}
_CACHE: dict = {}


def plain(v) -> bool:
    """A value a program may bake in, compared by ==."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    return isinstance(v, tuple) and all(plain(x) for x in v)


def as_plain(v):
    """A numpy scalar as its Python number; anything else as it is."""
    if isinstance(v, numbers.Number) and not isinstance(v, (bool, int, float)) and hasattr(v, "item"):
        return v.item()
    return v


def _overrides(cls, name) -> bool:
    for k in cls.__mro__:
        if k is nn.Module:
            return False
        if name in vars(k):
            return True
    return False


def _forward(self, *args, **kwargs):
    raise InvalidInputError(
        f"this {type(self).__name__} is a submodule of a batched model: it holds the n models' stacked "
        f"[n, ...] tensors and does not run on its own. Call the batched model, or batched.unbatch(i) for "
        f"model i as a plain module")


def _setattr(self, name, value):
    value = as_plain(value)
    nn.Module.__setattr__(self, name, value)
    if name in INTERNAL or name in self._parameters or name in self._buffers or name in self._modules:
        return
    if plain(value):
        self.__dict__.setdefault(SET, set()).add(name)       # the batched model takes it at its next call
        EPOCH[0] += 1
    else:
        warnings.warn(f"{name} = {type(value).__name__} on a {self._get_name()} inside a batched model: the batched "
                      f"program only sees numbers, bools, strings, None and tuples of them set on a submodule",
                      UserWarning, stacklevel=2)


def _reset_parameters(self, *args, **kwargs):
    raise InvalidInputError(
        f"reset_parameters on a {self._get_name()} inside a batched model would initialise the n models' stacked "
        f"[n, ...] tensors as one tensor (wrong fans, rows of the model dim): initialise the models before "
        f"mbcompile.batch, or load weights with load_state_dict")


def _apply_warning(self, fn, *args, **kwargs):
    warnings.warn(
        "apply(fn) on a batched model calls fn on submodules holding the n models' stacked [n, ...] tensors: an "
        "initialisation there (nn.init.*, weight[padding_idx]) treats them as one tensor. Initialise the models "
        "before mbcompile.batch; flags (m.eval(), m.p = 0.0) are fine", UserWarning, stacklevel=2)
    return nn.Module.apply(self, fn, *args, **kwargs)


def _hook_warning(register):
    def wrapper(self, *args, **kwargs):
        warnings.warn(
            f"{register.__name__} on a {type(self).__name__} inside a batched model: the batched model runs the "
            f"program captured from the models, so this hook never runs. Register hooks on the models before "
            f"mbcompile.batch (they are captured), or on the batched model itself", UserWarning, stacklevel=2)
        return register(self, *args, **kwargs)
    wrapper.__name__ = register.__name__
    return wrapper


_HOOKS = {name: _hook_warning(getattr(nn.Module, name)) for name in (
    "register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
    "register_full_backward_pre_hook", "register_backward_hook")}


class Shell(nn.Module):
    """The shell of a class that cannot be subclassed (its ``__init_subclass__`` refuses): no isinstance,
    the same attribute handling."""
    __setattr__ = _setattr
    forward = _forward


def _remake(cls):
    sub = shell_class(cls) or Shell
    return object.__new__(sub)


def _reduce_ex(self, protocol):
    """Pickled (torch.save, deepcopy) as "a shell of the original class" with its state."""
    return _remake, (type(self).__mro__[1],), nn.Module.__getstate__(self)


def _extra_repr_of(cls):
    def extra_repr(self):
        try:
            return cls.extra_repr(self)
        except Exception:  # noqa: BLE001 - an extra_repr that reads what a shell lacks: no details
            return ""
    return extra_repr


def shell_class(cls):
    """The shell class of module class ``cls`` (cached), or None where one cannot be made."""
    if cls in _CACHE:
        return _CACHE[cls]
    base = cls
    if cls.__module__ == "torch.nn.utils.parametrize" and cls.__name__.startswith("Parametrized"):
        base = cls.__bases__[0]               # its `weight` property would compute on the stacked originals
    ns = {name: val for name, val in vars(nn.Module).items()
          if callable(val) and name not in _KEEP and (not name.startswith("__") or name in _DUNDERS)
          and _overrides(base, name)}
    ns.update(_HOOKS)
    name = base.__name__
    ns.update(forward=_forward, __setattr__=_setattr, __reduce_ex__=_reduce_ex, extra_repr=_extra_repr_of(base),
              reset_parameters=_reset_parameters, apply=_apply_warning, _get_name=lambda self: name,
              __module__=base.__module__, __qualname__=f"Batched{base.__qualname__}", _mbcompile_shell=True)
    try:
        sub = type(f"Batched{name}", (base,), ns)
    except Exception:  # noqa: BLE001 - a metaclass or __init_subclass__ that refuses: a plain nn.Module
        sub = None
    _CACHE[cls] = sub
    return sub


def make(mod: nn.Module, like: nn.Module) -> nn.Module:
    """An empty shell for ``mod`` (its class, its train flag), with ``like``'s plain attributes (``like``: the
    batched model's own copy of ``mod``, which capture reads)."""
    s = object.__new__(shell_class(type(mod)) or Shell)
    nn.Module.__init__(s)
    object.__setattr__(s, "training", mod.training)
    for k, v in like.__dict__.items():
        if k not in INTERNAL and plain(v):
            object.__setattr__(s, k, v)
    return s
