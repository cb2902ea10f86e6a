"""Settings per parameter set: ``mbcompile.optimizer(..., params=...)`` takes some of the stacked
parameters, so two optimizers stepped together are torch's two param groups (the usual "no weight
decay for biases"): each model against its own torch.optim.AdamW with those two groups, in float64."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mbcompile

LRS = [1e-2, 3e-3, 1e-3]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def _no_decay(name):
    return name.endswith("bias") or name.startswith("norm.")


@pytest.mark.parametrize("how", ["callable", "names", "tensors"])
def test_two_optimizers_over_disjoint_sets_are_torchs_two_param_groups(how):
    torch.manual_seed(0)
    models = [Net().double() for _ in LRS]
    refs = [copy.deepcopy(m) for m in models]
    b = mbcompile.batch(models)
    names = [k for k, _ in b.named_parameters()]
    nd = [k for k in names if _no_decay(k)]
    d = [k for k in names if not _no_decay(k)]
    pick = {"callable": (lambda k: not _no_decay(k), _no_decay), "names": (d, nd),
            "tensors": ([b.get_parameter(k) for k in d], [b.get_parameter(k) for k in nd])}[how]
    opt_d = mbcompile.optimizer(b, torch.optim.AdamW, params=pick[0], lr=LRS, weight_decay=0.1)
    opt_nd = mbcompile.optimizer(b, torch.optim.AdamW, params=pick[1], lr=LRS, weight_decay=0.0)
    assert len(opt_d.param_groups) == len(LRS) and len(opt_d.param_groups[0]["params"]) == len(d)
    ropts = [torch.optim.AdamW([{"params": [r.get_parameter(k) for k in d], "weight_decay": 0.1},
                                {"params": [r.get_parameter(k) for k in nd], "weight_decay": 0.0}], lr=lr)
             for r, lr in zip(refs, LRS)]
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
        opt_d.zero_grad()
        opt_nd.zero_grad()
        mbcompile.loss(F.cross_entropy, b(x), y).sum().backward()
        opt_d.step()
        opt_nd.step()
        for r, o in zip(refs, ropts):
            o.zero_grad()
            F.cross_entropy(r(x), y).backward()
            o.step()
    for i, r in enumerate(refs):
        for k, want in r.named_parameters():
            torch.testing.assert_close(b.get_parameter(k)[i], want, rtol=1e-12, atol=1e-13)


def test_a_decay_set_differs_from_decaying_everything():
    """The split matters: decaying the biases too gives other numbers (the check above can fail)."""
    torch.manual_seed(0)
    models = [Net().double() for _ in LRS]
    b1, b2 = mbcompile.batch(models), mbcompile.batch(models)
    o1 = [mbcompile.optimizer(b1, torch.optim.AdamW, params=lambda k: not _no_decay(k), lr=LRS, weight_decay=0.5),
          mbcompile.optimizer(b1, torch.optim.AdamW, params=_no_decay, lr=LRS, weight_decay=0.0)]
    o2 = [mbcompile.optimizer(b2, torch.optim.AdamW, lr=LRS, weight_decay=0.5)]
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    for b, opts in ((b1, o1), (b2, o2)):
        mbcompile.loss(F.cross_entropy, b(x), y).sum().backward()
        for o in opts:
            o.step()
    assert not torch.allclose(b1.get_parameter("fc1.bias"), b2.get_parameter("fc1.bias"))
    torch.testing.assert_close(b1.get_parameter("fc1.weight"), b2.get_parameter("fc1.weight"))


def test_params_that_are_not_the_batched_modules_are_refused():
    b = mbcompile.batch(Net(), n=2)
    with pytest.raises(ValueError, match="'fc3.weight' is not a parameter of the batched module"):
        mbcompile.optimizer(b, torch.optim.SGD, params=["fc3.weight"], lr=0.1)
    with pytest.raises(ValueError, match="a tensor of shape \\(3,\\) is not a parameter"):
        mbcompile.optimizer(b, torch.optim.SGD, params=[torch.zeros(3)], lr=0.1)
    with pytest.raises(ValueError, match="selects no parameter"):
        mbcompile.optimizer(b, torch.optim.SGD, params=lambda k: False, lr=0.1)
    decay, no_decay = [b.get_parameter("fc1.weight")], [b.get_parameter("fc1.bias")]
    with pytest.raises(ValueError, match="one mbcompile.optimizer per set of parameters"):   # nanoGPT's groups
        mbcompile.optimizer(b, torch.optim.AdamW, params=[{"params": decay, "weight_decay": 0.1},
                                                          {"params": no_decay, "weight_decay": 0.0}])


def test_param_groups_instead_of_the_batched_module_say_what_to_do():
    b = mbcompile.batch(Net(), n=2)
    with pytest.raises(TypeError, match="params="):
        mbcompile.optimizer([{"params": list(b.parameters()), "weight_decay": 0.0}], torch.optim.AdamW)


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn, self.out = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.bn(self.fc(x)))


@pytest.mark.parametrize("cls,warns", [(BNNet, True), (Net, False)])
def test_fit_on_subsets_warns_when_batch_norm_sees_other_models_samples(cls, warns):
    b = mbcompile.batch(cls(), n=2)
    opt = mbcompile.optimizer(b, torch.optim.SGD, lr=0.1)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    w = torch.tensor([[True] * 4 + [False] * 4, [False] * 4 + [True] * 4])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        mbcompile.fit(b, [(x, y, w)], F.cross_entropy, opt, epochs=1, data="mask", progress=False)
    said = [str(r.message) for r in rec if "batch norm" in str(r.message)]
    assert bool(said) == warns
    if warns:
        assert "'bn'" in said[0] and "data='per_model'" in said[0]
