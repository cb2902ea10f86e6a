"""mbcompile.loss: entry i is fn(out[i], target_i), shared or per-model targets."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import mbcompile


@pytest.mark.parametrize("fn", [F.cross_entropy, F.nll_loss, F.mse_loss, F.l1_loss, F.smooth_l1_loss])
@pytest.mark.parametrize("per_model", [False, True])
def test_loss_equals_a_loop_over_models(fn, per_model):
    n, b, c = 3, 5, 4
    out = torch.randn(n, b, c, dtype=torch.float64).log_softmax(-1)
    if fn in (F.cross_entropy, F.nll_loss):
        target = torch.randint(0, c, (n, b) if per_model else (b,))
        target[..., 0] = -100                                   # ignore_index counts in the mean
    else:
        target = torch.randn((n, b, c) if per_model else (b, c), dtype=torch.float64)
    got = mbcompile.loss(fn, out, target)
    assert got.shape == (n,)
    for i in range(n):
        torch.testing.assert_close(got[i], fn(out[i], target[i] if per_model else target), rtol=1e-12, atol=1e-12)


def test_ambiguous_target_asks_for_target_in_dim():
    out = torch.randn(4, 4, 3)
    with pytest.raises(ValueError, match="target_in_dim"):
        mbcompile.loss(F.cross_entropy, out, torch.randint(0, 3, (4, 4)))
    per = mbcompile.loss(F.cross_entropy, out, torch.randint(0, 3, (4, 4)), target_in_dim=0)
    assert per.shape == (4,)
    y = torch.randint(0, 3, (4,))                  # [B] with n == B: asked too, never guessed
    with pytest.raises(mbcompile.MBCompileError, match="target_in_dim"):
        mbcompile.loss(F.cross_entropy, out, y)
    shared = mbcompile.loss(F.cross_entropy, out, y, target_in_dim=None)
    for i in range(4):
        torch.testing.assert_close(shared[i], F.cross_entropy(out[i], y))


def test_loss_with_keyword_arguments_uses_the_general_path():
    out = torch.randn(2, 6, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    got = mbcompile.loss(F.cross_entropy, out, y, label_smoothing=0.1)
    for i in range(2):
        torch.testing.assert_close(got[i], F.cross_entropy(out[i], y, label_smoothing=0.1))


@pytest.mark.parametrize("make", [lambda: torch.nn.CrossEntropyLoss(), lambda: torch.nn.CrossEntropyLoss(ignore_index=2),
                                  lambda: torch.nn.CrossEntropyLoss(label_smoothing=0.1),
                                  lambda: torch.nn.CrossEntropyLoss(reduction="sum")],
                         ids=["default", "ignore_index", "label_smoothing", "sum"])
@pytest.mark.parametrize("per_model", [False, True])
def test_loss_modules_equal_a_loop_over_models(make, per_model, monkeypatch):
    """nn.CrossEntropyLoss takes the one-call form when its options allow (ignore_index included), the
    general path otherwise; either way each entry is the module applied to that model's output."""
    loss_mod = importlib.import_module("mbcompile.loss")     # mbcompile.loss is the function
    n, b = 3, 6
    fn = make()
    out = torch.randn(n, b, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (n, b) if per_model else (b,))
    y[..., 0] = 2                                       # an ignored sample where ignore_index=2
    vmapped = []
    monkeypatch.setattr(torch, "vmap", lambda *a, **k: vmapped.append(1) or _real_vmap(*a, **k))
    got = mbcompile.loss(fn, out, y, target_in_dim=0 if per_model else None)
    want = torch.stack([fn(out[i], y[i] if per_model else y) for i in range(n)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    fast = fn.weight is None and fn.reduction == "mean" and fn.label_smoothing == 0
    assert (not vmapped) == fast and (loss_mod._fast(fn) is not None) == fast
    g1, = torch.autograd.grad(got.sum(), out)
    g2, = torch.autograd.grad(want.sum(), out)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


_real_vmap = torch.vmap


def test_mse_module_takes_the_one_call_form():
    loss_mod = importlib.import_module("mbcompile.loss")     # mbcompile.loss is the function
    out, t = torch.randn(3, 5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    assert loss_mod._fast(torch.nn.MSELoss()) is not None and loss_mod._fast(torch.nn.MSELoss(reduction="sum")) is None
    torch.testing.assert_close(mbcompile.loss(torch.nn.MSELoss(), out, t),
                               torch.stack([F.mse_loss(o, t) for o in out]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [F.cross_entropy, F.mse_loss, F.l1_loss], ids=["ce", "mse", "vmap"])
def test_a_per_model_target_of_the_wrong_leading_size_is_a_clear_error(fn):
    out = torch.randn(3, 5, 4)
    target = torch.randint(0, 4, (4, 5)) if fn is F.cross_entropy else torch.randn(4, 5, 4)
    with pytest.raises(mbcompile.MBCompileError, match=r"target_in_dim=0 .* n=3; got \(4, 5"):
        mbcompile.loss(fn, out, target, target_in_dim=0)


def test_outputs_holding_none_and_numbers_reach_the_loss_as_they_are():
    """A model returning {"logits": h, "aux": None} or (h, argmax, 3): the loss gets model i's
    structure, tensors sliced, None and numbers unchanged."""
    torch.manual_seed(0)
    h = torch.randn(3, 8, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (8,))
    want = torch.stack([F.cross_entropy(h[i], y) for i in range(3)])
    out = {"logits": h, "aux": None}
    got = mbcompile.loss(lambda o, t: F.cross_entropy(o["logits"], t) + (0 if o["aux"] is None else 1), out, y)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    out = (h, h.argmax(-1), 3)
    got = mbcompile.loss(lambda o, t: F.cross_entropy(o[0], t) * o[2] + 0 * o[1].sum(), out, y)
    torch.testing.assert_close(got, 3 * want, rtol=1e-12, atol=1e-12)
    with pytest.raises(mbcompile.MBCompileError, match="holding no tensor"):
        mbcompile.loss(lambda o, t: 0, (None, 3), y)


def test_a_loss_vmap_runs_op_by_op_says_nothing_of_vmap():
    """kl_div has no vmap batching rule: torch's fallback warning names a vmap the user never wrote."""
    import warnings
    out = torch.randn(3, 4, 5, dtype=torch.float64).log_softmax(-1)
    target = torch.randn(4, 5, dtype=torch.float64).softmax(-1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = mbcompile.loss(F.kl_div, out, target, reduction="batchmean")
    assert not [w for w in seen if "performance drop" in str(w.message)], [str(w.message) for w in seen]
    want = torch.stack([F.kl_div(o, target, reduction="batchmean") for o in out])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_tuple_target_is_per_model_or_shared_tensor_by_tensor():
    """Distillation: (per-model soft targets [n, B, C], shared labels [B]). Each tensor of the target is
    read as a single target is (it used to be shared as a whole: every model saw all soft targets)."""
    n, b, c = 3, 5, 4
    out = torch.randn(n, b, c)
    soft = torch.randn(n, b, c).softmax(-1)
    y = torch.randint(0, c, (b,))

    def kd(o, t):
        return F.kl_div(o.log_softmax(-1), t["soft"], reduction="batchmean") + F.cross_entropy(o, t["y"])
    want = torch.stack([kd(out[i], {"soft": soft[i], "y": y}) for i in range(n)])
    torch.testing.assert_close(mbcompile.loss(kd, out, {"soft": soft, "y": y}), want)
    fn = lambda o, t: kd(o, {"soft": t[0], "y": t[1]})               # noqa: E731
    torch.testing.assert_close(mbcompile.loss(fn, out, (soft, y)), want)
    with pytest.raises(ValueError, match="target_in_dim=0 means one target per model"):
        mbcompile.loss(fn, out, (soft, y), target_in_dim=0)          # y is not per model
