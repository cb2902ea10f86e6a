"""cores.map_models: per-model kernels split over worker threads, and the LSTM lowering that uses it."""
import multiprocessing
import threading
import time

import pytest
import torch

from mbcompile import cores
from mbcompile.passes import rnn as rnn_pass  # noqa: F401  (registers mbcompile::lstm_fused)

mb = torch.ops.mbcompile
spread_here = pytest.mark.skipif(cores.workers(2) < 2 and torch.get_num_threads() >= 2,
                                 reason="no worker threads here (MBCOMPILE_SPREAD=0, or torch's threads are not OpenMP's)")


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def test_results_in_model_order_on_worker_threads(two_threads):
    def one(i):
        time.sleep(0.02)                                          # keeps a worker busy: runs overlap
        return i, threading.current_thread().name, torch.get_num_threads()

    seen = cores.map_models(one, 7)
    assert [s[0] for s in seen] == list(range(7))
    if cores.workers(7) > 1:
        names = {s[1] for s in seen}
        assert len(names) == 2 and all(nm.startswith("mbcompile-models") for nm in names)
        assert {s[2] for s in seen} == {1}                      # one OpenMP thread per worker
    assert torch.get_num_threads() == 2                          # the caller's count untouched
    fresh = []
    t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert fresh == [2]                                          # ATen's process default too


def test_workers_take_the_callers_grad_and_inference_mode(two_threads):
    modes = lambda i: (torch.is_grad_enabled(), torch.is_inference_mode_enabled())  # noqa: E731
    assert set(cores.map_models(modes, 4)) == {(True, False)}
    with torch.no_grad():
        assert set(cores.map_models(modes, 4)) == {(False, False)}
    with torch.inference_mode():
        assert set(cores.map_models(modes, 4)) == {(False, True)}
    assert set(cores.map_models(modes, 4)) == {(True, False)}               # and not kept afterwards


def test_one_worker_runs_in_the_caller(monkeypatch, two_threads):
    me = threading.current_thread().name
    assert {cores.map_models(lambda i: threading.current_thread().name, 4, 1)[j] for j in range(4)} == {me}
    monkeypatch.setenv("MBCOMPILE_SPREAD", "0")
    assert cores.workers(16) == 1
    assert set(cores.map_models(lambda i: threading.current_thread().name, 4)) == {me}
    monkeypatch.delenv("MBCOMPILE_SPREAD")
    torch.set_num_threads(1)
    assert cores.workers(16) == 1
    assert cores.workers(1) == 1


def test_nested_call_runs_inline_and_errors_reach_the_caller(two_threads):
    inner = cores.map_models(lambda i: cores.map_models(lambda j: (i, j), 3), 4)
    assert inner == [[(i, j) for j in range(3)] for i in range(4)]

    def boom(i):
        if i == 3:
            raise ValueError("model 3 failed")
        return i

    with pytest.raises(ValueError, match="model 3 failed"):
        cores.map_models(boom, 4)


def _child(q):
    q.put(cores.map_models(lambda i: i * i, 5))


@spread_here
def test_pool_survives_fork(two_threads):
    cores.map_models(lambda i: i, 4)                             # the parent's pool exists
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    p.join(60)
    assert p.exitcode == 0 and q.get(timeout=5) == [0, 1, 4, 9, 16]


def _lstm_args(dt, n, T, B, I, H, shared):
    x = torch.randn(T, B, I) if shared else torch.randn(n, T, B, I)
    h0, c0 = torch.randn(n, B, H), torch.randn(B, H)
    ws = [torch.randn(n, 4 * H, I) * .1, torch.randn(n, 4 * H, H) * .1, torch.randn(n, 4 * H) * .1,
          torch.randn(n, 4 * H) * .1]
    return [t.to(dt) for t in (x, h0, c0, *ws)]


@spread_here
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,T,B,I,H,shared,reverse", [(5, 7, 3, 10, 20, False, False), (4, 16, 32, 32, 128, True, True),
                                                      (2, 12, 17, 33, 65, False, True)])
def test_spread_lstm_is_bit_for_bit_the_serial_one(two_threads, dt, n, T, B, I, H, shared, reverse):
    """Each model's oneDNN kernel on one thread of a worker gives the numbers of the same kernel on all
    threads (nothing is reduced across threads at these sizes), forward and backward; the batch_first
    layout (slices transposed per model inside the op) gives the time-major numbers, transposed."""
    torch.manual_seed(0)
    args = _lstm_args(dt, n, T, B, I, H, shared)
    fwd = [mb.lstm_fused(*args, reverse, True, spread, False, False) for spread in (False, True)]
    grads = [torch.randn_like(t) for t in fwd[0][:3]]
    bwd = [mb.lstm_fused_backward(*args, *f[:3], f[3], *grads, reverse, True, spread, False, False, [True] * 3)
           for spread, f in zip((False, True), fwd)]
    for a, b in zip(fwd[0][:3] + tuple(bwd[0]), fwd[1][:3] + tuple(bwd[1])):
        assert torch.equal(a, b)
    assert bwd[0][0].shape == args[0].shape                       # shared x: its gradient summed over models

    tax = 0 if shared else 1                                      # time axis of x
    bf = [args[0].transpose(tax, tax + 1).contiguous()] + args[1:]
    g_bf = grads[0].transpose(1, 2).contiguous()
    for x_bf, out_bf in ((True, True), (True, False), (False, True)):
        a = bf if x_bf else args
        f = mb.lstm_fused(*a, reverse, True, True, x_bf, out_bf)
        b = mb.lstm_fused_backward(*a, *f[:3], f[3], g_bf if out_bf else grads[0], *grads[1:],
                                   reverse, True, True, x_bf, out_bf, [True, False, True])
        assert torch.equal(f[0], fwd[0][0].transpose(1, 2) if out_bf else fwd[0][0])
        assert torch.equal(f[1], fwd[0][1]) and torch.equal(f[2], fwd[0][2])
        assert torch.equal(b[0], bwd[0][0].transpose(tax, tax + 1) if x_bf else bwd[0][0])
        assert b[1].numel() == 0                                  # not asked for: nothing computed
        for u, v in zip(b[2:], bwd[0][2:]):
            assert torch.equal(u, v)


@spread_here
def test_spread_is_taken_from_enough_work_per_model(monkeypatch, two_threads):
    monkeypatch.delenv("MBCOMPILE_RNN_LOWERING", raising=False)
    monkeypatch.delenv("MBCOMPILE_LOWERING", raising=False)
    x = torch.randn(4, 5, 6)                                      # T,B,I; weights 4H=32, H=8
    wl = [torch.randn(3, 32, 6), torch.randn(3, 32, 8), torch.randn(3, 32), torch.randn(3, 32)]
    macs = 4 * 5 * 32 * (6 + 8)
    choose = lambda x, wl, n=3: rnn_pass._choose("lstm", False, x, None, wl, 1, False, True, n)  # noqa: E731
    monkeypatch.setattr(rnn_pass, "SPREAD_MIN_TOTAL_MACS", 3 * macs)
    monkeypatch.setattr(rnn_pass, "SPREAD_MIN_MACS", macs + 1)
    assert choose(x, wl) == "fused"                               # too little work to spread
    monkeypatch.setattr(rnn_pass, "SPREAD_MIN_MACS", macs)
    assert choose(x, wl) == "spread"
    monkeypatch.setattr(rnn_pass, "SPREAD_MIN_TOTAL_MACS", 3 * macs + 1)
    assert choose(x, wl) == "fused"                               # too little over all models
    monkeypatch.setattr(rnn_pass, "SPREAD_MIN_TOTAL_MACS", 3 * macs)
    assert choose(x.bfloat16(), [w.bfloat16() for w in wl]) == "spread"   # oneDNN's numbers either way
    assert choose(x, [w[:1] for w in wl], n=1) == "fused"          # one model: nothing to spread
    assert choose(x.double(), [w.double() for w in wl]) == "cells"   # no fused kernel in float64
    torch.set_num_threads(1)
    assert choose(x, wl) == "fused"                               # one thread: nothing to spread over


def test_lowering_default_and_forced_rnn_choices(monkeypatch):
    from mbcompile import lowering
    monkeypatch.delenv("MBCOMPILE_RNN_LOWERING", raising=False)
    monkeypatch.setattr(rnn_pass, "SPREAD_MIN_MACS", 0)
    x = torch.randn(4, 5, 6)
    wl = [torch.randn(3, 32, 6), torch.randn(3, 32, 8), torch.randn(3, 32), torch.randn(3, 32)]
    with lowering.force("default"):                      # deterministic runs: the model's own kernel
        assert rnn_pass._choose("lstm", False, x, None, wl, 1, False, True, 3) == "fused"
        assert rnn_pass._choose("lstm", False, x.double(), None, [w.double() for w in wl], 1, False, True, 3) \
            == "cells"                                   # float64: no fused kernel
    with lowering.force(rnn="cells"):
        assert rnn_pass._choose("lstm", False, x, None, wl, 1, False, True, 3) == "cells"
    monkeypatch.setenv("MBCOMPILE_LOWERING", "rnn=spread")
    assert rnn_pass._choose("lstm", False, x, None, wl, 1, False, True, 3) == "spread"
