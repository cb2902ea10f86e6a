"""Graph regions whose autograd meaning export's decomposition drops: a no_grad block inside forward
(its values must carry no gradient) and circular padding on a computed tensor (functional aten.copy,
which has no eager derivative). Both against each model alone, float64."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mbcompile


class NoGradCentering(nn.Module):
    """Subtracts a statistic computed under no_grad (as EMA targets, centering or contrastive heads do)."""
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.register_buffer("ema", torch.zeros(8))

    def forward(self, x):
        h = F.relu(self.fc1(x))
        with torch.no_grad():
            c = h.mean(0)
            self.ema.mul_(0.9).add_(0.1 * c)
        return self.fc2(h - c) + (h * self.ema).sum(-1, keepdim=True)


class CircularConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, padding_mode="circular")
        self.c3 = nn.Conv2d(4, 2, 3, padding=1, padding_mode="reflect")

    def forward(self, x):
        return self.c3(F.elu(self.c2(F.elu(self.c1(x)))))


@pytest.mark.parametrize("cls,shape", [(NoGradCentering, (4, 6)), (CircularConv, (2, 3, 8, 8))])
@pytest.mark.parametrize("per_model", [False, True])
def test_matches_each_model_alone(cls, shape, per_model):
    n = 3
    models = [cls().double() for _ in range(n)]
    refs = copy.deepcopy(models)
    x = torch.randn(*((n,) if per_model else ()), *shape, dtype=torch.float64)
    b = mbcompile.batch(models, in_dims=0 if per_model else None)
    for _ in range(2):                                    # the second step sees the updated buffer
        b.zero_grad()
        out = b(x)
        out.square().sum().backward()
        for i, r in enumerate(refs):
            r.zero_grad()
            o = r(x[i] if per_model else x)
            o.square().sum().backward()
            torch.testing.assert_close(out[i], o, rtol=1e-10, atol=1e-12)
            for name, p in r.named_parameters():
                torch.testing.assert_close(dict(b.named_parameters())[name].grad[i], p.grad, rtol=1e-9,
                                           atol=1e-12, msg=name)
            for name, buf in r.named_buffers():
                torch.testing.assert_close(dict(b.named_buffers())[name][i], buf, rtol=1e-10, atol=1e-12)
    assert not mbcompile.explain(b).fallbacks


D, T = 8, 5


def _eval_models(make, n=3):
    return [make().double().eval() for _ in range(n)]        # eval: no dropout, exact comparison


@pytest.mark.parametrize("bool_mask", [False, True])
@pytest.mark.parametrize("arch", ["encoder", "transformer"])
def test_causal_mask_without_is_causal(arch, bool_mask):
    """nn.TransformerEncoder(x, mask=causal) / nn.Transformer(..., tgt_mask=causal) without is_causal:
    torch compares the mask with a causal one (a data-dependent branch); capture uses the mask as given."""
    mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=torch.float64)
    mask = mask.isinf() if bool_mask else mask
    if arch == "encoder":
        make = lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(D, 2, 16, batch_first=True), 2,  # noqa: E731
                                             enable_nested_tensor=False)
        run = lambda m, x: m(x, mask=mask)                                      # noqa: E731
    else:
        make = lambda: nn.Transformer(D, 2, 1, 1, 16, batch_first=True)       # noqa: E731
        run = lambda m, x: m(x, x, tgt_mask=mask)                               # noqa: E731
    models = _eval_models(make)
    refs = copy.deepcopy(models)
    x = torch.randn(2, T, D, dtype=torch.float64)
    b = mbcompile.batch(models, strict=True).eval()
    out = run(b, x)
    out.square().sum().backward()
    for i, r in enumerate(refs):
        o = run(r, x)
        o.square().sum().backward()
        torch.testing.assert_close(out[i], o, rtol=1e-9, atol=1e-10)
        for name, p in r.named_parameters():
            torch.testing.assert_close(b.get_parameter(name).grad[i], p.grad, rtol=1e-8, atol=1e-10, msg=name)


class Checkpointed(nn.Module):
    """Activation checkpointing, either implementation, with dropout inside the checkpointed block."""

    def __init__(self, reentrant):
        super().__init__()
        self.a, self.b, self.reentrant = nn.Linear(6, 8), nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.3)), reentrant
        self.c, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        h = checkpoint(self.b, torch.tanh(self.a(x)), use_reentrant=self.reentrant)
        # on an input that needs no grad, reentrant checkpointing gives c no gradient at all (torch warns)
        return self.head(h + checkpoint(self.c, x, use_reentrant=self.reentrant))


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_activation_checkpointing_trains_as_each_model_alone(reentrant):
    seeds = [3, 4, 5]
    models = [Checkpointed(reentrant).double() for _ in seeds]
    refs = copy.deepcopy(models)
    batched = mbcompile.batch(models, seeds=seeds)
    x = torch.randn(5, 6, dtype=torch.float64)
    for _ in range(2):                                # the masks of a second call too
        out = batched(x)
        assert out.requires_grad
        out.square().sum().backward()
    for i, r in enumerate(refs):
        torch.manual_seed(seeds[i])
        for _ in range(2):
            ref = r(x)
            ref.square().sum().backward()
        torch.testing.assert_close(out[i], ref, rtol=1e-10, atol=1e-12)
        for name, p in r.named_parameters():
            got = batched.get_parameter(name).grad
            if p.grad is None:
                assert reentrant and name.startswith("c.") and (got is None or not got[i].any()), name
                continue
            torch.testing.assert_close(got[i], p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("nested", [True, False])
def test_encoder_in_eval_with_a_padding_mask_matches_eagers_fast_path(nested, batch_first, aligned):
    """In eval without grad, nn.TransformerEncoder(enable_nested_tensor=True) with a left-aligned
    src_key_padding_mask takes torch's nested-tensor path: 0 at every padded position. The captured
    program (traced: the regular path) zeroes them alike; elsewhere, and where eager takes the regular
    path, the values are the regular ones."""
    def make():
        layer = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=batch_first)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                       # torch: nested tensors are a prototype
        models = _eval_models(make)
        refs = copy.deepcopy(models)
    x = torch.randn(*((3, T) if batch_first else (T, 3)), D, dtype=torch.float64)
    pad = torch.zeros(3, T, dtype=torch.bool)
    pad[0, 3:] = pad[2, 4:] = True
    if not aligned:
        pad[1, 0] = True                                      # a padded token before a kept one
    b = mbcompile.batch(models, strict=True).eval()
    with torch.no_grad():
        out = b(x, src_key_padding_mask=pad)
        for i, r in enumerate(refs):
            ref = r(x, src_key_padding_mask=pad)
            torch.testing.assert_close(out[i], ref, rtol=1e-10, atol=1e-12)
    zeros = (out[0] if batch_first else out[0].transpose(0, 1))[pad].abs().max() == 0
    assert bool(zeros) == (nested and aligned and batch_first)   # torch: the fast path needs batch_first
