"""Rewrites of export's graph that keep eager's autograd meaning (and drop what a batched graph cannot
hold): no_grad blocks, in-place renorms and parameter updates inside forward, tensor indices read out
as numbers, effect tokens. Each takes the graph right after export or after run_decompositions."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.export.graph_signature import InputKind, OutputKind

aten = torch.ops.aten
mb = torch.ops.mbcompile


def _undetach_renorm(gm):
    """embedding(max_norm=...) renorms the weight in place under no_grad; functionalised, the lookup
    reads renorm(detach(weight)) and the weight gets no gradient, unlike eager. Feed renorm the weight
    itself: its rule returns the renormed values with an identity gradient."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.embedding_renorm.default:
            src = node.args[0]
            if isinstance(src, fx.Node) and src.op == "call_function" and src.target is aten.detach.default:
                node.replace_input_with(src, src.args[0])
    gm.recompile()


_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _instance_norm_as_group_norm(gm):
    """InstanceNorm reaches ATen as x.view(1, B*C, *S) -> batch_norm without stats (weight.repeat(B)) ->
    view(B, C, *S). Batched, x is B,n,C,H,W, and no view of it is 1,(B*C) per model: it was copied, and
    everything after it ran n-major (a style-transfer net at 0.65x sequential). That is group_norm(x, C,
    weight, bias): one group per channel, the same statistics, and group_norm batches with the models
    folded into the channels (layout kept, affine in the kernel)."""
    g = gm.graph
    for bn in list(g.nodes):
        if bn.op != "call_function" or bn.target is not aten._native_batch_norm_legit.no_stats:
            continue
        v, w, b, training, _momentum, eps = bn.args
        xv = v.args[0].meta.get("val") if isinstance(v, fx.Node) and v.target in _VIEWS else None
        if not training or not isinstance(xv, torch.Tensor) or xv.dim() < 2:
            continue
        B, C = xv.shape[0], xv.shape[1]
        get = list(bn.users)
        back = list(get[0].users) if len(get) == 1 and get[0].args[1] == 0 else []
        if list(v.args[1]) != [1, B * C, *xv.shape[2:]] or len(back) != 1 or back[0].target not in _VIEWS \
                or list(back[0].args[1]) != list(xv.shape):
            continue
        bases = [None if t is None else t.args[0] if isinstance(t, fx.Node) and t.target is aten.repeat.default
                 and list(t.args[1]) == [B] else False for t in (w, b)]
        if any(t is False for t in bases):
            continue
        with g.inserting_before(back[0]):
            new = g.call_function(aten.group_norm.default, (v.args[0], C, bases[0], bases[1], eps))
        new.meta = dict(back[0].meta)
        back[0].replace_all_uses_with(new)
        for nd in (back[0], get[0], bn, v, w, b):
            if isinstance(nd, fx.Node) and not nd.users:
                g.erase_node(nd)
    gm.recompile()


def _tensor_indices(gm):
    """``table[step]`` with a 0-d integer tensor reads the index out (aten.item) and selects with that number:
    each model may read its own, which one static graph cannot hold. Index with the tensor itself
    (aten.index: per model when step is). Other uses of the number are refused by its batching rule."""
    g = gm.graph
    for nd in list(g.nodes):
        t = nd.args[0] if nd.target in (aten.item.default, aten._local_scalar_dense.default) else None
        tv = t.meta.get("val") if isinstance(t, fx.Node) else None
        if not isinstance(tv, torch.Tensor) or tv.dim() != 0 or tv.dtype.is_floating_point or tv.dtype.is_complex:
            continue
        for u in [u for u in nd.users if u.target is aten.select.int and u.args[2] is nd]:
            d = u.args[1] % u.args[0].meta["val"].dim()       # x.select(d, step) -> x[:, .., step] (d slices)
            with g.inserting_before(u):
                new = g.call_function(aten.index.Tensor, (u.args[0], [None] * d + [t]))
            new.meta = dict(u.meta)
            u.replace_all_uses_with(new)
            g.erase_node(u)
        if not nd.users:
            g.erase_node(nd)
    gm.recompile()


def _drop_effect_tokens(gm, sig):
    """Export threads an effect token through side-effecting ops (aten._linalg_check_errors, left by
    linalg.inv / solve / cholesky once decomposed): ``with_effects(token, op, *args) -> (token, *outs)``.
    Run each such op as a plain call (its rule checks every model's values) and drop the token inputs
    and outputs, which the signature then skips."""
    g, we = gm.graph, torch.ops.higher_order.with_effects
    tokens = {s.arg.name for s in list(sig.input_specs) + list(sig.output_specs) if s.kind.name == "TOKEN"}
    if not tokens:
        return
    for nd in [nd for nd in g.nodes if nd.target is we]:
        op = nd.args[1]
        with g.inserting_before(nd):
            call = g.call_function(op, tuple(nd.args[2:]), dict(nd.kwargs))
        val, multi = nd.meta.get("val"), len(op._schema.returns) > 1
        rest = tuple(val[1:]) if isinstance(val, (tuple, list)) else (None,)
        call.meta = {**nd.meta, "val": rest if multi else rest[0]}
        for u in list(nd.users):                       # getitem(with_effects, k): 0 the token, k the outputs
            k = u.args[1]
            if k == 0:
                tokens.add(u.name)
                continue
            if multi:
                u.args = (call, k - 1)
            else:
                u.replace_all_uses_with(call)
                g.erase_node(u)
    out = next(nd for nd in g.nodes if nd.op == "output")
    out.args = (type(out.args[0])(a for a in out.args[0] if not (isinstance(a, fx.Node) and a.name in tokens)),)
    for nd in reversed(list(g.nodes)):
        if nd.name in tokens or nd.target is we:
            g.erase_node(nd)
    gm.recompile()


def _assigned_params(ep):
    """A parameter changed in place under no_grad inside forward (``w.clamp_(...)``, max-norm constraints)
    stays the leaf eager differentiates: its later uses read mbcompile::assigned(new, w) (new's values,
    w's gradient) instead of the detached new value."""
    sig, g = ep.graph_signature, ep.graph_module.graph
    ph = {nd.name: nd for nd in g.nodes if nd.op == "placeholder"}
    param_of = {t: ph[s.arg.name] for s in sig.input_specs if s.kind == InputKind.PARAMETER for t in [s.target]}
    out = next(nd for nd in g.nodes if nd.op == "output")
    for spec, val in zip(sig.output_specs, out.args[0]):
        if spec.kind != OutputKind.PARAMETER_MUTATION or not isinstance(val, fx.Node):
            continue
        for det in [u for u in val.users if u.target is aten.detach.default]:   # the no_grad block's output
            with g.inserting_after(det):
                new = g.call_function(mb.assigned.default, (val, param_of[spec.target]))
            new.meta = dict(det.meta)
            det.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
    ep.graph_module.recompile()


def _detach_no_grad_regions(gm):
    """``with torch.no_grad():`` inside forward is a wrap_with_set_grad_enabled(False, submod, ...) in
    export's graph, and run_decompositions inlines it as ordinary ops: gradients would flow through
    what eager computed without them. Detach the region's outputs first (detach is kept)."""
    hop = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
    if hop is None:
        return
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_function" or node.target is not hop or node.args[0] is not False:
            continue
        for user in list(node.users):               # getitem(region, i)
            with g.inserting_after(user):
                det = g.call_function(aten.detach.default, (user,))
            det.meta = dict(user.meta)
            user.replace_all_uses_with(det, delete_user_cb=lambda u, d=det: u is not d)
    gm.recompile()


def _view_base(node):
    """The tensor a chain of views (slice, select, view, transpose, ...) starts from."""
    while node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.args \
            and isinstance(node.args[0], fx.Node) and node.target._schema.returns \
            and node.target._schema.returns[0].alias_info is not None \
            and not node.target._schema.returns[0].alias_info.is_write:
        node = node.args[0]
    return node


def _inplace_through_detach(gm):
    """``x.detach().clamp_(min=tiny)`` (torch.distributions' Gamma.rsample): eager changes x's values
    and autograd never sees it, so x's gradient flows as if nothing happened. Functionalised, x would
    become a clamp of a detached tensor, with no gradient at all. Every later reader of x reads
    ``clamp(x.detach()) + (x - x.detach())`` instead (the values of the one, the gradient of the
    other), of the detached alias the clamp."""
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    changed = False
    for node in list(g.nodes):
        t, d = node.target, node.args[0] if node.args else None
        if (node.op != "call_function" or not isinstance(t, torch._ops.OpOverload) or not isinstance(d, fx.Node)
                or d.target is not aten.detach.default or _view_base(d) is not d.args[0]
                or d.args[0].op == "placeholder"):
            continue        # x a view (its base changes too) or a parameter / input (embedding max_norm): kept
        name = t._schema.name.split("::")[-1]
        pure = getattr(getattr(aten, name[:-1], None), t._overloadname, None) if name.endswith("_") else None
        if pure is None or not (t._schema.arguments and t._schema.arguments[0].alias_info is not None
                                and t._schema.arguments[0].alias_info.is_write):
            continue
        x, at = d.args[0], order[node]

        def after(prev, op, args, kwargs=None, x=x):
            with g.inserting_after(prev):
                nd = g.call_function(op, args, kwargs or {})
            nd.meta = dict(x.meta)
            return nd
        new = after(node, pure, (d, *node.args[1:]), dict(node.kwargs))       # x's new values
        zero = after(new, aten.sub.Tensor, (x, d))                             # 0, x's gradient
        st = after(zero, aten.add.Tensor, (new, zero))                         # new, bit for bit
        for src, dst in ((x, st), (d, new)):
            for user in list(src.users):
                if user in order and order[user] > at:
                    user.replace_input_with(src, dst)
        for o in [o for o in g.nodes if o.op == "output"]:       # x returned: the output is read last
            o.replace_input_with(x, st)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
