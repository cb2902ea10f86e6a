"""mbcompile's own ops. The capture pre-pass rewrites random ops (and ops that carry a per-model
constant) into these, so that run_decompositions keeps them whole and the batching rules can give
each model its own random stream. Unbatched, each behaves exactly like the aten op it replaced."""
from __future__ import annotations

import copy
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from . import cores
from .errors import InvalidInputError

_DROPOUT = {"plain": torch.dropout, "feature": torch.feature_dropout,
            "alpha": torch.alpha_dropout, "feature_alpha": torch.feature_alpha_dropout}


# a draw advances a random stream even when its result is unused (the last mask of a decoder loop):
# tagged as random, and registered as effectful (below), since export's run_decompositions drops an unused
# pure op, aten.rand included; capture then runs each as a plain call again (graph_fixes._drop_effect_tokens)
_RANDOM = (torch.Tag.nondeterministic_seeded,)


@torch.library.custom_op("mbcompile::dropout", mutates_args=(), tags=_RANDOM)
def dropout(x: Tensor, p: List[float], mode: str) -> Tensor:
    """Model 0's view of a dropout whose rate may differ per model (``p`` has one entry or n)."""
    return _DROPOUT[mode](x, p[0], True).clone()


@dropout.register_fake
def _(x, p, mode):
    return torch.empty_like(x)


@torch.library.custom_op("mbcompile::leaky_relu", mutates_args=())
def leaky_relu(x: Tensor, slope: List[float]) -> Tensor:
    return torch.nn.functional.leaky_relu(x, slope[0])


@leaky_relu.register_fake
def _(x, slope):
    return torch.empty_like(x)


@torch.library.custom_op("mbcompile::draw", mutates_args=(), tags=_RANDOM)
def draw(like: Optional[Tensor], kind: str, a: float, b: float, shape: List[int], stride: List[int],
         dtype: torch.dtype, device: torch.device) -> Tensor:
    """A fresh random tensor as eager torch draws it: empty_strided(shape, stride).<kind>_(a, b);
    ``bernoulli_t`` draws with the per-element probabilities in ``like``."""
    return draw_one(like, kind, a, b, shape, stride, dtype, device, None)


@draw.register_fake
def _(like, kind, a, b, shape, stride, dtype, device):
    return torch.empty_strided(shape, stride, dtype=dtype, device=device)


def draw_one(like, kind, a, b, shape, stride, dtype, device, gen):
    return _draw_into(torch.empty_strided(shape, stride, dtype=dtype, device=device), kind, a, b, gen, like)


def _draw_into(t, kind, a, b, gen, like=None):
    """Draw ``kind`` into ``t`` in place (a fresh tensor, or a slice laid out as eager's would be)."""
    if kind == "bernoulli":
        return t.bernoulli_(a, generator=gen)
    if kind == "bernoulli_t":
        return t.bernoulli_(like, generator=gen)
    if kind == "uniform":
        return t.uniform_(a, b, generator=gen)
    if kind == "normal":
        return t.normal_(a, b, generator=gen)
    raise InvalidInputError(f"unknown random kind {kind!r}")


def _gen(device, state):
    g = torch.Generator(device=device)
    g.set_state(state.clone())  # a view with a storage offset crashes set_state (torch 2.13)
    return g


@torch.library.custom_op("mbcompile::draw_per_model", mutates_args=("states",))
def draw_per_model(like: Optional[Tensor], like_dim: int, kind: str, a: List[float], b: float,
                   shape: List[int], stride: List[int], dtype: torch.dtype, device: torch.device,
                   states: Tensor) -> Tensor:
    """n,*shape: model i's slice is drawn from generator state ``states[i]`` (advanced in place),
    exactly as model i alone would draw it from torch's generator. a[i] == 0 with kind
    ``bernoulli_keep`` is p == 1 (all dropped, nothing drawn); a[i] == 1 draws nothing either.
    ``bernoulli_keep_scaled`` is eager dropout's noise: the keep-mask divided in place by a[i]."""
    n = states.shape[0]
    out = torch.empty((n, *shape), dtype=dtype, device=device)
    direct = list(out.stride()[1:]) == list(stride) or out[0].numel() <= 1   # slices laid out as eager's

    def one(i):
        ai = a[i] if len(a) > 1 else a[0]
        if kind.startswith("bernoulli_keep") and ai in (0.0, 1.0):   # eager dropout draws nothing here
            out[i].fill_(ai)
            return
        if kind == "cuda_dropout_mask":                          # fused CUDA dropout has no generator arg
            out[i].copy_(_cuda_dropout_mask(shape, stride, dtype, device, 1.0 - ai, states[i]))
            return
        g = _gen(device, states[i])
        li = None if like is None else like.select(like_dim, i)
        k = "bernoulli" if kind.startswith("bernoulli_keep") else kind
        if direct and li is None and k in ("bernoulli", "uniform", "normal"):
            _draw_into(out[i], k, ai, b, g)                      # into model i's slice: no copy
        else:
            out[i].copy_(draw_one(li, k, ai, b, shape, stride, dtype, device, g))
        if kind == "bernoulli_keep_scaled":
            out[i].div_(ai)
        states[i].copy_(g.get_state())

    # torch's CPU generators draw one element after another on one thread; each model has a generator
    # of its own, so big draws run side by side on the cores (the same draws: each stream is model i's)
    spread = out.device.type == "cpu" and out[0].numel() >= SPREAD_MIN_NUMEL and out.numel() >= SPREAD_MIN_TOTAL
    cores.map_models(one, n, None if spread else 1)
    return out


# a CPU draw is split over the cores (cores.map_models) from this many elements per model and in all.
# Measured, 2-core EPYC: bernoulli_ takes ~4.3 ns an element on one thread; handing work to the workers
# ~50 us; and after a hand-off the caller's OpenMP team starts again, which now and then stalls its next
# ops for up to ~7 ms (the new team thread queued behind the caller's spinning one: docs/performance.md,
# stop 22). 2M elements (~9 ms on one thread) gain more than that: a ViT's dropout (16 models, 0.5M
# elements each) 381 -> 335 ms a step; 2 models of 0.5M each lost (376 -> 772 ms, in chunks of 2).
SPREAD_MIN_NUMEL = 1 << 15
SPREAD_MIN_TOTAL = 1 << 21


@draw_per_model.register_fake
def _(like, like_dim, kind, a, b, shape, stride, dtype, device, states):
    return torch.empty((states.shape[0], *shape), dtype=dtype, device=device)


def _cuda_dropout_mask(shape, stride, dtype, device, p, state):
    """The mask eager CUDA dropout (fused native_dropout) would draw from generator state ``state``
    on an input laid out as eager's (``stride``): the kernel gives a contiguous input 4 neighbouring
    elements per random draw, any other input elements a grid's width apart (a batch_first
    MultiheadAttention's output is a transposed view), so the layout decides which element gets
    which number."""
    idx = torch.device(device).index
    saved = torch.cuda.get_rng_state(idx)
    try:
        torch.cuda.set_rng_state(state, idx)
        ones = torch.empty_strided(shape, stride, dtype=dtype, device=device).fill_(1)
        mask = torch.native_dropout(ones, p, True)[1]
        state.copy_(torch.cuda.get_rng_state(idx))
    finally:
        torch.cuda.set_rng_state(saved, idx)
    return mask.to(dtype)


# ---- any other random op: the pre-pass registers the call (op, args with tensor slots), and model i
# replays it on its own slices with its own stream swapped into the device's default generator.
_CALLS: list = []                     # key -> (target, args, kwargs, inplace, device)
_KEYS: dict = {}


class Slot:
    """Where tensors[i] goes in a registered call; ``like``: the (shape, stride) eager saw, or None."""
    __slots__ = ("i", "like")

    def __init__(self, i, like):
        self.i, self.like = i, like

    def __repr__(self):
        return f"Slot({self.i}, {self.like})"


def register_random_call(target, args, kwargs, inplace, device) -> int:
    entry = (target, tuple(args), dict(kwargs), inplace, torch.device(device))
    k = repr(entry)
    if k not in _KEYS:
        _KEYS[k] = len(_CALLS)
        _CALLS.append(entry)
    return _KEYS[k]


def call_device(key):
    return _CALLS[key][4]


def random_call_one(key, tensors):
    """The registered op on ``tensors``, as eager runs it (an in-place op fills a copy of self)."""
    target, args, kwargs, inplace, _ = _CALLS[key]

    def fill(a):
        if not isinstance(a, Slot):
            return a
        t = tensors[a.i]
        if a.like is not None and (a.i == 0 and inplace or t.stride() != a.like[1]):  # eager's layout
            return torch.empty_strided(*a.like, dtype=t.dtype, device=t.device).copy_(t)
        return t.clone() if a.i == 0 and inplace else t

    return target(*torch.utils._pytree.tree_map(fill, args), **torch.utils._pytree.tree_map(fill, kwargs))


def rrelu_noise(x, lower, upper):
    """The noise eager rrelu(training=True) draws: uniform(lower, upper) where x <= 0, else 1."""
    noise = torch.empty_like(x, memory_format=torch.contiguous_format)
    torch.ops.aten.rrelu_with_noise(x, noise, lower, upper, True)
    return noise


@torch.library.custom_op("mbcompile::random_call", mutates_args=(), tags=_RANDOM)
def random_call(key: int, tensors: List[Tensor]) -> Tensor:
    return random_call_one(key, tensors)


@random_call.register_fake
def _(key, tensors):
    return random_call_one(key, tensors)


def default_generator(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    if device.type == "cpu":
        return torch.default_generator
    raise NotImplementedError(f"random ops on {device} have no per-model stream")


@torch.library.custom_op("mbcompile::random_call_per_model", mutates_args=())
def random_call_per_model(key: int, tensors: List[Tensor], mapped: List[bool],
                          states: Tensor) -> Tuple[Tensor, Tensor]:
    """(n,*out, advanced states): model i runs the registered op on its slices of the mapped tensors
    with the device's default generator set to ``states[i]``; the global state is restored.
    Functional (the caller copies the states back) so that it can have torch's zero gradients."""
    g = default_generator(call_device(key))
    saved, outs, states = g.get_state(), [], states.clone()
    try:
        for i in range(states.shape[0]):
            g.set_state(states[i].clone())
            outs.append(random_call_one(key, [t[i] if m else t for t, m in zip(tensors, mapped)]))
            states[i].copy_(g.get_state())
    finally:
        g.set_state(saved)
    return torch.stack(outs), states


@random_call_per_model.register_fake
def _(key, tensors, mapped, states):
    out = random_call_one(key, [t[0] if m else t for t, m in zip(tensors, mapped)])
    return out.new_empty((states.shape[0], *out.shape)), torch.empty_like(states)


def _random_grad_ctx(ctx, inputs, output):
    ctx.likes = [(t.shape, t.dtype, t.device) if t.is_floating_point() or t.is_complex() else None
                 for t in inputs[1]]
    ctx.extra = (None,) * (len(inputs) - 2)
    name = _CALLS[inputs[0]][0].__name__.split(".")[0]
    ctx.reparam = None
    if name in _REPARAM and inputs[1]:
        out = output[0] if isinstance(output, (tuple, list)) else output
        shared = len(inputs) > 2 and not inputs[2][0]        # per model: self not mapped
        ctx.reparam = name, shared
        ctx.save_for_backward(inputs[1][0], out)


def _random_grad(ctx, *grads):
    """torch's formulas: zeros for every tensor input, except a reparameterised sampler's parameter."""
    gs = [None if m is None else torch.zeros(m[0], dtype=m[1], device=m[2]) for m in ctx.likes]
    if ctx.reparam is not None:
        name, shared = ctx.reparam
        x, out = ctx.saved_tensors
        g = _REPARAM[name](x.expand_as(out) if shared else x, out, grads[0])
        gs[0] = g.sum(0) if shared else g               # a shared parameter: every model's share
    return (None, gs, *ctx.extra)


def _gamma_grad(x, out, g):
    return g * torch._standard_gamma_grad(x.contiguous(), out)


def _dirichlet_grad(x, out, g):
    """torch.distributions.dirichlet._Dirichlet's backward (aten's _sample_dirichlet has none; the
    distribution's autograd.Function supplies it, and capture keeps only its forward)."""
    x = x.contiguous()
    total = x.sum(-1, True).expand_as(x)
    return torch._dirichlet_grad(out, x, total) * (g - (out * g).sum(-1, True))


_REPARAM = {"_standard_gamma": _gamma_grad, "_sample_dirichlet": _dirichlet_grad}


random_call.register_autograd(_random_grad, setup_context=_random_grad_ctx)
random_call_per_model.register_autograd(_random_grad, setup_context=_random_grad_ctx)


@torch.library.custom_op("mbcompile::assigned", mutates_args=())
def assigned(new: Tensor, old: Tensor) -> Tensor:
    """``new``'s values with ``old``'s gradient: a parameter changed in place under no_grad in forward
    (``w.clamp_(...)``) is still the leaf eager differentiates, at its new value."""
    return new.clone()


@assigned.register_fake
def _(new, old):
    return torch.empty_like(new)


assigned.register_autograd(lambda ctx, g: (None, g), setup_context=lambda ctx, inputs, output: None)


@torch.library.custom_op("mbcompile::relayout", mutates_args=())
def relayout(x: Tensor, channels_last: bool) -> Tensor:
    """``x.contiguous(memory_format=...)`` whose gradient comes back in x's own strides: so the ops
    on each side of a layout boundary (an NCHW chain meeting a channels-last conv, or a channels-last
    chain seen as B,n,C,H,W meeting a view to n,B,C*H*W) run their backward in the layout their forward
    used, instead of mixing layouts (a copy inside every backward kernel)."""
    return x.clone(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@relayout.register_fake
def _(x, channels_last):
    return x.clone(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _relayout_ctx(ctx, inputs, output):
    ctx.like = inputs[0].shape, inputs[0].stride()


def _relayout_bwd(ctx, grad):
    shape, stride = ctx.like
    return torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device).copy_(grad), None


relayout.register_autograd(_relayout_bwd, setup_context=_relayout_ctx)


@torch.library.custom_op("mbcompile::linear_bmm", mutates_args=())
def linear_bmm(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
    """n,M,I @ (n,O,I)^T (+ n,O) -> n,M,O, as baddbmm. Its own backward gives the weight's gradient
    as g^T @ x, in the weight's n,O,I layout, as torch's linear does per model: autograd's bmm
    backward gives n,I,O, whose transpose AccumulateGrad then copies every step (a strided copy of
    the whole weight: 0.9 ms a step for MLP 784's 16 hidden layers on this CPU)."""
    return linear_bmm_decomposition(x, w, bias)


@linear_bmm.register_fake
def _(x, w, bias):
    return x.new_empty(x.shape[0], x.shape[1], w.shape[1])


def _linear_bmm_ctx(ctx, inputs, output):
    x, w, bias = inputs
    ctx.save_for_backward(x, w)
    ctx.has_bias = bias is not None


def _linear_bmm_bwd(ctx, g):
    x, w = ctx.saved_tensors
    need = ctx.needs_input_grad
    gx = torch.bmm(g, w) if need[0] else None                       # n,M,O @ n,O,I -> n,M,I
    gw = torch.bmm(g.transpose(1, 2), x) if need[1] else None       # n,O,M @ n,M,I -> n,O,I
    gb = g.sum(1) if ctx.has_bias and need[2] else None             # n,M,O -> n,O
    return gx, gw, gb


linear_bmm.register_autograd(_linear_bmm_bwd, setup_context=_linear_bmm_ctx)


def _linear_bmm_vmap(info, in_dims, x, w, bias):
    """Under torch.vmap (torch.func over a batched module): the vmapped dim in front of each operand
    that has it, and broadcasting matmul:  V,n,M,I @ (V,)n,I,O (+ (V,)n,1,O) -> V,n,M,O."""
    x, w = (t.movedim(d, 0) if d is not None else t for t, d in zip((x, w), in_dims[:2]))
    out = torch.matmul(x, w.transpose(-1, -2))
    if bias is not None:
        b = bias.movedim(in_dims[2], 0) if in_dims[2] is not None else bias
        out = out + b.unsqueeze(-2)
    return (out, None) if out.dim() == 3 else (out, 0)      # n,M,O: no operand carried the vmapped dim


linear_bmm.register_vmap(_linear_bmm_vmap)


def linear_bmm_decomposition(x, w, bias=None):
    """What Inductor and make_fx see instead of the op (so compiled programs fuse the bias)."""
    wt = w.transpose(1, 2)
    return torch.bmm(x, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, wt)


# ---- eager execution: the same ops without the custom-op dispatch ---------------------------------
# A batched program runs eagerly as a GraphModule of the ops above. In eager mode a custom op's
# dispatch (schema checks, the autograd kernel, version bumps) costs 10-40 us a call, more than a
# small op itself (a per-model dropout draw at n=2: 76 us against 40 us for its Python body). For eager
# execution those nodes call the same Python functions directly; compiled programs keep the ops.

def _as_function(op):
    """An autograd.Function running ``op``'s own implementation, setup_context and backward."""
    fn = type(f"Eager_{op._name}", (torch.autograd.Function,), {
        "forward": staticmethod(lambda *args: op._init_fn(*args)),
        "setup_context": staticmethod(op._setup_context_fn),
        "backward": staticmethod(op._backward_fn),
    })

    def call(*args):                  # a plain function: FX's code generation names it
        return fn.apply(*args)
    call.__name__ = f"eager_{op._name}"
    return call


def _no_grad(op):
    """A random draw: its result carries no gradient (a custom op without autograd neither)."""
    def call(*args):
        with torch.no_grad():
            return op._init_fn(*args)
    call.__name__ = f"eager_{op._name}"
    return call


EAGER = {linear_bmm._opoverload: _as_function(linear_bmm), relayout._opoverload: _as_function(relayout),
         draw_per_model._opoverload: _no_grad(draw_per_model)}


def eager_module(gm):
    """``gm`` with the nodes of EAGER calling their Python functions (``gm`` itself if it has none)."""
    import torch.fx as fx
    if not any(nd.op == "call_function" and nd.target in EAGER for nd in gm.graph.nodes):
        return gm
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    graph.output(graph.graph_copy(gm.graph, {}))
    for nd in graph.nodes:
        if nd.op == "call_function" and nd.target in EAGER:
            names = [a.name for a in nd.target._schema.arguments]     # apply() takes positions only
            pos = list(nd.args) + [nd.kwargs.get(k, a.default_value) for k, a in
                                   zip(names[len(nd.args):], nd.target._schema.arguments[len(nd.args):])]
            nd.args, nd.kwargs, nd.target = tuple(pos), {}, EAGER[nd.target]
    return fx.GraphModule(gm, graph)


def _keep_unused_draws():
    from torch._higher_order_ops.effects import _EffectType, _register_effectful_op
    for op in (dropout, draw, random_call):
        _register_effectful_op(op._opoverload, _EffectType.ORDERED)


_keep_unused_draws()
