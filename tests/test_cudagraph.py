"""``mbcompile.cudagraph``: train_step's program replayed from a CUDA graph. Capturing needs a GPU
(tests/test_cuda.py runs the real thing); here a stand-in graph with the same contract (capturing runs
nothing, replay reads the captured input tensors and overwrites the same output tensors) checks what
can go wrong on the host side: which inputs are copied into static buffers, recapturing when an
in-place input changes, outputs that the next replay must not change, and giving up cleanly."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mbcompile
from _models import BNCNN
from mbcompile import backend, cudagraph


class FakeGraph:
    """What a captured CUDA graph does, on the CPU: replay runs ``fn`` on the captured inputs and
    writes into the output tensors handed out at capture."""

    def __init__(self, fn, inputs):
        self.fn, self.inputs = fn, inputs
        self.outs = [torch.empty_like(o) for o in fn(*[v.clone() for v in inputs])]   # shapes only

    def replay(self):
        for o, r in zip(self.outs, self.fn(*self.inputs)):
            o.copy_(r)


def fake_capture(fn, inputs):
    g = FakeGraph(fn, inputs)
    return g, g.outs


@pytest.fixture(autouse=True)
def stand_in(monkeypatch):
    monkeypatch.setattr(cudagraph, "_capture_cuda", fake_capture)


def step_fn(w, x):
    w.add_(x.sum(0))                  # an in-place update of a persistent input, as the optimizer's
    return [w * 2, x.sum()]


def test_replays_equal_plain_calls_with_new_batches_every_step():
    w, ref = torch.zeros(3), torch.zeros(3)
    g = cudagraph.GraphedStep(step_fn, None, {0})
    kept = []
    for k in range(7):
        x = torch.full((2, 3), float(k + 1))
        out, want = g(w, x), step_fn(ref, x)
        kept.append((out, [t.clone() for t in want]))
    assert g.captures == 1 and g.replays == 7 - cudagraph.WARMUP
    assert g.copied == {1}                         # the batch is copied; w is read in place
    for out, want in kept:                         # a later replay did not change an earlier result
        for o, t in zip(out, want):
            torch.testing.assert_close(o, t, rtol=0, atol=0)
    torch.testing.assert_close(w, ref, rtol=0, atol=0)
    assert g.status.startswith("CUDA graph (")


def test_an_in_place_input_that_changes_is_copied_after_a_new_capture():
    w, ref = torch.zeros(3), torch.zeros(3)
    x = torch.ones(2, 3)                            # the same batch tensor every step: read in place
    g = cudagraph.GraphedStep(step_fn, None, {0})
    for _ in range(4):
        g(w, x), step_fn(ref, x)
    assert g.copied == set()
    x.mul_(3)                                       # changed in place: the graph sees it
    g(w, x), step_fn(ref, x)
    torch.testing.assert_close(w, ref, rtol=0, atol=0)
    w2, ref2 = w.clone(), ref.clone()               # a new parameter tensor (p.data = ... in user code)
    for _ in range(6):
        a, b = g(w2, x), step_fn(ref2, x)
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(w2, ref2, rtol=0, atol=0)
    torch.testing.assert_close(w, ref, rtol=0, atol=0)     # the old one no longer steps
    assert g.captures == 2 and g.copied == set()   # a written input is never a copy: the update must land


def test_capture_failure_falls_back_to_plain_calls():
    def broken(fn, inputs):
        raise RuntimeError("operation not permitted when stream is capturing")

    w, ref = torch.zeros(3), torch.zeros(3)
    cudagraph._capture_cuda = broken              # undone by the stand_in fixture
    g = cudagraph.GraphedStep(step_fn, None, {0})
    for k in range(5):
        x = torch.full((2, 3), float(k))
        torch.testing.assert_close(g(w, x)[0], step_fn(ref, x)[0], rtol=0, atol=0)
    assert g.graph is None and "capture failed (RuntimeError: operation not permitted" in g.status
    torch.testing.assert_close(w, ref, rtol=0, atol=0)


def test_inputs_that_keep_changing_stop_the_recaptures():
    g = cudagraph.GraphedStep(step_fn, None, {0})
    w = torch.zeros(3)
    for _ in range(40):
        w = w.clone()                               # a new "in-place" tensor every call
        g(w, torch.ones(2, 3))
    assert g.captures <= cudagraph.MAX_CAPTURES and "changed under" in g.status


def test_written_inputs_follow_views():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(a, b, c):
        a.view(-1)[1:].add_(b.sum())               # through a view
        c.t().mul(2)                               # a view, not written
        return [a + c]

    gm = make_fx(f)(torch.zeros(2, 2), torch.ones(3), torch.ones(2, 2))
    assert cudagraph.written_inputs(gm) == {0}
    assert cudagraph.written_inputs(make_fx(step_fn)(torch.zeros(3), torch.ones(2, 3))) == {0}


def test_why_not_names_what_a_graph_cannot_replay():
    def traced(fn, *args):
        from torch.fx.experimental.proxy_tensor import make_fx
        return make_fx(fn)(*args)

    x = torch.randn(3)
    assert cudagraph.why_not(traced(lambda v: v * 2, x), [x]) == "not every input is a CUDA tensor"
    assert "random op aten.bernoulli" in cudagraph.graph_reason(traced(lambda v: F.dropout(v, 0.5), x))
    assert "random op aten.randperm" in cudagraph.graph_reason(traced(lambda v: v[torch.randperm(3)], x))
    assert cudagraph.graph_reason(traced(lambda v: v * 2, x)) == "mul is computed on cpu"


def _train(models, steps=7):
    b = mbcompile.batch(copy.deepcopy(models))
    opt = mbcompile.optimizer(b, torch.optim.AdamW, lr=[1e-3, 1e-2, 3e-2])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    step = mbcompile.train_step(b, F.cross_entropy, opt, max_grad_norm=[1.0, 0.5, 2.0])
    g = torch.Generator().manual_seed(0)
    losses = []
    for k in range(steps):
        if k == 4:
            opt.freeze(1)
        x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
        losses.append(step(x, torch.randint(0, 4, (4,), generator=g)))
        sched.step()
    return b, step, losses


def test_train_step_through_a_graph_equals_plain_train_step(monkeypatch):
    """Batch-norm buffers (outputs handed back to the module), per-model lrs changed by a scheduler
    (new scalar tensors every step), per-model clipping, a new batch every step, a frozen model."""
    models = [BNCNN().double() for _ in range(3)]
    with monkeypatch.context() as m:               # the CPU program through the stand-in graph
        m.setattr(backend, "graph_unsafe", lambda gm, inputs: None)
        b1, s1, l1 = _train(models)
    b2, s2, l2 = _train(models)
    assert s1.cuda_graph.startswith("CUDA graph (") and "replays" in s1.cuda_graph
    assert s2.cuda_graph == "no CUDA graph: not every input is a CUDA tensor"
    for a, c in zip(l1, l2):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    for (name, p), (_, q) in zip(b1.named_parameters(), b2.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    for (name, p), (_, q) in zip(b1.named_buffers(), b2.named_buffers()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(s1.last_grad_norms, s2.last_grad_norms, rtol=0, atol=0)


def test_every_mbcompile_op_says_whether_a_graph_may_replay_it():
    import mbcompile.passes  # noqa: F401 - registers the passes' ops
    ops = set(torch.ops.mbcompile._dir)
    assert not cudagraph._PURE & cudagraph._HOST
    assert ops == cudagraph._PURE | cudagraph._HOST, ops ^ (cudagraph._PURE | cudagraph._HOST)


def test_the_batched_linear_does_not_keep_a_step_from_its_graph(monkeypatch):
    """Stop 23, H200: every program with mbcompile.linear_bmm ran without a graph ("random op")."""
    seen = []

    def record(gm, flat):
        seen.append(([n.target for n in gm.graph.nodes], cudagraph.graph_reason(gm)))
        return cudagraph.why_not(gm, flat)

    monkeypatch.setattr(backend, "graph_unsafe", record)
    b = mbcompile.batch([nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(3)])
    step = mbcompile.train_step(b, F.cross_entropy, mbcompile.optimizer(b, torch.optim.SGD, lr=0.1),
                                path="compiled")
    step(torch.randn(4, 6), torch.randint(0, 3, (4,)))
    (targets, reason), = seen
    assert torch.ops.mbcompile.linear_bmm.default in targets
    assert not reason.startswith("random op"), reason       # on CPU: "... is computed on cpu"


def test_parameters_written_after_the_program_are_replayed_by_the_graph(monkeypatch):
    """torch < 2.13 (backend.UPDATE_IN_GRAPH False): the copy of the new parameters is part of the
    graphed step, so the parameters stay inputs read in place (no recapture) and a replay updates them."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double() for _ in range(3)]

    def run():
        b = mbcompile.batch(copy.deepcopy(models))
        step = mbcompile.train_step(b, F.cross_entropy, mbcompile.optimizer(b, torch.optim.SGD, lr=[0.1, 0.2, 0.3],
                                                                            momentum=0.9), path="compiled")
        g = torch.Generator().manual_seed(0)
        losses = [step(torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
                  for _ in range(6)]
        return b, step, losses

    want_b, _, want = run()
    monkeypatch.setattr(backend, "UPDATE_IN_GRAPH", False)
    monkeypatch.setattr(backend, "graph_unsafe", lambda gm, inputs: None)
    got_b, step, got = run()
    assert step.cuda_graph.startswith("CUDA graph (") and "1 captures" in step.cuda_graph, step.cuda_graph
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    for (name, p), (_, q) in zip(got_b.named_parameters(), want_b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
