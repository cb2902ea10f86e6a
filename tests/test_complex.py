"""Complex parameters and values, each model against itself alone (float64 / complex128): the
per-model optimizer steps a complex parameter as torch.optim does (its real and imaginary parts as
separate elements), and writes into views of complex tensors (an FNO spectral layer's
``out[:, :m] = ...``) train through the batched program."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mbcompile
from _stacked import step_together

N = 2
OPTIMS = [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)), (torch.optim.Adam, dict(lr=0.1)),
          (torch.optim.Adam, dict(lr=0.1, amsgrad=True, weight_decay=0.1)), (torch.optim.AdamW, dict(lr=0.1)),
          (torch.optim.RMSprop, dict(lr=0.05, centered=True, momentum=0.5)),
          (torch.optim.Adagrad, dict(lr=0.1, initial_accumulator_value=[0.5, 0.2])), (torch.optim.Adamax, dict(lr=0.1)),
          (torch.optim.NAdam, dict(lr=0.1)), (torch.optim.RAdam, dict(lr=0.1))]


class Gain(nn.Module):
    """A complex weight next to a real layer."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, dtype=torch.complex128))
        self.lin = nn.Linear(3, 1).double()

    def forward(self, x):
        return (x.to(self.w.dtype) * self.w).abs().sum(-1, keepdim=True) + self.lin(x * self.w.real)


class Spectral(nn.Module):
    """FNO-style: rfft, the lowest modes scaled by complex weights written into a zero spectrum
    (slice, select and diagonal writes), irfft."""

    def __init__(self, modes=4):
        super().__init__()
        self.modes = modes
        self.w = nn.Parameter(torch.randn(2, modes, dtype=torch.complex128) / 4)
        self.d = nn.Parameter(torch.randn(2, dtype=torch.complex128))

    def forward(self, x):                                # B,2,16 real
        xf = torch.fft.rfft(x)                           # B,2,9 complex
        out = torch.zeros_like(xf)
        out[:, :, :self.modes] = xf[:, :, :self.modes] * self.w
        out[:, :, -1] = xf[:, :, -1] * self.d
        sq = torch.zeros(x.shape[0], 2, 2, dtype=xf.dtype)
        sq.diagonal(dim1=-2, dim2=-1).copy_(xf[:, :, 1] * self.d)
        return torch.fft.irfft(out, n=x.shape[-1]) + (sq.sum(-1, keepdim=True) * self.w[:, :1]).real


def _pairs(cls):
    torch.manual_seed(0)
    models = [cls() for _ in range(N)]
    return models, copy.deepcopy(models)


CASES = [(c, hp, False) for c, hp in OPTIMS] + [(c, hp, True) for c, hp in OPTIMS[:2]]   # compiled: SGD, Adam


@pytest.mark.parametrize("optim,hp,compile", CASES,
                         ids=[f"{c.__name__}{i}{'-compiled' * k}" for i, (c, _, k) in enumerate(CASES)])
def test_complex_parameter_steps_as_torch_optim(optim, hp, compile):
    models, refs = _pairs(Gain)
    b = mbcompile.batch(models)
    opt = mbcompile.optimizer(b, optim, compile=compile, **hp)
    ropts = [optim(r.parameters(), **{k: v[i] if isinstance(v, list) else v for k, v in hp.items()})
             for i, r in enumerate(refs)]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 1, generator=g, dtype=torch.float64)
        step_together(b, opt, refs, ropts, F.mse_loss, x, y)
    for i, r in enumerate(refs):
        for name, p in r.named_parameters():
            torch.testing.assert_close(b.get_parameter(name)[i], p, rtol=1e-12, atol=1e-14)
            for k, v in ropts[i].state[p].items():      # state stays complex, as torch keeps it
                mine = opt.state[b.get_parameter(name)][k]
                assert mine.dtype == v.dtype, (name, k)
                if v.dim():
                    torch.testing.assert_close(mine[i], v, rtol=1e-12, atol=1e-14)


def test_writes_into_views_of_complex_tensors_train_as_each_model_alone():
    models, refs = _pairs(Spectral)
    b = mbcompile.batch(models, strict=True)
    opt = mbcompile.optimizer(b, torch.optim.Adam, lr=[0.05, 0.1])
    ropts = [torch.optim.Adam(r.parameters(), lr=lr) for r, lr in zip(refs, (0.05, 0.1))]
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(3, 2, 16, generator=g, dtype=torch.float64)
        opt.zero_grad()
        out = b(x)
        out.square().sum().backward()
        for i, (r, o) in enumerate(zip(refs, ropts)):
            o.zero_grad()
            want = r(x)
            want.square().sum().backward()
            torch.testing.assert_close(out[i], want, rtol=1e-12, atol=1e-12)
            for name, p in r.named_parameters():
                torch.testing.assert_close(b.get_parameter(name).grad[i], p.grad, rtol=1e-10, atol=1e-12)
            o.step()
        opt.step()
