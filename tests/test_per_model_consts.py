"""Attributes batched per model (Dropout.p, LeakyReLU.negative_slope, ...) follow their model: through
shrink_ (the kept models keep their own values), unbatch / export, and a fit run that drops models
(History.model of a retired model, also after a resume from a checkpoint)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mbcompile
from mbcompile.callbacks import Checkpoint, Lambda
from mbcompile.fit import fit

PS, SLOPES = (0.0, 0.2, 0.9), (0.0, 0.5, 1.0)


class Net(nn.Module):
    def __init__(self, p, slope):
        super().__init__()
        self.fc, self.act, self.drop, self.out = nn.Linear(4, 64), nn.LeakyReLU(slope), nn.Dropout(p), nn.Linear(64, 3)

    def forward(self, x):
        return self.out(self.drop(self.act(self.fc(x))))


def _models():
    out = []
    for i, (p, s) in enumerate(zip(PS, SLOPES)):
        torch.manual_seed(10 + i)
        out.append(Net(p, s).double())
    return out


def _x():
    return torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def _alone(models, seeds, calls, x):
    """Each model's outputs over ``calls`` calls, alone after torch.manual_seed(its seed)."""
    res = []
    for m, s in zip(models, seeds):
        torch.manual_seed(s)
        res.append([m(x).detach() for _ in range(calls)])
    return res


def test_shrink_keeps_each_kept_models_own_values():
    models, x = _models(), _x()
    b = mbcompile.batch(models, seeds=[0, 1, 2])
    first = b(x).detach()
    mbcompile.shrink_([2, 1], b)
    second = b(x).detach()
    ref = _alone(models, [0, 1, 2], 2, x)
    for i in range(3):
        torch.testing.assert_close(first[i], ref[i][0], rtol=1e-12, atol=1e-12)
    for j, i in enumerate([2, 1]):                  # model 2 still drops 90%, with slope 1.0
        torch.testing.assert_close(second[j], ref[i][1], rtol=1e-12, atol=1e-12)
    assert [b.unbatch(j).drop.p for j in range(2)] == [0.9, 0.2]
    assert [b.unbatch(j).act.negative_slope for j in range(2)] == [1.0, 0.5]


def test_shrink_to_models_with_equal_values():
    """Kept models that now agree (one model left) run with that value; nothing is left per model."""
    models, x = _models(), _x()
    b = mbcompile.batch(models, seeds=[0, 1, 2])
    b(x)
    mbcompile.shrink_([1], b)
    out = b(x).detach()
    torch.testing.assert_close(out[0], _alone(models[1:2], [1], 2, x)[0][1], rtol=1e-12, atol=1e-12)
    assert b.unbatch(0).drop.p == 0.2 and b.unbatch(0).act.negative_slope == 0.5


def test_unbatch_gives_each_model_its_own_values():
    models, x = _models(), _x()
    b = mbcompile.batch(models).eval()
    out = b(x)
    for i, m in enumerate(models):
        u = b.unbatch(i)
        assert (u.drop.p, u.act.negative_slope) == (PS[i], SLOPES[i])
        torch.testing.assert_close(u(x), m.eval()(x), rtol=0, atol=0)
        torch.testing.assert_close(out[i], u(x), rtol=1e-12, atol=1e-12)


def test_retired_models_keep_their_values_through_a_resume(tmp_path):
    x, y = _x(), torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(4))

    def drop_first(run, logs):
        if run.epoch == 0:
            run.stop([0, 2])                           # retire the p=0.0 and p=0.9 models

    def run(epochs, resume=None):
        b = mbcompile.batch(_models(), seeds=[0, 1, 2])
        opt = mbcompile.optimizer(b, torch.optim.SGD, lr=0.1)
        return fit(b, [(x, y)], F.cross_entropy, opt, epochs=epochs, progress=False, resume=resume,
                   callbacks=[Lambda(on_epoch_end=drop_first), Checkpoint(tmp_path / "run.pt")])
    hist = run(1)
    assert hist.active == [1]
    for h in (hist, run(2, resume=True)):
        for i in (0, 2):
            m = h.model(i)
            assert (m.drop.p, m.act.negative_slope) == (PS[i], SLOPES[i])
        assert h.model(1).drop.p == PS[1]


class _Branchy(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.fc, self.drop = nn.Linear(4, 4), nn.Dropout(p)

    def forward(self, x):
        h = self.fc(x)
        if self.drop.p > 0.5:          # only a model with a high rate takes this branch
            h = h * 2
        return self.drop(h)


@pytest.mark.parametrize("rates", [(0.1, 0.2, 0.6), (0.1, 0.6, 0.2), (0.6, 0.1, 0.2)])
def test_a_branch_only_a_later_model_takes_is_refused(rates):
    """Capture exports again with every other model's values, not only the first that differs: with
    rates (0.1, 0.2, 0.6) model 2 used to run model 0's graph (no * 2) silently."""
    batched = mbcompile.batch([_Branchy(p).double() for p in rates])
    with pytest.raises(ValueError, match=r"differ in drop.p, which changes what forward computes"):
        batched(torch.randn(2, 4, dtype=torch.float64))
