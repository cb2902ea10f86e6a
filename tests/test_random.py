"""Per-model randomness: "sequential" reproduces each model's own draws bit for bit; "different"
draws fresh independent masks; "same" shares one."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mbcompile
from _streams import Streams

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
        if k == "fill_a_view":                              # in place into views of a tensor forward made
            t = torch.zeros_like(h)
            t[:, :3].uniform_(-1.0, 1.0)
            t[0].bernoulli_(0.5)
            return h * t
        if k == "dropout_a_view_inplace":
            h = h * 1
            F.dropout(h[:, 2:], 0.5, self.training, inplace=True)
            return h
        raise KeyError(k)


KINDS = ["dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
         "rand_like", "randn_like", "bernoulli", "bernoulli_p", "normal_", "uniform_", "transposed_dropout",
         "fill_a_view", "dropout_a_view_inplace"]


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


@torch.library.custom_op("mbtest::seeded_noise", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _seeded_noise(x: torch.Tensor) -> torch.Tensor:
    return torch.rand_like(x) * x


@_seeded_noise.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("mbtest::seeded_pair", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _seeded_pair(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand_like(x), torch.rand_like(x)


@_seeded_pair.register_fake
def _(x):
    return torch.empty_like(x), torch.empty_like(x)


class OtherRandom(nn.Module):
    """h = x * w + b (elementwise: bit for bit batched), then a random op; returns (out, raw draw)."""
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.w, self.b = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(6))

    def forward(self, x):
        h = x * self.w + self.b                                # B,6
        k, e = self.kind, torch.empty_like(h)
        if k == "randperm":
            r = torch.randperm(6)
            return h[:, r], r
        draws = {
            "randint": lambda: torch.randint(0, 3, h.shape, dtype=h.dtype),
            "randint_high": lambda: torch.randint(5, (4,)),
            "randint_like": lambda: torch.randint_like(h, 3),
            "random_": lambda: e.random_(4),
            "random_full": lambda: torch.empty(h.shape, dtype=torch.int64).random_(),
            "multinomial": lambda: torch.multinomial(torch.softmax(h.detach(), -1), 3),
            "multinomial_shared": lambda: torch.multinomial(torch.ones(6), 4, replacement=True),
            "exponential_": lambda: e.exponential_(1.5),
            "exponential_of_h": lambda: h.clone().exponential_(),
            "geometric_": lambda: e.geometric_(0.3),
            "cauchy_": lambda: e.cauchy_(),
            "log_normal_": lambda: e.log_normal_(0.5, 0.3),
            "poisson": lambda: torch.poisson(h.abs() * 3),
            "normal_float_float": lambda: torch.normal(0.0, 0.5, size=h.shape, dtype=h.dtype),
            "normal_tensor_float": lambda: torch.normal(h, 0.5),
            "normal_float_tensor": lambda: torch.normal(1.0, h.abs()),
            "normal_tensor_tensor": lambda: torch.normal(h, h.abs()),
            "custom_seeded_op": lambda: torch.ops.mbtest.seeded_noise(h.detach()),
        }
        if k in draws:
            r = draws[k]()
            if r.shape == h.shape and r.is_floating_point():
                return h * r, r
            return h.sum() * r, r
        if k == "rrelu":
            return F.rrelu(h, 0.1, 0.4, training=self.training), h
        if k == "rrelu_module":
            return nn.RReLU()(h) if self.training else nn.RReLU().eval()(h), h
        if k == "rrelu_":
            return F.rrelu(h * 1, training=self.training, inplace=True), h
        raise KeyError(k)


OTHER_KINDS = ["randperm", "randint", "randint_high", "randint_like", "random_", "random_full", "multinomial",
               "multinomial_shared", "exponential_", "exponential_of_h", "geometric_", "cauchy_",
               "log_normal_", "poisson", "normal_float_float", "normal_tensor_float", "normal_float_tensor",
               "normal_tensor_tensor", "custom_seeded_op", "rrelu", "rrelu_module", "rrelu_"]


def _other_run(kind, train=True, **kw):
    models = [OtherRandom(kind).double().train(train) for _ in SEEDS]
    refs = [copy.deepcopy(m) for m in models]
    batched = mbcompile.batch(models, seeds=SEEDS, **kw).train(train)
    xs = [torch.randn(5, 6, dtype=torch.float64) for _ in range(2)]
    state = torch.get_rng_state()
    outs = []
    for x in xs:
        out, r = batched(x)
        out.sum().backward()
        outs.append((out, r))
    return models, refs, batched, xs, outs, state


@pytest.mark.parametrize("kind", OTHER_KINDS)
def test_other_random_ops_reproduce_each_models_draws_and_grads(kind):
    """Random ops beyond dropout/rand/randn/...: model i draws exactly what it draws alone."""
    _, refs, batched, xs, outs, state = _other_run(kind, strict=True)
    assert torch.equal(state, torch.get_rng_state())        # the global generator was not advanced
    for i, r in enumerate(refs):
        torch.manual_seed(SEEDS[i])
        for x, (out, draw) in zip(xs, outs):
            ref, ref_draw = r(x)
            ref.sum().backward()
            assert torch.equal(draw[i], ref_draw), f"model {i}: draws differ"
            assert torch.equal(out[i], ref), f"model {i}: outputs differ"
        assert torch.equal(batched.w.grad[i], r.w.grad) and torch.equal(batched.b.grad[i], r.b.grad)
    a, b = outs[0][1], outs[1][1]
    if a.shape == b.shape and kind not in ("rrelu", "rrelu_module", "rrelu_"):
        assert not torch.equal(a, b)                            # the stream moves on between calls


@pytest.mark.parametrize("kind", ["rrelu", "rrelu_module", "rrelu_"])
def test_rrelu_in_eval_is_leaky_relu_with_the_mean_slope(kind):
    _, refs, _, xs, outs, state = _other_run(kind, train=False, strict=True)
    for i, r in enumerate(refs):
        for x, (out, _) in zip(xs, outs):
            assert torch.equal(out[i], r(x)[0])


@pytest.mark.parametrize("kind", ["randperm", "randint", "multinomial", "exponential_of_h", "normal_tensor_float",
                                  "rrelu"])
def test_other_random_ops_different_and_same_modes(kind):
    for mode in ("different", "same"):
        _, _, _, _, outs, state = _other_run(kind, randomness=mode, strict=True)
        out, draw = outs[0]
        assert out.shape[0] == 3 and draw.shape[0] == 3
        assert not torch.equal(state, torch.get_rng_state())    # these modes draw from torch's generator
        shared = kind in ("randperm", "randint")                 # every input shared: one draw in "same"
        assert torch.equal(draw[0], draw[1]) == (mode == "same" and shared)


def test_random_op_without_rule_is_flagged(monkeypatch):
    """A seeded op that no rule gives per-model streams never runs shared, silently."""
    from mbcompile.errors import UnsupportedOpError
    from mbcompile.passes import batch_pass

    class Gamma(nn.Module):
        def __init__(self, op):
            super().__init__()
            self.op, self.w = op, nn.Parameter(torch.ones(4))

        def forward(self, x):
            g = self.op(torch.ones(4, dtype=torch.float64))     # every input shared
            return x * self.w * (g[0] if isinstance(g, tuple) else g)

    x = torch.randn(2, 4, dtype=torch.float64)
    for op in (torch.ops.mbtest.seeded_pair,):            # (torch._standard_gamma has had a rule since stop 23)
        with pytest.raises(UnsupportedOpError, match="random op"):
            mbcompile.batch(Gamma(op).double(), n=3, strict=True)(x)
        monkeypatch.setattr(batch_pass, "_WARNED", set())
        with pytest.warns(UserWarning, match="fallback"):
            out = mbcompile.batch(Gamma(op).double(), n=3)(x)
        assert not torch.equal(out[0], out[1])                  # one draw per model, not one shared


def test_attention_dropout_rate_per_model():
    """nn.TransformerEncoderLayer(dropout=p_i): the attention's own rate (a float in MultiheadAttention,
    read by sdpa) and the Dropout modules' rates are each model's; masks are each model's own stream."""
    d, seeds = 8, [5, 6, 7]
    models = [nn.TransformerEncoderLayer(d, 2, 16, dropout=p, batch_first=True).double() for p in (0.0, 0.3, 0.6)]
    refs = copy.deepcopy(models)
    b = mbcompile.batch(models, seeds=seeds, strict=True)
    x = torch.randn(2, 5, d, dtype=torch.float64)
    streams = Streams(seeds)
    for _ in range(2):                                         # the streams continue
        out = b(x)
        out.square().sum().backward()
        for i, r in enumerate(refs):
            o = streams.run(i, r, x)
            o.square().sum().backward()
            torch.testing.assert_close(out[i], o, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(b.get_parameter("self_attn.in_proj_weight").grad[i],
                                       r.self_attn.in_proj_weight.grad, rtol=1e-10, atol=1e-12)
    b.eval()
    with torch.no_grad():
        out = b(x)
    for i, r in enumerate(refs):
        torch.testing.assert_close(out[i], r.eval()(x), rtol=1e-12, atol=1e-12)


class MaskedAttnDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)

    def forward(self, x):                                      # B,L,4; query 1 attends to no key
        q, k, v = self.qkv(x).unflatten(-1, (3, 1, 4)).permute(2, 0, 3, 1, 4).unbind(0)
        L = x.shape[1]
        mask = torch.ones(L, L, dtype=torch.bool).tril()
        mask[1] = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.4)


def test_attention_dropout_with_a_query_that_attends_to_nothing():
    """Eager's math path gives such a query 0s (a safe softmax), not NaN; so does the batched one."""
    seeds = [3, 4]
    models = [MaskedAttnDropout().double() for _ in seeds]
    refs = copy.deepcopy(models)
    b = mbcompile.batch(models, seeds=seeds, strict=True)
    x = torch.randn(2, 4, 4, dtype=torch.float64)
    out = b(x)
    out.square().sum().backward()
    streams = Streams(seeds)
    for i, r in enumerate(refs):
        o = streams.run(i, r, x)
        assert not o.isnan().any() and (o[:, :, 1] == 0).all()
        o.square().sum().backward()
        torch.testing.assert_close(out[i], o, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b.qkv.weight.grad[i], r.qkv.weight.grad, rtol=1e-10, atol=1e-12)


class NoGradSampler(nn.Module):
    """Random draws inside a no_grad block of forward (torch.distributions' sample() wraps its draw so)."""
    def __init__(self):
        super().__init__()
        self.mu, self.l = nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x):
        m = self.mu(x)
        with torch.no_grad():
            eps = torch.randn_like(m)
            keep = F.dropout(torch.ones_like(m), 0.5, True)
        a = torch.distributions.Normal(m, 1.0, validate_args=False).sample()
        return self.l(m + eps * keep + a)


def test_random_ops_inside_no_grad_blocks_draw_per_model():
    seeds = [3, 4, 5]
    models = [NoGradSampler().double() for _ in range(3)]
    refs = copy.deepcopy(models)
    b = mbcompile.batch(models, seeds=seeds, strict=True)
    x = torch.randn(6, 4, dtype=torch.float64)
    g = torch.get_rng_state()
    out = b(x)
    assert torch.equal(g, torch.get_rng_state())               # the global stream did not move
    out.square().sum().backward()
    for i, r in enumerate(refs):
        torch.manual_seed(seeds[i])
        want = r(x)
        want.square().sum().backward()
        torch.testing.assert_close(out[i], want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b.get_parameter("mu.weight").grad[i], r.mu.weight.grad, rtol=1e-10, atol=1e-12)


class _OwnGenerator(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.fc, self.how = nn.Linear(4, 4), how

    def forward(self, x, g=None):
        if self.how == "made":
            g = torch.Generator().manual_seed(0)
            return self.fc(x) + torch.randn(x.shape, generator=g)
        if self.how == "perm":
            g = torch.Generator().manual_seed(0)
            return self.fc(x[torch.randperm(x.shape[0], generator=g)])
        return F.dropout(self.fc(x), 0.5, True) + torch.rand(x.shape, generator=g)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("how", ["made", "perm", "passed"])
def test_a_draw_from_an_explicit_generator_is_refused_with_its_line(how, strict):
    """One generator object cannot give each model what it draws alone (a fresh one per call, or its
    own): refused naming the op and the user's line (it crashed inside the random-op rewrite)."""
    b = mbcompile.batch([_OwnGenerator(how) for _ in range(3)], strict=strict)
    kw = {"g": torch.Generator().manual_seed(1)} if how == "passed" else {}
    with pytest.raises(mbcompile.UnsupportedOpError, match=r"(?s)generator.*test_random.py.*generator=g"):
        b(torch.randn(5, 4), **kw)


class UnusedDraws(nn.Module):
    """Draws whose results forward never uses (the last scheduled-sampling mask of a decoder loop): they
    still advance model i's stream, as alone."""
    def __init__(self, kind):
        super().__init__()
        self.fc, self.kind = nn.Linear(6, 6), kind

    def forward(self, x):
        h = self.fc(x)
        k = self.kind
        if k == "rand":
            torch.rand(4)
        elif k == "dropout":
            F.dropout(h, 0.5, self.training)
        elif k == "randperm":
            torch.randperm(5)
        elif k == "normal_":
            torch.empty(3).normal_()
        return h * torch.rand_like(h)


@pytest.mark.parametrize("kind", ["rand", "dropout", "randperm", "normal_"])
def test_draws_whose_results_are_unused_still_advance_each_stream(kind):
    models = [UnusedDraws(kind).double() for _ in SEEDS]
    refs = copy.deepcopy(models)
    b = mbcompile.batch(models, seeds=SEEDS, strict=True)
    x = torch.randn(5, 6, dtype=torch.float64)
    outs = [b(x) for _ in range(3)]
    for i, r in enumerate(refs):
        torch.manual_seed(SEEDS[i])
        for out in outs:
            torch.testing.assert_close(out[i], r(x), rtol=1e-12, atol=1e-12)
    for mode in ("different", "same"):
        assert mbcompile.batch(copy.deepcopy(refs), randomness=mode)(x).shape == (3, 5, 6)


class BigDraws(nn.Module):
    """Draws of 64K elements a model: enough to be split over the cores (ops.SPREAD_MIN_NUMEL)."""

    def __init__(self, p):
        super().__init__()
        self.fc = nn.Linear(16, 1024)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        h = self.drop(self.fc(x))                                    # 64,1024
        h = h + torch.rand_like(h) + torch.randn_like(h) * 0.1
        return h * torch.bernoulli(torch.sigmoid(h.detach()))


def test_big_draws_on_the_cores_are_each_models_own(monkeypatch):
    """CPU generators draw on one thread; big per-model draws run on the worker threads, one model's
    stream each: the masks and noise must still be exactly those of each model alone."""
    from mbcompile import cores, ops
    if cores.workers(2) < 2 and torch.get_num_threads() >= 2:
        pytest.skip("no worker threads here (MBCOMPILE_SPREAD=0, or torch's threads are not OpenMP's)")
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    spread = []
    real = cores.map_models
    monkeypatch.setattr(ops.cores, "map_models", lambda fn, n, k=None: spread.append(k) or real(fn, n, k))
    monkeypatch.setattr(ops, "SPREAD_MIN_TOTAL", 0)                  # 4 models: spread at any total
    try:
        seeds, ps = [5, 6, 7, 8], [0.1, 0.3, 0.5, 0.7]
        models = [BigDraws(p).double() for p in ps]
        refs = [copy.deepcopy(m) for m in models]
        batched = mbcompile.batch(models, seeds=seeds, strict=True).train()
        x = torch.randn(64, 16, dtype=torch.float64)
        out = [batched(x) for _ in range(2)]
    finally:
        torch.set_num_threads(old)
    assert None in spread                                            # split over the workers
    for i, r in enumerate(refs):
        torch.manual_seed(seeds[i])
        for o in out:
            ref = r.train()(x)
            torch.testing.assert_close(o[i], ref, rtol=1e-12, atol=1e-12)
            assert torch.equal(o[i] == 0, ref == 0)                   # the very same masks


def test_small_draws_stay_on_the_callers_thread(monkeypatch):
    """Handing a draw to the workers restarts the caller's OpenMP team afterwards: only draws of
    SPREAD_MIN_TOTAL elements in all (and SPREAD_MIN_NUMEL a model) are split."""
    from mbcompile import cores, ops
    ks = []
    real = cores.map_models
    monkeypatch.setattr(ops.cores, "map_models", lambda fn, n, k=None: ks.append(k) or real(fn, n, k))
    states = torch.stack([torch.Generator().manual_seed(i).get_state() for i in range(4)])
    for numel, split in ((ops.SPREAD_MIN_TOTAL // 4, True), (ops.SPREAD_MIN_TOTAL // 8, False),
                         (ops.SPREAD_MIN_NUMEL // 2, False)):
        ks.clear()
        torch.ops.mbcompile.draw_per_model(None, 0, "bernoulli_keep", [0.9], 0.0, [numel], [1], torch.float32,
                                           torch.device("cpu"), states)
        assert ks == [None if split else 1], (numel, ks)


SAMPLERS = {   # reparameterised samplers: the sample is differentiable in its parameter
    "standard_gamma": lambda c: torch._standard_gamma(c),
    "Gamma.rsample": lambda c: torch.distributions.Gamma(c, 2.0, validate_args=False).rsample(),
    "Beta.rsample": lambda c: torch.distributions.Beta(c, c.flip(-1), validate_args=False).rsample(),
    "Dirichlet.rsample": lambda c: torch.distributions.Dirichlet(c, validate_args=False).rsample(),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_reparameterised_samplers_draw_and_differentiate_as_each_model_alone(name):
    """Stop 23's hunt: Dirichlet/Beta's gradient was silently zero (capture keeps only the forward of
    their autograd.Function), _standard_gamma ran through the fallback with "different" draws, and
    Gamma.rsample's in-place clamp of a detached view cut its gradient."""
    sample = SAMPLERS[name]

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 3)

        def forward(self, x):
            return sample(self.a(x).exp())

    torch.manual_seed(0)
    models = [M().double() for _ in range(3)]
    x = torch.randn(4, 6, dtype=torch.float64)
    w = torch.arange(1.0, 4.0, dtype=torch.float64)
    b = mbcompile.batch(copy.deepcopy(models), seeds=range(3), strict=True)
    out = b(x)
    (out * w).sum().backward()
    grad = dict(b.named_parameters())["a.weight"].grad
    for i, m in enumerate(models):
        torch.manual_seed(i)
        o = m(x)
        (o * w).sum().backward()
        torch.testing.assert_close(out[i], o, rtol=1e-12, atol=1e-12, msg=lambda s: f"model {i} sample: {s}")
        assert m.a.weight.grad.abs().max() > 0
        torch.testing.assert_close(grad[i], m.a.weight.grad, rtol=1e-10, atol=1e-12,
                                   msg=lambda s: f"model {i} gradient: {s}")


def test_a_shared_sampler_parameter_gets_every_models_gradient():
    """The sampler's parameter is the (shared) input: its gradient sums each model's."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.rand(5, dtype=torch.float64) + 0.5)

        def forward(self, c):
            return torch._standard_gamma(c) * self.s

    torch.manual_seed(0)
    models = [M() for _ in range(3)]
    c = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_()
    b = mbcompile.batch(copy.deepcopy(models), seeds=range(3))
    b(c).sum().backward()
    want = torch.zeros_like(c)
    for i, m in enumerate(models):
        torch.manual_seed(i)
        c_i = c.detach().clone().requires_grad_()
        m(c_i).sum().backward()
        want += c_i.grad
    torch.testing.assert_close(c.grad, want, rtol=1e-12, atol=1e-12)


def test_inplace_clamp_through_detach_keeps_the_gradient():
    """Eager changes x's values and autograd never sees it: x's gradient is the identity."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 3)

        def forward(self, x):
            v = self.a(x)
            v.detach().clamp_(min=0.0)
            return v * 2

    torch.manual_seed(0)
    models = [M().double() for _ in range(2)]
    x = torch.randn(4, 6, dtype=torch.float64)
    b = mbcompile.batch(copy.deepcopy(models))
    out = b(x)
    out.sum().backward()
    for i, m in enumerate(models):
        o = m(x)
        o.sum().backward()
        assert (o >= 0).all() and (out[i] >= 0).all()           # the clamp's values, in both
        torch.testing.assert_close(out[i], o, rtol=1e-12, atol=1e-12)   # (a measured linear lowering rounds)
        torch.testing.assert_close(dict(b.named_parameters())["a.weight"].grad[i], m.a.weight.grad)


class _DrawsLikePerModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        h = self.fc(x)                 # per model: every draw below is shaped like a per-model value
        return (torch.rand_like(h), torch.randn_like(h), torch.bernoulli(torch.full_like(h, 0.5)),
                torch.bernoulli(torch.sigmoid(h)))


def test_same_randomness_shares_draws_shaped_like_per_model_values():
    """randomness="same": draws shaped like a per-model tensor, and bernoulli of per-model probabilities
    (one shared uniform draw against each model's p), are every model's one draw (bernoulli(p) used to
    draw per model)."""
    batched = mbcompile.batch([_DrawsLikePerModel() for _ in range(3)], randomness="same")
    rand, randn, coin, probs = batched(torch.randn(5, 3))
    for t in (rand, randn, coin):
        assert all(torch.equal(t[0], t[i]) for i in range(3))
    assert probs.shape == (3, 5, 4) and set(probs.unique().tolist()) <= {0.0, 1.0}
