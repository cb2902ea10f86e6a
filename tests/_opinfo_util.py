"""Helpers for tests/test_opinfo.py: trace one OpInfo sample the way ``capture()`` does, give each of
n models its own inputs, run the batching pass and compare every model with the op run alone.

Tracing mirrors capture: aot_export_module with the decomposition table capture uses (default table
minus every op in RULES), with the CompositeImplicit ops that have a rule preserved exactly as
run_decompositions preserves them.

Per-model inputs: the OpInfo's sample generator is run once per model under seeds 0..n-1, so every
model gets values of the same shapes drawn the way the op wants them (valid indices, PD matrices,
sorted sequences, ...). A case says which tensor inputs are mapped (stacked [n, ...], model dim moved
to ``at``) and which are shared (model 0's value)."""
from __future__ import annotations

import contextlib
import itertools
import random
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils import _pytree as pytree

import mbcompile  # noqa: F401  (registers mbcompile:: ops)
from mbcompile.passes import RULES, batch_pass

N = 3               # models
SAMPLES = {torch.float64: 2, torch.float32: 1}   # sample inputs per op per dtype
LOOKAHEAD = 8       # samples drawn per seed to choose SAMPLES from (the first + the highest rank)


NONDET = {"empty_like", "new_empty", "new_empty_strided"}   # uninitialised memory


class Skip(Exception):
    """The OpInfo cannot be tested here (reason in the message)."""


def op_id(op):
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


# ---- tracing like capture() ------------------------------------------------------------------

_TABLES = None


def _tables():
    global _TABLES
    if _TABLES is None:
        from torch.export.exported_program import _split_decomp_table_to_cia_and_python_decomp
        table = {op: fn for op, fn in torch.export.default_decompositions().items() if op not in RULES}
        _TABLES = _split_decomp_table_to_cia_and_python_decomp(table)
    return _TABLES


@contextlib.contextmanager
def capture_mode():
    """What run_decompositions holds while it retraces: CompositeImplicit ops with a rule preserved.
    Entered once per test module (it patches a few hundred ops; ~0.1 s)."""
    from torch.export._trace import _ignore_backend_decomps
    from torch.export.exported_program import _override_composite_implicit_decomp
    cia, _ = _tables()
    with _ignore_backend_decomps(), _override_composite_implicit_decomp(cia):
        yield


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def trace(fn, args):
    """fn(*tensors) -> tuple of tensors, traced to the functional, decomposed aten graph capture()
    would give: aot_export_module is what run_decompositions calls, here straight on the function
    (torch.export's pre-dispatch step changes nothing for a single op once random ops are skipped;
    capture's pre-pass only rewrites random ops). Constants stay get_attr nodes. Returns (gm, mutated):
    mutated[k] is the input whose new value is graph output k (they lead the outputs)."""
    from torch._functorch.aot_autograd import aot_export_module
    from torch._subclasses.fake_tensor import FakeTensorMode
    _, py = _tables()
    fake = FakeTensorMode()
    fargs = [fake.from_tensor(a) for a in args]
    with fake:
        gm, sig = aot_export_module(_Fn(fn), fargs, decompositions=py, trace_joint=False)
    if _random(gm):
        raise Skip("random op")
    if sig.buffers_to_mutate:
        raise Skip("the op mutates a constant")
    _drop_tokens(gm, sig)
    user = [p.name for p in gm.graph.nodes if p.op == "placeholder"]
    return gm, [user.index(name) for name in sig.user_inputs_to_mutate.values()]


def _random(gm):
    """Whether the graph draws random numbers (attention counts only with dropout_p > 0)."""
    for nd in gm.graph.nodes:
        t = nd.target
        if nd.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
            continue
        if t is torch.ops.aten.scaled_dot_product_attention.default:
            if (nd.args[4] if len(nd.args) > 4 else nd.kwargs.get("dropout_p", 0.0)) == 0:
                continue
        if torch.Tag.nondeterministic_seeded in t.tags or t.namespace == "mbcompile":
            return True
    return False


def _drop_tokens(gm, sig):
    """Effect tokens (e.g. linalg's error checks) out, as torch.export does: with_effects(tok, f, *a)
    -> f(*a)."""
    import operator
    if not sig.input_tokens:
        return
    g = gm.graph
    for nd in list(g.nodes):
        if nd.op == "call_function" and nd.target is torch.ops.higher_order.with_effects:
            tok, func, *a = nd.args
            with g.inserting_before(nd):
                new = g.call_function(func, tuple(a), dict(nd.kwargs))
            new.meta = dict(nd.meta)
            nret = len(func._schema.returns)
            for u in list(nd.users):
                i = u.args[1]
                if i == 0:
                    u.replace_all_uses_with(tok)
                elif nret == 1:
                    u.replace_all_uses_with(new)
                else:
                    u.args = (new, i - 1)
    out = g.output_node()
    keep = tuple(a for a in out.args[0] if not (isinstance(a, torch.fx.Node) and (
        a.op == "placeholder" and a.name in sig.input_tokens or a.name in sig.output_tokens)))
    out.args = (keep,)
    g.eliminate_dead_code()
    for nd in list(g.nodes):
        if nd.op == "placeholder" and nd.name in sig.input_tokens:
            g.erase_node(nd)
    gm.recompile()


def graph_ops(gm):
    """The aten ops of the graph that take a tensor (the ones that need a rule when mapped)."""
    import operator
    import torch.fx as fx
    ops = set()
    for nd in gm.graph.nodes:
        if nd.op == "call_function" and nd.target is not operator.getitem:
            tensors = []
            fx.node.map_arg((nd.args, nd.kwargs), tensors.append)
            if tensors:
                ops.add(nd.target)
    return ops


# ---- per-model samples ----------------------------------------------------------------------

_UNFINISHED: list = []


def _seeded_samples(op, dtype, seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    # the generator itself: op.sample_inputs() would re-seed before every sample (all models alike)
    gen = iter(op.sample_inputs_func(op, "cpu", dtype, False))
    _UNFINISHED.append(gen)   # kept alive: finalised during a later trace, it would complain
    return list(itertools.islice(gen, LOOKAHEAD))


def _leaves(s):
    return pytree.tree_flatten((s.input, s.args, s.kwargs))


def _same_structure(a, b):
    (la, sa), (lb, sb) = _leaves(a), _leaves(b)
    if sa != sb or len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype:
                return False
        elif not (x == y or (isinstance(x, float) and isinstance(y, float))):   # floats: model 0's
            return False
    return True


def _tensors_first(s):
    x = s.input
    return isinstance(x, torch.Tensor) or (isinstance(x, (list, tuple)) and len(x) > 0
                                           and all(isinstance(t, torch.Tensor) for t in x))


@dataclass
class Sample:
    """One OpInfo sample for n models: ``per_model[i]`` are model i's tensor leaves."""
    spec: object
    leaves: list               # model 0's leaves (tensors and python values)
    tensor_at: list            # positions of tensors in leaves
    per_model: list            # [n][k] tensors
    fn: object = None
    gm: object = None
    mutated: list = field(default_factory=list)

    def call(self, tensors):
        leaves = list(self.leaves)
        for pos, t in zip(self.tensor_at, tensors):
            leaves[pos] = t
        x, args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return self.fn(x, *args, **kwargs)


def _flat_out(out):
    return tuple(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def _rank(s):
    x = s.input
    return x.dim() if isinstance(x, torch.Tensor) else max(t.dim() for t in x)


def samples(op, dtype):
    """Up to SAMPLES traced samples for the op, each with N models' inputs: the first sample and the
    one of highest rank (float32: that one only), else the next usable ones. Raises Skip."""
    try:
        sets = [_seeded_samples(op, dtype, seed) for seed in range(N)]
    except Exception as e:  # noqa: BLE001
        raise Skip(f"the sample generator fails ({type(e).__name__})") from e
    if not sets[0]:
        raise Skip("no sample inputs")
    if not _tensors_first(sets[0][0]):
        raise Skip("sample inputs are not tensors-first")
    if op.name in NONDET:
        raise Skip("random op")
    if any(t.layout != torch.strided for t in _leaves(sets[0][0])[0] if isinstance(t, torch.Tensor)):
        raise Skip("sparse inputs")
    usable = [k for k in range(len(sets[0])) if _tensors_first(sets[0][k])
              and all(k < len(s) and _same_structure(sets[0][k], s[k]) for s in sets[1:])]
    if not usable:
        raise Skip("sample inputs differ in structure from seed to seed")
    top = max(usable, key=lambda k: (_rank(sets[0][k]), len(sets[0][k].args) + len(sets[0][k].kwargs), -k))
    order = [usable[0], top] if SAMPLES[dtype] > 1 else [top, usable[0]]
    order += [k for k in usable if k not in order]
    out, why = [], None
    for k in list(dict.fromkeys(order))[:SAMPLES[dtype] + 2]:
        try:
            out.append(_prepare(op, sets, k))
        except Skip as e:                        # e.g. a sample with dropout_p > 0: try the next
            why = why or e
        if len(out) == SAMPLES[dtype]:
            break
    if not out:
        raise why
    return out


def _prepare(op, sets, k):
    leaves, spec = _leaves(sets[0][k])
    at = [j for j, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    per_model = [[_leaves(s[k])[0][j] for j in at] for s in sets]
    smp = Sample(spec, leaves, at, per_model, fn=op.op)
    _check_deterministic(smp)
    fn = lambda *ts: _flat_out(smp.call(ts))  # noqa: E731
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            smp.gm, smp.mutated = trace(fn, per_model[0])
    except Skip:
        raise
    except Exception as e:  # noqa: BLE001
        raise Skip(f"capture fails ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from e
    return smp


def _check_deterministic(smp):
    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        try:
            outs.append(_flat_out(smp.call([t.clone() for t in smp.per_model[0]])))
        except Exception as e:  # noqa: BLE001
            raise Skip(f"the op fails on its own sample ({type(e).__name__})") from e
    if not outs[0]:
        raise Skip("no tensor outputs")
    for a, b in zip(*outs):
        if a.layout != torch.strided or a.dtype in (torch.complex32,):
            raise Skip(f"{a.layout} {a.dtype} outputs")
        if a.shape != b.shape or not torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)):
            raise Skip("random op (differs between seeds)")


# ---- cases: which inputs are mapped, where the model dim sits --------------------------------

def cases(k):
    """(name, mapped?, position) per tensor input: all mapped at 0, all mapped with the model dim
    last, first mapped and the rest shared, first shared and the rest mapped."""
    out = [("all@0", [True] * k, "front"), ("all@last", [True] * k, "last")]
    if k > 1:
        out.append(("first", [True] + [False] * (k - 1), "front"))
        out.append(("rest@last", [False] + [True] * (k - 1), "last"))
    return out


def _place(ts, where):
    x = torch.stack(ts)
    d = 0 if where == "front" else x.dim() - 1
    return x.movedim(0, d), d


TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1.3e-6, atol=1e-5)}
OP_TOL = {  # (op, dtype) -> tolerance, where the batched op legitimately sums in another order
    ("addbmm", torch.float32): dict(rtol=1e-5, atol=1e-4),     # bmm then sum over B vs addbmm's order
}


def batched_inputs(smp, mapped, where):
    """The pass's inputs and model dims: mapped tensors stacked over models (model dim at ``where``),
    shared ones model 0's."""
    ins, dims = [], []
    for j, m in enumerate(mapped):
        x, d = _place([pm[j] for pm in smp.per_model], where) if m else (smp.per_model[0][j], None)
        ins.append(x)
        dims.append(d)
    return ins, dims


def check(smp, mapped, where, dtype, *, strict, name=None):
    """Batch the sample's graph over N models and compare each with the op on that model's inputs.
    Returns the records of the pass (rule or fallback per node)."""
    ins, dims = batched_inputs(smp, mapped, where)
    records = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = batch_pass.run(smp.gm, N, ins, dims, strict=strict, records=records)
    for i in range(N):
        mine = [smp.per_model[i if m else 0][j].clone() for j, m in enumerate(mapped)]
        ref = _flat_out(smp.call(mine))
        ref = tuple(mine[j] for j in smp.mutated) + ref           # new values of mutated inputs lead
        if len(ref) != len(outs):
            raise AssertionError(f"{len(outs)} outputs, the op gives {len(ref)}")
        for k, (o, r) in enumerate(zip(outs, ref)):
            if tuple(o.shape[1:]) != tuple(r.shape) or o.shape[0] != N:
                raise AssertionError(f"output {k}: batched shape {tuple(o.shape)}, model {i} alone gives "
                                     f"{tuple(r.shape)}")
            torch.testing.assert_close(o[i], r, equal_nan=True, check_stride=False,
                                       msg=lambda m, k=k, i=i: f"output {k}, model {i}: {m}",
                                       **OP_TOL.get((name, dtype), TOL[dtype]))
    return records


def _loss(outs, cot):
    """sum_k <out_k, cot_k> over the differentiable outputs (complex ones as their real view)."""
    total = 0
    for o, v in zip(outs, cot):
        if v is not None:
            total = total + ((torch.view_as_real(o.resolve_conj()) if o.is_complex() else o) * v).sum()
    return total


def _cotangents(outs, gen, per_model):
    """A fixed random cotangent per differentiable output (None for integer/bool outputs or ones that
    carry no gradient); ``per_model``: outputs have the model dim in front."""
    cot = []
    for o in outs:
        if not isinstance(o, torch.Tensor) or not (o.is_floating_point() or o.is_complex()) or not o.requires_grad:
            cot.append(None)
            continue
        shape = torch.view_as_real(o.resolve_conj()).shape if o.is_complex() else o.shape
        dt = o.real.dtype if o.is_complex() else o.dtype
        cot.append(torch.randn(shape, generator=gen, dtype=torch.float64).to(dt))
    return cot


def _differentiable(smp, j):
    """Whether the op differentiates model 0's tensor input j (torch refuses some: nll_loss's class
    weights, a loss's target, scatter with a reduction)."""
    mine = [t.detach().clone() for t in smp.per_model[0]]
    mine[j].requires_grad_()
    try:
        outs = [o for o in _flat_out(smp.call(mine)) if o.requires_grad]
        if outs:
            torch.autograd.grad(sum((torch.view_as_real(o.resolve_conj()) if o.is_complex() else o).sum()
                                    for o in outs), mine[j], allow_unused=True)
    except RuntimeError as e:
        if "not differentiable" in str(e) or "not implemented" in str(e):
            return False
        raise
    return True


def check_grad(smp, mapped, where, dtype, *, name=None):
    """The batched graph's vector-Jacobian product against each model's own (its op's autograd formula):
    a mapped input's gradient slice i is model i's, a shared input's is the sum over models. Returns
    False when there is nothing to differentiate (no float input or output with a gradient)."""
    if smp.mutated:
        return False
    ins, dims = batched_inputs(smp, mapped, where)
    ins = [x.detach().clone() for x in ins]
    leaves = [j for j, x in enumerate(ins) if (x.is_floating_point() or x.is_complex()) and _differentiable(smp, j)]
    for j in leaves:
        ins[j].requires_grad_()
    if not leaves:
        return False
    from mbcompile.batching import _trace
    with warnings.catch_warnings():                   # as a batched module runs: the pass traced (make_fx),
        warnings.simplefilter("ignore")               # then that graph called with autograd on
        gm = _trace(lambda *a: batch_pass.run(smp.gm, N, list(a), dims, strict=False), ins)
        outs = gm(*ins)
    cot = _cotangents(outs, torch.Generator().manual_seed(0), True)
    if all(v is None for v in cot):
        return False
    grads = torch.autograd.grad(_loss(outs, cot), [ins[j] for j in leaves], allow_unused=True)
    grads = {j: (g if g is not None else torch.zeros_like(ins[j])) for j, g in zip(leaves, grads)}
    shared_sum = {j: 0 for j in leaves if not mapped[j]}
    for i in range(N):
        mine = [smp.per_model[i if m else 0][j].detach().clone() for j, m in enumerate(mapped)]
        for j in leaves:
            mine[j].requires_grad_()
        ref = _flat_out(smp.call(mine))
        rcot = [None if v is None else v[i] for v in cot[len(smp.mutated):]]
        usable = [(r, v) for r, v in zip(ref, rcot) if v is not None and r.requires_grad]
        if not usable:
            continue
        rg = torch.autograd.grad(_loss(*zip(*usable)), [mine[j] for j in leaves], allow_unused=True)
        for j, g in zip(leaves, rg):
            g = torch.zeros_like(mine[j]) if g is None else g
            if mapped[j]:
                got = grads[j].movedim(dims[j], 0)[i]
                torch.testing.assert_close(got, g, equal_nan=True, check_stride=False,
                                           msg=lambda m, j=j, i=i: f"gradient of input {j}, model {i}: {m}",
                                           **OP_TOL.get((name, dtype), TOL[dtype]))
            else:
                shared_sum[j] = shared_sum[j] + g
    for j, want in shared_sum.items():
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(grads[j], want, equal_nan=True, check_stride=False,
                                       msg=lambda m, j=j: f"gradient of shared input {j} (summed over models): {m}",
                                       **OP_TOL.get((name, dtype), TOL[dtype]))
    return True
