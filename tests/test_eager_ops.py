"""Eager programs call mbcompile's own ops (per-model random draws, the batched linear, relayouts) as
Python functions, not through the custom-op dispatcher (ops.eager_module); compiled programs keep
the ops. Both must compute the same numbers, gradients (double backward too) and random streams."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mbcompile
from mbcompile import lowering, ops


def _custom_ops(gm):
    return {str(nd.target) for nd in gm.graph.nodes
            if nd.op == "call_function" and str(nd.target).startswith("mbcompile.")}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 128), nn.Linear(128, 128), nn.Linear(128, 5)  # b: n*O*I >= 64K

    def forward(self, x):
        h = F.dropout(torch.tanh(self.a(x)), 0.3, self.training)
        h = F.dropout(torch.tanh(self.b(h)), 0.1, self.training)
        return self.c(h)


def _run(eager, n=4, steps=3, double=False):
    torch.manual_seed(0)
    models = [Net().double() for _ in range(n)]
    saved = ops.eager_module
    if not eager:
        ops.eager_module = lambda gm: gm
    try:
        with lowering.force("default"):
            b = mbcompile.batch(models, seeds=range(n))
            x = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            outs, grads = [], []
            for _ in range(steps):
                out = b(x)
                loss = out.square().sum()
                if double:                         # d/dw of |dL/dw|^2 goes through the op's backward
                    g = torch.autograd.grad(loss, list(b.parameters()), create_graph=True)
                    loss = sum(t.square().sum() for t in g)
                gs = torch.autograd.grad(loss, list(b.parameters()))
                outs.append(out.detach())
                grads.append(gs)
        return b, outs, grads
    finally:
        ops.eager_module = saved


@pytest.mark.parametrize("double", [False, True])
def test_eager_program_equals_the_custom_op_program(double):
    b1, outs1, grads1 = _run(True, double=double)
    b2, outs2, grads2 = _run(False, double=double)
    prog = b1._last_program
    assert {"mbcompile.draw_per_model.default", "mbcompile.linear_bmm.default"} <= _custom_ops(prog.gm)
    assert _custom_ops(prog.eager) == set()          # the eager program calls them directly
    assert prog.call is prog.eager
    assert _custom_ops(b2._last_program.call) == _custom_ops(prog.gm)
    for o1, o2 in zip(outs1, outs2):
        torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    assert not torch.equal(outs1[0], outs1[1])       # masks move on from step to step
    for g1, g2 in zip(grads1, grads2):
        for a, c in zip(g1, g2):
            torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_eager_draws_follow_each_model_alone():
    """Model i's dropout masks through the eager draw are those of model i alone after manual_seed."""
    b, outs, _ = _run(True, n=3, steps=2)
    torch.manual_seed(0)
    models = [Net().double() for _ in range(3)]
    x = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for i, m in enumerate(models):
        torch.manual_seed(i)
        for s in range(2):
            torch.testing.assert_close(outs[s][i], m(x).detach(), rtol=1e-12, atol=1e-12)


def test_compiled_program_keeps_the_ops():
    torch.manual_seed(0)
    b = mbcompile.batch([Net() for _ in range(4)], seeds=range(4), compile=True)
    b(torch.randn(8, 16))
    prog = b._last_program
    assert prog.call is not prog.eager
    assert "mbcompile.draw_per_model.default" in _custom_ops(prog.gm)
