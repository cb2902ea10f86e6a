"""Capture: torch.export (training IR, params lifted), a pre-pass that turns random ops and per-model
constants into mbcompile ops, then run_decompositions that keeps every op with a rule."""
from __future__ import annotations

import contextlib
import re
import types
import traceback
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.export.graph_signature import InputKind, OutputKind

from .errors import CaptureError
from .passes import RULES
from .passes.registry import per_model_const

aten = torch.ops.aten
mb = torch.ops.mbcompile

_DROPOUTS = {aten.dropout.default: "plain", aten.feature_dropout.default: "feature",
             aten.alpha_dropout.default: "alpha", aten.feature_alpha_dropout.default: "feature_alpha",
             aten.dropout_.default: "plain", aten.feature_dropout_.default: "feature",
             aten.alpha_dropout_.default: "alpha", aten.feature_alpha_dropout_.default: "feature_alpha"}
# random op -> (kind, index of `a`, index of `b`, default a, default b, index of `like` or None, in-place)
_DRAWS = {
    aten.rand_like.default: ("uniform", None, None, 0.0, 1.0, None, False),
    aten.rand.default: ("uniform", None, None, 0.0, 1.0, None, False),
    aten.randn_like.default: ("normal", None, None, 0.0, 1.0, None, False),
    aten.randn.default: ("normal", None, None, 0.0, 1.0, None, False),
    aten.bernoulli.default: ("bernoulli_t", None, None, 0.0, 0.0, 0, False),
    aten.bernoulli.p: ("bernoulli", 1, None, 0.5, 0.0, None, False),
    aten.bernoulli_.float: ("bernoulli", 1, None, 0.5, 0.0, None, True),
    aten.bernoulli_.Tensor: ("bernoulli_t", None, None, 0.0, 0.0, 1, True),
    aten.normal_.default: ("normal", 1, 2, 0.0, 1.0, None, True),
    aten.uniform_.default: ("uniform", 1, 2, 0.0, 1.0, None, True),
}
_PER_MODEL_SCALARS = {  # module attribute that may differ per model -> the aten op and arg it feeds
    ("Dropout", "p"), ("Dropout1d", "p"), ("Dropout2d", "p"), ("Dropout3d", "p"), ("AlphaDropout", "p"),
    ("FeatureAlphaDropout", "p"), ("LeakyReLU", "negative_slope"),
    ("LSTM", "dropout"), ("GRU", "dropout"), ("RNN", "dropout"),  # inter-layer dropout (passes/rnn.py)
}


@dataclass
class Captured:
    gm: fx.GraphModule                       # unbatched, functional, decomposed
    inputs: list                             # (kind, target) per placeholder: param/buffer/const/user
    outputs: list                            # (kind, target) per output: buffer/user/user_mutation
    out_spec: object
    constants: dict = field(default_factory=dict)
    seconds: float = 0.0


@contextlib.contextmanager
def _cumulative_batch_norm(model):
    """BatchNorm with momentum=None averages with 1/float(num_batches_tracked), a data-dependent Python
    float; during capture such layers (in training) compute the factor as a tensor instead."""
    patched = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
               and m.momentum is None and m.training and m.track_running_stats]
    for m in patched:
        m.forward = types.MethodType(_bn_cumulative_forward, m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _bn_cumulative_forward(self, x):
    self._check_input_dim(x)
    self.num_batches_tracked.add_(1)
    f = 1.0 / self.num_batches_tracked.to(x.dtype)             # the cumulative-average factor
    dims = [0] + list(range(2, x.dim()))
    mean, var = x.mean(dims), x.var(dims, correction=1)        # running_var uses the unbiased variance
    with torch.no_grad():
        self.running_mean.mul_(1 - f).add_(mean.detach() * f)
        self.running_var.mul_(1 - f).add_(var.detach() * f)
    return torch.nn.functional.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


def _data_dependent(e):
    text = f"{type(e).__name__}: {e}"
    return any(s in text for s in ("data-dependent", "data dependent", "GuardOnDataDependent",
                                   "Could not guard", "Could not extract specialized integer"))


def _user_frame(e, model):
    import inspect
    try:
        src = inspect.getsourcefile(type(model))
    except TypeError:
        src = None
    frames = traceback.extract_tb(e.__traceback__)
    for fr in reversed(frames):
        if src and fr.filename == src:
            return f"{fr.filename}:{fr.lineno}: {fr.line}"
    m = re.search(r'File "([^"]+)", line (\d+)[^\n]*\n\s*(.+)', str(e))
    return f"{m.group(1)}:{m.group(2)}: {m.group(3)}" if m else "(see the traceback above)"


def capture(template, args, kwargs, consts) -> Captured:
    """Export ``template`` (one model, unbatched example inputs) and prepare it for batching."""
    import time
    t0 = time.perf_counter()
    try:
        with _cumulative_batch_norm(template):
            ep = torch.export.export(template, tuple(args), dict(kwargs), strict=False)
    except Exception as e:  # noqa: BLE001
        from .passes import rnn
        if rnn.packed_sequence_in(e):
            raise CaptureError(f"{rnn.PACKED_SEQUENCE_MESSAGE}\nExport said: {str(e).splitlines()[0][:300]}") from e
        if _data_dependent(e):
            raise CaptureError(
                f"{type(template).__name__}.forward has data-dependent Python control flow, which one "
                f"captured graph cannot express. Rewrite the branch with torch.cond (or torch.where for "
                f"elementwise choices) so that every model takes its own branch inside the graph.\n"
                f"  branch at {_user_frame(e, template)}\n"
                f"  export said: {str(e).splitlines()[0][:300]}") from e
        raise CaptureError(f"torch.export could not capture {type(template).__name__}.forward: "
                           f"{type(e).__name__}: {str(e)[:2000]}") from e
    _detach_no_grad_regions(ep.graph_module)
    _prepass(ep.graph_module, consts)
    ep = ep.run_decompositions(decomposition_table())
    _undetach_renorm(ep.graph_module)
    sig = ep.graph_signature
    inputs = []
    for spec in sig.input_specs:
        kind = {InputKind.PARAMETER: "param", InputKind.BUFFER: "buffer",
                InputKind.CONSTANT_TENSOR: "const", InputKind.USER_INPUT: "user"}.get(spec.kind)
        if kind is None:
            raise CaptureError(f"unsupported graph input {spec}")
        inputs.append((kind, spec.target if kind != "user" else spec.arg.name))
    outputs = []
    for spec in sig.output_specs:
        kind = {OutputKind.BUFFER_MUTATION: "buffer", OutputKind.USER_OUTPUT: "user",
                OutputKind.USER_INPUT_MUTATION: "user_mutation",
                OutputKind.PARAMETER_MUTATION: "param"}.get(spec.kind)
        if kind is None:
            raise CaptureError(f"unsupported graph output {spec}")
        outputs.append((kind, spec.target))
    gm = ep.graph_module
    return Captured(gm, inputs, outputs, ep.call_spec.out_spec, dict(ep.constants),
                    time.perf_counter() - t0)


_TABLE: dict = {}


def decomposition_table():
    """torch's default decompositions minus every op that has a batching rule (cached per RULES size)."""
    key = len(RULES)
    if key not in _TABLE:
        _TABLE.clear()
        _TABLE[key] = {op: fn for op, fn in torch.export.default_decompositions().items() if op not in RULES}
    return _TABLE[key]


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


def _prepass(gm, consts):
    """dropout(x, p, train) -> mbcompile.dropout(x, [p..], mode); rand/bernoulli/normal_/... ->
    mbcompile.draw(like, kind, a, b, shape, stride, dtype, device); leaky_relu with a per-model slope
    -> mbcompile.leaky_relu(x, [slopes])."""
    g = gm.graph
    order = {nd: i for i, nd in enumerate(g.nodes)}
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        t = node.target
        if t in _DROPOUTS:
            x, p = node.args[0], node.args[1]
            train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
            ps = per_model_const(node, consts, "p") or [p]
            if not train or all(v == 0 for v in ps):
                _replace(g, node, x, order, inplace=t.name().endswith("_"))
                continue
            with g.inserting_before(node):
                new = g.call_function(mb.dropout.default, (x, list(ps), _DROPOUTS[t]))
            _replace(g, node, new, order, inplace=t.name().endswith("_"))
        elif t is aten.leaky_relu.default and per_model_const(node, consts, "negative_slope"):
            with g.inserting_before(node):
                new = g.call_function(mb.leaky_relu.default,
                                      (node.args[0], list(per_model_const(node, consts, "negative_slope"))))
            _replace(g, node, new, order)
        elif t in _DRAWS:
            kind, ia, ib, da, db, il, inplace = _DRAWS[t]
            val = node.meta["val"]
            a = node.args[ia] if ia is not None and len(node.args) > ia else da
            b = node.args[ib] if ib is not None and len(node.args) > ib else db
            if isinstance(a, fx.Node) or isinstance(b, fx.Node):
                continue  # tensor-valued parameters: left to the fallback
            like = node.args[il] if il is not None else None
            with g.inserting_before(node):
                new = g.call_function(mb.draw.default, (like, kind, float(a), float(b), list(val.shape),
                                                        list(val.stride()), val.dtype, val.device))
            _replace(g, node, new, order, inplace=inplace)
    gm.recompile()


def _replace(g, node, new, order, inplace=False):
    """Replace node by new; for an in-place op also every later use of the tensor it mutated."""
    if isinstance(new, fx.Node):
        new.meta = dict(node.meta)
    if inplace and isinstance(node.args[0], fx.Node):
        target = node.args[0]
        for user in list(target.users):
            if user is not node and order.get(user, -1) > order[node]:
                user.replace_input_with(target, new)
    node.replace_all_uses_with(new)
    g.erase_node(node)
