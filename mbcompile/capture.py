"""Capture: torch.export (training IR, params lifted), a pre-pass that turns random ops and per-model
constants into mbcompile ops, then run_decompositions that keeps every op with a rule."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import random
import re
import sys
import traceback
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from . import ops
from .errors import (CaptureError, CaptureTypeError, CaptureValueError, InvalidInputError, MBCompileError,
                     UnsupportedOpError, source_line)
from .passes import RULES
from .passes.registry import module_path, per_model_const
from .export_ctx import (_cumulative_batch_norm, _dataclass_outputs, _gradient_changers,
                         _nested_encoder_padding, _no_causal_mask_detection, _no_kv_cache, _side_effect_hooks)
from .graph_fixes import (_assigned_params, _detach_no_grad_regions, _drop_effect_tokens,
                          _inplace_through_detach, _instance_norm_as_group_norm, _tensor_indices,
                          _undetach_renorm, _view_base)

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
# Any other random op with one tensor output becomes mbcompile.random_call (replayed per model; zero
# gradients, or a reparameterised sampler's: ops._REPARAM), except ops with a rule of their own:
_NOT_GENERIC = {"rrelu_with_noise", "rrelu_with_noise_", "rrelu_with_noise_functional"}
_UNTAGGED = {"random", "random_", "_standard_gamma"}   # seeded, not tagged nondeterministic_seeded (2.13)
_PER_MODEL_SCALARS = {  # module attribute that may differ per model -> the aten op and arg it feeds
    ("Dropout", "p"), ("Dropout1d", "p"), ("Dropout2d", "p"), ("Dropout3d", "p"), ("AlphaDropout", "p"),
    ("FeatureAlphaDropout", "p"), ("LeakyReLU", "negative_slope"),
    ("LSTM", "dropout"), ("GRU", "dropout"), ("RNN", "dropout"),  # inter-layer dropout (passes/rnn.py)
    ("MultiheadAttention", "dropout"),                             # attention dropout (passes/attention.py)
}


@dataclass
class Captured:
    gm: fx.GraphModule                       # unbatched, functional, decomposed
    inputs: list                             # (kind, target) per placeholder: param/buffer/const/user
    outputs: list                            # (kind, target) per output: buffer/user/user_mutation
    out_spec: object
    constants: dict = field(default_factory=dict)
    seconds: float = 0.0
    consts: dict = field(default_factory=dict)  # per-model scalars that change an op here (_check_per_model_consts)


def _data_dependent(e):
    text = f"{type(e).__name__}: {e}"
    return any(s in text for s in ("data-dependent", "data dependent", "GuardOnDataDependent",
                                   "Could not guard", "Could not extract specialized integer"))


def _tied_renorm(template):
    """(embedding path, other name) of an nn.Embedding with max_norm whose weight another module shares."""
    names: dict = {}
    for name, p in template.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for path, m in template.named_modules():
        if isinstance(m, nn.Embedding) and m.max_norm is not None:
            own = f"{path}.weight" if path else "weight"
            others = [k for k in names.get(id(m.weight), []) if k != own]
            if others:
                return path or "<root>", others[0]
    return None


def _check_per_model_consts(template, args, kwargs, ep, consts):
    """A scalar that differs per model (Dropout.p, ...) is batched where its own module uses it; forward may
    also read it elsewhere (``F.dropout(x, self.drop.p)``, HF attention's ``dropout_p=self.dropout.p``), where
    export bakes model 0's value. Export again with another model's values: every op whose arguments change
    must run inside the module that owns the value, else refuse (never model 0's value for all)."""
    if not consts:
        return {}
    slots = [(template.get_submodule(path), path, attr, vals) for path, attrs in consts.items()
             for attr, vals in attrs.items()]
    what = [f"{path}.{attr}" for _, path, attr, _ in slots]
    n = len(slots[0][3])
    combos = list(dict.fromkeys(tuple(vals[k] for *_, vals in slots) for k in range(n)))[1:]
    used = set()
    for combo in combos:      # every other model's values: a branch only a later model takes is seen too
        saved = [(mod, attr, getattr(mod, attr)) for mod, _, attr, _ in slots]
        for (mod, _, attr, _), v in zip(slots, combo):
            setattr(mod, attr, v)
        try:
            other = _export(template, args, kwargs)[0]
        finally:
            for mod, attr, v in saved:
                setattr(mod, attr, v)
        used |= _compare_exports(ep, other, consts, what)
    return {path: attrs for path, attrs in consts.items() if path in used}   # eval: a rate changes nothing


def _compare_exports(ep, other, consts, what):
    """The module paths where ``other`` (exported with another model's values) passes other arguments
    than ``ep``; refuses a different graph, or a changed argument outside the value's own module."""
    a_nodes, b_nodes = list(ep.graph.nodes), list(other.graph.nodes)

    def names(nd):
        return fx.node.map_arg(nd.args, lambda x: x.name), fx.node.map_arg(nd.kwargs, lambda x: x.name)

    if len(a_nodes) != len(b_nodes) or any(a.target != b.target for a, b in zip(a_nodes, b_nodes)):
        raise InvalidInputError(f"the models differ in {', '.join(what)}, which changes what forward computes (not "
                                f"only a value); give the models the same values or batch them apart")
    used = set()
    for a, b in zip(a_nodes, b_nodes):
        idle = a.target in _DROPOUTS and not (a.args[2] if len(a.args) > 2 else a.kwargs.get("train", True))
        if a.op != "call_function" or names(a) == names(b) or idle:
            continue
        used.add(module_path(a))
        if module_path(a) not in consts:
            raise InvalidInputError(
                f"the models differ in {', '.join(what)}, and forward also passes that value to {a.target} "
                f"outside its module, at {source_line(a)}; mbcompile batches it per model only where its own "
                f"module (Dropout, LeakyReLU, LSTM/GRU/RNN) uses it, and never gives every model model 0's "
                f"value: give the models the same values or batch them apart")
    return used


def _refuse_data_dependent_shapes(gm, template):
    """Export takes every input size as fixed, so a symbolic size can only come from the data (x[mask],
    nonzero, unique, masked_select): each model would get its own size, which one batched graph cannot hold."""
    for nd in gm.graph.nodes:
        v = nd.meta.get("val")
        for t in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(t, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in t.shape):
                raise CaptureError(
                    f"{type(template).__name__}.forward makes a tensor whose shape depends on the data "
                    f"({nd.target} -> shape {tuple(t.shape)}), at {source_line(nd)}: each model could get its own "
                    f"size, which one batched graph cannot hold. Keep shapes fixed: mask with torch.where or a "
                    f"multiplication instead of indexing with a boolean mask (the data-dependent counterpart of "
                    f"torch.cond for control flow); count with torch.zeros(N).index_add_(0, idx, ones) instead "
                    f"of torch.bincount.")


def _size_from_data(e, template):
    return CaptureError(
        f"{type(template).__name__}.forward makes a shape, a size or a count that depends on the data (a number "
        f"read out of a tensor: F.one_hot without num_classes, bincount without minlength, range(int(t)), ...), "
        f"which one batched graph cannot hold (each model could get its own). Give it a fixed value "
        f"(F.one_hot(idx, num_classes=K), a Python int attribute).\n  at {_user_frame(e, template)}\n"
        f"  export said: {str(e).splitlines()[0][:300]}")


def _is_branch(frame: str) -> bool:
    """Whether the user's line (from :func:`_user_frame`) may decide something (if / while / for /
    assert, a conditional expression, and / or / not, a call into code that branches), rather than only
    read a number out of a tensor there (float(t), int(t), .item(), .tolist())."""
    m = re.match(r".*?:\d+: (.*)$", frame, re.S)
    code = m.group(1).strip() if m else ""
    if not code:
        return True                     # unknown: the branch message, as before
    if re.match(r"(if|elif|while|for|assert)\b", code) or re.search(r"\s(if|and|or|not)\s", code):
        return True
    return not re.search(r"\b(float|int)\(|\.(item|tolist)\(", code)   # reads no number on this line


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


_MACHINERY = ("/torch/fx/", "/torch/_dynamo/", "/torch/export/", "/torch/_export/", "/torch/overrides.py",
              "/torch/_subclasses/", "/torch/utils/", "/torch/_ops.py", "/torch/_tensor.py", "/torch/_refs/",
              "/torch/_prims", "/torch/_decomp/", "/torch/_meta_registrations.py", "/torch/_higher_order_ops/",
              "/torch/_library/", "/torch/_functorch/", "/torch/nn/modules/module.py", "/torch/__init__.py")


def _torch_branch(e):
    """"name (torch/nn/functional.py:N)" when the innermost frame of ``e`` outside torch's tracing
    machinery is a torch.nn function or layer (a branch of torch's own on its inputs' values), else None."""
    for fr in reversed(traceback.extract_tb(e.__traceback__)):
        path = fr.filename.replace("\\", "/")
        if any(m in path for m in _MACHINERY):
            continue
        if "/torch/nn/" in path:
            return f"{fr.name} ({path[path.rindex('/torch/') + 1:]}:{fr.lineno})"
        return None
    return None


def _export(template, args, kwargs):
    """torch.export of the template under what capture changes while it traces (export_ctx.py); also
    returns what forward did that gives gradients of its own."""
    with _cumulative_batch_norm(template), _no_causal_mask_detection(), _dataclass_outputs(template), \
            _no_kv_cache(template), _nested_encoder_padding(template), _gradient_changers() as seen, \
            _side_effect_hooks(template) as lost, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*were assigned during export.*")   # nn.LSTM's flat weights
        with _no_partial_graph_dump():
            return torch.export.export(template, tuple(args), dict(kwargs), strict=False), seen, lost


@contextlib.contextmanager
def _no_partial_graph_dump():
    """Where data-dependent control flow stops export, torch logs a warning and prints the partial
    graph to stderr; capture raises a CaptureError naming the user's line instead. Everything else
    written to stderr meanwhile is passed on."""
    log = logging.getLogger("torch.fx.experimental.symbolic_shapes")   # "Unable to find user code ..."
    level, buf = log.level, io.StringIO()
    log.setLevel(max(level, logging.ERROR))
    try:
        with contextlib.redirect_stderr(buf):
            yield
    except Exception as e:
        graph = getattr(e, "partial_fx_graph", None)
        text = buf.getvalue()
        buf = io.StringIO(text.replace(f"{graph}\n", "") if graph is not None else text)
        raise
    finally:
        log.setLevel(level)
        sys.stderr.write(buf.getvalue())


def _random_state():
    """Python's and numpy's global random states (what forward might draw from outside torch)."""
    np = sys.modules.get("numpy")
    return random.getstate(), np.random.get_state() if np is not None else None


def _draws(before) -> list:
    """The random modules forward drew from while capturing; their states are restored (capture
    should not move the user's streams)."""
    (py_rng, np_rng), (py_now, np_now) = before, _random_state()
    draws = []
    if py_now != py_rng:
        draws.append("Python's random module (random.random(), random.uniform(), ...)")
        random.setstate(py_rng)
    if np_rng is not None and np_now is not None and (np_now[2] != np_rng[2] or (np_now[1] != np_rng[1]).any()):
        draws.append("numpy's global random state (np.random.rand(), ...)")
        sys.modules["numpy"].random.set_state(np_rng)
    return draws


_MISSING = object()


def _hook_weights(mod) -> set:
    """Attributes that a forward pre-hook of the hook-based nn.utils.weight_norm / spectral_norm
    recomputes from parameters before every call (``weight`` from ``weight_g``, ``weight_v``), or
    that of nn.utils.prune (``weight`` = ``weight_orig * weight_mask``)."""
    return {h.name if isinstance(h, (WeightNorm, SpectralNorm)) else h._tensor_name
            for h in mod._forward_pre_hooks.values() if isinstance(h, (WeightNorm, SpectralNorm, BasePruningMethod))}


@contextlib.contextmanager
def _watch_attributes(template, changes: list, stores: list):
    """Record forward's assignments of plain values (numbers, strings) to the template's modules:
    export puts the attributes back afterwards, but the graph keeps what forward read of them."""
    paths = {id(m): p for p, m in template.named_modules()}
    setattr_ = nn.Module.__setattr__

    def watched(self, name, value):
        p = paths.get(id(self))
        if p is not None and not name.startswith("_") and isinstance(value, torch.Tensor) \
                and not isinstance(value, nn.Parameter) and name not in self._buffers and name not in self._parameters \
                and name not in _hook_weights(self):
            stores.append((p + "." if p else "") + name)
        elif p is not None and not name.startswith("_") and name != "training" \
                and type(value) in (int, float, bool, str):
            old = self.__dict__.get(name, _MISSING)
            if old is _MISSING or not (type(old) is type(value) and old == value):
                where = (p + "." if p else "") + name
                changes.append(f"{where!r}: set to {value!r}" if old is _MISSING
                               else f"{where!r}: {old!r} -> {value!r}")
        setattr_(self, name, value)

    nn.Module.__setattr__ = watched
    try:
        yield
    finally:
        nn.Module.__setattr__ = setattr_


def _refuse_python_state(template, draws, changes, strict, stores=(), lost=()):
    """Forward that draws Python / numpy random numbers is refused (each model alone would draw anew
    at every call; the graph keeps the one draw of capture); forward that changes a plain attribute
    (a step counter, a cached length) warns, or with strict=True is refused."""
    name = type(template).__name__
    if draws:
        raise CaptureError(
            f"{name}.forward draws from {draws[0]}: a captured graph keeps the value drawn while capturing, "
            f"so every later call would repeat it. Draw with torch instead (torch.rand(()), torch.bernoulli; "
            f"with randomness='sequential' each model then gets the draws it would get alone)")
    stores = list(dict.fromkeys(stores))
    if stores or lost:
        what = ([f"stores tensors on module attributes ({', '.join(map(repr, stores[:3]))})"] if stores else []) + \
               ([f"has forward hooks that return nothing ({'; '.join(dict.fromkeys(lost[:3]))})"] if lost else [])
        msg = (f"{name}.forward {' and '.join(what)}: such side effects happen once, while capturing, on "
               f"placeholder tensors, and not at the batched module's calls (the batched module has no such "
               f"attributes; a list a hook appends to holds one placeholder). Return the tensors from forward "
               f"instead (a tuple or dict output: each gets the leading model dim)")
        warnings.warn("mbcompile: " + msg, stacklevel=4)   # the outputs are right: a warning, also when strict
    if changes:
        seen = list(dict.fromkeys(changes))
        msg = (f"{name}.forward changes plain Python attributes ({'; '.join(seen[:3])}"
               f"{'; ...' if len(seen) > 3 else ''}). A captured graph keeps the values forward read while "
               f"capturing, so later calls do not see them change as each model alone would. Keep such state in a "
               f"buffer (register_buffer) updated with tensor ops")
        if strict:
            raise CaptureError(msg)
        warnings.warn("mbcompile: " + msg, stacklevel=4)


def capture(template, args, kwargs, consts, strict=False) -> Captured:
    """Export ``template`` (one model, unbatched example inputs) and prepare it for batching."""
    import time
    t0 = time.perf_counter()
    rng, changes, stores = _random_state(), [], []
    if kwargs.get("use_cache") is True and any(hasattr(m, "config") for m in template.modules()):
        raise CaptureError(
            f"{type(template).__name__} was called with use_cache=True: the key/value cache it returns is an object "
            f"one batched graph cannot return (and training never reads it). Call it without use_cache (mbcompile "
            f"captures with the config's use_cache off) or with use_cache=False; to generate, use "
            f"batched.unbatch(i).generate(...)")
    try:
        with _watch_attributes(template, changes, stores):
            ep, seen, lost = _export(template, args, kwargs)
    except MBCompileError:
        raise
    except Exception as e:  # noqa: BLE001
        from .passes import rnn
        if rnn.packed_sequence_in(e):
            raise CaptureError(f"{rnn.PACKED_SEQUENCE_MESSAGE}\nExport said: {str(e).splitlines()[0][:300]}") from e
        if "fake tensor in the exported program constant" in str(e):   # x.data / p.data.mul_(...) in forward
            raise CaptureError(
                f"{type(template).__name__}.forward uses .data of a tensor (e.g. p.data.mul_(m) for a momentum "
                f"encoder), which export cannot follow. Write it on the tensor itself inside torch.no_grad(): "
                f"p.mul_(m).add_(q.detach(), alpha=1 - m).\n  at {_user_frame(e, template)}") from e
        if "Could not extract specialized integer" in str(e):     # a size or a count, not a branch
            raise _size_from_data(e, template) from e
        if _data_dependent(e) and not _is_branch(_user_frame(e, template)):
            raise CaptureError(
                f"{type(template).__name__}.forward turns a tensor into a Python number (float(t), int(t), "
                f".item(), .tolist()) and computes with it, which one captured graph cannot express: the number "
                f"depends on the data. Keep it a tensor (x / x.abs().max() rather than x / float(x.abs().max())); where the "
                f"number decides a branch, write the branch with torch.cond or torch.where.\n"
                f"  at {_user_frame(e, template)}\n  export said: {str(e).splitlines()[0][:300]}") from e
        if _data_dependent(e):
            dists = any("/torch/distributions/" in fr.filename for fr in traceback.extract_tb(e.__traceback__))
            raise CaptureError(
                f"{type(template).__name__}.forward has data-dependent Python control flow, which one "
                f"captured graph cannot express. Rewrite the branch with torch.cond (or torch.where for "
                f"elementwise choices) so that every model takes its own branch inside the graph.\n"
                + ("  (here torch.distributions checks its arguments: pass validate_args=False, or call "
                   "torch.distributions.Distribution.set_default_validate_args(False))\n" if dists else "")
                + (f"  (the branch is in torch's own {inner}, which looks at its inputs' values: call it outside "
                   f"the model; a loss: return its inputs from forward and use mbcompile.loss(fn, out, target))\n"
                   if (inner := _torch_branch(e)) and not dists else "") +
                f"  branch at {_user_frame(e, template)}\n"
                f"  export said: {str(e).splitlines()[0][:300]}") from e
        if "Unsupported input type" in str(e):                    # a torch.dtype / torch.device argument
            import re
            found = re.search(r"Unsupported input type <class '([^']+)'>", str(e))
            kind = found.group(1) if found else "an unsupported type"
            leaf = next((v for v in pytree.tree_leaves((args, kwargs))
                         if kind in (f"{type(v).__module__}.{type(v).__qualname__}", type(v).__qualname__)), None)
            if isinstance(leaf, (torch.dtype, torch.device)) or kind in ("torch.dtype", "torch.device"):
                how = ("Pass it as a string (torch.float64 -> 'float64', mapped back in forward) or set it as an "
                       "attribute of the model before mbcompile.batch")
            elif dataclasses.is_dataclass(leaf):
                how = ("Register the dataclass as a pytree first (torch.utils._pytree.register_dataclass(Cls)): its "
                       "tensor fields then count as inputs, shared or per model")
            else:
                how = ("Pass tensors (a numpy array as torch.as_tensor(a), a complex number as a tensor), plain "
                       "numbers or strings, or a tuple / list / dict of them; set anything else as an attribute of "
                       "the model before mbcompile.batch")
            raise CaptureError(f"{type(template).__name__}.forward takes an argument of type {kind}, which "
                               f"torch.export cannot take as an input. {how}") from e
        if type(e).__name__ == "DynamicOutputShapeException":     # e.g. F.ctc_loss, torch.nonzero
            op = str(e).strip().splitlines()[0][:200]
            raise CaptureError(
                f"{type(template).__name__}.forward calls {op}, whose output shape depends on the input's values "
                f"(or whose kernel runs only on real data), which one captured graph cannot express. Compute it "
                f"outside the batched forward: return what it takes and apply it per model in the loss "
                f"(mbcompile.loss(fn, out, target) runs fn per model).\n  at {_user_frame(e, template)}") from e
        cls = CaptureValueError if isinstance(e, ValueError) else CaptureTypeError if isinstance(e, TypeError) \
            else CaptureError                             # forward's own error keeps its builtin type
        raise cls(f"torch.export could not capture {type(template).__name__}.forward: "
                  f"{type(e).__name__}: {str(e)[:2000]}") from e
    if seen:
        raise CaptureError(f"{type(template).__name__}.forward {seen[0]}. The batched graph keeps forward's ops only, "
                           f"so its backward would not run that and the gradients would differ. Write it with "
                           f"differentiable ops (a straight-through estimator is x + (f(x) - x).detach()), or as a "
                           f"torch.library.custom_op with register_autograd")
    _refuse_data_dependent_shapes(ep.graph_module, template)
    _refuse_own_generators(ep.graph_module)
    consts = _check_per_model_consts(template, args, kwargs, ep, consts)
    _refuse_python_state(template, _draws(rng), changes, strict, stores, lost)
    _detach_no_grad_regions(ep.graph_module)
    _inplace_through_detach(ep.graph_module)
    _tensor_indices(ep.graph_module)
    _prepass(ep.graph_module, consts)
    try:
        with warnings.catch_warnings():                      # torch's own deprecation notice (LeafSpec)
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            ep = ep.run_decompositions(decomposition_table())
    except Exception as e:  # noqa: BLE001 - torch's own limits (e.g. a tied weight renormalised in place)
        tied = _tied_renorm(template)
        if tied:
            raise CaptureError(
                f"{type(template).__name__}.forward: '{tied[0]}' is an nn.Embedding with max_norm, which renormalises "
                f"its weight in place in forward, and that weight is tied to '{tied[1]}': torch.export cannot "
                f"capture an in-place update of a tied parameter. Untie the weights, or drop max_norm and renormalise "
                f"outside forward (under torch.no_grad() after each step)") from e
        branch = _random_in_branch(ep.graph_module)
        if branch:
            raise CaptureError(
                f"{type(template).__name__}.forward draws random numbers ({branch}) inside a torch.cond branch: "
                f"mbcompile keeps each model's random stream in order, and a draw that only one branch makes "
                f"cannot be ordered. Draw outside the cond (e.g. the dropout mask or torch.rand_like before it) and "
                f"pass it into the branch as an operand") from e
        raise CaptureError(f"torch.export captured {type(template).__name__}.forward but could not decompose it "
                           f"to core aten ops: {type(e).__name__}: {str(e)[:500]}") from e
    _undetach_renorm(ep.graph_module)
    _instance_norm_as_group_norm(ep.graph_module)
    _assigned_params(ep)
    sig = ep.graph_signature
    _drop_effect_tokens(ep.graph_module, sig)
    inputs = []
    for spec in sig.input_specs:
        if spec.kind == InputKind.TOKEN:
            continue
        kind = {InputKind.PARAMETER: "param", InputKind.BUFFER: "buffer",
                InputKind.CONSTANT_TENSOR: "const", InputKind.USER_INPUT: "user"}.get(spec.kind)
        if kind is None:
            raise CaptureError(f"unsupported graph input {spec}")
        inputs.append((kind, spec.target if kind != "user" else spec.arg.name))
    outputs = []
    for spec in sig.output_specs:
        if spec.kind == OutputKind.TOKEN:
            continue
        kind = {OutputKind.BUFFER_MUTATION: "buffer", OutputKind.USER_OUTPUT: "user",
                OutputKind.USER_INPUT_MUTATION: "user_mutation",
                OutputKind.PARAMETER_MUTATION: "param"}.get(spec.kind)
        if kind is None:
            raise CaptureError(f"unsupported graph output {spec}")
        outputs.append((kind, spec.target))
    gm = ep.graph_module
    return Captured(gm, inputs, outputs, ep.call_spec.out_spec, dict(ep.constants),
                    time.perf_counter() - t0, consts)


_TABLE: dict = {}


def _random_in_branch(gm):
    """The first random op (after _prepass: an mbcompile draw) inside a control-flow subgraph, or None."""
    from .cudagraph import _HOST                  # every mbcompile op that draws from a generator
    for name, sub in gm.named_modules():
        if not name or not isinstance(sub, fx.GraphModule):
            continue
        for nd in sub.graph.nodes:
            if nd.op == "call_function" and getattr(nd.target, "namespace", None) == "mbcompile" and \
                    nd.target._opname in _HOST:
                files = [ln.strip() for ln in (nd.meta.get("stack_trace") or "").splitlines()
                         if ln.strip().startswith("File") and "<eval_with_key>" not in ln]
                return nd.target._opname + (f", {files[-1]}" if files else "")
    return None


def decomposition_table():
    """torch's default decompositions minus every op that has a batching rule (cached per RULES size),
    with torch's wrong ones replaced (FIXED_DECOMPOSITIONS; backend.py's tables too)."""
    key = len(RULES)
    if key not in _TABLE:
        _TABLE.clear()
        table = {op: fn for op, fn in torch.export.default_decompositions().items() if op not in RULES}
        table.update({op: fn for op, fn in FIXED_DECOMPOSITIONS.items() if op in table})
        _TABLE[key] = table
    return _TABLE[key]


def _multilabel_margin_loss_forward(input, target, reduction):
    """torch 2.13's decomposition with its bug fixed: target slots after the first -1 are masked out of
    the loss (torch's gathers input[..., 0] for them and adds it in; eager ignores them).
    N,C + N,C class indices (-1 ends each row's list) -> loss, is_target."""
    shape = target.shape
    input, target = torch.atleast_2d(input), torch.atleast_2d(target)
    dim = input.shape[1]
    idx = torch.arange(dim, device=target.device)
    end = torch.amin(torch.where(target == -1, idx, dim), dim=-1, keepdim=True)
    listed = idx < end                                          # N,C: slot j holds a target
    u = torch.gather(input, -1, torch.where(listed, target, 0))  # N,C: input at each listed target
    is_target = torch.any(idx == torch.where(listed, target, -1).unsqueeze(-1), dim=1)   # N,C
    z = (1.0 - u.T.unsqueeze(-1) + input).clamp_min(0) / dim   # slot j, N, C
    z = torch.where(is_target | ~listed.T.unsqueeze(-1), 0, z)
    if reduction == 1:                                          # mean
        z = z.sum(dim=(0, -1)).mean()
    elif reduction == 2:                                        # sum
        z = z.sum()
    else:
        z = z.sum(dim=(0, -1))
    return z, is_target.to(input.dtype).reshape(shape)


FIXED_DECOMPOSITIONS = {aten.multilabel_margin_loss_forward.default: _multilabel_margin_loss_forward}


@contextlib.contextmanager
def fixed_kernels():
    """torch runs the wrong decompositions above as the ops' Python autograd kernels whenever its Python
    dispatcher is on (make_fx, export): within this block the fixed ones run instead."""
    key, saved = torch._C.DispatchKey.Autograd, {}
    for op, fn in FIXED_DECOMPOSITIONS.items():
        if key in op.py_kernels:
            saved[op], op.py_kernels[key] = op.py_kernels[key], fn
            op._dispatch_cache.clear()
    try:
        yield
    finally:
        for op, fn in saved.items():
            op.py_kernels[key] = fn
            op._dispatch_cache.clear()


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
            ps = per_model_const(node, consts, "p") or per_model_const(node, consts, "dropout") or [p]
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
        elif t in (aten.rrelu.default, aten.rrelu_.default) and _arg(node, 4, "generator", None) is None:
            x, val = node.args[0], node.meta["val"]
            lower, upper = _arg(node, 1, "lower", 1 / 8), _arg(node, 2, "upper", 1 / 3)
            with g.inserting_before(node):
                if not _arg(node, 3, "training", False):      # eager: leaky_relu with the mean slope
                    new = g.call_function(aten.leaky_relu.default, (x, (lower + upper) / 2))
                else:                                          # x * noise, noise drawn as eager does
                    det = g.call_function(aten.detach.default, (x,))
                    det.meta = dict(x.meta)
                    noise = _random_call(g, ops.rrelu_noise, (det, lower, upper), {}, False, val.device)
                    noise.meta = dict(node.meta)
                    new = g.call_function(aten.mul.Tensor, (x, noise))
            _replace(g, node, new, order, inplace=t is aten.rrelu_.default)
        elif _generic_random(t, node):
            with g.inserting_before(node):
                new = _random_call(g, t, node.args, node.kwargs, t._schema.name.endswith("_"),
                                   node.meta["val"].device)
            _replace(g, node, new, order, inplace=t._schema.name.endswith("_"))
    gm.recompile()
    for _, sub in gm.named_children():              # the body of a no_grad block (a wrap_with_set_grad_enabled
        if isinstance(sub, fx.GraphModule):        # subgraph), inlined later by run_decompositions
            _prepass(sub, consts)


def _arg(node, i, name, default):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _generic_random(t, node):
    """A random op with one tensor output that mutates at most self and takes no explicit generator."""
    if not isinstance(t, torch._ops.OpOverload):
        return False
    s = t._schema
    name = s.name.split("::")[-1]
    if name in _NOT_GENERIC or (torch.Tag.nondeterministic_seeded not in t.tags and
                                not (s.name.startswith("aten::") and name in _UNTAGGED)):
        return False
    if t in RULES and torch.Tag.pointwise not in t.tags:    # its own rule draws per model (attention)
        return False
    writes = [a.name for a in s.arguments if a.alias_info is not None and a.alias_info.is_write]
    return (len(s.returns) == 1 and str(s.returns[0].type) == "Tensor" and writes in ([], ["self"])
            and isinstance(node.meta.get("val"), torch.Tensor)
            and _generator_arg(s, node) is None)


def _refuse_own_generators(gm):
    """A draw from a torch.Generator that forward creates (or is given): the captured program would
    hold one generator object for every model and every call, while each model alone makes a fresh one
    (or advances its own); no per-model stream reproduces that, so it is refused, not guessed."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
                and isinstance(_generator_arg(node.target._schema, node), fx.Node):
            raise UnsupportedOpError(
                f"{node.target} draws from a torch.Generator made in (or passed to) forward, at "
                f"{source_line(node)}: mbcompile gives each model its own stream of torch's default "
                f"generator (seeds=...), and cannot batch a generator object. Draw without generator= "
                f"(each model then draws its own numbers, reproducibly), or draw the noise outside and "
                f"pass it to forward as an input")


def _generator_arg(schema, node):
    """The node's explicit ``generator=`` (a Generator, or the lifted object export makes of one
    created in forward), else None."""
    for k, a in enumerate(schema.arguments):
        if a.name == "generator":
            return node.args[k] if k < len(node.args) else node.kwargs.get("generator")
    return None


def _random_call(g, target, args, kwargs, inplace, device):
    """mbcompile.random_call(key, tensors): the call registered with each tensor argument a slot."""
    tensors = []

    def slot(a):
        val = a.meta.get("val")
        dense = isinstance(val, torch.Tensor) and torch._prims_common.is_non_overlapping_and_dense_or_false(val)
        tensors.append(a)
        return ops.Slot(len(tensors) - 1, (tuple(val.shape), tuple(val.stride())) if dense else None)

    args, kwargs = fx.node.map_arg(tuple(args), slot), fx.node.map_arg(dict(kwargs), slot)
    key = ops.register_random_call(target, args, kwargs, inplace, device)
    return g.call_function(mb.random_call.default, (key, tensors))


def _replace(g, node, new, order, inplace=False):
    """Replace node by new; for an in-place op also what it mutated: a tensor forward made (or a view of
    one: ``t[:, :3].uniform_()``) gets new copied into it, which functionalization then carries to the
    base and every alias; an input's later uses read new instead (the caller's tensor, shared by the
    models, is not written)."""
    if isinstance(new, fx.Node):
        new.meta = dict(node.meta)
    if inplace and isinstance(node.args[0], fx.Node):
        target = node.args[0]
        if _view_base(target).op != "placeholder" and isinstance(new, fx.Node):
            with g.inserting_after(new):
                new = g.call_function(aten.copy_.default, (target, new))
            new.meta = dict(node.meta)
        else:
            for user in list(target.users):
                if user is not node and order.get(user, -1) > order[node]:
                    user.replace_input_with(target, new)
    node.replace_all_uses_with(new)
    g.erase_node(node)

