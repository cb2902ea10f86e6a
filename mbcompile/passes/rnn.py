"""Recurrent layers: LSTM, GRU, RNN (tanh/relu) and their cells, lowered to unrolled batched cells.

Per layer and direction (G = 4H for LSTM, 3H for GRU, H for RNN; P = proj_size or H)::

    shared x:     T,B,I  @ (n*G),I^T + b     -> one addmm             -> T,B,n,G
    per-model x:  n,T,B,I @ n,I,G + b        -> one baddbmm           -> n,T,B,G
    each step t:  gates = baddbmm(gx[t], h, W_hh^T)   n,B,G + n,B,P @ n,P,G   -> n,B,G
                  then the gate math exactly as torch (LSTM i,f,g,o; GRU r,z,n; tanh/relu)
    outputs:      stack over t -> n,T,B,P; directions cat -> n,T,B,D*P; layers chain (dropout between)

The input projection of every timestep is hoisted out of the loop; only ``h @ W_hh^T`` is per step.
Inter-layer dropout reuses the dropout rule of ``random.py`` on the time-major layer output (T,B,D*P,
where eager CPU torch draws its mask), so "sequential" masks equal each model's own.
Results: (output, h_n[, c_n]) with the model dim in front, exactly torch's shapes otherwise.

One exception, measured: a plain float32 or bfloat16 LSTM layer on CPU runs torch's own fused oneDNN
kernel instead (``mbcompile::lstm_fused``, one graph op with its own backward op), model after model or,
from SPREAD_MIN_MACS of work per model, with the models split over the cores (cores.py): _choose. A
bfloat16 LSTM (or one under CPU autocast, where torch runs LSTM and RNN whole in the autocast dtype)
thus gets oneDNN's numbers, as the model alone does.
PackedSequence inputs are refused with a clear error (capture fails inside the RNN module's forward).
"""
from __future__ import annotations

import os
from typing import List, Tuple

import torch
from torch import Tensor

from .. import cores, lowering
from ..errors import UnsupportedOpError, source_line
from .axes import front, pdim, per_model
from .registry import RuleCtx, aten, rule

mb = torch.ops.mbcompile

_MODES = {aten.gru.input: "gru", aten.rnn_tanh.input: "tanh", aten.rnn_relu.input: "relu",
          aten.gru_cell.default: "gru", aten.rnn_tanh_cell.default: "tanh",
          aten.rnn_relu_cell.default: "relu", aten.lstm_cell.default: "lstm"}


def _full_args(ctx, args, kwargs):
    """Positional args completed from kwargs and the schema's defaults."""
    schema = ctx.op._schema.arguments
    return list(args) + [kwargs.get(a.name, a.default_value) for a in schema[len(args):]]


# ---- the two halves of a cell ------------------------------------------------------------------------

def _project(x, dx, w_ih, bias, n, time_axis):
    """Input projection of all timesteps at once. x: [T,]B,I (shared) or n,[T,]B,I; returns the steps
    as a list of n,B,G (one entry when time_axis is None). ``time_axis`` is x's logical time axis."""
    g, i = w_ih.shape[1], w_ih.shape[2]
    if dx is None:                                     # *,I @ (n*G),I^T -> *,n*G -> *,n,G
        x2 = x.reshape(-1, i)
        w2 = w_ih.reshape(n * g, i).t()
        y = torch.mm(x2, w2) if bias is None else torch.addmm(bias.reshape(n * g), x2, w2)
        y = y.view(*x.shape[:-1], n, g)
        steps = [y] if time_axis is None else list(y.unbind(time_axis))
        return [s.movedim(-2, 0) for s in steps]      # B,n,G -> n,B,G
    x = front(x, dx, n)                                # n,*,I @ n,I,G -> n,*,G
    x3 = x.reshape(n, -1, i)
    wt = w_ih.transpose(1, 2)
    y = torch.bmm(x3, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), x3, wt)
    y = y.view(*x.shape[:-1], g)
    return [y] if time_axis is None else list(y.unbind(time_axis + 1))


def _step(mode, gx, h, c, whh_t, b_hh, whr_t):
    """One cell step. gx: n,B,G (input projection, biases folded in except GRU's b_hh);
    h: n,B,P or B,P (shared); c: n,B,H or B,H. Returns (h, c)."""
    if mode == "lstm":
        gates = torch.baddbmm(gx, _batched(h, gx), whh_t)   # n,B,4H
        i, f, g, o = gates.chunk(4, -1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c = f * c + i * g
        h = o * c.tanh()
        if whr_t is not None:                               # n,B,H @ n,H,P -> n,B,P
            h = torch.bmm(h, whr_t)
        return h, c
    hb = _batched(h, gx)
    if mode == "gru":                                       # r,z,n = torch's gate order
        gh = torch.bmm(hb, whh_t) if b_hh is None else torch.baddbmm(b_hh.unsqueeze(1), hb, whh_t)
        xr, xz, xn = gx.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r = (xr + hr).sigmoid()
        z = (xz + hz).sigmoid()
        new = (xn + r * hn).tanh()
        return (h - new) * z + new, None
    pre = torch.baddbmm(gx, hb, whh_t)
    return (pre.tanh() if mode == "tanh" else pre.relu()), None


def _batched(h, like):
    """A shared B,P state as n,B,P (an expanded view) for bmm."""
    return h if h.dim() == 3 else h.unsqueeze(0).expand(like.shape[0], *h.shape)


# ---- full layers ---------------------------------------------------------------------------------

# under CPU autocast torch runs these whole in the lower precision (autocast casts their inputs and
# weights); a GRU is not on autocast's list: alone, its linears meet autocast one by one, as here
_AUTOCAST_WHOLE = ("lstm", "tanh", "relu")


def _layers(ctx, mode, x, dx, h0, dh, c0, dc, params, dparams, has_biases, num_layers, p, train,
            bidirectional, batch_first):
    dev = x.device.type
    if mode in _AUTOCAST_WHOLE and dev == "cpu" and torch.is_autocast_enabled(dev):
        low = torch.get_autocast_dtype(dev)
        cast = lambda t: t.to(low) if isinstance(t, Tensor) and t.is_floating_point() else t  # noqa: E731
        ctx.own_dtype = True                         # the capture recorded float32 results; alone: low
        with torch.autocast(dev, enabled=False):     # n,.. all in bf16, as the op alone sees them
            return _layers(ctx, mode, cast(x), dx, cast(h0), dh, cast(c0), dc, [cast(t) for t in params],
                           dparams, has_biases, num_layers, p, train, bidirectional, batch_first)
    n = ctx.n
    D = 2 if bidirectional else 1
    w = [front(t, d, n) for t, d in zip(params, dparams)]      # each n,*shape
    proj = mode == "lstm" and h0.shape[-1] != c0.shape[-1]
    per = 2 + 2 * bool(has_biases) + int(proj)
    if len(w) != per * num_layers * D:
        raise NotImplementedError(f"{len(w)} weights for {num_layers} layers x {D} directions")
    h0 = h0 if dh is None else front(h0, dh, n)                  # L*D,B,P or n,L*D,B,P
    c0 = c0 if dc is None or c0 is None else front(c0, dc, n)
    ps = _dropout_rates(ctx, p)
    inp, dinp, bf = x, dx, batch_first                           # bf: the layout of inp
    h_n, c_n, how = [], [], set()
    for layer in range(num_layers):
        wl = w[layer * D * per:(layer + 1) * D * per]
        sl = slice(layer * D, (layer + 1) * D)
        hl = (h0[sl], dh) if dh is None else (h0[:, sl], 0)
        cl = None if c0 is None else ((c0[sl], dc) if dc is None else (c0[:, sl], 0))
        choice = _choose(mode, proj, inp, dinp, wl, D, bf, train, n, has_biases)
        how.add(choice)
        layer_fn = _LAYER_FNS[choice]
        last = layer == num_layers - 1                          # between layers: time-major where it can
        inp, hs, cs, bf = layer_fn(mode, n, inp, dinp, wl, per, hl, cl, has_biases, proj, train, D, bf,
                                   batch_first and last)
        dinp = 0
        h_n += hs
        c_n += cs
        if train and not last and any(v > 0 for v in ps):
            inp = _inter_layer_dropout(ctx, inp, ps, bf)
    if bf != batch_first:                                       # n,T,B,F <-> n,B,T,F (a view)
        inp = inp.transpose(1, 2)
    steps = x.shape[pdim(1 if batch_first else 0, 3, dx)]
    ctx.note(f"{mode}: {num_layers} layer(s) x {D} direction(s), {steps} steps: " + " + ".join(
        sorted({"cells": "unrolled batched cells (input projection hoisted, per step baddbmm over models)",
                "fused": "per-model fused kernel (torch's own, oneDNN on CPU), model after model",
                "spread": f"per-model fused kernel (torch's own, oneDNN on CPU), the models split over "
                          f"{cores.workers(n)} worker threads (cores.py)"}[h]
               for h in how)))
    out = (inp, torch.stack(h_n, 1)) + ((torch.stack(c_n, 1),) if mode == "lstm" else ())
    return out, tuple(0 for _ in out)


def _cells_layer(mode, n, inp, dinp, wl, per, hl, cl, has_biases, proj, train, D, batch_first, _out_bf=None):
    """One layer, every direction, as unrolled batched cells. Returns (n,T,B,D*P (batch_first:
    n,B,T,D*P), [h_n per direction: n,B,P], [c_n per direction], batch_first): the input's layout."""
    tax = 1 if batch_first else 0                               # time axis of the layer input
    outs, hs, cs = [], [], []
    for d in range(D):
        wk = wl[d * per:(d + 1) * per]
        w_ih, w_hh = wk[0], wk[1]
        b_ih, b_hh = (wk[2], wk[3]) if has_biases else (None, None)
        whr = wk[-1] if proj else None
        bias = None if b_ih is None else (b_ih if mode == "gru" else b_ih + b_hh)
        steps = _project(inp, dinp, w_ih, bias, n, tax)
        whh_t = w_hh.transpose(1, 2)                            # n,P,G
        whr_t = None if whr is None else whr.transpose(1, 2)    # n,H,P
        h = hl[0][d] if hl[1] is None else hl[0][:, d]          # B,P or n,B,P
        c = None if cl is None else (cl[0][d] if cl[1] is None else cl[0][:, d])
        ys = [None] * len(steps)
        order = range(len(steps) - 1, -1, -1) if d == 1 else range(len(steps))
        for t in order:
            h, c = _step(mode, steps[t], h, c, whh_t, b_hh if mode == "gru" else None, whr_t)
            ys[t] = h
        outs.append(torch.stack(ys, tax + 1))                   # n,T,B,P (batch_first: n,B,T,P)
        hs.append(_batched(h, ys[0]))
        if mode == "lstm":
            cs.append(_batched(c, ys[0]))
    return (outs[0] if D == 1 else torch.cat(outs, -1)), hs, cs, batch_first


def _fused_layer(mode, n, inp, dinp, wl, per, hl, cl, has_biases, proj, train, D, batch_first, out_bf,
                 spread=False):
    """One LSTM layer, every direction, through torch's own fused CPU kernel (oneDNN), model after
    model inside one op (mbcompile::lstm_fused below), or with ``spread`` the models split over the
    cores. Same returns as _cells_layer, the output in layout ``out_bf``."""
    x = (inp if dinp is None else front(inp, dinp, n)).contiguous()   # [n,]T,B,I (batch_first: [n,]B,T,I)
    outs, hs, cs = [], [], []
    for d in range(D):
        w_ih, w_hh, b_ih, b_hh = (t.contiguous() for t in wl[d * per:d * per + 4])
        h = hl[0][d] if hl[1] is None else hl[0][:, d]          # B,H or n,B,H
        c = cl[0][d] if cl[1] is None else cl[0][:, d]
        out, hy, cy, _ = mb.lstm_fused(x, h.contiguous(), c.contiguous(), w_ih, w_hh, b_ih, b_hh, d == 1, train,
                                       spread, batch_first, out_bf)
        outs.append(out)                                        # n,T,B,H (out_bf: n,B,T,H)
        hs.append(hy)
        cs.append(cy)
    return (outs[0] if D == 1 else torch.cat(outs, -1)), hs, cs, out_bf


def _spread_layer(*args):
    return _fused_layer(*args, spread=True)


_LAYER_FNS = {"cells": _cells_layer, "fused": _fused_layer, "spread": _spread_layer}


# mbcompile::lstm_fused: n LSTM layers (one direction) run by torch's fused CPU kernel one model after the
# other, as ONE graph op with its own backward op, so that it survives make_fx and torch.compile (the bare
# aten.mkldnn_rnn_layer does not: its fake workspace is empty).
#   x: T,B,I (shared) or n,T,B,I (batch_first: B,T,I or n,B,T,I); h0, c0: B,H (shared) or n,B,H;
#   weights n,4H,I / n,4H,H / n,4H
#   -> out n,T,B,H (out_batch_first: n,B,T,H); hy, cy n,B,H; n workspaces (uint8, what the backward needs)
# oneDNN's kernel reads its tensors as contiguous time-major ones (a strided view gives wrong numbers), so
# batch_first slices are transposed per model, on the thread that runs it, while in cache. Between two
# layers the output stays time-major (out_batch_first=False): the next layer reads it as it is.

def _tm(t, batch_first):
    """A contiguous time-major [T,B,*] tensor from a slice in the given layout (no copy when it is one)."""
    return (t.transpose(0, 1) if batch_first else t).contiguous()


def _models(t, rank, n):
    """Model i's slice of a per-model tensor for every i (a shared one, of the unbatched rank, n times)."""
    return per_model(t, t.dim() == rank, n)


def _inputs(x, batch_first, n):
    """Model i's input as oneDNN reads it, contiguous time-major, as a function of i: a shared x is
    transposed once here, a per-model slice on the thread that runs it (while in cache)."""
    if x.dim() == 3:
        shared = _tm(x, batch_first)
        return lambda i: shared
    xs = x.unbind(0)
    return lambda i: _tm(xs[i], batch_first)


def _unbind_all(*ws):
    return tuple(w.unbind(0) for w in ws)


@torch.library.custom_op("mbcompile::lstm_fused", mutates_args=())
def lstm_fused(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor,
               reverse: bool, train: bool, spread: bool, batch_first: bool, out_batch_first: bool
               ) -> Tuple[Tensor, Tensor, Tensor, List[Tensor]]:
    """n one-direction LSTM layers, each model by torch's fused CPU kernel (what nn.LSTM runs alone);
    ``spread``: the models split over the cores (cores.map_models), one kernel per core at a time."""
    n, hid = w_ih.shape[0], w_hh.shape[-1]
    t, b = x.shape[-3:-1] if not batch_first else reversed(x.shape[-3:-1])
    out = x.new_empty(n, b, t, hid) if out_batch_first else x.new_empty(n, t, b, hid)
    xi = _inputs(x, batch_first, n)
    hs, cs, outs = _models(h0, 2, n), _models(c0, 2, n), out.unbind(0)
    ws = _unbind_all(w_ih, w_hh, b_ih, b_hh)

    def one(i):                                                 # model i's output written while in cache
        with torch.enable_grad():                               # without grad mode: no workspace
            res = aten.mkldnn_rnn_layer(xi(i), *(w[i] for w in ws), hs[i], cs[i], reverse, [], 2, hid, 1, True,
                                        False, False, train)
        with torch.no_grad():
            outs[i].copy_(res[0].transpose(0, 1) if out_batch_first else res[0])
        return res[1:]

    res = cores.map_models(one, n, None if spread else 1)
    with torch.no_grad():
        hy, cy = torch.stack([r[0] for r in res]), torch.stack([r[1] for r in res])
    return out, hy, cy, [r[2] for r in res]                     # workspaces: not copied


@lstm_fused.register_fake
def _(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, train, spread, batch_first, out_batch_first):
    n, hid = w_ih.shape[0], w_hh.shape[-1]
    t, b = x.shape[-3:-1] if not batch_first else reversed(x.shape[-3:-1])
    s = _workspace_size(t, b, x.shape[-1], hid, x.dtype, train)
    out = x.new_empty(n, b, t, hid) if out_batch_first else x.new_empty(n, t, b, hid)
    return (out, x.new_empty(n, b, hid), x.new_empty(n, b, hid), [x.new_empty(s, dtype=torch.uint8) for _ in range(n)])


_WS: dict = {}


def _workspace_size(t, b, i, hid, dtype, train):
    """oneDNN's workspace size for these shapes (its meta kernel says 0): probed once on zeros."""
    key = (t, b, i, hid, dtype, train)
    if key not in _WS:
        with torch.utils._python_dispatch._disable_current_modes(), torch.enable_grad():
            z = lambda *shape: torch.zeros(shape, dtype=dtype)  # noqa: E731
            _WS[key] = aten.mkldnn_rnn_layer(z(t, b, i), z(4 * hid, i), z(4 * hid, hid), z(4 * hid), z(4 * hid),
                                             z(b, hid), z(b, hid), False, [], 2, hid, 1, True, False, False,
                                             train)[3].numel()
    return _WS[key]


@torch.library.custom_op("mbcompile::lstm_fused_backward", mutates_args=())
def lstm_fused_backward(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor,
                        out: Tensor, hy: Tensor, cy: Tensor, workspace: List[Tensor], g_out: Tensor, g_hy: Tensor,
                        g_cy: Tensor, reverse: bool, train: bool, spread: bool, batch_first: bool,
                        out_batch_first: bool, needs: List[bool]) -> List[Tensor]:
    """Gradients of lstm_fused for (x, h0, c0, w_ih, w_hh, b_ih, b_hh); shared x, h0, c0 sum over models.
    ``needs`` says which of x, h0, c0 want one: the others get an empty tensor (nothing copied)."""
    n, hid = w_ih.shape[0], w_hh.shape[-1]
    gx = x.new_empty(n, *x.shape[-3:]) if needs[0] else None                     # n,*: then summed if shared
    xi = _inputs(x, batch_first, n)
    hs, cs = _models(h0, 2, n), _models(c0, 2, n)
    ws = _unbind_all(w_ih, w_hh, b_ih, b_hh)
    saved = _unbind_all(out, hy, cy, g_out, g_hy, g_cy)

    @torch.no_grad()
    def one(i):                                                 # model i's input gradient written while in cache
        o, y, c, go, gy, gc = (t[i] for t in saved)
        res = aten.mkldnn_rnn_layer_backward(xi(i), *(w[i] for w in ws), hs[i], cs[i], _tm(o, out_batch_first), y,
                                             c, _tm(go, out_batch_first), gy.contiguous(), gc.contiguous(), reverse,
                                             2, hid, 1, True, train, False, [], False, workspace[i])
        if gx is not None:
            gx[i].copy_(res[0].transpose(0, 1) if batch_first else res[0])
        return res[1:]

    res = cores.map_models(one, n, None if spread else 1)
    with torch.no_grad():
        stack = lambda k: torch.stack([r[k] for r in res])     # noqa: E731
        fold = lambda g, like, rank: g if like.dim() > rank else g.sum(0)  # noqa: E731
        none = lambda: x.new_empty(0)                          # noqa: E731  (outputs may not alias)
        return [fold(gx, x, 3) if needs[0] else none(), fold(stack(4), h0, 2) if needs[1] else none(),
                fold(stack(5), c0, 2) if needs[2] else none(), stack(0), stack(1), stack(2), stack(3)]


@lstm_fused_backward.register_fake
def _(x, h0, c0, w_ih, w_hh, b_ih, b_hh, out, hy, cy, workspace, g_out, g_hy, g_cy, reverse, train, spread,
      batch_first, out_batch_first, needs):
    return [torch.empty_like(t) if need else x.new_empty(0) for t, need in zip((x, h0, c0), needs)] + \
        [torch.empty_like(t) for t in (w_ih, w_hh, b_ih, b_hh)]


def _fused_setup(ctx, inputs, output):
    out, hy, cy, ws = output
    ctx.mark_non_differentiable(*ws)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs[:7], out, hy, cy, *ws)
    ctx.flags = inputs[7:]                                      # reverse, train, spread, batch_first, out_bf


def _fused_backward(ctx, g_out, g_hy, g_cy, _g_ws):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, out, hy, cy, *ws = ctx.saved_tensors
    g_out = torch.zeros_like(out) if g_out is None else g_out
    g_hy = torch.zeros_like(hy) if g_hy is None else g_hy
    g_cy = torch.zeros_like(cy) if g_cy is None else g_cy
    needs = list(ctx.needs_input_grad[:3])
    grads = mb.lstm_fused_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, out, hy, cy, ws, g_out, g_hy, g_cy,
                                   *ctx.flags, needs)
    return (*(g if need else None for g, need in zip(grads[:3], needs)), *grads[3:], None, None, None, None, None)


lstm_fused.register_autograd(_fused_backward, setup_context=_fused_setup)


# ---- lowering choice -----------------------------------------------------------------------------

# "spread" is taken from this much work per model and layer (forward multiply-adds, T*B*4H*(I+H)); below
# it the fixed costs (thread handoff, the GIL between kernels, the caller's OpenMP team restarting) outweigh.
# Measured, 2-core EPYC, n=16, in the training step: a 2-layer LSTM with H=64, T=20, B=32 (13M and 21M)
# 34.2 ms spread against 31.1 fused; the char-LSTM (T=32, B=32, H=128: 84M) 39-47 against 43-55; op level,
# forward+backward, spread 3-18% ahead at 262M-3.8G. Over all models at least SPREAD_MIN_TOTAL_MACS too: a
# hand-off to the workers can stall the caller's next parallel ops by ~7 ms (its OpenMP team restarting:
# docs/performance.md, stop 22), which fewer models do not win back. The char-LSTM (84M a model), step ms:
# n=4 sequential 11.4, fused 13.2, spread 15.6-20.4; n=8 23.0 / 23.9 / 23.5 (a 61.7 round); n=16 44.8 /
# 43.3 / 40.4; n=32 91.7 / 85.0 / 81.8.
SPREAD_MIN_MACS = 40_000_000
SPREAD_MIN_TOTAL_MACS = 1_000_000_000


def _choose(mode, proj, x, dx, wl, D, batch_first, train, n, has_biases=True):
    """"cells", "fused" or "spread" (fused, the models split over the cores: cores.py). Only a plain
    LSTM (biases, no proj_size) on CPU in float32 or bfloat16 can use torch's fused kernel (oneDNN),
    and there it is taken (spread from SPREAD_MIN_MACS of work per model and SPREAD_MIN_TOTAL_MACS over
    the models): a cost rule, not a timing.
    Timing one layer alone misjudged both races in the step (docs/rnn.md): the cells timed 5% ahead of
    the fused kernel for a small layer and ran the step 34% slower; spread timed 4-11% behind fused
    for the char-LSTM layer and ran the step 10-28% faster. ``MBCOMPILE_RNN_LOWERING=cells|fused|spread``
    or ``MBCOMPILE_LOWERING=rnn=...`` forces one; ``MBCOMPILE_LOWERING=default`` takes "fused"."""
    if mode != "lstm" or proj or not has_biases or x.device.type != "cpu" \
            or x.dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return "cells"
    forced = os.environ.get("MBCOMPILE_RNN_LOWERING") or lowering._setting("rnn")
    if forced in _LAYER_FNS:
        return forced
    if forced == "default":
        return lowering.DEFAULTS["rnn"]
    t, b = (x.shape if dx is None else front(x, dx, n).shape[1:])[:2]
    macs = t * b * wl[0].shape[-2] * (wl[0].shape[-1] + wl[1].shape[-1])   # one model's forward
    return "spread" if cores.workers(n) > 1 and macs >= SPREAD_MIN_MACS and n * macs >= SPREAD_MIN_TOTAL_MACS \
        else "fused"


def _dropout_rates(ctx, p):
    """Inter-layer dropout rate per model (a list of n when the models' rates differ), else [p]."""
    per = ctx.per_model("dropout")
    return list(per) if per else [p]


def _inter_layer_dropout(ctx, y, ps, batch_first):
    """Eager CPU torch drops the time-major layer output T,B,D*P (batch_first is undone first)."""
    from .random import dropout
    tm = y.transpose(1, 2) if batch_first else y               # n,T,B,F
    sub = RuleCtx(n=ctx.n, op=ctx.op, node=None, consts=ctx.consts, rng=ctx.rng, notes=ctx.notes)
    out, _ = dropout(sub, (tm, ps, "plain"), (0, None, None), {})
    return out.transpose(1, 2) if batch_first else out


@rule(aten.lstm.input)
def lstm(ctx, args, dims, kwargs):
    """lstm(x, [h0, c0], params, has_biases, layers, dropout, train, bidirectional, batch_first)."""
    x, hx, params, has_biases, num_layers, p, train, bidir, batch_first = _full_args(ctx, args, kwargs)
    (h0, c0), (dh, dc) = hx, dims[1]
    return _layers(ctx, "lstm", x, dims[0], h0, dh, c0, dc, params, dims[2], has_biases, num_layers, p,
                   train, bidir, batch_first)


@rule(aten.gru.input, aten.rnn_tanh.input, aten.rnn_relu.input)
def rnn(ctx, args, dims, kwargs):
    """gru / rnn_tanh / rnn_relu(x, h0, params, has_biases, layers, dropout, train, bidirectional,
    batch_first)."""
    x, h0, params, has_biases, num_layers, p, train, bidir, batch_first = _full_args(ctx, args, kwargs)
    return _layers(ctx, _MODES[ctx.op], x, dims[0], h0, dims[1], None, None, params, dims[2], has_biases,
                   num_layers, p, train, bidir, batch_first)


# ---- cells ---------------------------------------------------------------------------------------

@rule(aten.lstm_cell.default, aten.gru_cell.default, aten.rnn_tanh_cell.default, aten.rnn_relu_cell.default)
def cell(ctx, args, dims, kwargs):
    """*_cell(x: B,I, hx, w_ih, w_hh, b_ih, b_hh): one step, x @ W_ih^T as one matmul over models."""
    x, hx, w_ih, w_hh, b_ih, b_hh = _full_args(ctx, args, kwargs)
    dims = list(dims) + [None] * (6 - len(dims))
    n, mode = ctx.n, _MODES[ctx.op]
    w_ih, w_hh = front(w_ih, dims[2], n), front(w_hh, dims[3], n)
    b_ih = None if b_ih is None else front(b_ih, dims[4], n)
    b_hh = None if b_hh is None else front(b_hh, dims[5], n)
    if mode == "lstm":
        (h, c), (dh, dc) = hx, dims[1]
        c = c if dc is None else front(c, dc, n)
    else:
        h, dh, c = hx, dims[1], None
    h = h if dh is None else front(h, dh, n)
    if mode == "gru":                                   # GRU keeps b_hh inside r * (h W_hn^T + b_hn)
        bias = b_ih
    else:
        bias = b_hh if b_ih is None else (b_ih if b_hh is None else b_ih + b_hh)
    (gx,) = _project(x, dims[0], w_ih, bias, n, None)
    h, c = _step(mode, gx, h, c, w_hh.transpose(1, 2), b_hh if mode == "gru" else None, None)
    ctx.note(f"{mode} cell: input matmul over models, then one baddbmm step")
    if mode == "lstm":
        return (h, c), (0, 0)
    return h, 0


# ---- PackedSequence ------------------------------------------------------------------------------

_PACKED_MSG = ("mbcompile does not support PackedSequence inputs to nn.LSTM / nn.GRU / nn.RNN "
               "(their per-step batch sizes are data, which one captured graph cannot hold). Pass the "
               "padded batch [T, B, ...] instead and mask the padded steps in the loss (or pick each "
               "sequence's last valid output with torch.gather).")


@rule(aten.lstm.data, aten.gru.data, aten.rnn_tanh.data, aten.rnn_relu.data)
def packed(ctx, args, dims, kwargs):
    raise UnsupportedOpError(f"{_PACKED_MSG}\nAt {source_line(ctx.node)}")


def packed_sequence_in(exc) -> bool:
    """True when an exception was raised inside an RNN module's forward that got a PackedSequence
    (capture uses this to explain a failed export)."""
    from torch.nn.utils.rnn import PackedSequence
    tb = exc.__traceback__
    while tb is not None:
        f = tb.tb_frame
        if f.f_code.co_filename.replace("\\", "/").endswith("torch/nn/modules/rnn.py"):
            if any(isinstance(v, PackedSequence) for v in f.f_locals.values()):
                return True
        tb = tb.tb_next
    return False


PACKED_SEQUENCE_MESSAGE = _PACKED_MSG
