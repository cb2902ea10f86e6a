"""Recurrent layers (passes/rnn.py): every variant of nn.LSTM / nn.GRU / nn.RNN and the cells, batched
with strict=True (so the rule ran, no fallback), against each model run alone: outputs and parameter
gradients in float64 to 1e-9; inter-layer dropout against each model alone after manual_seed(seeds[i])."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils import _pytree as pytree

import mbcompile
from mbcompile.passes import rnn as rnn_pass

T, B, I, H = 4, 2, 3, 5
F64 = torch.float64


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*were assigned during export.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def _slice(inputs, in_dims, i):
    dims = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(inputs)
    return [pytree.tree_map(lambda t: t[i], x) if d == 0 else x for x, d in zip(inputs, dims)]


def check(make, inputs, *, n=3, in_dims=None, train=False, seeds=None, dtype=F64, tol=1e-9, calls=1,
          models=None):
    """Batch n models built by make() (strict) and compare outputs and parameter grads with each alone."""
    models = models or [make().to(dtype) for _ in range(n)]
    n = len(models)
    refs = [copy.deepcopy(m).train(train) for m in models]
    batched = mbcompile.batch(models, in_dims=in_dims, seeds=seeds, strict=True).train(train)
    outs = []
    for _ in range(calls):
        out = pytree.tree_leaves(batched(*inputs))
        weights = [torch.randn_like(o) for o in out]
        sum((o * w).sum() for o, w in zip(out, weights)).backward()
        outs.append((out, weights))
    for i, ref in enumerate(refs):
        if seeds is not None:
            torch.manual_seed(seeds[i])
        for out, weights in outs:
            got = pytree.tree_leaves(ref(*_slice(inputs, in_dims, i)))
            assert len(got) == len(out)
            for o, g in zip(out, got):
                assert o.shape[1:] == g.shape
                torch.testing.assert_close(o[i], g, rtol=tol, atol=tol)
            sum((g * w[i]).sum() for g, w in zip(got, weights)).backward()
        for name, p in ref.named_parameters():
            torch.testing.assert_close(batched.get_parameter(name).grad[i], p.grad, rtol=tol, atol=tol,
                                       msg=lambda m, name=name, i=i: f"grad of {name}, model {i}: {m}")
    return batched


KINDS = {"lstm": lambda **k: nn.LSTM(I, H, **k), "gru": lambda **k: nn.GRU(I, H, **k),
         "rnn_tanh": lambda **k: nn.RNN(I, H, **k), "rnn_relu": lambda **k: nn.RNN(I, H, nonlinearity="relu", **k)}
SHAPES = [(1, False, False), (2, True, True), (2, False, True), (1, True, False)]  # layers, bidirectional, batch_first


@pytest.mark.parametrize("layers,bidirectional,batch_first", SHAPES)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_layers_match_each_model(kind, layers, bidirectional, batch_first):
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=F64)
    b = check(lambda: KINDS[kind](num_layers=layers, bidirectional=bidirectional, batch_first=batch_first),
              (x,))
    assert "unrolled batched cells" in str(mbcompile.explain(b))


def test_lstm_proj_size():
    x = torch.randn(B, T, I, dtype=F64)
    check(lambda: nn.LSTM(I, H, num_layers=2, proj_size=2, bidirectional=True, batch_first=True), (x,))


def test_no_bias_and_per_model_input():
    x = torch.randn(3, T, B, I, dtype=F64)                      # in_dims=0: each model its own sequence
    check(lambda: nn.LSTM(I, H, num_layers=2, bias=False), (x,), in_dims=0)
    check(lambda: nn.GRU(I, H, bias=False, batch_first=True), (x,), in_dims=0)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_given_initial_state_shared_and_per_model(kind):
    x = torch.randn(T, B, I, dtype=F64)
    h0 = torch.randn(4, B, H, dtype=F64)                        # 2 layers x 2 directions
    state = (h0, torch.randn(4, B, H, dtype=F64)) if kind == "lstm" else h0
    make = lambda: KINDS[kind](num_layers=2, bidirectional=True)  # noqa: E731
    check(make, (x, state))                                     # shared h0 (and c0)
    per_model = pytree.tree_map(lambda t: torch.randn(3, *t.shape, dtype=F64), state)
    check(make, (x, per_model), in_dims=(None, 0))              # h0 per model, x shared


def test_per_model_initial_state_gets_its_gradient():
    models = [nn.GRU(I, H).double() for _ in range(3)]
    refs = copy.deepcopy(models)
    x = torch.randn(T, B, I, dtype=F64)
    h0 = torch.randn(3, 1, B, H, dtype=F64, requires_grad=True)
    out, hn = mbcompile.batch(models, in_dims=(None, 0), strict=True)(x, h0)
    (out.sum() + hn.square().sum()).backward()
    for i, r in enumerate(refs):
        hi = h0.detach()[i].clone().requires_grad_()
        o, h = r(x, hi)
        (o.sum() + h.square().sum()).backward()
        torch.testing.assert_close(h0.grad[i], hi.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_relu"])
def test_unbatched_input(kind):
    x = torch.randn(T, I, dtype=F64)                            # no batch dim
    check(lambda: KINDS[kind](num_layers=2, bidirectional=True), (x,))
    h0 = torch.randn(3, 2, H, dtype=F64)
    state = (h0, torch.randn(3, 2, H, dtype=F64)) if kind == "lstm" else h0
    check(lambda: KINDS[kind](num_layers=2), (x, state), in_dims=(None, 0))


CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn_tanh": nn.RNNCell,
         "rnn_relu": lambda i, h, **k: nn.RNNCell(i, h, nonlinearity="relu", **k)}


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_cells(kind):
    make = lambda **k: CELLS[kind](I, H, **k)  # noqa: E731
    x = torch.randn(B, I, dtype=F64)
    b = check(make, (x,))
    assert "cell" in str(mbcompile.explain(b))
    h = torch.randn(3, B, H, dtype=F64)
    state = (h, torch.randn(3, B, H, dtype=F64)) if kind == "lstm" else h
    check(make, (torch.randn(3, B, I, dtype=F64), state), in_dims=0)      # per-model input and state
    check(lambda: make(bias=False), (torch.randn(I, dtype=F64),))         # unbatched, no bias


class CellLoop(nn.Module):
    """A cell stepped by hand over a sequence (the usual way cells are used)."""

    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(I, H)
        self.out = nn.Linear(H, 2)

    def forward(self, xs):
        h = c = torch.zeros(xs.shape[1], H, dtype=xs.dtype)
        for x in xs.unbind(0):
            h, c = self.cell(x, (h, c))
        return self.out(h)


def test_cell_in_a_loop():
    check(CellLoop, (torch.randn(T, B, I, dtype=F64),))


SEEDS = [11, 22, 33]


@pytest.mark.parametrize("make", [
    lambda: nn.LSTM(I, H, num_layers=3, dropout=0.5, batch_first=True),
    lambda: nn.GRU(I, H, num_layers=2, dropout=0.3, bidirectional=True),
    lambda: nn.RNN(I, H, num_layers=2, dropout=0.4, nonlinearity="relu", batch_first=True),
], ids=["lstm3_bf", "gru2_bi", "rnn2_relu"])
def test_inter_layer_dropout_matches_each_model_with_its_seed(make):
    x = torch.randn(B, T, I, dtype=F64)
    check(make, (x,), train=True, seeds=SEEDS, calls=2)


def test_inter_layer_dropout_rate_per_model():
    models = [nn.LSTM(I, H, num_layers=2, dropout=p).double() for p in (0.0, 0.3, 0.7)]
    check(None, (torch.randn(T, B, I, dtype=F64),), train=True, seeds=SEEDS, models=models)


def test_eval_mode_has_no_inter_layer_dropout():
    check(lambda: nn.LSTM(I, H, num_layers=2, dropout=0.9), (torch.randn(T, B, I, dtype=F64),), train=False)


def test_randomness_modes_different_and_same():
    m = nn.GRU(I, 64, num_layers=2, dropout=0.5).double()
    x = torch.randn(T, B, I, dtype=F64)
    diff = mbcompile.batch(m, n=2, randomness="different", strict=True).train()(x)[0]
    assert not torch.allclose(diff[0], diff[1])
    same = mbcompile.batch(m, n=2, randomness="same", strict=True).train()(x)[0]
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=0)


@pytest.mark.parametrize("lowering", ["fused", "spread", "cells"])
def test_float32_lstm_both_lowerings(monkeypatch, lowering):
    """CPU float32 LSTMs may run torch's own fused (oneDNN) kernel per model, also with the models
    split over the cores; every lowering must agree with each model alone, dropout masks included."""
    monkeypatch.setenv("MBCOMPILE_RNN_LOWERING", lowering)
    x = torch.randn(B, T, I)
    state = (torch.randn(3, 4, B, H), torch.randn(3, 4, B, H))
    b = check(lambda: nn.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True, dropout=0.5),
              (x, state), in_dims=(None, 0), train=True, seeds=SEEDS, dtype=torch.float32, tol=1e-5)
    said = {"fused": "model after model", "spread": "models split over", "cells": "unrolled batched cells"}
    assert said[lowering] in str(mbcompile.explain(b))


@pytest.mark.parametrize("lowering", ["fused", "spread"])
def test_float32_fused_lowering_in_eval_no_grad_and_compiled(monkeypatch, lowering):
    monkeypatch.setenv("MBCOMPILE_RNN_LOWERING", lowering)
    make = lambda: nn.LSTM(I, H, num_layers=2, batch_first=True)  # noqa: E731
    x = torch.randn(B, T, I)
    check(make, (x,), train=False, dtype=torch.float32, tol=1e-5)            # eval mode, with gradients
    models = [make() for _ in range(2)]
    batched = mbcompile.batch(copy.deepcopy(models), strict=True).eval()
    with torch.no_grad():                                                  # inference: no workspace needed
        out = batched(x)[0]
    with torch.inference_mode():                                           # inference tensors, on every thread
        out_inf = batched(x)[0]
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m.eval()(x)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_inf[i], out[i], rtol=0, atol=0)
    compiled = mbcompile.batch(copy.deepcopy(models), strict=True, compile=True).train()  # custom ops compile
    out = compiled(x)[0]
    out.square().sum().backward()
    for i, m in enumerate(models):
        ref = m.train()(x)[0]
        ref.square().sum().backward()
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled.get_parameter("weight_hh_l1").grad[i], m.weight_hh_l1.grad,
                                   rtol=1e-4, atol=1e-5)


def test_float32_lstm_takes_the_fused_kernel_unforced(monkeypatch):
    monkeypatch.delenv("MBCOMPILE_RNN_LOWERING", raising=False)
    b = check(lambda: nn.LSTM(I, H), (torch.randn(T, B, I),), dtype=torch.float32, tol=1e-5, n=2)
    assert "fused kernel" in str(mbcompile.explain(b))           # a small layer: model after model
    assert "unrolled batched cells" not in str(mbcompile.explain(b))


def test_packed_sequence_is_a_clear_error():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(I, H)

        def forward(self, x):
            return self.rnn(pack_padded_sequence(x, [T, T - 1]))[0].data

    with pytest.raises(mbcompile.CaptureError, match="PackedSequence"):
        mbcompile.batch(Packed().double(), n=2)(torch.randn(T, B, I, dtype=F64))


@pytest.mark.parametrize("make", [lambda: nn.LSTM(6, 8, num_layers=2), lambda: nn.RNN(6, 8),
                                  lambda: nn.RNN(6, 8, nonlinearity="relu"), lambda: nn.GRU(6, 8)],
                         ids=["lstm", "rnn_tanh", "rnn_relu", "gru"])
def test_recurrent_layers_under_cpu_autocast_match_each_model_alone(make):
    """Under bfloat16 autocast torch runs an LSTM / RNN whole in bfloat16 (a GRU's linears one by one):
    the batch returns the same dtypes, the LSTM (oneDNN, as alone) the same numbers, and the first call
    may be the autocast one (choosing the LSTM lowering once crashed inside autocast)."""
    torch.manual_seed(0)
    models = [make() for _ in range(3)]
    b = mbcompile.batch(copy.deepcopy(models))
    x = torch.randn(5, 4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, h = b(x)
        alone = [m(x) for m in models]
    exact = not isinstance(models[0], nn.RNN)
    for i, (o, hi) in enumerate(alone):
        hb, hi = (h[0], hi[0]) if isinstance(h, tuple) else (h, hi)
        assert out.dtype == o.dtype and hb.dtype == hi.dtype
        tol = dict(rtol=0, atol=0) if exact else dict(rtol=2e-2, atol=2e-2)   # cells in bf16: ulps apart
        torch.testing.assert_close(out[i], o, **tol)
        torch.testing.assert_close(hb[i], hi, **tol)
    out.float().sum().backward()                        # the backward runs too
    assert all(p.grad is not None for p in b.parameters())


@pytest.mark.parametrize("lowering", ["fused", "spread"])
@pytest.mark.parametrize("shared", [True, False])
def test_fused_lowering_input_and_state_gradients(monkeypatch, lowering, shared):
    """The fused kernel's gradients for the input and the initial state (only computed where asked for),
    per model and summed over models for a shared input, against each model alone; layers in between
    stay time-major (batch_first undone once, at the ends)."""
    monkeypatch.setenv("MBCOMPILE_RNN_LOWERING", lowering)
    n = 3
    models = [nn.LSTM(I, H, num_layers=3, batch_first=True) for _ in range(n)]
    refs = copy.deepcopy(models)
    x = torch.randn((B, T, I) if shared else (n, B, T, I), requires_grad=True)
    h0, c0 = torch.randn(n, 3, B, H, requires_grad=True), torch.randn(n, 3, B, H, requires_grad=True)
    batched = mbcompile.batch(models, in_dims=(None if shared else 0, 0), strict=True)
    out, (hn, cn) = batched(x, (h0, c0))
    w = [torch.randn_like(t) for t in (out, hn, cn)]
    sum((t * v).sum() for t, v in zip((out, hn, cn), w)).backward()
    gx = torch.zeros(B, T, I)
    for i, ref in enumerate(refs):
        xi = (x if shared else x[i]).detach().requires_grad_()
        hi, ci = h0[i].detach().requires_grad_(), c0[i].detach().requires_grad_()
        o, (a, b) = ref(xi, (hi, ci))
        torch.testing.assert_close(out[i], o, rtol=1e-5, atol=1e-5)
        sum((t * v[i]).sum() for t, v in zip((o, a, b), w)).backward()
        torch.testing.assert_close(h0.grad[i], hi.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c0.grad[i], ci.grad, rtol=1e-5, atol=1e-5)
        if shared:
            gx += xi.grad
        else:
            torch.testing.assert_close(x.grad[i], xi.grad, rtol=1e-5, atol=1e-5)
    if shared:
        torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-5)
