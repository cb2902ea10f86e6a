"""What compiled programs (train_step, compile=True) run on CPU in place of Inductor's defaults.

- backend.weight_grad_layout: a small linear with fewer outputs than inputs runs as mbcompile::linear_bmm,
  so its weight gradient is one n,O,I GEMM (g^T @ x) instead of x^T @ g (n,I,O, a GEMM with O columns)
  read transposed. Checked: which graphs it rewrites, that the rewritten graph's outputs and gradients
  equal the original's, and that a compiled train_step over such a head trains each model as torch alone.
- embedding_dense_backward stays ATen's kernel (Inductor's decomposition is atomic float adds).
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mbcompile
from mbcompile import backend

LINEAR_BMM = torch.ops.mbcompile.linear_bmm.default


def _gm(model, n, x):
    b = mbcompile.batch(model, n=n)
    b(x)
    (prog,) = b._programs.values()
    return b, copy.deepcopy(prog.gm)


def _targets(gm):
    return [nd.target for nd in gm.graph.nodes if nd.op == "call_function"]


@pytest.mark.parametrize("bias", [True, False])
def test_rewrites_small_head_with_fewer_outputs(bias):
    torch.manual_seed(0)
    b, gm = _gm(nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 5, bias=bias)), 3, torch.randn(6, 12))
    before = copy.deepcopy(gm)
    assert backend.weight_grad_layout(gm)
    assert _targets(gm).count(LINEAR_BMM) == 1                  # the 32->5 head; 12->32 has O > I
    # the same numbers, forward and backward (float64)
    (mm,) = [nd for nd in gm.graph.nodes if nd.target is LINEAR_BMM]
    phs = [a for a in gm.graph.nodes if a.op == "placeholder"]
    args = [torch.randn(a.meta["val"].shape, dtype=torch.float64, requires_grad=a.meta["val"].is_floating_point())
            if "val" in a.meta and isinstance(a.meta["val"], torch.Tensor) else None
            for a in phs]
    ins = [a for a in args if a is not None and a.requires_grad]
    head_w = args[phs.index(mm.args[1])]
    outs = [gm(*args)[0], before(*args)[0]]
    g = torch.randn_like(outs[0])
    grads = [torch.autograd.grad(o, ins, g, allow_unused=True) for o in outs]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for a, c in zip(*grads):
        assert (a is None) == (c is None)
        if a is not None:
            torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    k = next(j for j, t in enumerate(ins) if t is head_w)
    assert grads[0][k].is_contiguous() and not grads[1][k].is_contiguous()   # n,O,I against n,I,O transposed


def test_leaves_wider_outputs_and_other_products_alone():
    torch.manual_seed(0)
    _, gm = _gm(nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16)), 2, torch.randn(5, 4))
    assert not backend.weight_grad_layout(gm)                   # O >= I everywhere
    assert LINEAR_BMM not in _targets(gm)

    class Scaled(nn.Module):                                    # baddbmm with beta: not a plain linear
        def forward(self, b, x, w):
            return torch.baddbmm(b, x, w.transpose(1, 2), beta=0.5)
    gm = torch.fx.symbolic_trace(Scaled())
    assert not backend.weight_grad_layout(gm)


def test_compiled_train_step_matches_each_model_alone():
    torch.manual_seed(1)
    n, steps = 3, 3
    models = [nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4)).double() for _ in range(n)]
    xs, ys = torch.randn(steps, 8, 20, dtype=torch.float64), torch.randint(0, 4, (steps, 8))
    lrs = [1e-3, 3e-3, 1e-2]
    b = mbcompile.batch(copy.deepcopy(models))
    opt = mbcompile.optimizer(b, torch.optim.Adam, lr=lrs)
    step = mbcompile.train_step(b, F.cross_entropy, opt, path="compiled", target_in_dim=None)
    for t in range(steps):
        step(xs[t], ys[t])
    _check_each_alone(b, models, lambda m, i: torch.optim.Adam(m.parameters(), lr=lrs[i]), xs, ys)


def _check_each_alone(b, models, make_opt, xs, ys):
    """Model i trained alone with torch on (xs[t], ys[t]) ends where the batch's model i is."""
    for i, m in enumerate(models):
        o = make_opt(m, i)
        for x, y in zip(xs, ys):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        for (name, p), q in zip(m.named_parameters(), b.unbatch(i).parameters()):
            torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12, msg=name)


class _BagOfWords(nn.Module):
    def __init__(self, pad=None, freq=False):
        super().__init__()
        self.emb = nn.Embedding(50, 8, padding_idx=pad, scale_grad_by_freq=freq)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.emb(x).mean(1))


@pytest.mark.parametrize("pad,freq", [(None, False), (0, False), (None, True)])
def test_compiled_embedding_backward_is_atens_kernel(pad, freq):
    """On CPU the compiled programs keep ATen's embedding_dense_backward: Inductor's decomposition is
    a scatter of atomic float adds (a 5000x64 table at n=16: 13.3 -> 8.8 ms a train_step). Values:
    each model alone with torch (repeated and padding indices included)."""
    torch.manual_seed(2)
    n, steps = 3, 2
    models = [_BagOfWords(pad, freq).double() for _ in range(n)]
    xs = torch.randint(0, 6, (steps, 4, 7))                       # few distinct ids: many repeats
    ys = torch.randint(0, 3, (steps, 4))
    b = mbcompile.batch(copy.deepcopy(models))
    opt = mbcompile.optimizer(b, torch.optim.SGD, lr=[0.1, 0.2, 0.3], momentum=0.9)
    step = mbcompile.train_step(b, F.cross_entropy, opt, path="compiled", target_in_dim=None)
    step(xs[0], ys[0])
    with torch.profiler.profile() as prof:
        step(xs[1], ys[1])
    assert any(e.name == "aten::embedding_dense_backward" for e in prof.events())
    _check_each_alone(b, models, lambda m, i: torch.optim.SGD(m.parameters(), lr=[0.1, 0.2, 0.3][i], momentum=0.9),
                      xs, ys)
