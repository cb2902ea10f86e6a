"""mbcompile.loss: entry i is fn(out[i], target_i), shared or per-model targets."""
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
