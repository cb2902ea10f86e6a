"""Per-model randomness: "sequential" reproduces each model's own draws bit for bit; "different"
draws fresh independent masks; "same" shares one."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mbcompile

SEEDS = [3, 17, 101]


class RandomOps(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        h = self.fc(x)                                      # B,6 (or B,6,L for the channel variants)
        k = self.kind
        if k == "dropout":
            return F.dropout(h, 0.4, self.training)
        if k == "dropout1d":
            return F.dropout1d(h.unsqueeze(-1).expand(-1, -1, 3), 0.5, self.training)
        if k == "dropout2d":
            return F.dropout2d(h.view(-1, 6, 1, 1).expand(-1, 6, 2, 2), 0.5, self.training)
        if k == "dropout3d":
            return F.dropout3d(h.view(-1, 6, 1, 1, 1).expand(-1, 6, 2, 1, 2), 0.5, self.training)
        if k == "alpha_dropout":
            return F.alpha_dropout(h, 0.3, self.training)
        if k == "feature_alpha_dropout":
            return F.feature_alpha_dropout(h.unsqueeze(-1).expand(-1, -1, 2), 0.3, self.training)
        if k == "rand_like":
            return h * torch.rand_like(h)
        if k == "randn_like":
            return h + torch.randn_like(h)
        if k == "bernoulli":
            return h * torch.bernoulli(torch.sigmoid(h))
        if k == "bernoulli_p":
            return h * torch.bernoulli(h.detach(), 0.3)
        if k == "normal_":
            return h + torch.empty_like(h).normal_(1.0, 2.0)
        if k == "uniform_":
            return h * torch.empty_like(h).uniform_(-1.0, 3.0)
        if k == "transposed_dropout":
            return F.dropout(h.t(), 0.5, self.training).t()
        raise KeyError(k)


KINDS = ["dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
         "rand_like", "randn_like", "bernoulli", "bernoulli_p", "normal_", "uniform_", "transposed_dropout"]


@pytest.mark.parametrize("kind", KINDS)
def test_sequential_reproduces_each_models_draws_and_grads(kind):
    models = [RandomOps(kind).double() for _ in SEEDS]
    refs = [copy.deepcopy(m) for m in models]
    batched = mbcompile.batch(models, seeds=SEEDS, strict=True).train()
    xs = [torch.randn(5, 6, dtype=torch.float64) for _ in range(2)]
    outs = []
    for x in xs:
        out = batched(x)
        out.sum().backward()
        outs.append(out)
    for i, r in enumerate(refs):
        torch.manual_seed(SEEDS[i])
        for x, out in zip(xs, outs):
            ref = r.train()(x)
            ref.sum().backward()
            torch.testing.assert_close(out[i], ref, rtol=1e-12, atol=1e-12)
            assert torch.equal(out[i] == 0, ref == 0)      # the very same mask
        torch.testing.assert_close(batched.fc.weight.grad[i], r.fc.weight.grad, rtol=1e-12, atol=1e-12)


def test_sequential_mode_leaves_the_global_generator_alone():
    batched = mbcompile.batch(RandomOps("dropout").double(), n=2, seeds=[1, 2])
    x = torch.randn(4, 6, dtype=torch.float64)
    state = torch.get_rng_state()
    batched(x)
    assert torch.equal(state, torch.get_rng_state())


def test_seeds_default_to_torch_generator():
    torch.manual_seed(7)
    a = mbcompile.batch(RandomOps("dropout").double(), n=3)
    torch.manual_seed(7)
    b = mbcompile.batch(RandomOps("dropout").double(), n=3)
    x = torch.randn(4, 6, dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    assert a.seeds == b.seeds
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_per_model_dropout_rates_are_used():
    ps = [0.0, 0.5, 0.9]
    models = []
    for p in ps:
        m = nn.Sequential(nn.Linear(8, 64), nn.Dropout(p)).double()
        models.append(m)
    refs = [copy.deepcopy(m) for m in models]
    batched = mbcompile.batch(models, seeds=SEEDS)
    x = torch.randn(32, 8, dtype=torch.float64)
    out = batched(x)
    for i, r in enumerate(refs):
        torch.manual_seed(SEEDS[i])
        ref = r(x)
        torch.testing.assert_close(out[i], ref, rtol=1e-12, atol=1e-12)
        assert torch.equal(out[i] == 0, ref == 0)
    dropped = [(out[i] == 0).double().mean().item() for i in range(3)]
    assert dropped[0] < 0.05 < dropped[1] < dropped[2]


def test_per_model_leaky_relu_slopes():
    models = [nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(s)).double() for s in (0.01, 0.2, 0.5)]
    batched = mbcompile.batch(models, strict=True)
    x = torch.randn(6, 4, dtype=torch.float64)
    out = batched(x)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x), rtol=1e-12, atol=1e-12)


def test_unsupported_per_model_constant_is_refused_with_module_and_attribute():
    models = [nn.Sequential(nn.Linear(4, 4), nn.ELU(alpha=a)) for a in (1.0, 2.0)]
    with pytest.raises(ValueError, match=r"1\.alpha"):
        mbcompile.batch(models)


def test_different_randomness_statistics():
    """Each model drops at rate p within 4 sigma; no two models or calls share a mask."""
    p, n = 0.3, 4
    model = nn.Sequential(nn.Dropout(p)).double()
    batched = mbcompile.batch(model, n=n, randomness="different")
    x = torch.ones(64, 50, dtype=torch.float64)
    masks = [(batched(x) == 0) for _ in range(3)]
    count = x.numel()
    sigma = math.sqrt(p * (1 - p) / count)
    for m in masks:
        for i in range(n):
            assert abs(m[i].double().mean().item() - p) < 4 * sigma
    flat = [m[i] for m in masks for i in range(n)]
    for a in range(len(flat)):
        for b in range(a + 1, len(flat)):
            assert not torch.equal(flat[a], flat[b])


def test_same_randomness_shares_one_mask():
    batched = mbcompile.batch(nn.Sequential(nn.Dropout(0.5)).double(), n=3, randomness="same")
    out = batched(torch.ones(8, 8, dtype=torch.float64))
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert (out[0] == 0).any()


def test_sequential_masks_move_on_between_calls():
    batched = mbcompile.batch(nn.Sequential(nn.Dropout(0.5)).double(), n=2, seeds=[0, 0])
    x = torch.ones(16, 16, dtype=torch.float64)
    a, b = batched(x), batched(x)
    assert torch.equal(a[0], a[1])           # same seed, same stream
    assert not torch.equal(a[0], b[0])       # a new mask every call


def test_transformer_attention_and_residual_dropout_match_each_model():
    """SDPA with dropout_p > 0 runs the math path with per-model masks, as CPU eager does."""
    models = [nn.TransformerEncoderLayer(8, 2, 16, dropout=0.3, batch_first=True).double() for _ in SEEDS]
    refs = [copy.deepcopy(m) for m in models]
    batched = mbcompile.batch(models, seeds=SEEDS, strict=True).train()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    out = batched(x)
    out.sum().backward()
    for i, r in enumerate(refs):
        torch.manual_seed(SEEDS[i])
        ref = r.train()(x)
        ref.sum().backward()
        torch.testing.assert_close(out[i], ref, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(batched.linear1.weight.grad[i], r.linear1.weight.grad, rtol=1e-9, atol=1e-9)
