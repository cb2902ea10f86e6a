"""Ops that export threads through effect tokens or check ops (linalg.inv/solve/cholesky's error checks,
one_hot's range asserts) and 0-d tensor indices read out of a buffer: each model of the batch equals the
model alone (outputs and parameter gradients), strict=True; what cannot batch is a clear CaptureError."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mbcompile


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def _spd(h):
    return h.T @ h / h.shape[0] + 0.5 * torch.eye(h.shape[1], dtype=h.dtype)


LINALG = {
    "inv": lambda h: h @ torch.linalg.inv(_spd(h)),
    "inverse": lambda h: h @ torch.inverse(_spd(h)),
    "solve": lambda h: torch.linalg.solve(_spd(h), h.T).T,
    "cholesky": lambda h: h @ torch.linalg.cholesky(_spd(h)),
    "cholesky_solve": lambda h: torch.cholesky_solve(h.T, torch.linalg.cholesky(_spd(h))).T,
    "several": lambda h: torch.linalg.solve(_spd(h), torch.linalg.inv(_spd(h + 1)) @ h.T).T,
}


class Linalg(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.l, self.fn = nn.Linear(6, 4), fn

    def forward(self, x):
        return self.fn(self.l(x))


class OneHot(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(6, 4)

    def forward(self, x):
        h = self.l(x)
        return h * (1 + F.one_hot(h.argmax(-1), num_classes=4).to(h.dtype))


class StepTable(nn.Module):
    """A learned per-step row picked by a step counter buffer (its own value in each model)."""
    def __init__(self, step):
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, 6))
        self.register_buffer("step", torch.tensor(step))

    def forward(self, x):
        return x * self.table[self.step] + self.table[:, self.step].sum() + self.table[-1, self.step]


def _check(models, per_model, shape=(8, 6)):
    n = len(models)
    refs = [copy.deepcopy(m) for m in models]
    batched = mbcompile.batch(models, in_dims=0 if per_model else None, strict=True)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(*shape, dtype=torch.float64, generator=g) for _ in range(n if per_model else 1)]
    xs = xs if per_model else xs * n
    out = batched(torch.stack(xs) if per_model else xs[0])
    out.square().sum().backward()
    params = dict(batched.named_parameters())
    for i, r in enumerate(refs):
        ref = r(xs[i])
        torch.testing.assert_close(out[i], ref, rtol=1e-9, atol=1e-9)
        ref.square().sum().backward()
        for name, p in r.named_parameters():
            torch.testing.assert_close(params[name].grad[i], p.grad, rtol=1e-8, atol=1e-9,
                                       msg=lambda m: f"model {i} {name}: {m}")
    return batched


@pytest.mark.parametrize("per_model", [False, True])
@pytest.mark.parametrize("name", sorted(LINALG))
def test_linalg_with_error_checks_matches_each_model(name, per_model):
    b = _check([Linalg(LINALG[name]).double() for _ in range(3)], per_model)
    assert not mbcompile.explain(b).fallbacks


@pytest.mark.parametrize("per_model", [False, True])
def test_one_hot_of_a_computed_value(per_model):
    _check([OneHot().double() for _ in range(3)], per_model, shape=(5, 6))


def test_one_hot_assert_sees_every_model():
    class Bad(nn.Module):                       # model 1's class index is out of range
        def __init__(self, k):
            super().__init__()
            self.register_buffer("k", torch.tensor(k))

        def forward(self, x):
            return x * F.one_hot(self.k.expand(x.shape[0]), num_classes=4).to(x.dtype).sum(-1, keepdim=True)
    mbcompile.batch([Bad(0), Bad(3), Bad(1)], strict=True)(torch.randn(5, 6))
    with pytest.raises(RuntimeError, match="smaller than num_classes"):
        mbcompile.batch([Bad(0), Bad(7), Bad(1)], strict=True)(torch.randn(5, 6))


def test_one_hot_without_num_classes_is_a_data_dependent_shape_error():
    class NoK(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(6, 4)

        def forward(self, x):
            return F.one_hot(self.l(x).argmax(-1)).sum() + x   # the line the error names
    with pytest.raises(mbcompile.CaptureError, match=r"(?s)depends on the data.*num_classes.*the line the error") \
            as info:
        mbcompile.batch(NoK(), n=3)(torch.randn(5, 6))
    assert "torch.cond" not in str(info.value)


@pytest.mark.parametrize("per_model", [False, True])
def test_index_with_a_per_model_step_buffer(per_model):
    _check([StepTable(s).double() for s in (3, 0, 5)], per_model, shape=(4, 6))


def test_number_read_from_a_per_model_tensor_is_a_capture_error():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(6, 6)
            self.register_buffer("scale", torch.tensor(3.0))

        def forward(self, x):
            return self.l(x) * self.scale.item()        # the line the error names
    for strict in (False, True):
        with pytest.raises(mbcompile.CaptureError, match=r"(?s)the line the error.*index with it"):
            mbcompile.batch(Scaled(), n=3, strict=strict)(torch.randn(4, 6))


class PairDist(nn.Module):
    """Pairwise distances of the points with themselves (a zero diagonal), as contrastive losses use."""
    def __init__(self, mode):
        super().__init__()
        self.l, self.mode = nn.Linear(6, 4), mode

    def forward(self, x):
        h = self.l(x)
        return torch.cdist(h, h, compute_mode=self.mode)


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("rows,mode", [(30, "use_mm_for_euclid_dist_if_necessary"), (8, "use_mm_for_euclid_dist"),
                                       (8, "use_mm_for_euclid_dist_if_necessary")])
def test_cdist_gradient_at_zero_distance(rows, mode, compile):
    """Above 25 rows (or with use_mm) torch computes cdist as _euclidean_dist, whose own backward gives
    0 at a zero distance; its decomposition (mm, clamp, sqrt) gave NaN gradients. A point's distance to
    itself is the square root of the product's rounding error (~1e-8 here, alone too), so values agree
    to that, not to the last bit."""
    torch.manual_seed(0)
    models = [PairDist(mode).double() for _ in range(3)]
    refs = [copy.deepcopy(m) for m in models]
    x = torch.randn(rows, 6, dtype=torch.float64)
    b = mbcompile.batch(models, compile=compile)
    out = b(x)
    out.sum().backward()
    for i, r in enumerate(refs):
        ref = r(x)
        ref.sum().backward()
        torch.testing.assert_close(out[i], ref, rtol=1e-10, atol=1e-7)
        assert b.l.weight.grad[i].isfinite().all() and b.l.bias.grad[i].isfinite().all()
        torch.testing.assert_close(b.l.weight.grad[i], r.l.weight.grad, rtol=1e-9, atol=1e-6)
        torch.testing.assert_close(b.l.bias.grad[i], r.l.bias.grad, rtol=1e-9, atol=1e-6)
