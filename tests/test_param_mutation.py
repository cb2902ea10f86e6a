"""A parameter changed in place inside forward under no_grad (WGAN weight clipping, max-norm constraints)
is still the leaf eager differentiates, at its new value: gradients, the stored value and SGD steps equal
each model alone."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import mbcompile


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


class Clipped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        with torch.no_grad():
            self.a.weight.clamp_(-0.3, 0.3)
            self.b.weight.div_(self.b.weight.norm(dim=1, keepdim=True).clamp(min=1.0))
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("per_model", [False, True])
def test_parameter_changed_in_forward_keeps_its_gradient(per_model):
    models = [Clipped().double() for _ in range(3)]
    for m in models:
        with torch.no_grad():
            m.b.weight.mul_(3)
    refs = copy.deepcopy(models)
    b = mbcompile.batch(models, in_dims=0 if per_model else None, strict=True)
    lrs = [0.5, 0.1, 0.2]
    opt = mbcompile.optimizer(b, torch.optim.SGD, lr=lrs)
    ropts = [torch.optim.SGD(r.parameters(), lr=lr) for r, lr in zip(refs, lrs)]
    for _ in range(3):
        x = torch.randn(*((3,) if per_model else ()), 5, 4, dtype=torch.float64)
        opt.zero_grad()
        out = b(x)
        out.square().sum().backward()
        for name in ("a.weight", "b.weight"):
            assert b.get_parameter(name).grad is not None, name
        opt.step()
        for i, (r, o) in enumerate(zip(refs, ropts)):
            o.zero_grad()
            want = r(x[i] if per_model else x)
            want.square().sum().backward()
            o.step()
            torch.testing.assert_close(out[i], want, rtol=1e-12, atol=1e-12)
    for i, r in enumerate(refs):
        for name, p in r.named_parameters():
            torch.testing.assert_close(b.get_parameter(name)[i], p, rtol=1e-12, atol=1e-12, msg=name)
