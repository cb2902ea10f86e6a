"""The BatchedModule contract: names, ties, buffers, in_dims, pytrees, errors, explain."""
import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mbcompile
from _models import MLP, EmbBag


def test_tied_weights_stay_tied_and_state_dict_lists_every_name():
    m = EmbBag().double()
    b = mbcompile.batch(m, n=3)
    assert b.proj.weight is b.emb.weight
    assert set(b.state_dict()) == set(m.state_dict())
    names = [n for n, _ in b.named_parameters()]
    assert names == [n for n, _ in m.named_parameters()]
    u = b.unbatch(1)
    assert u.proj.weight is u.emb.weight


def test_requires_grad_false_and_buffers_carry_over():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.fc.bias.requires_grad_(False)
            self.register_buffer("scale", torch.tensor(2.0))
            self.register_buffer("tmp", torch.ones(3), persistent=False)

        def forward(self, x):
            return self.fc(x) * self.scale + self.tmp

    m = M().double()
    b = mbcompile.batch(m, n=2)
    assert not b.fc.bias.requires_grad and b.fc.weight.requires_grad
    assert "tmp" not in b.state_dict() and "scale" in b.state_dict()
    assert b.tmp.shape == (2, 3) and b.scale.shape == (2,)
    x = torch.randn(4, 3, dtype=torch.float64)
    b(x).sum().backward()
    assert b.fc.bias.grad is None and b.fc.weight.grad is not None
    u = b.unbatch(0)
    assert not u.fc.bias.requires_grad and "tmp" in dict(u.named_buffers())
    torch.testing.assert_close(u(x), m(x))


def test_state_dict_round_trip():
    a = mbcompile.batch([MLP().double() for _ in range(3)])
    b = mbcompile.batch([MLP().double() for _ in range(3)])
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 10, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_in_dims_tuple_and_keyword_inputs_are_shared():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x, y, *, scale):
            return self.fc(x) + y * scale

    models = [Two().double() for _ in range(3)]
    b = mbcompile.batch(models, in_dims=(0, None))
    xs = torch.randn(3, 5, 4, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    s = torch.tensor(3.0, dtype=torch.float64)
    out = b(xs, y, scale=s)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(xs[i], y, scale=s), rtol=1e-12, atol=1e-12)


def test_pytree_outputs_get_the_model_dim():
    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor
        extra: dict

    torch.utils._pytree.register_dataclass(Out)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            h = self.fc(x)
            return Out(h, {"pair": (h.sum(-1), x)})

    models = [M().double() for _ in range(2)]
    b = mbcompile.batch(models)
    x = torch.randn(4, 3, dtype=torch.float64)
    out = b(x)
    assert isinstance(out, Out)
    assert out.logits.shape == (2, 4, 2) and out.extra["pair"][0].shape == (2, 4)
    assert out.extra["pair"][1].shape == (2, 4, 3)       # a shared output is given the model dim too
    torch.testing.assert_close(out.logits[1], models[1](x).logits)


def test_a_smaller_last_batch_recaptures():
    b = mbcompile.batch([MLP().double() for _ in range(2)])
    assert b(torch.randn(8, 10, dtype=torch.float64)).shape == (2, 8, 3)
    assert b(torch.randn(3, 10, dtype=torch.float64)).shape == (2, 3, 3)
    assert len(b._programs) == 2


def test_training_the_batch_leaves_the_original_model_alone():
    m = MLP().double()
    before = copy.deepcopy(m.state_dict())
    b = mbcompile.batch(m, n=2)
    b(torch.randn(2, 10, dtype=torch.float64)).sum().backward()
    with torch.no_grad():
        for p in b.parameters():
            p.sub_(p.grad)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


def test_mismatched_architectures_name_the_difference():
    a, c = MLP(), MLP(h=16)
    with pytest.raises(ValueError, match="fc1"):
        mbcompile.batch([a, c])
    with pytest.raises(ValueError, match="n"):
        mbcompile.batch(MLP())


def test_wrong_leading_size_names_n_and_the_size():
    b = mbcompile.batch(MLP(), n=4, in_dims=0)
    with pytest.raises(ValueError, match=r"n=4.*leading size 2"):
        b(torch.randn(2, 3, 10))


@torch.library.custom_op("mbtest::cube", mutates_args=())
def cube(x: torch.Tensor) -> torch.Tensor:
    """An op mbcompile has no rule for (and vmap has no batching rule for either)."""
    return x * x * x


@cube.register_fake
def _(x):
    return torch.empty_like(x)


class Weird(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return cube(self.fc(x))


def test_strict_mode_names_the_op_and_the_source_line():
    b = mbcompile.batch(Weird().double(), n=2, strict=True)
    with pytest.raises(mbcompile.UnsupportedOpError, match=r"(?s)mbtest.cube.*test_api\.py.*adding_a_rule"):
        b(torch.randn(3, 4, dtype=torch.float64))


def test_fallback_warns_once_and_is_correct_and_explained():
    models = [Weird().double() for _ in range(2)]
    b = mbcompile.batch(models)
    x = torch.randn(3, 4, dtype=torch.float64)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        out = b(x)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x))
    report = str(mbcompile.explain(b))
    assert "FALLBACK" in report and "mbtest.cube" in report


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if self.fc(x).mean() > 0:  # the line the error must point at
            return x
        return -x


def test_capture_error_points_at_the_users_line():
    b = mbcompile.batch(Branchy(), n=2)
    with pytest.raises(mbcompile.CaptureError, match=r"(?s)torch\.cond.*test_api\.py.*the line the error"):
        b(torch.randn(2, 4))


class ReadsANumber(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        scale = float(x.abs().max())  # a number read from the data, no branch
        return self.fc(x / scale)


def test_a_number_read_from_the_data_is_named_as_such_not_as_a_branch():
    b = mbcompile.batch(ReadsANumber(), n=2)
    with pytest.raises(mbcompile.CaptureError, match=r"(?s)turns a tensor into a Python number.*a number read from") \
            as info:
        b(torch.randn(2, 4))
    assert "control flow" not in str(info.value)


def test_explain_shows_rules_and_lowerings():
    b = mbcompile.batch([MLP().double() for _ in range(2)])
    b(torch.randn(2, 10, dtype=torch.float64))
    e = mbcompile.explain(b)
    text = str(e)
    assert "linalg.linear" in text and "concat" in text
    assert not e.fallbacks


def test_parametrized_modules_batch_and_unbatch():
    """weight_norm gives each instance its own class; models built alike still batch."""
    def make():
        return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(5, 4)), nn.Tanh()).double()

    models = [make() for _ in range(3)]
    refs = [copy.deepcopy(m) for m in models]
    b = mbcompile.batch(models, strict=True)
    x = torch.randn(6, 5, dtype=torch.float64)
    out = b(x)
    out.sum().backward()
    params = dict(b.named_parameters())
    for i, r in enumerate(refs):
        ref = r(x)
        ref.sum().backward()
        torch.testing.assert_close(out[i], ref, rtol=1e-12, atol=1e-12)
        for name, p in r.named_parameters():
            torch.testing.assert_close(params[name].grad[i], p.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.unbatch(2)(x), models[2](x))


def test_autocast_is_part_of_the_program_key():
    models = [MLP() for _ in range(2)]
    b = mbcompile.batch(models)
    x = torch.randn(4, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = b(x)
        refs = [m(x) for m in models]
    assert low.dtype == torch.bfloat16
    for i, r in enumerate(refs):
        torch.testing.assert_close(low[i], r)
    full = b(x)
    assert full.dtype == torch.float32
    torch.testing.assert_close(full[1], models[1](x))


@pytest.mark.parametrize("what", ["list", "n"])
@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_hook_based_weight_and_spectral_norm_batch(norm, what):
    """The deprecated hook forms keep ``weight`` as a tensor the hook recomputes before every call
    (not copyable once computed with grad, and a different tensor in each model): they were refused
    ("different forward pre hooks", "differs in '0.weight'") or failed to copy. Spectral norm's power
    iteration updates its buffers in forward: each model's own, over two calls."""
    import warnings
    wrap = getattr(nn.utils, norm)

    def make(seed):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return nn.Sequential(wrap(nn.Linear(6, 5)), nn.ReLU(), nn.Linear(5, 3)).double()

    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    seeds = [0, 1, 2] if what == "list" else [0, 0, 0]
    models, refs = [make(s) for s in seeds], [make(s) for s in seeds]
    models[0](x).sum().backward()                 # weight now carries a grad_fn
    refs[0](x)
    for i in ([] if what == "list" else [1, 2]):
        refs[i](x)
    for m in models + refs:
        m.zero_grad()
    b = mbcompile.batch(models) if what == "list" else mbcompile.batch(models[0], n=3)
    for _ in range(2):
        b.zero_grad()
        out = b(x)
        out.sum().backward()
        for i, r in enumerate(refs):
            r.zero_grad()
            ref = r(x)
            ref.sum().backward()
            torch.testing.assert_close(out[i], ref, rtol=1e-12, atol=1e-12)
            for name, p in r.named_parameters():
                torch.testing.assert_close(b.get_parameter(name).grad[i], p.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.unbatch(2).eval()(x), refs[2].eval()(x), rtol=1e-12, atol=1e-12)


def test_pruned_models_batch_each_with_its_own_mask():
    """nn.utils.prune keeps ``weight = weight_orig * weight_mask`` recomputed by a pre-hook: models pruned
    by different amounts (hook objects that differ only in how much they pruned) batch, without the
    side-effect warning, and train as each alone; unbatch(i) is model i, still pruned."""
    import warnings
    import torch.nn.utils.prune as prune
    from _stacked import step_together

    def make(i):
        torch.manual_seed(i)
        m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()
        prune.l1_unstructured(m[0], "weight", amount=0.2 + 0.2 * i)
        prune.random_unstructured(m[2], "weight", amount=0.5)
        return m
    models, refs = [make(i) for i in range(3)], [make(i) for i in range(3)]
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (5,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = mbcompile.batch(models)
        b(x)
    assert sorted(n for n, _ in b.named_buffers()) == ["0.weight_mask", "2.weight_mask"]
    opt = mbcompile.optimizer(b, torch.optim.SGD, lr=[0.1, 0.2, 0.3])
    ropts = [torch.optim.SGD(r.parameters(), lr=0.1 * (i + 1)) for i, r in enumerate(refs)]
    for _ in range(3):
        step_together(b, opt, refs, ropts, F.cross_entropy, x, y)
    for i, r in enumerate(refs):
        torch.testing.assert_close(b(x)[i], r(x), rtol=1e-12, atol=1e-12)
        u = b.unbatch(i)
        torch.testing.assert_close(u(x), r(x), rtol=1e-12, atol=1e-12)
        assert prune.is_pruned(u) and torch.equal(u[0].weight_mask, r[0].weight_mask)


def test_load_state_dict_of_another_n_or_of_one_model_says_so():
    three = mbcompile.batch(nn.Linear(4, 2), n=3)
    four = mbcompile.batch(nn.Linear(4, 2), n=4)
    with pytest.raises(ValueError, match=r"'weight' holds 4 models .* this batch has n=3"):
        three.load_state_dict(four.state_dict())
    with pytest.raises(ValueError, match=r"'weight' has one model's shape \(2, 4\)"):
        three.load_state_dict(nn.Linear(4, 2).state_dict())
    other = mbcompile.batch(nn.Linear(4, 2), n=3)
    three.load_state_dict(other.state_dict())                      # the same n: loads
    assert torch.equal(three.weight, other.weight)
