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
from the model; setting one on a shell bumps :data:`EPOCH`, and the batched model then copies it onto
the module it captures (every model's value from then on) and captures again.
"""
from __future__ import annotations

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
    nn.Module.__setattr__(self, name, value)
    if name not in INTERNAL and plain(value):
        self.__dict__.setdefault(SET, set()).add(name)       # the batched model takes it at its next call
        EPOCH[0] += 1


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


def _remake(cls):
    sub = shell_class(cls) or nn.Module
    return object.__new__(sub) if sub is not nn.Module else nn.Module.__new__(nn.Module)


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
    ns.update(forward=_forward, __setattr__=_setattr, __reduce_ex__=_reduce_ex, extra_repr=_extra_repr_of(base),
              __module__=base.__module__, __qualname__=base.__qualname__, _mbcompile_shell=True)
    try:
        sub = type(base.__name__, (base,), ns)
    except Exception:  # noqa: BLE001 - a metaclass or __init_subclass__ that refuses: a plain nn.Module
        sub = None
    _CACHE[cls] = sub
    return sub


def _holds_tensors(v) -> bool:
    if isinstance(v, (torch.Tensor, nn.Module)):
        return True
    return isinstance(v, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in v)   # RNN _flat_weights


def make(mod: nn.Module, like: nn.Module) -> nn.Module:
    """An empty shell for ``mod`` (its class, its train flag), with ``like``'s plain and other non-tensor
    attributes (``like``: the batched model's own copy of ``mod``, which capture reads)."""
    sub = shell_class(type(mod))
    if sub is None:
        s = nn.Module()
    else:
        s = object.__new__(sub)
        nn.Module.__init__(s)
    object.__setattr__(s, "training", mod.training)
    for k, v in like.__dict__.items():
        if k not in INTERNAL and not _holds_tensors(v):
            object.__setattr__(s, k, v)
    return s
