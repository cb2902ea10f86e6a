"""``mbcompile.batch``: n copies of one architecture as one nn.Module whose forward is the captured,
batched graph. Parameters are stacked to [n, *shape] under the original names."""
from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import operator
import time
import types
import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.utils.prune import BasePruningMethod
from torch.utils import _pytree as pytree

from .capture import _PER_MODEL_SCALARS, Captured, _hook_weights, capture, fixed_kernels
from . import archcheck, chunking, hostmem, ops
from . import shells as _shells
from .passes import batch_pass
from .errors import InvalidInputError, InvalidTypeError, OutOfRangeError

RANDOMNESS = ("sequential", "different", "same")


def batch(models, n=None, *, in_dims=None, seeds=None, randomness="sequential", strict=False,
          compile=False):
    """Batch ``n`` copies of ``models`` (one module, or a list of same-architecture modules) into one
    module whose outputs carry a leading model dim. See CONTRACT.md for every argument."""
    if isinstance(models, nn.Module):
        if n is None:
            raise InvalidInputError("mbcompile.batch(model, n=...) needs n, the number of copies (or pass a list of "
                                    "models)")
        try:
            if isinstance(n, bool):
                raise TypeError
            n = operator.index(n)                      # an int (numpy's too), never a float or a string
        except TypeError:
            raise InvalidTypeError(f"mbcompile.batch needs n, the number of copies, as an int; got {n!r}") from None
        if int(n) < 1:
            raise InvalidInputError(f"mbcompile.batch needs n >= 1 models, got n={n}")
        models = [models] * int(n)
    else:
        what = type(models).__name__
        if isinstance(models, (str, bytes)) or not isinstance(models, Iterable):
            raise InvalidTypeError(f"mbcompile.batch expects an nn.Module or a non-empty list of nn.Modules, got "
                                   f"{what}" + (" (wrap a function in an nn.Module)" if callable(models) else ""))
        models = list(models)
        if not models:
            raise InvalidInputError(f"mbcompile.batch expects an nn.Module or a non-empty list of nn.Modules, got "
                                    f"an empty {what}")
        bad = next((type(m).__name__ for m in models if not isinstance(m, nn.Module)), None)
        if bad is not None:
            raise InvalidTypeError(f"mbcompile.batch expects an nn.Module or a non-empty list of nn.Modules, got "
                                   f"a {what} holding {bad}")
        if n is not None and n != len(models):
            raise InvalidInputError(f"n={n} but {len(models)} models were given")
    if randomness not in RANDOMNESS:
        raise InvalidInputError(f"randomness must be one of {RANDOMNESS}, got {randomness!r}")
    if in_dims not in (None, 0) and not (isinstance(in_dims, tuple) and all(d in (None, 0) for d in in_dims)):
        raise InvalidInputError(f"in_dims must be None, 0 or a tuple of 0/None per positional input (the model dim "
                                f"leads each per-model input), got {in_dims!r}")
    _refuse_lazy(models)
    for m in {id(m): m for m in models}.values():
        _detach_hook_weights(m)
    consts = check_same_architecture(models)
    lazy = archcheck.lazy_differences(models)
    for (path, attr), vals in lazy.items():
        if len({v for v in vals if v is not None}) > 1:
            raise InvalidInputError(f"models differ in '{path or '<root>'}.config.{attr}': {vals}; one batched "
                                    f"forward runs one setting for every model: give them the same")
    batched = BatchedModule(models, in_dims=in_dims, seeds=seeds, randomness=randomness, strict=strict,
                            compile=compile, consts=consts)
    for path, attr in lazy:
        setattr(batched._template.get_submodule(path).config, attr, None)   # inferred as the unset ones will
    object.__setattr__(batched, "_lazy", lazy)
    return batched


_SHRINK_LISTENERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def on_shrink(batched, obj) -> None:
    """Call ``obj._shrink_(keep)`` whenever ``batched`` drops models (held weakly on both sides)."""
    _SHRINK_LISTENERS.setdefault(batched, weakref.WeakSet()).add(obj)


def _leaf_name(args, kwargs, k):
    """How the user calls the k-th input leaf: "positional input 1", "keyword input 'bias'", "... [0]"."""
    path = pytree.tree_flatten_with_path((args, kwargs))[0][k][0]
    head, rest = path[1], pytree.keystr(path[2:])
    if path[0].idx == 0:
        return f"positional input {head.idx}{rest}"
    return f"keyword input {head.key!r}{rest}"


def _refuse_lazy(models):
    """Lazy modules (nn.LazyLinear, ...) have no shapes to stack until their first forward."""
    from torch.nn.parameter import UninitializedBuffer, UninitializedParameter
    for i, m in enumerate(models):
        for name, t in itertools.chain(m.named_parameters(), m.named_buffers()):
            if isinstance(t, (UninitializedParameter, UninitializedBuffer)):
                raise InvalidInputError(
                    f"model {i} has an uninitialized lazy parameter {name!r} (nn.LazyLinear, nn.LazyConv2d, ...): "
                    f"its shape is set by the first forward. Run each model once on a sample input before "
                    f"mbcompile.batch")


def check_same_architecture(models):
    """Refuse models that differ in structure; return {module path: {attr: [per-model values]}} for the
    scalar attributes that may differ per model (Dropout.p, LeakyReLU.negative_slope, ...)."""
    ref = models[0]
    ref_mods = dict(ref.named_modules(remove_duplicate=False))
    _refuse_backward_hooks(ref)
    consts = {}
    shared0, paths0 = archcheck.sharing(ref), archcheck.Paths(ref)
    for i, m in enumerate(models[1:], 1):
        if m is ref:
            continue
        mods = dict(m.named_modules(remove_duplicate=False))
        if mods.keys() != ref_mods.keys():
            extra = sorted(set(mods) ^ set(ref_mods))
            raise InvalidInputError(f"model {i} has a different module tree than model 0: first difference at "
                                    f"{extra[0]!r}")
        diff = archcheck.sharing_difference(shared0, archcheck.sharing(m))
        if diff is not None:                           # tied weights / a reused module in one model only
            raise InvalidInputError(diff.format(i=i) + "; tying is part of the architecture: tie (or untie) "
                                    "the same names in every model")
        paths = archcheck.Paths(m)
        class_diff = None          # two classes of one name: said last, when no attribute names the difference
        for path, a in ref_mods.items():
            b = mods[path]
            where = path or "<root>"
            ca, cb = type(a), type(b)
            if ca is not cb and not _same_parametrized_class(a, b) and not archcheck.same_value(ca, cb, paths0, paths):
                class_diff = class_diff or (
                    f"model {i} differs from model 0 at {where!r}: {cb.__module__}.{cb.__qualname__} vs "
                    f"{ca.__module__}.{ca.__qualname__}" + (
                        " (two classes of that name whose bodies differ: defined apart, or by a factory called "
                        "with other arguments)" if ca.__qualname__ == cb.__qualname__ else ""))
                if ca.__qualname__ != cb.__qualname__:
                    raise InvalidInputError(class_diff)
            for kind in ("_parameters", "_buffers"):
                ta, tb = getattr(a, kind), getattr(b, kind)
                if ta.keys() != tb.keys() or any((ta[k] is None) != (tb[k] is None) for k in ta):
                    raise InvalidInputError(f"model {i} differs from model 0 at {where!r}: {kind[1:]} "
                                            f"{sorted(k for k in tb if tb[k] is not None)} vs "
                                            f"{sorted(k for k in ta if ta[k] is not None)}")
                for k in ta:
                    if ta[k] is not None and (ta[k].shape != tb[k].shape or ta[k].dtype != tb[k].dtype):
                        raise InvalidInputError(
                            f"model {i} differs from model 0 at '{path}.{k}': shape/dtype {tuple(tb[k].shape)} "
                            f"{tb[k].dtype} vs {tuple(ta[k].shape)} {ta[k].dtype}")
                    if kind == "_parameters" and ta[k] is not None and ta[k].requires_grad != tb[k].requires_grad:
                        raise InvalidInputError(f"model {i} differs from model 0 at '{path}.{k}': requires_grad")
            for hooks in ("_forward_hooks", "_forward_pre_hooks"):
                ha, hb = list(getattr(a, hooks).values()), list(getattr(b, hooks).values())
                if len(ha) != len(hb) or not all(_same_hook(x, y, ref, m) for x, y in zip(ha, hb)):
                    raise InvalidInputError(
                        f"model {i} and model 0 have different {hooks[1:-1].replace('_', ' ')}s at {where!r}: one "
                        f"batched forward runs model 0's; register the same hook function on every model (or none)")
            if a.training != b.training:
                mode = lambda m: "train" if m.training else "eval"  # noqa: E731
                raise InvalidInputError(f"model {i} is in {mode(b)} mode at {where!r} but model 0 is in {mode(a)} "
                                        f"mode; batched models share each module's mode: call .train() / .eval() "
                                        f"on them alike")
            attrs_a, attrs_b = archcheck.attributes(a), archcheck.attributes(b)
            for attr in _hook_weights(a) & _hook_weights(b):     # recomputed by the hook at every call
                attrs_a.pop(attr, None)
                attrs_b.pop(attr, None)
            only = sorted(attrs_a.keys() ^ attrs_b.keys())
            if only:
                raise InvalidInputError(f"model {i} differs from model 0 at {where!r}: only one of them has the "
                                        f"attribute {only[0]!r}")
            for attr, va in attrs_a.items():
                vb = attrs_b[attr]
                if archcheck.same_value(va, vb, paths0, paths):
                    continue
                plain = isinstance(va, archcheck.PLAIN) and isinstance(vb, archcheck.PLAIN)
                if plain and (type(a).__name__, attr) in _PER_MODEL_SCALARS:
                    consts.setdefault(path, {}).setdefault(attr, [getattr(mm.get_submodule(path), attr)
                                                                  for mm in models])
                    continue
                inner = archcheck.where_differs(va, vb, paths0, paths)
                raise InvalidInputError(
                    f"model {i} differs from model 0 in '{where}.{attr}{inner.partition(':')[0]}' "
                    f"({type(a).__name__}): {inner.partition(': ')[2] if inner else ''}"
                    f"{'' if inner else archcheck.short(vb) + ' vs ' + archcheck.short(va)}. "
                    f"One batched forward runs model 0's code "
                    f"and attributes for every model; mbcompile batches per-model values only for Dropout*.p, "
                    f"MultiheadAttention.dropout, LSTM/GRU/RNN.dropout and LeakyReLU.negative_slope; "
                    f"give the models the same {attr} or batch them apart.")
        if class_diff:
            raise InvalidInputError(class_diff)
    return consts


def _detach_hook_weights(model):
    """Such an attribute, computed by the last forward with grad, cannot be deep-copied (model 0 is
    copied into the template); its value is recomputed at every call, so it is detached first."""
    for mod in model.modules():
        for name in _hook_weights(mod):
            t = getattr(mod, name, None)
            if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                setattr(mod, name, t.detach())


def _same_hook(x, y, model_x, model_y) -> bool:
    """Whether two models' hooks do the same: one function; or functions with the same code, defaults
    and plain closure values (a lambda written in __init__; not one that closes over a module: copying
    model 0 would not rebind it); or the same method bound to the module at the same path of each model
    (copying rebinds it to the copy); or objects of one class with equal plain attributes (the hook
    objects of nn.utils.weight_norm / spectral_norm); or nn.utils.prune hooks of one tensor (how much
    each model pruned is in its own mask)."""
    if x is y:
        return True
    if isinstance(x, BasePruningMethod) and isinstance(y, BasePruningMethod):
        return x._tensor_name == y._tensor_name         # forward: name = name_orig * name_mask (each model's own)
    if isinstance(x, types.MethodType) and isinstance(y, types.MethodType):
        return x.__func__ is y.__func__ and _path_in(x.__self__, model_x) == _path_in(y.__self__, model_y) is not None
    if isinstance(x, types.FunctionType) and isinstance(y, types.FunctionType):
        cx, cy = x.__closure__ or (), y.__closure__ or ()
        return (x.__code__ is y.__code__ and x.__defaults__ == y.__defaults__ and len(cx) == len(cy)
                and all(_same_plain(p.cell_contents, q.cell_contents) for p, q in zip(cx, cy)))
    if type(x) is type(y) and not isinstance(x, (types.FunctionType, types.MethodType)) and callable(x):
        vx, vy = getattr(x, "__dict__", None), getattr(y, "__dict__", None)   # a hook object (the hook
        return vx is not None and vy is not None and vx.keys() == vy.keys() and \
            all(_same_plain(vx[k], vy[k]) for k in vx)       # form of weight_norm): equal plain settings
    return False


def _same_plain(u, v) -> bool:
    return type(u) is type(v) and isinstance(u, archcheck.PLAIN) and u == v


def _path_in(mod, model):
    return next((p for p, m in model.named_modules(remove_duplicate=False) if m is mod), None)


def _refuse_backward_hooks(model):
    """Backward hooks change gradients outside the graph mbcompile captures: refused, never dropped."""
    for path, mod in model.named_modules():
        if mod._backward_hooks or mod._backward_pre_hooks:
            raise InvalidInputError(
                f"module {path or '<root>'!r} ({type(mod).__name__}) has a backward hook (register_full_backward_"
                f"hook / _pre_hook): the batched backward would not run it. Remove it, or register a hook on the "
                f"batched parameters' gradients ([n, ...]) instead")
        for name, p in mod.named_parameters(recurse=False):
            if p._backward_hooks:
                raise InvalidInputError(
                    f"parameter '{path + '.' if path else ''}{name}' has a gradient hook (Tensor.register_hook): "
                    f"the batched parameter is a new tensor. Register the hook on batched.get_parameter("
                    f"'{path + '.' if path else ''}{name}') (its gradient is [n, ...])")


def _same_parametrized_class(a, b):
    """torch.nn.utils.parametrize gives every parametrized module its own class; compare their bases."""
    ta, tb = type(a), type(b)
    return ta.__name__ == tb.__name__ and ta.__name__.startswith("Parametrized") and ta.__bases__ == tb.__bases__


@dataclass
class Program:
    """One captured-and-batched forward, for one input signature and train/eval mode."""
    captured: Captured
    gm: torch.fx.GraphModule
    call: object
    in_dims: list
    user_names: list
    records: list = field(default_factory=list)
    times: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)     # program-level notes (host malloc, chunks), for explain()
    chunked: object = None    # (sizes, vals, records) -> the program traced over chunks (chunking.py), or None
    eager: object = None      # gm as eager code runs it (ops.eager_module: mbcompile's ops as Python calls)
    chunk: object = None      # what chunking.Chooser picked: n (whole), k (chunks of k), 0 (chunks of 1, default lowerings)
    chunk_gain: float = 1.0   # how much faster (eager) that was than whole: compiled_chunk's margin


_ATTR_WARN = 9                       # distinct submodule-attribute combinations before a warning


class _RNG:
    def __init__(self, mode, states=None):
        self.mode, self.states, self.fused_cuda = mode, states, False


class BatchedModule(nn.Module):
    """n models as one module. ``named_parameters()`` use the original names, stacked to [n, *shape]."""

    def __init__(self, models, *, in_dims=None, seeds=None, randomness="sequential", strict=False,
                 compile=False, consts=None):
        super().__init__()
        base = models[0]
        n = len(models)
        try:
            object.__setattr__(self, "_template", copy.deepcopy(base))
        except RuntimeError as e:
            raise InvalidInputError(
                f"mbcompile.batch copies model 0 and copy.deepcopy failed: {e}. A module holding a computed tensor "
                f"as an attribute (one with a grad_fn) cannot be copied: compute it in forward, or run one forward "
                f"under torch.no_grad() before batching") from e
        object.__setattr__(self, "_programs", {})
        self._n, self._in_dims, self._randomness = n, in_dims, randomness
        self._strict, self._compile = strict, compile
        self._consts = {path: dict(attrs) for path, attrs in (consts or {}).items()}
        if seeds is None:
            seeds = torch.randint(0, 2**62, (n,)).tolist()
        seeds = [int(s) for s in seeds]
        if len(seeds) != n:
            raise InvalidInputError(f"seeds has {len(seeds)} entries, expected n={n}")
        self._seeds = seeds
        object.__setattr__(self, "_rng_states", {})
        self._build_tree(models)
        self.training = base.training                  # each submodule keeps its own mode (a frozen bn.eval())
        object.__setattr__(self, "_shells", list(self.modules()))
        object.__setattr__(self, "_shell_paths", [p for p, _ in self.named_modules()])
        object.__setattr__(self, "_attr_ids", {})
        object.__setattr__(self, "_attr_epoch", None)
        object.__setattr__(self, "_p0", next(iter(self.parameters()), None))

    # ---- structure -------------------------------------------------------------------------------
    def _build_tree(self, models):
        base = models[0]
        taken = [k for k in [*base._modules, *base._parameters, *base._buffers] if hasattr(type(self), k)]
        if taken:
            raise InvalidInputError(
                f"the model has a top-level submodule, parameter or buffer named {taken[0]!r}, which is also an "
                f"attribute of the batched module (batched.{taken[0]}); rename it, or batch a container holding "
                f"the model (nn.Sequential(model) names its parameters '0.*')")
        shells = {"": self}
        by_id = {id(base): self}
        like = dict(self._template.named_modules(remove_duplicate=False))
        for path, mod in base.named_modules(remove_duplicate=False):
            if path == "":
                continue
            parent, _, leaf = path.rpartition(".")
            shell = by_id.get(id(mod))
            if shell is None:
                shell = by_id[id(mod)] = _shells.make(mod, like[path])
            shells[parent].add_module(leaf, shell)
            shells[path] = shell
        stacked = {}
        for name, p in base.named_parameters(remove_duplicate=False):
            parent, _, leaf = name.rpartition(".")
            if id(p) not in stacked:
                with torch.no_grad():
                    data = torch.stack([m.get_parameter(name).detach() for m in models]).clone()
                stacked[id(p)] = nn.Parameter(data, requires_grad=p.requires_grad)
            shells[parent].register_parameter(leaf, stacked[id(p)])
        for name, b in base.named_buffers(remove_duplicate=False):
            parent, _, leaf = name.rpartition(".")
            owner = base.get_submodule(parent)
            persistent = leaf not in owner._non_persistent_buffers_set
            if id(b) not in stacked:
                stacked[id(b)] = torch.stack([m.get_buffer(name).detach() for m in models]).clone()
            shells[parent].register_buffer(leaf, stacked[id(b)], persistent=persistent)

    def _param_dtype(self):
        """Parameters' dtype and device (``.double()`` / ``.to()`` change them in place): part of a program's key."""
        p = self._p0
        return None if p is None else (p.dtype, p.device)

    def _modes(self):
        """Every module's train/eval flag: a program is captured per combination."""
        return tuple([m.training for m in self._shells])

    def _attr_key(self):
        """The plain attributes of the submodules (BatchNorm momentum, Dropout.p, ...) as a small int for
        the program key. One the user set on a submodule since (update_bn's momentum=None) is copied onto
        the template that capture reads, as every model's value."""
        if self._attr_epoch == _shells.EPOCH[0]:
            return self._attr_id
        tmods = list(self._template.modules())
        fp, changed = [], []
        for k in range(1, len(self._shells)):
            shell, tm, path = self._shells[k], tmods[k], self._shell_paths[k]
            for name in shell.__dict__.pop(_shells.SET, ()):
                if name in shell.__dict__:
                    setattr(tm, name, shell.__dict__[name])
                    changed.append(f"{path}.{name}")
                    attrs = self._consts.get(path, {})
                    if attrs.pop(name, None) is not None and not attrs:
                        del self._consts[path]
            fp += [(k, name, v) for name, v in shell.__dict__.items()
                   if name not in _shells.INTERNAL and _shells.plain(v)]
        fp += [(0, name, v) for name, v in self._template.__dict__.items()
               if not name.startswith("_") and _shells.plain(v)]
        fp += [(path, attr, tuple(vals)) for path, attrs in self._consts.items() for attr, vals in attrs.items()]
        ids = self._attr_ids
        object.__setattr__(self, "_attr_id", ids.setdefault(tuple(fp), len(ids)))
        if len(ids) == _ATTR_WARN and changed:
            warnings.warn(f"the batched model's submodule attributes have taken {_ATTR_WARN} combinations (the "
                          f"last set: {', '.join(changed)}); each is captured once and kept, so a value set anew "
                          f"every step (an annealed Dropout.p) captures every step. Set such values at epoch "
                          f"boundaries, or pass them to forward as tensors", UserWarning, stacklevel=3)
        object.__setattr__(self, "_attr_epoch", _shells.EPOCH[0])
        return self._attr_id

    @property
    def n(self) -> int:
        return self._n

    @property
    def seeds(self) -> list:
        return list(self._seeds)

    def extra_repr(self):
        return f"n={self._n}, model={type(self._template).__name__}, randomness={self._randomness!r}"

    def __getitem__(self, idx):
        """``batched[k]`` of a batched nn.Sequential / ModuleList / ModuleDict: its k-th (or named) submodule."""
        t = self._template
        if isinstance(t, nn.ModuleDict):
            return self._modules[idx]
        if not isinstance(t, (nn.Sequential, nn.ModuleList)) or isinstance(idx, slice):
            raise TypeError(f"a batched {type(t).__name__} takes no [{idx!r}]" + (
                "; slicing is not supported: batch the slice's models" if isinstance(idx, slice) else ""))
        return list(self._modules.values())[idx]

    def __iter__(self):
        """A batched Sequential / ModuleList: its submodules; a ModuleDict: its keys."""
        t = self._template
        if isinstance(t, nn.ModuleDict):
            return iter(self._modules)
        if isinstance(t, (nn.Sequential, nn.ModuleList)):
            return iter(self._modules.values())
        raise TypeError(f"a batched {type(t).__name__} is not iterable")

    def __setattr__(self, name, value):
        """A plain top-level attribute of the model (``batched.temperature = 2.0``, read by forward) is set
        on the template that capture reads, as every model's value (captured once per combination)."""
        t = self.__dict__.get("_template")
        if (t is not None and not name.startswith("_") and name in t.__dict__ and name not in self.__dict__
                and not hasattr(type(self), name) and _shells.plain(t.__dict__[name])):
            value = _shells.as_plain(value)
            if not _shells.plain(value):
                raise InvalidInputError(f"batched.{name} = {type(value).__name__}: the batched program only sees "
                                        f"numbers, bools, strings, None and tuples of them set on the model")
            setattr(t, name, value)
            object.__setattr__(self, "_attr_epoch", None)
            return
        super().__setattr__(name, value)

    def __getattr__(self, name):
        t = self.__dict__.get("_template")
        if t is not None and not name.startswith("_") and name in t.__dict__ and _shells.plain(t.__dict__[name]):
            return t.__dict__[name]                    # the model's own top-level number, flag, ...
        try:
            return super().__getattr__(name)
        except AttributeError:
            cls = type(self.__dict__.get("_template"))
            if callable(getattr(cls, name, None)) and not name.startswith("__"):
                raise AttributeError(
                    f"'{name}' is a method of {cls.__name__}, and mbcompile batches forward only: reach it "
                    f"through forward (say forward(self, x, mode='{name}'), branching on the string: each mode "
                    f"is captured once), or call batched.unbatch(i).{name}(...) for model i alone") from None
            raise

    def __getstate__(self):
        """Pickling (torch.save of the whole module) leaves out the captured programs: they hold traced
        closures, and the next call after loading captures again."""
        state = dict(self.__dict__)
        state["_programs"], state["_fast_programs"], state["_attr_epoch"] = {}, {}, None
        state.pop("_last_program", None)
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module's, with a clear error for a state of another number of models or of one model."""
        own = dict(self.named_parameters())
        own.update(self.named_buffers())
        for k, v in state_dict.items():
            mine = own.get(k)
            if not isinstance(v, torch.Tensor) or mine is None or v.shape == mine.shape or mine.dim() == 0:
                continue
            if v.dim() == mine.dim() and v.shape[1:] == mine.shape[1:]:
                raise InvalidInputError(f"load_state_dict: {k!r} holds {v.shape[0]} models ({tuple(v.shape)}) but this "
                                        f"batch has n={self._n}; load it into a batch of {v.shape[0]} models")
            if tuple(v.shape) == tuple(mine.shape[1:]):
                raise InvalidInputError(f"load_state_dict: {k!r} has one model's shape {tuple(v.shape)}, a batch's state "
                                        f"stacks its n={self._n} models ({tuple(mine.shape)}); build the batch from "
                                        f"models that hold those weights (mbcompile.batch([m0, m1, ...]))")
        res = super().load_state_dict(state_dict, strict=strict, assign=assign)
        object.__setattr__(self, "_p0", next(iter(self.parameters()), None))    # assign=True: new parameters
        return res

    def unbatch(self, i: int) -> nn.Module:
        """Model i as a plain module of the original class, with its own copy of weights and buffers."""
        if isinstance(i, bool) or not hasattr(i, "__index__"):
            raise InvalidTypeError(f"unbatch takes a model index (an int), got {type(i).__name__} {i!r}")
        i = operator.index(i)
        if not -self._n <= i < self._n:
            raise OutOfRangeError(f"model index {i} out of range for n={self._n}")
        self._attr_key()                                # attributes set on the submodules since the last call
        m = copy.deepcopy(self._template)
        with torch.no_grad():
            for name, p in self.named_parameters(remove_duplicate=False):
                tgt = m.get_parameter(name)
                tgt.data = p[i].detach().clone()
                tgt.requires_grad_(p.requires_grad)    # as the stacked one is now (requires_grad_ after batch)
            for name, b in self.named_buffers(remove_duplicate=False):
                parent, _, leaf = name.rpartition(".")
                m.get_submodule(parent)._buffers[leaf] = b[i].detach().clone()
        _retie(m, self._template)
        for mod, shell in zip(m.modules(), self._shells):
            mod.training = shell.training
        apply_consts(m, self.model_consts(i))
        return m

    def model_consts(self, i: int) -> dict:
        """Model i's own values of the attributes batched per model ({module path: {attr: value}}:
        Dropout.p, LeakyReLU.negative_slope, ...); the template holds model 0's."""
        self._attr_key()
        return {path: {attr: vals[i] for attr, vals in attrs.items()} for path, attrs in self._consts.items()}

    # ---- randomness ------------------------------------------------------------------------------
    def _states(self, device):
        key = str(device)
        if key not in self._rng_states:
            dev = torch.device(device)
            with torch.inference_mode(False):          # a first call under inference_mode: still a normal
                self._rng_states[key] = torch.stack(   # tensor, which later training calls update in place
                    [torch.Generator(device=dev).manual_seed(s).get_state() for s in self._seeds])
        return self._rng_states[key]

    def get_rng_state(self) -> dict:
        """Every model's random stream (for checkpoints): {"seeds": [...], "states": {device: uint8 [n, S]}}."""
        return {"seeds": list(self._seeds), "states": {k: v.clone() for k, v in self._rng_states.items()}}

    def set_rng_state(self, state: dict):
        self._seeds = [int(s) for s in state["seeds"]]
        self._rng_states.clear()
        self._rng_states.update({k: v.clone() for k, v in state["states"].items()})

    # ---- shrinking -------------------------------------------------------------------------------
    def _shrink_(self, keep):
        """Keep only models ``keep`` (indices): parameters keep their identity, so optimizers stay valid."""
        keep = [int(k) for k in keep]
        if not keep or any(not 0 <= k < self._n for k in keep) or len(set(keep)) != len(keep):
            raise InvalidInputError(f"keep must list distinct model indices in [0, {self._n}), got {keep}")
        idx = torch.tensor(keep)
        with torch.no_grad():
            for p in self.parameters():
                p.data = p.data[idx.to(p.device)].clone()
                if p.grad is not None:
                    p.grad = p.grad[idx.to(p.device)].clone()
            for mod in self.modules():
                for k, b in list(mod._buffers.items()):
                    if b is not None:
                        mod._buffers[k] = b[idx.to(b.device)].clone()
        for k, v in self._rng_states.items():
            self._rng_states[k] = v[idx].clone()
        self._seeds = [self._seeds[k] for k in keep]
        consts = {}                                    # per-model Dropout.p, ...: the kept models' values
        for path, attrs in self._consts.items():
            for attr, vals in attrs.items():
                new = [vals[k] for k in keep]
                setattr(self._template.get_submodule(path), attr, new[0])   # the template: model keep[0]
                object.__setattr__(self.get_submodule(path), attr, new[0])  # and its shell, which shows it
                if any(v != new[0] for v in new):
                    consts.setdefault(path, {})[attr] = new
        self._consts = consts
        object.__setattr__(self, "_attr_epoch", None)   # the program key reads the kept models' values
        self._n = len(keep)
        self._programs.clear()
        for obj in list(_SHRINK_LISTENERS.get(self, ())):      # train_step's per-model max_grad_norm
            obj._shrink_(keep)
        return self

    # ---- forward ---------------------------------------------------------------------------------
    def _leaf_dims(self, args, kwargs):
        in_dims = self._in_dims
        if in_dims is None:
            per_arg, kw = [None] * len(args), None
        elif in_dims == 0:
            per_arg, kw = [0] * len(args), 0
        else:
            if len(in_dims) != len(args):
                raise InvalidInputError(f"in_dims has {len(in_dims)} entries but forward got {len(args)} positional "
                                        "inputs")
            per_arg, kw = list(in_dims), None
        dims = []
        for a, d in zip(args, per_arg):
            dims += [d] * len(pytree.tree_leaves(a))
        for v in kwargs.values():
            dims += [kw] * len(pytree.tree_leaves(v))
        return dims

    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling():            # torch.compile(batched): dynamo traces only the
            prog, vals, leaves = _prepare(self, args, kwargs)    # call of the batched graph
            return _finish(self, prog, prog.gm(*vals), leaves)
        prog, vals, leaves = self._prepare(args, kwargs)
        return self._outputs(prog, prog.call(*vals), leaves)

    def _prepare(self, args, kwargs):
        """The Program for this input signature (captured and batched on first use) and its inputs:
        stacked params/buffers, constants, user tensors, then the per-model RNG states."""
        fast = not kwargs and all(type(a) is torch.Tensor for a in args)
        if fast:                                     # positional tensors only: one dict lookup per call
            fkey = (tuple((a.shape, a.stride(), a.dtype, a.device) for a in args), self._modes(), self._attr_key(),
                    self._randomness, self._n, self._in_dims, _autocast_key(), self._param_dtype())
            cache = self.__dict__.setdefault("_fast_programs", {})
            hit = cache.get(fkey)
            if hit is not None and self._programs.get(hit[3]) is hit[0]:
                prog, getters, skey = hit[:3]
                vals = [d[k] if d is not None else args[k] for d, k in getters]
                states = self._rng_states.get(skey) if skey is not None else _NO_STATES
                if states is None:
                    states = self._states(vals[0].device if vals else args[0].device)
                vals.append(states)
                self.__dict__["_last_program"] = prog       # what explain() shows: the program that ran
                return prog, vals, list(args)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        dims = self._leaf_dims(args, kwargs)
        dims = [d if isinstance(x, torch.Tensor) else None for x, d in zip(leaves, dims)]
        for k, (x, d) in enumerate(zip(leaves, dims)):
            if d is not None and (x.dim() == 0 or x.shape[0] != self._n):
                got = "a 0-dim tensor" if x.dim() == 0 else f"leading size {x.shape[0]} (shape {tuple(x.shape)})"
                raise InvalidInputError(f"{_leaf_name(args, kwargs, k)} is per-model (in_dims), so its leading dim must "
                                        f"be n={self._n}; got {got}. Pass inputs as [n, B, ...] or mark them shared "
                                        f"with in_dims=None.")
        device = next(iter(self.parameters()), torch.empty(0)).device
        # strides too: the traced program keeps the views its first inputs allowed
        key = (spec, tuple((tuple(x.shape), x.stride(), x.dtype, x.device, d) if isinstance(x, torch.Tensor)
                           else ("c", repr(x)) for x, d in zip(leaves, dims)), self._modes(), self._attr_key(),
               self._randomness,
               self._n, _autocast_key(), self._param_dtype())
        prog = self._programs.get(key)
        if prog is None:
            self._count_constants(key, args, kwargs, leaves)
            cuda = [device.index or 0] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda), _gc_paused():   # lowering measurements draw random
                prog = self._build(args, kwargs, leaves, dims, spec)  # inputs: capture never moves the user's RNG
            self._programs[key] = prog
        self.__dict__["_last_program"] = prog
        vals = self._inputs(prog, leaves)
        vals.append(self._states(device) if self._randomness == "sequential" else _NO_STATES)
        if fast:
            cache[fkey] = (prog, self._getters(prog), str(device) if self._randomness == "sequential" else None,
                           key)
        return prog, vals, leaves

    def _count_constants(self, key, args, kwargs, leaves):
        """Warn once when forward's non-tensor arguments (a Python float, a string) have taken _ATTR_WARN
        values for one tensor signature: each value is a constant of a program of its own, so a value
        that changes every step (an annealed temperature) captures every step."""
        shape = (key[0], tuple(k if k[0] != "c" else "c" for k in key[1]), *key[2:])
        seen = self.__dict__.setdefault("_constant_args", {})
        count = seen[shape] = seen.get(shape, 0) + 1
        if count == _ATTR_WARN and any(k[0] == "c" for k in key[1]):
            named = [f"{_leaf_name(args, kwargs, i)}={x!r}" for i, x in enumerate(leaves)
                     if not isinstance(x, torch.Tensor)]
            warnings.warn(f"forward's non-tensor arguments have taken {_ATTR_WARN} values ({', '.join(named[:3])} "
                          f"this time); each value is captured once as a constant of its own program, so a value "
                          f"that changes every step captures every step. Pass it as a tensor "
                          f"(torch.tensor(value)) to change it freely", UserWarning, stacklevel=4)

    def _getters(self, prog):
        """(dict, key) per graph input, so that a call looks inputs up without walking the module tree
        (a replaced parameter or buffer is still found: the owner's dict is looked up at each call)."""
        out, user = [], 0
        for kind, target in prog.captured.inputs:
            if kind in ("param", "buffer"):
                parent, _, leaf = target.rpartition(".")
                owner = self.get_submodule(parent)
                out.append((owner._parameters if kind == "param" else owner._buffers, leaf))
            elif kind == "const":
                out.append((prog.captured.constants, target))
            else:
                out.append((None, user))
                user += 1
        return out

    def _inputs(self, prog, leaves):
        users = iter([leaves[i] for i in _user_leaves(prog.captured, leaves)])
        vals = []
        for kind, target in prog.captured.inputs:
            if kind in ("param", "buffer"):            # the owner's dict, as _getters: a tensor that
                parent, _, leaf = target.rpartition(".")   # torch.func.functional_call swapped in counts
                owner = self.get_submodule(parent)
                vals.append((owner._parameters if kind == "param" else owner._buffers)[leaf])
            elif kind == "const":
                vals.append(prog.captured.constants[target])
            else:
                vals.append(next(users))
        return vals

    def _outputs(self, prog, outs, leaves):
        user = []
        for (kind, target), v in zip(prog.captured.outputs, outs):
            if kind == "buffer":  # a new tensor, not copy_: autograd may have saved the old one
                parent, _, leaf = target.rpartition(".")
                mod = self.get_submodule(parent)
                old = mod._buffers[leaf]
                if v.is_inference() and old is not None and not old.is_inference():
                    with torch.no_grad():      # under inference_mode: in place, as eager's updates (a new
                        old.copy_(v)           # inference tensor could never be saved for backward later)
                else:
                    mod._buffers[leaf] = v.detach()
            elif kind == "param":  # e.g. embedding max_norm renormalises rows in place, as eager does
                with torch.no_grad():
                    self.get_parameter(target).data.copy_(v.detach())
            elif kind == "user_mutation":
                with torch.no_grad():
                    src = leaves[_user_leaves(prog.captured, leaves)[prog.user_names.index(target)]]
                    src.copy_(v if v.shape == src.shape else v[0])
            else:
                user.append(v)
        return pytree.tree_unflatten(user, prog.captured.out_spec)

    def _sync_template(self):
        """Give the template model 0's current tensors (same dtype/device) for export."""
        t = self._template
        with torch.no_grad():
            for name, p in self.named_parameters(remove_duplicate=False):
                t.get_parameter(name).data = p[0].detach()
            for name, b in self.named_buffers(remove_duplicate=False):
                parent, _, leaf = name.rpartition(".")
                t.get_submodule(parent)._buffers[leaf] = b[0].detach().clone()
        _retie(t, t)
        t.train(self.training)
        for (path, mod), (_, shell) in zip(t.named_modules(), self.named_modules()):
            mod.training = shell.training

    def _check_lazy(self):
        """After a capture: the values the template inferred (archcheck.LAZY) must be those the models
        that set theirs have; else those models would run with another (a regression head as a
        classifier)."""
        for (path, attr), vals in list(self.__dict__.get("_lazy", {}).items()):
            got = getattr(self._template.get_submodule(path).config, attr, None)
            if got is None:
                continue                                   # not inferred by this forward: later
            bad = [i for i, v in enumerate(vals) if v is not None and v != got]
            if bad:
                raise InvalidInputError(
                    f"model {bad[0]} has '{path or '<root>'}.config.{attr}' = {vals[bad[0]]!r}, but models "
                    f"{[i for i, v in enumerate(vals) if v is None]} have None and infer {got!r} from these "
                    f"inputs; one batched forward runs one setting: set {attr} alike on every model")
            del self._lazy[(path, attr)]

    def _build(self, args, kwargs, leaves, dims, spec):
        self._sync_template()
        ul = [x.select(0, 0) if d is not None else x for x, d in zip(leaves, dims)]
        seen = set()                                     # one tensor passed twice (per model here, shared
        for k, x in enumerate(ul):                       # there): export must see separate inputs
            if isinstance(x, torch.Tensor):
                key = x.untyped_storage().data_ptr() if x.device.type != "meta" else id(x)
                if key in seen:
                    ul[k] = x.clone()
                seen.add(key)
        uargs, ukwargs = pytree.tree_unflatten(ul, spec)
        from . import lowering
        m0 = lowering.SPENT["measure_s"]
        t0 = time.perf_counter()
        cap = capture(self._template, uargs, ukwargs, self._consts, strict=self._strict)
        self._check_lazy()
        t1 = time.perf_counter()
        tdims = iter([dims[i] for i in _user_leaves(cap, leaves)])
        in_dims, user_names = [], []
        for kind, target in cap.inputs:
            if kind in ("param", "buffer"):
                in_dims.append(0)
            elif kind == "const":
                in_dims.append(None)
            else:
                in_dims.append(next(tdims))
                user_names.append(target)
        records = []
        n, strict, mode = self._n, self._strict, self._randomness
        consts = cap.consts                              # the per-model scalars some op of this graph uses

        def batched_forward(*vals):
            *vals, states = vals
            rng = _RNG(mode, states)
            records.clear()
            return batch_pass.run(cap.gm, n, list(vals), in_dims, strict=strict, consts=consts, rng=rng,
                                  records=records)

        prog = Program(cap, None, None, in_dims, user_names, records)
        vals = self._inputs(prog, leaves)
        device = next(iter(self.parameters()), torch.empty(0)).device
        if device.type == "cpu":                         # before the lowerings are timed (hostmem.py)
            prog.notes.append(hostmem.tune())
        states = self._states(device) if mode == "sequential" else torch.empty(0)
        gm = _trace(batched_forward, vals + [states])
        t2 = time.perf_counter()
        prog.gm = gm
        prog.call = prog.eager = ops.eager_module(gm)
        prog.times = {"capture_s": t1 - t0, "batch_s": t2 - t1, "export_s": cap.seconds,
                      "measure_s": lowering.SPENT["measure_s"] - m0}     # lowering timing, part of batch_s
        if self._compile:                                # compiled at first call; adds times["compile_s"]
            from .backend import compile_program
            prog.call = compile_program(gm, prog.times)
        elif chunking.allowed(prog, device, n, consts, mode):
            def trace(sizes, vals, recs):                # n models as chunks of sizes[i], one graph
                def chunked_forward(*vals):
                    *vals, states = vals
                    parts = [v.split(sizes) if d == 0 else [v] * len(sizes) for v, d in zip(vals, in_dims)]
                    sts = states.split(sizes) if states.numel() else [states] * len(sizes)
                    outs = []
                    for i, k in enumerate(sizes):       # n,... -> k,... per chunk; outs k,... -> n,...
                        outs.append(batch_pass.run(cap.gm, k, [p[i] for p in parts], in_dims, strict=strict,
                                                   consts=consts, rng=_RNG(mode, sts[i]),
                                                   records=recs if i == 0 else []))
                    return [torch.cat(col) if isinstance(col[0], torch.Tensor) else col[0] for col in zip(*outs)]
                return _trace(chunked_forward, vals)
            prog.chunked = trace
            prog.call = chunking.Chooser(prog, n, self.training)
        return prog


def apply_consts(module: nn.Module, consts: dict) -> None:
    """Set the per-model attribute values ``consts`` ({path: {attr: value}}) on a plain module."""
    for path, attrs in consts.items():
        for attr, v in attrs.items():
            setattr(module.get_submodule(path), attr, v)


def _user_leaves(cap, leaves):
    """Indices of the input leaves behind the captured graph's user placeholders: every leaf where
    export gave each one a placeholder (Python numbers too: their values are baked into the graph,
    and the program's key), else the tensors."""
    if sum(1 for kind, _ in cap.inputs if kind == "user") == len(leaves):
        return range(len(leaves))
    return [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]


def _trace(fn, vals):
    """``fn`` traced by make_fx on fake copies of ``vals`` (under no_grad: the graph's ops, not autograd's)."""
    with torch.no_grad(), fixed_kernels():
        gm = make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)(
            *[v.detach() if isinstance(v, torch.Tensor) else v for v in vals])
    _drop_identity_views(gm)
    return gm


_VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)


def _drop_identity_views(gm):
    """Views to the shape and strides their input has already (the rules' ``reshape(n, -1, i)`` of a
    tensor that is n,B,i): each is a dispatch in forward and a node in autograd's backward, for
    nothing. Not of a graph input (the program would hand back the caller's own tensor)."""
    dropped = False
    for nd in list(gm.graph.nodes):
        if nd.op != "call_function" or nd.target not in _VIEWS or not isinstance(nd.args[0], torch.fx.Node):
            continue
        src = nd.args[0]
        a, o = src.meta.get("val"), nd.meta.get("val")
        if (src.op != "placeholder" and isinstance(a, torch.Tensor) and isinstance(o, torch.Tensor)
                and a.shape == o.shape and a.stride() == o.stride() and a.dtype == o.dtype):
            nd.replace_all_uses_with(src)
            gm.graph.erase_node(nd)
            dropped = True
    if dropped:
        gm.recompile()


_NO_STATES = torch.empty(0, dtype=torch.uint8)     # the RNG-states input when randomness != "sequential"


@contextlib.contextmanager
def _gc_paused():
    """No cyclic GC while capturing and batching: tracing makes many short-lived objects and the
    collector's passes cost ~15% of a ResNet-18 capture."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _autocast_key():
    """Autocast changes the captured graph (casts are recorded), so it is part of a program's key."""
    return tuple(torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
                 for dev in ("cpu", "cuda"))


@torch.compiler.disable
def _prepare(module, args, kwargs):
    return module._prepare(args, kwargs)


@torch.compiler.disable
def _finish(module, prog, outs, leaves):
    return module._outputs(prog, outs, leaves)


def _retie(m, like):
    """Make parameters that are one tensor in ``like`` one tensor in ``m`` again."""
    first = {}
    for name, p in like.named_parameters(remove_duplicate=False):
        if id(p) in first:
            parent, _, leaf = name.rpartition(".")
            src = m.get_parameter(first[id(p)])
            setattr(m.get_submodule(parent), leaf, src)
        else:
            first[id(p)] = name
