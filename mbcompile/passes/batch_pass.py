"""The batching transform: walk an unbatched aten FX graph and run each node through its rule.

Before (unbatched, one model)::

    linear = aten.linear(x, p_fc_weight, p_fc_bias)          # x: B,I   weight: O,I
After (traced with make_fx; n models)::

    t = aten.permute(p_fc_weight.view(n*O, I), [1, 0])       # weight: n,O,I
    addmm = aten.addmm(p_fc_bias.view(n*O), x, t)            # B,(n*O)
    view = aten.view(addmm, [B, n, O])                       # model dim at 1

Each value carries where its model dim is (None: shared). Shared-only nodes run unchanged.
"""
from __future__ import annotations

import operator
import warnings

import torch
import torch.fx as fx

from ..errors import MBCompileError, UnsupportedOpError, source_line
from .axes import front
from .registry import RANDOM_OPS, RULES, RuleCtx, module_path
from ..errors import InvalidInputError

_WARNED: set = set()


class Record:
    """How one node was lowered (for explain())."""
    __slots__ = ("node", "op", "how", "notes", "module", "source")

    def __init__(self, node, op, how, notes=(), module="", source=""):
        self.node, self.op, self.how, self.notes, self.module, self.source = node, op, how, list(notes), module, source


def op_name(target):
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))


def run(gm, n, inputs, in_dims, *, strict=False, consts=None, rng=None, records=None, fallback=True):
    """Batch ``gm`` over n models. Returns the flat outputs, each with its model dim in front."""
    env = {}
    placeholders = [nd for nd in gm.graph.nodes if nd.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise InvalidInputError(f"graph has {len(placeholders)} inputs, got {len(inputs)}")
    for nd, x, d in zip(placeholders, inputs, in_dims):
        env[nd] = (x, d)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "get_attr":
            obj = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            env[node] = (obj, None)
        elif node.op == "call_function":
            env[node] = _call(node, env, n, strict, consts, rng, records, fallback)
        elif node.op == "output":
            vals = fx.node.map_aggregate(node.args[0], lambda a: env[a] if isinstance(a, fx.Node) else (a, None))
            flat = vals if isinstance(vals, (list, tuple)) else [vals]
            return [front(v, d, n) if isinstance(v, torch.Tensor) else v for v, d in flat]
        else:
            raise NotImplementedError(f"node kind {node.op} ({node.name})")


def _split(node, env):
    vals = fx.node.map_arg(node.args, lambda a: env[a][0])
    dims = fx.node.map_aggregate(node.args, lambda a: env[a][1] if isinstance(a, fx.Node) else None)
    kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a][0])
    kdims = fx.node.map_aggregate(node.kwargs, lambda a: env[a][1] if isinstance(a, fx.Node) else None)
    return vals, dims, kwargs, kdims


def _any_mapped(dims):
    if isinstance(dims, (list, tuple)):
        return any(_any_mapped(d) for d in dims)
    if isinstance(dims, dict):
        return any(_any_mapped(d) for d in dims.values())
    return dims is not None


def _call(node, env, n, strict, consts, rng, records, fallback):
    target = node.target
    args, dims, kwargs, kdims = _split(node, env)
    if target is operator.getitem:
        (v, d), i = env[node.args[0]], node.args[1]
        return v[i], (d[i] if isinstance(d, (tuple, list)) else d)
    mapped = _any_mapped(dims) or _any_mapped(kdims)
    seeded = _seeded(target)
    if not mapped and target not in RANDOM_OPS and not seeded:
        return target(*args, **kwargs), None                 # shared by all models: run as is
    if _any_mapped(kdims):                                   # rules take tensors positionally
        keys = [k for k in kwargs if _any_mapped(kdims[k])]
        shared = {k: v for k, v in kwargs.items() if k not in keys}
        npos = len(args)

        def with_kw(*a, _t=target):
            return _t(*a[:npos], **shared, **dict(zip(keys, a[npos:])))
        with_kw.__name__ = op_name(target)
        return _fallback(node, with_kw, list(args) + [kwargs[k] for k in keys],
                         list(dims) + [kdims[k] for k in keys], {}, n, strict or not fallback, records,
                         "a per-model tensor as a keyword argument")
    ctx = RuleCtx(n=n, node=node, consts=consts, rng=rng, strict=strict or not fallback)
    ctx.op = target
    rule = RULES.get(target)
    why = "no batching rule"
    if seeded and (not mapped or torch.Tag.pointwise in target.tags):   # it would draw once, globally
        rule, why = None, "random op without a per-model rule"
    if rule is not None:
        try:
            out, d = rule(ctx, args, dims, kwargs)
            out = out if ctx.own_dtype else _eager_dtype(node, out)
            if records is not None:
                records.append(Record(node.name, op_name(target), f"rule {rule.__module__.rsplit('.', 1)[-1]}."
                                      f"{rule.__name__}", ctx.notes, module_path(node), source_line(node)))
            return out, d
        except NotImplementedError as e:
            why = f"rule declined: {e}"
        except Exception as e:
            note = f"mbcompile: raised while batching {op_name(target)} (node {node.name}), from {source_line(node)}"
            if not isinstance(e, MBCompileError) and note not in getattr(e, "__notes__", ()):
                e.add_note(note)                      # which op of the user's forward, where
            raise
    return _fallback(node, target, args, dims, kwargs, n, strict or not fallback, records, why)


def _eager_dtype(node, out):
    """The dtype the op has in the captured graph: a rule that computes with per-model weights may
    promote (group_norm on a bf16 input with float32 weights under autocast returns bf16 alone)."""
    def fix(o, w):
        if isinstance(o, torch.Tensor) and isinstance(w, torch.Tensor) and o.dtype != w.dtype \
                and o.dtype.is_floating_point and w.dtype.is_floating_point:
            return o.to(w.dtype)
        return o

    want = node.meta.get("val")
    if isinstance(out, (tuple, list)) and isinstance(want, (tuple, list)) and len(out) == len(want):
        return type(out)(fix(o, w) for o, w in zip(out, want))
    return fix(out, want)


def _seeded(target):
    """A random op that no rule gives per-model streams (run shared, it would draw once, globally)."""
    return (isinstance(target, torch._ops.OpOverload) and target not in RANDOM_OPS
            and torch.Tag.nondeterministic_seeded in target.tags)


# ops that address their input's storage: a model's slice of a batch has another storage layout
_STORAGE_OPS = {torch.ops.aten.as_strided.default, torch.ops.aten.as_strided_copy.default,
                torch.ops.aten.as_strided_scatter.default}


def _storage_check(node, target, args, dims, n):
    """as_strided addresses its input's storage: each model's slice must have the strides the input
    had alone (else it is made contiguous, as it was, or refused), and an explicit storage offset
    reads the unbatched storage, which no batch reproduces: refused (even without strict), unless it
    is the input's own (then dropped)."""
    if target not in _STORAGE_OPS:
        return args, dims
    at = 3 if target is not torch.ops.aten.as_strided_scatter.default else 4
    offset = args[at] if len(args) > at else None
    val = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    x, d = args[0], dims[0]
    what = None
    if d is not None and val is not None and x.select(d, 0).stride() != val.stride():
        if not val.is_contiguous():
            what = f"on an input with strides {tuple(val.stride())}"   # no model slice can be laid out so
        else:
            args, dims = [front(x, d, n).contiguous()] + list(args[1:]), [0] + list(dims[1:])
    if offset is not None and (val is None or offset != val.storage_offset()):
        what = f"with storage offset {offset}"
    if what is None:
        return list(args[:at]) + list(args[at + 1:]), list(dims[:at]) + list(dims[at + 1:])
    raise UnsupportedOpError(
        f"{op_name(target)} {what} addresses the unbatched input's storage, which a batch of models lays out "
        f"differently; node {node.name}, from {source_line(node)}. Index with views instead (slicing, view, "
        f"unfold), or call it on a contiguous tensor without storage_offset")


def _fallback(node, target, args, dims, kwargs, n, strict, records, why):
    name = op_name(target)
    args, dims = _storage_check(node, target, args, dims, n)
    if strict:
        raise UnsupportedOpError(
            f"{name} has no batching rule ({why}); node {node.name}, from {source_line(node)}.\n"
            f"Add a rule with @mbcompile.passes.rule({name}) in the file of its op family under "
            f"mbcompile/passes/ (see docs/adding_a_rule.md), or batch with strict=False to use the slower "
            f"vmap fallback.")
    how = "vmap"
    try:
        out = torch.vmap(lambda *a: target(*a, **kwargs), in_dims=tuple(dims), out_dims=0,
                         randomness="different")(*args)
    except Exception:  # noqa: BLE001 - vmap has no rule either: loop over models
        how = "loop"
        outs = [target(*_slice(args, dims, i), **kwargs) for i in range(n)]
        out = type(outs[0])(torch.stack(list(t), 0) for t in zip(*outs)) if isinstance(outs[0], (tuple, list)) \
            else None if outs[0] is None else torch.stack(outs, 0)     # None: a check op (asserts)
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(f"mbcompile: {name} ({why}) runs through the slower per-op {how} fallback; "
                      f"node {node.name}, from {source_line(node)}", stacklevel=3)
    if records is not None:
        records.append(Record(node.name, name, f"FALLBACK {how}", [why], module_path(node), source_line(node)))
    d = tuple(0 for _ in out) if isinstance(out, (tuple, list)) else None if out is None else 0
    return out, d


def _slice(args, dims, i):
    def one(a, d):
        if isinstance(a, (list, tuple)) and isinstance(d, (list, tuple)):
            return type(a)(one(x, y) for x, y in zip(a, d))
        return a.select(d, i) if d is not None and isinstance(a, torch.Tensor) else a
    return [one(a, d) for a, d in zip(args, dims)]
