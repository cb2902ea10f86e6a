"""torch.cond, the rewrite capture errors recommend for data-dependent branches, has a batching rule:
each model takes its own branch (a per-model predicate), or all take one (a predicate of shared data);
outputs and gradients equal each model alone, eager, strict and compiled."""
import copy

import pytest
import torch
import torch.nn as nn

import mbcompile


class Branch(nn.Module):
    def __init__(self, shared_pred):
        super().__init__()
        self.fc, self.out, self.shared_pred = nn.Linear(6, 3), nn.Linear(3, 2), shared_pred

    def forward(self, x):
        h = self.fc(x)
        pred = (x.sum() > 0) if self.shared_pred else (h.sum() > 0)
        h = torch.cond(pred, lambda h: torch.tanh(h) * 2 * self.out.bias[0], lambda h: -h, (h,))
        return self.out(h)


def _models(shared_pred):
    out = []
    for i in range(4):
        torch.manual_seed(i)
        out.append(Branch(shared_pred).double())
    return out


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("shared_pred", [False, True])
def test_cond_matches_each_model_alone(shared_pred, compile):
    models = _models(shared_pred)
    refs = [copy.deepcopy(m) for m in models]
    b = mbcompile.batch(models, strict=True, compile=compile)
    for sign in (1.0, -1.0):                       # a shared predicate: both ways over two calls
        x = sign * torch.rand(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        b.zero_grad()
        out = b(x)
        out.square().sum().backward()
        taken = set()
        for i, r in enumerate(refs):
            r.zero_grad()
            ref = r(x)
            ref.square().sum().backward()
            taken.add(bool(r.fc(x).sum() > 0))
            torch.testing.assert_close(out[i], ref, rtol=1e-12, atol=1e-12)
            for name, p in r.named_parameters():
                torch.testing.assert_close(b.get_parameter(name).grad[i], p.grad, rtol=1e-10, atol=1e-12)
        if not shared_pred:
            assert taken == {True, False}          # the models really took different branches
    if not compile:
        assert not mbcompile.explain(b).fallbacks


def test_cond_nodes_name_the_users_line(monkeypatch):
    """The cond node's trace ends in the code dynamo generated for its branches; errors and explain()
    name the user's line instead."""
    from mbcompile.passes import RULES

    def broken(ctx, args, dims, kwargs):
        raise ZeroDivisionError("a rule that fails")
    monkeypatch.setitem(RULES, torch.ops.higher_order.cond, broken)
    with pytest.raises(ZeroDivisionError) as info:
        mbcompile.batch(_models(False))(torch.randn(5, 6, dtype=torch.float64))
    note = "\n".join(getattr(info.value, "__notes__", []))
    assert "test_control_flow.py" in note and "torch.cond(pred" in note and "eval_with_key" not in note


class RandomBranch(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.fc, self.kind = nn.Linear(4, 6), kind

    def forward(self, x):
        h = self.fc(x)
        if self.kind == "dropout":
            draw = lambda t: nn.functional.dropout(t, 0.5, True)   # noqa: E731
        else:
            draw = lambda t: t * torch.rand_like(t)                 # noqa: E731
        return torch.cond(h.sum() > 0, draw, lambda t: t * 2, (h,))


@pytest.mark.parametrize("kind", ["dropout", "rand_like"])
def test_random_draw_inside_a_cond_branch_is_refused_clearly(kind):
    """A draw that one branch makes cannot keep each model's stream in order: a CaptureError that says
    so, names the user's line and what to do (torch.export's own message was a SpecViolationError about
    a lifted constant)."""
    batched = mbcompile.batch([RandomBranch(kind).double() for _ in range(3)], seeds=[1, 2, 3])
    with pytest.raises(mbcompile.CaptureError, match=r"inside a torch.cond branch.*Draw outside the cond") as err:
        batched(torch.randn(3, 4, dtype=torch.float64))
    assert "test_control_flow.py" in str(err.value), str(err.value)
