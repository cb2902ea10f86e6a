"""What two models of one batch must share beyond their module tree: the values of module attributes
the forward may read, and which parameters, buffers and modules are the same object (tying).

One batched forward runs model 0's code with model 0's attributes for every model, so an attribute
that differs (a callable, a tensor constant, a list or dict of settings, a private float) would give
every model model 0's value. ``same_value`` decides "the same for the forward" as far as it can see:
equal plain values, parameters/buffers/modules at the same path of each model, tensors with equal
values, containers and functions compared member by member. What it cannot show equal counts as
different: the batch is refused, never run with model 0's value."""
from __future__ import annotations

import functools
import numbers
import types
import weakref

import torch
from torch.utils.hooks import RemovableHandle
import torch.nn as nn

from .shells import INTERNAL as _BASE    # nn.Module's own bookkeeping (_parameters, hooks, ...)
PLAIN = (int, float, bool, str, bytes, complex, type(None))   # compared by value
MAX_DEPTH, MAX_LEN = 6, 10_000


class Paths:
    """id -> name of every parameter, buffer and module of one model (tensors and modules are
    compared by where they sit in their own model)."""

    def __init__(self, model: nn.Module):
        self.names = {}
        for kind, items in (("module", model.named_modules(remove_duplicate=False)),
                            ("parameter", model.named_parameters(remove_duplicate=False)),
                            ("buffer", model.named_buffers(remove_duplicate=False))):
            for name, obj in items:
                self.names.setdefault(id(obj), (kind, name))

    def of(self, obj):
        return self.names.get(id(obj))


def attributes(mod: nn.Module):
    """The attributes of ``mod`` that its forward may read (nn.Module's own bookkeeping left out)."""
    return {k: v for k, v in vars(mod).items() if k not in _BASE}


def _kind(v):
    """bool / integer / real / other: what a value's type makes of tensor arithmetic (numpy scalars as
    Python's)."""
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        return "bool"
    if isinstance(v, numbers.Integral):
        return "int"
    if isinstance(v, numbers.Real):
        return "real"
    return type(v)


def same_value(u, v, pu: Paths, pv: Paths, depth: int = 0) -> bool:
    """Whether attribute values ``u`` (of model a, whose objects ``pu`` names) and ``v`` (model b)
    are the same as far as a forward can tell."""
    if u is v:
        return True
    if type(u) is not type(v):              # 2 and 2.0 (or 1 and True) compare equal but compute apart
        return isinstance(u, PLAIN) and isinstance(v, PLAIN) and _kind(u) == _kind(v) and _eq(u, v)
    if isinstance(u, PLAIN):
        return _eq(u, v)
    if depth > MAX_DEPTH:
        return False
    if isinstance(u, (nn.Module, torch.Tensor)):
        where = pu.of(u)
        if where is not None or pv.of(v) is not None:          # a parameter/buffer/module: its path
            return where is not None and where == pv.of(v)
        if isinstance(u, nn.Module):
            return False
        return (u.shape == v.shape and u.dtype == v.dtype and u.device == v.device
                and u.layout == v.layout and bool(torch.equal(u, v)))
    rec = functools.partial(_all_same, pu=pu, pv=pv, depth=depth + 1)
    if isinstance(u, (list, tuple)):
        return len(u) == len(v) <= MAX_LEN and rec(zip(u, v))
    if isinstance(u, dict):
        return (len(u) <= MAX_LEN and list(u) == list(v)
                and rec((u[k], v[k]) for k in u))
    if isinstance(u, (set, frozenset)):
        return _eq(u, v)
    if isinstance(u, types.FunctionType):
        cu, cv = u.__closure__ or (), v.__closure__ or ()
        return (u.__code__ is v.__code__ and u.__globals__ is v.__globals__ and len(cu) == len(cv)
                and rec(zip(u.__defaults__ or (), v.__defaults__ or ()))
                and same_value(u.__kwdefaults__, v.__kwdefaults__, pu, pv, depth + 1)
                and rec((p.cell_contents, q.cell_contents) for p, q in zip(cu, cv)))
    if isinstance(u, RemovableHandle):                         # bookkeeping: the hooks themselves are compared
        return True
    if isinstance(u, weakref.ref):                             # RNN's _flat_weight_refs: their targets
        return same_value(u(), v(), pu, pv, depth + 1)
    if isinstance(u, types.MethodType):
        return u.__func__ is v.__func__ and same_value(u.__self__, v.__self__, pu, pv, depth + 1)
    if isinstance(u, functools.partial):
        return rec([(u.func, v.func), (u.args, v.args), (u.keywords, v.keywords)])
    if isinstance(u, type):
        return _same_class(u, v, pu, pv, depth)
    if isinstance(u, (types.BuiltinFunctionType, types.ModuleType)):
        return False                                           # not the same object
    if type(u).__eq__ is not object.__eq__ and type(u).__module__.partition(".")[0] != "transformers":
        return _eq(u, v)                                       # a type that says what equal means
    du, dv = getattr(u, "__dict__", None), getattr(v, "__dict__", None)
    if du is None or dv is None:
        return False
    lazy = LAZY.get(type(u).__module__.partition(".")[0], ())
    return list(du) == list(dv) and rec((du[k], dv[k]) for k in du
                                        if not (k in lazy and (du[k] is None or dv[k] is None)))


# attributes a library infers on its first forward, None until then (transformers: problem_type, from
# the labels). Models that have run and models that have not differ only there: the batch captures with
# None and infers as the models that have not run will, and a set value that differs from what it
# inferred is refused then (lazy_differences, batching.BatchedModule._check_lazy)
LAZY = {"transformers": ("problem_type",)}


def lazy_differences(models) -> dict:
    """{(module path, attribute): [value per model]} for LAZY attributes of a submodule's ``config``
    that some models have set and some not (None)."""
    out = {}
    for path, mod in models[0].named_modules():
        cfg = getattr(mod, "config", None)
        for attr in LAZY.get(type(cfg).__module__.partition(".")[0], ()):
            vals = [getattr(getattr(m.get_submodule(path), "config", None), attr, None) for m in models]
            if any(v is None for v in vals) and any(v is not None for v in vals):
                out[(path, attr)] = vals
    return out


_CLASS_OWN = {"__dict__", "__weakref__", "__module__", "__qualname__", "__doc__", "__firstlineno__",
              "__static_attributes__", "__classcell__"}
_COMPARING: set = set()     # class pairs under comparison: a method's super() cell holds its own class


def _same_class(u, v, pu, pv, depth) -> bool:
    """Two class objects from one class statement run twice (a factory function): same name, bases and
    body (each method the same code, closing over the same values)."""
    if (u.__qualname__, u.__module__, u.__bases__) != (v.__qualname__, v.__module__, v.__bases__):
        return False
    key = (id(u), id(v))
    if key in _COMPARING:
        return True
    unwrap = lambda x: x.__func__ if isinstance(x, (staticmethod, classmethod)) else x  # noqa: E731
    du, dv = ({k: unwrap(x) for k, x in vars(t).items() if k not in _CLASS_OWN} for t in (u, v))
    _COMPARING.add(key)
    try:
        return du.keys() == dv.keys() and _all_same(((du[k], dv[k]) for k in du), pu, pv, depth + 1)
    finally:
        _COMPARING.discard(key)


def _all_same(pairs, pu, pv, depth) -> bool:
    return all(same_value(a, b, pu, pv, depth) for a, b in pairs)


def _eq(u, v) -> bool:
    try:
        if getattr(u, "shape", None) != getattr(v, "shape", None):       # numpy arrays of other shapes
            return False
        r = u == v
        if isinstance(r, torch.Tensor):
            return False
        if hasattr(r, "all") and not isinstance(r, bool):                  # numpy: elementwise
            r = r.all()
        r = bool(r)
    except Exception:  # noqa: BLE001 - values that cannot be compared are not shown equal
        return False
    return r or (isinstance(u, float) and isinstance(v, float) and u != u and v != v)    # nan, nan


def where_differs(u, v, pu: Paths, pv: Paths, depth: int = 0) -> str:
    """'' or the path inside two differing values to their first difference (".scale", "[1]",
    ".config.num_labels") with both values there, for an error message."""
    if depth < 4 and type(u) is type(v) and not isinstance(u, (PLAIN, torch.Tensor, nn.Module)):
        if isinstance(u, (list, tuple)) and len(u) == len(v):
            pairs = [(f"[{k}]", a, b) for k, (a, b) in enumerate(zip(u, v))]
        elif isinstance(u, dict) and list(u) == list(v):
            pairs = [(f"[{k!r}]", u[k], v[k]) for k in u]
        elif type(u).__eq__ is object.__eq__ or hasattr(u, "to_dict"):   # plain objects, HF configs
            du, dv = getattr(u, "__dict__", None), getattr(v, "__dict__", None)
            if du is None or dv is None:
                return ""
            if list(du) != list(dv):
                missing = sorted(set(du) ^ set(dv))
                return f".{missing[0]}: set in one model only" if missing else ""
            pairs = [(f".{k}", du[k], dv[k]) for k in du]
        else:
            return ""
        for key, a, b in pairs:
            if not same_value(a, b, pu, pv, depth + 1):
                inner = where_differs(a, b, pu, pv, depth + 1)
                return key + (inner or f": {_named(b, pv)} vs {_named(a, pu)}")
    return ""


def _named(v, paths: Paths) -> str:
    where = paths.of(v) if isinstance(v, (nn.Module, torch.Tensor)) else None
    return f"<{where[0]} {where[1] or '<root>'!r}>" if where else short(v)


def short(v, limit: int = 60) -> str:
    """A short description of an attribute value for an error message."""
    if isinstance(v, torch.Tensor):
        s = f"tensor{tuple(v.shape)}" if v.numel() > 4 else f"tensor({v.tolist()})"
    elif isinstance(v, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        s = f"<function {getattr(v, '__qualname__', getattr(v, '__name__', '?'))}>"
    else:
        try:
            s = repr(v)
        except Exception:  # noqa: BLE001
            s = f"<{type(v).__name__}>"
    return s if len(s) <= limit else s[:limit - 3] + "..."


def sharing(model: nn.Module) -> dict:
    """{kind: sorted groups of names that are one object} for parameters, buffers and modules: tied
    weights (head.weight is emb.weight) and reused modules (self.b = self.a)."""
    out = {}
    for kind, items in (("modules", model.named_modules(remove_duplicate=False)),
                        ("parameters", model.named_parameters(remove_duplicate=False)),
                        ("buffers", model.named_buffers(remove_duplicate=False))):
        groups: dict = {}
        for name, obj in items:
            groups.setdefault(id(obj), []).append(name)
        out[kind] = sorted(tuple(g) for g in groups.values() if len(g) > 1)
    return out


def sharing_difference(a: dict, b: dict):
    """The first difference between two ``sharing`` results, as a sentence, or None."""
    for kind in a:
        if a[kind] != b[kind]:
            ga, gb = set(a[kind]), set(b[kind])
            only_b, only_a = sorted(gb - ga), sorted(ga - gb)
            if only_b:
                return f"model {{i}} shares {kind} {' = '.join(only_b[0])} (one object) and model 0 does not"
            return f"model 0 shares {kind} {' = '.join(only_a[0])} (one object) and model {{i}} does not"
    return None
