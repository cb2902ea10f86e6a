"""Every lowering of a heavy op computes the same numbers (float64, against each model alone), and the
choice (forced, default or measured) is what explain() reports."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mbcompile
from mbcompile import lowering


class CNN(nn.Module):
    def __init__(self, groups=1):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=groups, bias=False)
        self.head = nn.Linear(6 * 3 * 3, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv1(x))), 2)
        x = F.relu(self.conv2(x))
        return self.head(x.flatten(1))


class Deconv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)
        self.up = nn.ConvTranspose1d(4, 2, 3, stride=2, groups=2)

    def forward(self, x):
        return self.up(torch.tanh(self.conv(x)))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(7, 9), nn.Linear(9, 9, bias=False), nn.Linear(9, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.tanh(self.fc1(x)))))


INPUT = {CNN: lambda: torch.randn(4, 3, 12, 12, dtype=torch.float64),
         Deconv: lambda: torch.randn(3, 2, 9, dtype=torch.float64),
         MLP: lambda: torch.randn(5, 7, dtype=torch.float64)}


def notes(batched):
    return [note for r in mbcompile.explain(batched).records for note in r.notes]


def check(cls, mode, per_model_input, n=3, force=None, **kw):
    """Batched forward and gradients equal each model's own, under lowering mode ``mode``."""
    return notes(checked(cls, mode, per_model_input, n, force, **kw)[0])


def checked(cls, mode, per_model_input, n=3, force=None, **kw):
    """check(), returning the batched module and the reference models."""
    models = [cls(**kw).double() for _ in range(n)]
    refs = copy.deepcopy(models)
    with lowering.force(mode, **(force or {})):
        batched = mbcompile.batch(models, in_dims=0 if per_model_input else None)
        xs = torch.stack([INPUT[cls]() for _ in range(n)]) if per_model_input else INPUT[cls]()
        out = batched(xs)
    out.square().sum().backward()
    params = dict(batched.named_parameters())
    for i, ref in enumerate(refs):
        x = xs[i] if per_model_input else xs
        want = ref(x)
        torch.testing.assert_close(out[i], want, rtol=1e-10, atol=1e-10)
        want.square().sum().backward()
        for name, p in ref.named_parameters():
            torch.testing.assert_close(params[name].grad[i], p.grad, rtol=1e-9, atol=1e-10,
                                       msg=lambda m, name=name: f"model {i} {name}: {m}")
    return batched, refs


@pytest.mark.parametrize("mode, per_model_input", [("grouped", False), ("loop", False), ("concat", False),
                                                   ("concat_nhwc", False), ("grouped", True), ("loop", True),
                                                   ("unfold", True), ("grouped_nhwc", True)])
def test_conv_lowerings_agree(mode, per_model_input):
    got = check(CNN, mode, per_model_input)
    conv = [s for s in got if s.startswith("conv")]
    assert len(conv) == 2
    # conv1 sees the shared input only when the input is shared; conv2 always sees per-model input
    first, second = conv
    offered_first = ("concat", "concat_nhwc", "loop") if not per_model_input else \
        ("grouped", "grouped_nhwc", "loop", "unfold")
    if mode in offered_first:
        assert first.startswith(f"conv{'' if per_model_input else '_shared_input'} lowering: {mode} (forced")
    if mode in ("grouped", "grouped_nhwc", "loop", "unfold"):
        assert second.startswith(f"conv lowering: {mode} (forced"), second


@pytest.mark.parametrize("mode", ["grouped", "loop"])
def test_grouped_and_transposed_conv_lowerings_agree(mode):
    got = check(Deconv, mode, True)
    assert sum(s.startswith(f"conv lowering: {mode} (forced") for s in got) == 2, got
    got = check(CNN, mode, True, groups=2)
    assert sum(s.startswith(f"conv lowering: {mode} (forced") for s in got) == 2, got


@pytest.mark.parametrize("mode", ["baddbmm", "bmm", "loop", "concat", "concat_t"])
@pytest.mark.parametrize("per_model_input", [False, True])
def test_linear_lowerings_agree(mode, per_model_input):
    got = check(MLP, mode, per_model_input)
    lin = [s for s in got if s.startswith("linear")]
    assert len(lin) == 3
    if mode in ("baddbmm", "loop"):      # fc2 and fc3 always see per-model input
        assert all(s.startswith(f"linear lowering: {mode} (forced") for s in lin[1:]), lin
    if not per_model_input and mode in ("bmm", "loop", "concat", "concat_t"):
        assert lin[0].startswith(f"linear_shared_input lowering: {mode} (forced"), lin


def test_default_mode_is_fixed_and_says_so():
    got = check(CNN, "default", True)
    assert any(s.startswith("conv lowering: grouped (MBCOMPILE_LOWERING=default") for s in got), got
    assert any(s.startswith("linear lowering: baddbmm (MBCOMPILE_LOWERING=default") for s in got), got


def test_measured_choice_is_cached_and_explained():
    lowering.clear_cache()
    got = check(MLP, "measure", True)
    lin = [s for s in got if s.startswith("linear lowering")]
    assert lin and all("measured fwd+bwd on cpu" in s and "baddbmm" in s and "loop" in s for s in lin), lin
    n_cached = len(lowering._CACHE)
    assert n_cached >= 2                         # fc1/fc3 share no shape with fc2
    again = check(MLP, "measure", True)
    assert len(lowering._CACHE) == n_cached      # same signatures: no new measurement
    assert [s for s in again if s.startswith("linear lowering")] == lin


def test_env_var_forces_per_family(monkeypatch):
    monkeypatch.setenv("MBCOMPILE_LOWERING", "conv=unfold,conv_shared_input=loop,linear=loop,"
                                             "linear_shared_input=bmm")
    assert lowering._setting("conv") == "unfold" and lowering._setting("linear") == "loop"
    models = [CNN().double() for _ in range(2)]
    batched = mbcompile.batch(models)
    x = INPUT[CNN]()
    out = batched(x)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x), rtol=1e-10, atol=1e-10)
    got = notes(batched)
    assert "conv_shared_input lowering: loop (forced by MBCOMPILE_LOWERING / lowering.force)" in got
    assert "conv lowering: unfold (forced by MBCOMPILE_LOWERING / lowering.force)" in got
    assert "linear lowering: loop (forced by MBCOMPILE_LOWERING / lowering.force)" in got


class Chain(nn.Module):
    """conv -> bn -> relu -> pool, twice, then a head: the layout the model dim keeps must need no copy."""
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.head = nn.Linear(6 * 2 * 2, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = F.avg_pool2d(F.relu(self.b2(self.c2(x))), 2)
        return self.head(x.flatten(1))


INPUT[Chain] = lambda: torch.randn(4, 3, 8, 8, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["grouped", "loop"])
def test_conv_bn_relu_pool_chain_runs_without_layout_copies(mode):
    models = [Chain().double() for _ in range(3)]
    refs = copy.deepcopy(models)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    # the first conv (shared input) is forced too: measured, a busy machine could pick its channels-last form
    with lowering.force(mode, conv_shared_input="concat" if mode == "grouped" else "loop"):
        batched = mbcompile.batch(models)
        out = batched(x)
    for i, ref in enumerate(refs):
        torch.testing.assert_close(out[i], ref(x), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(batched.unbatch(i).b2.running_var, ref.b2.running_var, rtol=1e-10, atol=1e-12)
    e = mbcompile.explain(batched)
    assert e.copies == 0, e.gm.code          # before the layout work: 3 (grouped) / 2 (loop) clones
    assert "0 copies in the batched graph" in str(e)


def test_channels_last_chain_matches_each_model_and_keeps_its_layout_in_backward():
    """concat_nhwc / grouped_nhwc: the conv/bn/relu/pool chain runs channels-last, the flatten before
    the head is the one layout boundary, and mbcompile::relayout hands gradients back in each side's
    own layout (no mixed-layout backward)."""
    batched, refs = checked(Chain, None, False, force={"conv": "grouped_nhwc", "conv_shared_input": "concat_nhwc"})
    for i, ref in enumerate(refs):
        torch.testing.assert_close(batched.unbatch(i).b2.running_var, ref.b2.running_var, rtol=1e-10, atol=1e-12)
    e = mbcompile.explain(batched)
    assert "relayout" in e.gm.code and "channels_last" in e.gm.code, e.gm.code
    assert e.copies >= 1                     # the layout switch before the head is counted as a copy


def test_relayout_gradient_comes_back_in_the_inputs_layout():
    from mbcompile import ops  # noqa: F401 - registers mbcompile::relayout
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    x.requires_grad_()
    assert x.is_contiguous(memory_format=torch.channels_last)
    y = torch.ops.mbcompile.relayout(x, False)
    assert y.is_contiguous() and torch.equal(y, x)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    assert gx.stride() == x.stride() and torch.equal(gx, g)
    z = torch.ops.mbcompile.relayout(x.detach().contiguous().requires_grad_(), True)
    assert z.is_contiguous(memory_format=torch.channels_last)


def test_a_channels_last_chain_is_not_offered_nchw_lowerings():
    """Once conv1 runs channels-last, conv2 measures only channels-last candidates (and im2col): a
    per-op measurement cannot see what mixing layouts costs the ops around it."""
    got = check(CNN, None, False, force={"conv_shared_input": "concat_nhwc"})
    second = [s for s in got if s.startswith("conv lowering")]
    assert len(second) == 1 and "grouped_nhwc" in second[0], got
    assert "loop" not in second[0] and "grouped " not in second[0], second


@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["B", "B,T"])
def test_concat_t_keeps_leading_dims_and_equals_each_model(lead):
    """concat_t returns the transposed product as a B..,n,O view: leading dims and bias broadcast right."""
    n = 3
    models = [nn.Linear(7, 4).double() for _ in range(n)]
    refs = copy.deepcopy(models)
    x = torch.randn(*lead, 7, dtype=torch.float64)
    with lowering.force(linear_shared_input="concat_t"):
        batched = mbcompile.batch(models)
        out = batched(x)
    assert out.shape == (n, *lead, 4)
    out.square().sum().backward()
    for i, ref in enumerate(refs):
        want = ref(x)
        torch.testing.assert_close(out[i], want, rtol=1e-12, atol=1e-12)
        want.square().sum().backward()
        torch.testing.assert_close(batched.weight.grad[i], ref.weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(batched.bias.grad[i], ref.bias.grad, rtol=1e-10, atol=1e-12)


class Attn(nn.Module):
    def __init__(self, mask_kind):
        super().__init__()
        self.qkv, self.mask_kind = nn.Linear(8, 24), mask_kind

    def forward(self, x):                                  # B,L,8 -> B,2,L,4 heads
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4).unbind(0)
        L = x.shape[1]
        if self.mask_kind == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        mask = None
        if self.mask_kind == "bool":
            mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        elif self.mask_kind == "empty_row":                # a query with no key to attend: 0s
            mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
            mask[1] = False
        elif self.mask_kind == "float":
            mask = torch.linspace(-1.0, 0.0, L * L, dtype=x.dtype, device=x.device).view(L, L)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("mask_kind", [None, "bool", "empty_row", "float", "causal"])
@pytest.mark.parametrize("mode", ["fused", "math", "broadcast"])
def test_attention_lowerings_agree(mode, mask_kind):
    n = 3
    models = [Attn(mask_kind).double() for _ in range(n)]
    refs = copy.deepcopy(models)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with lowering.force(attention=mode):
        batched = mbcompile.batch(models)
        out = batched(x)
    (out * torch.arange(out[0].numel(), dtype=out.dtype).view(out[0].shape)).sum().backward()
    assert any(s.startswith(f"attention lowering: {mode} (forced") for s in notes(batched))
    for i, ref in enumerate(refs):
        want = ref(x)
        torch.testing.assert_close(out[i], want, rtol=1e-10, atol=1e-12)
        (want * torch.arange(want.numel(), dtype=want.dtype).view(want.shape)).sum().backward()
        torch.testing.assert_close(batched.qkv.weight.grad[i], ref.qkv.weight.grad, rtol=1e-9, atol=1e-10)


class LearnedBias(nn.Module):
    """A learned additive attention bias (relative positions, ALiBi slopes): SDPA's attn_mask needs a
    gradient, which the CPU flash kernel does not give."""

    def __init__(self):
        super().__init__()
        self.qkv, self.bias = nn.Linear(8, 24), nn.Parameter(torch.randn(2, 5, 5) * 0.1)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)


@pytest.mark.parametrize("mode", ["measured", "fused"])
def test_a_learned_attention_mask_is_never_given_the_fused_kernel(mode):
    models = [LearnedBias().double() for _ in range(3)]
    refs = copy.deepcopy(models)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with lowering.force(**({"attention": "fused"} if mode == "fused" else {})):
        batched = mbcompile.batch(models)
        out = batched(x)
    out.square().sum().backward()
    assert not any("lowering: fused" in s for s in notes(batched)), notes(batched)
    for i, ref in enumerate(refs):
        want = ref(x)
        torch.testing.assert_close(out[i], want, rtol=1e-10, atol=1e-12)
        want.square().sum().backward()
        for name, p in ref.named_parameters():
            torch.testing.assert_close(batched.get_parameter(name).grad[i], p.grad, rtol=1e-9, atol=1e-10)


class OneConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.head(F.relu(self.c(x)).flatten(1))


INPUT[OneConv] = lambda: torch.randn(4, 3, 8, 8, dtype=torch.float64)


def test_a_cpu_conv_chain_starts_channels_last_and_a_lone_conv_measures_both_layouts():
    """Timing a chain's first conv alone cannot see what its layout costs the ops after it, so on CPU a
    conv that feeds another conv is offered only channels-last candidates (+ unfold); a conv with no
    conv after it is measured in both layouts."""
    lowering.clear_cache()
    chain = check(Chain, "measure", False)
    first = next(s for s in chain if s.startswith("conv_shared_input lowering"))
    assert "concat_nhwc" in first and "concat " not in first.split("(", 1)[1], first
    assert "loop" not in first.split("(", 1)[1], first
    second = next(s for s in chain if s.startswith("conv lowering"))
    assert "grouped_nhwc" in second and "grouped " not in second.split("(", 1)[1], second
    lone = next(s for s in check(OneConv, "measure", False) if s.startswith("conv_shared_input lowering"))
    assert all(k in lone for k in ("concat ", "concat_nhwc", "loop")), lone


def test_a_clear_loser_is_timed_twice(monkeypatch):
    """_measure re-times only candidates within LOSER_RATIO of the best (or small ones): a clear loser
    runs for its warm-up and once more."""
    monkeypatch.setattr(lowering, "_busy", lambda: False)
    import time as _time
    calls = {"fast": 0, "slow": 0}

    def fast(x):
        calls["fast"] += 1
        return x * 2

    def slow(x):
        calls["slow"] += 1
        _time.sleep(0.05)
        return x * 2

    t = lowering._measure({"fast": fast, "slow": slow}, (torch.randn(8),), (True,))
    assert calls["slow"] == 2 and calls["fast"] >= 2, calls
    assert t["slow"] >= 0.05 > t["fast"]


def _slow_first_call(calls, name, first_s, then_s):
    import time as _time

    def fn(x):
        calls[name] += 1
        _time.sleep(first_s if calls[name] == 1 else then_s)
        return x * 2
    return fn


def test_a_candidate_slow_only_on_its_first_run_is_still_chosen(monkeypatch):
    """One-time costs (a oneDNN primitive, a weight reorder) in the warm-up do not make a loser."""
    monkeypatch.setattr(lowering, "_busy", lambda: False)
    calls = {"once": 0, "steady": 0}
    t = lowering._measure({"steady": _slow_first_call(calls, "steady", 0.01, 0.01),
                           "once": _slow_first_call(calls, "once", 0.08, 0.001)}, (torch.randn(8),), (True,))
    assert t["once"] < t["steady"], t


def test_a_busy_machine_retimes_every_candidate_with_more_samples(monkeypatch):
    monkeypatch.setattr(lowering, "_busy", lambda: True)
    calls = {"fast": 0, "slow": 0}
    t = lowering._measure({"fast": _slow_first_call(calls, "fast", 0.0, 0.0),
                           "slow": _slow_first_call(calls, "slow", 0.05, 0.05)}, (torch.randn(8),), (True,))
    assert calls["slow"] >= 3 and calls["fast"] > lowering.MAX_REPS, calls
    assert t["slow"] > t["fast"]


def test_busy_reads_the_run_queue_beyond_torchs_threads(monkeypatch, tmp_path):
    import builtins
    real_open = builtins.open

    def fake(load1, running):
        def opener(path, *a, **k):
            if path == "/proc/loadavg":
                f = tmp_path / "loadavg"
                f.write_text(f"{load1} 0.5 0.5 {running}/100 123\n")
                return real_open(f, *a, **k)
            return real_open(path, *a, **k)
        return opener
    cores = len(__import__("os").sched_getaffinity(0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: cores)
    monkeypatch.setattr(builtins, "open", fake(0.1, cores))          # only this process's threads
    assert not lowering._busy()
    monkeypatch.setattr(builtins, "open", fake(0.1, cores + 2))      # two more runnable tasks
    assert lowering._busy()
    monkeypatch.setattr(builtins, "open", fake(cores + 1.0, 1))      # a sustained load
    assert lowering._busy()


class BigConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.c(x)


def test_unfold_is_not_timed_when_its_im2col_is_huge_unless_forced():
    # n=4 models, per-model input 8 x 16 x 64 x 64: im2col 4 * 8 * 144 * 4096 floats = 75.5 MB, past the CPU cap
    models = [BigConv() for _ in range(4)]
    x = torch.randn(4, 8, 16, 64, 64)
    lowering.clear_cache()
    with lowering.force(program="whole"):          # chunks of fewer models would fit im2col under the cap
        b = mbcompile.batch(models, in_dims=0)
        b(x)
    note = next(s for s in notes(b) if s.startswith("conv lowering"))
    assert "unfold" not in note and "grouped" in note, note
    with lowering.force(conv="unfold"):
        b2 = mbcompile.batch(models, in_dims=0)
        out = b2(x)
    assert any(s.startswith("conv lowering: unfold (forced") for s in notes(b2))
    torch.testing.assert_close(out[2], models[2](x[2]), rtol=1e-4, atol=1e-4)


def test_concat_t_returns_a_contiguous_model_major_result():
    """concat_t's GEMM yields (n*O),B; handing on its transposed view made every elementwise op after it
    (and its backward against the next bmm's contiguous gradient) run strided."""
    from mbcompile.passes.linalg import _linear_concat_t
    x = torch.randn(5, 7, dtype=torch.float64)
    w, b = torch.randn(3, 4, 7, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    out = _linear_concat_t(x, w, b)
    assert out.shape == (3, 5, 4) and out.is_contiguous()
    for i in range(3):
        torch.testing.assert_close(out[i], F.linear(x, w[i], b[i]), rtol=1e-12, atol=1e-12)


def test_a_candidate_that_fails_on_these_strides_is_not_chosen():
    """conv on a batch-1 1x1 map: the grouped candidate's backward (slow_conv2d) refuses the strides a
    fold leaves; the measurement drops it instead of failing the call."""
    models = [nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
              .double() for _ in range(2)]
    b = mbcompile.batch(copy.deepcopy(models))
    x = torch.randn(1, 3, 1, 1, dtype=torch.float64)
    out = b(x)
    out.sum().backward()
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t_pref, chosen", [(1.1e-3, "broadcast"), (1.3e-3, "math")])
def test_a_preferred_candidate_wins_only_within_its_factor(monkeypatch, t_pref, chosen):
    lowering.clear_cache()
    monkeypatch.setattr(lowering, "_measure", lambda cands, tensors, grad: {"math": 1e-3, "broadcast": t_pref})
    x = torch.randn(3, 2)
    cands = {"math": lambda t: t * 2, "broadcast": lambda t: t + t}
    c = lowering.choose("attention", cands, (x,), 3, prefer=("broadcast", 1.15))
    assert c.name == chosen
    assert ("preferred within 1.15x" in c.why) == (chosen == "broadcast")
    lowering.clear_cache()


def test_the_batched_graph_keeps_no_view_that_changes_nothing():
    """The rules' reshape(n, -1, i) of a tensor already n,B,i is dropped from the program (a dispatch
    and a backward node each, for nothing); the numbers stay each model's own."""
    models = [nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()
              for _ in range(3)]
    refs = copy.deepcopy(models)
    x = torch.randn(5, 6, dtype=torch.float64)
    with lowering.force(linear="baddbmm", linear_shared_input="bmm"):
        b = mbcompile.batch(models)
        out = b(x)
    gm = mbcompile.explain(b).gm
    for nd in gm.graph.nodes:
        if nd.op == "call_function" and nd.target in (torch.ops.aten.view.default, torch.ops.aten.reshape.default):
            src = nd.args[0]
            assert src.op == "placeholder" or src.meta["val"].shape != nd.meta["val"].shape, gm.code
    # small weights: plain baddbmm (linalg.LINEAR_BMM_MIN_NUMEL)
    assert sum(nd.target in (torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default) for nd in gm.graph.nodes) == 3
    out.sum().backward()
    for i, r in enumerate(refs):
        torch.testing.assert_close(out[i], r(x), rtol=1e-12, atol=1e-12)
        r(x).sum().backward()
        for (name, p), (_, q) in zip(r.named_parameters(), b.named_parameters()):
            torch.testing.assert_close(q.grad[i], p.grad, rtol=1e-12, atol=1e-12)


def assert_loop_op_matches_alone(cls, shape, mode, per_model_input, tol):
    """Forced lowering ``mode`` (a per-model loop op with its own backward op): outputs, the input's
    gradient (per model, or summed over models for a shared input), the parameters' gradients, a gradient
    penalty (create_graph: the backward itself differentiated) and a plain backward (mbcompile's backward
    op), against each model alone. Returns the batched module."""
    n = 3
    models = [cls().double() for _ in range(n)]
    refs = copy.deepcopy(models)
    x = torch.randn((n, *shape) if per_model_input else shape, dtype=torch.float64, requires_grad=True)
    with lowering.force(mode):
        batched = mbcompile.batch(models, in_dims=0 if per_model_input else None)
        out = batched(x)
    g = torch.autograd.grad(out.square().sum(), [x, *batched.parameters()], create_graph=True)
    names = [name for name, _ in batched.named_parameters()]
    gx_sum = 0
    for i, ref in enumerate(refs):
        xi = (x[i] if per_model_input else x).detach().requires_grad_()
        o = ref(xi)
        torch.testing.assert_close(out[i], o, rtol=tol, atol=tol)
        gi = torch.autograd.grad(o.square().sum(), [xi, *ref.parameters()], create_graph=True)
        if per_model_input:
            torch.testing.assert_close(g[0][i], gi[0], rtol=tol, atol=tol)
        else:
            gx_sum = gx_sum + gi[0].detach()
        for name, a, b in zip(names, g[1:], gi[1:]):
            torch.testing.assert_close(a[i], b, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")
        want = torch.autograd.grad(sum(t.square().sum() for t in gi[1:]), list(ref.parameters()))
        got = torch.autograd.grad(sum(t[i].square().sum() for t in g[1:]), list(batched.parameters()),
                                  retain_graph=True)
        for name, a, b in zip(names, got, want):
            torch.testing.assert_close(a[i], b, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
    if not per_model_input:
        torch.testing.assert_close(g[0], gx_sum, rtol=tol, atol=tol)
    x2 = x.detach().clone().requires_grad_()
    batched(x2).square().sum().backward()
    gx = [torch.autograd.grad(r(xi).square().sum(), xi)[0] for r, xi in
          zip(refs, [(x2[i] if per_model_input else x2).detach().requires_grad_() for i in range(n)])]
    torch.testing.assert_close(x2.grad, torch.stack(gx) if per_model_input else sum(gx), rtol=tol, atol=tol)
    return batched


@pytest.mark.parametrize("per_model_input", [False, True])
def test_conv_loop_input_gradients_and_double_backward(per_model_input):
    """The loop lowering (mbcompile::conv_loop, its own backward op) against each model alone."""
    assert_loop_op_matches_alone(Deconv, (5, 2, 9), "loop", per_model_input, 1e-10)


def test_conv_loop_with_frozen_weights():
    """Frozen conv weights (requires_grad=False) through the loop op: no weight gradient is computed or
    given, the other parameters' gradients are each model's own."""
    models = [Deconv().double() for _ in range(3)]
    for m in models:
        m.conv.weight.requires_grad_(False)
    refs = copy.deepcopy(models)
    x = torch.randn(5, 2, 9, dtype=torch.float64)
    with lowering.force("loop"):
        batched = mbcompile.batch(models)
        out = batched(x)
    out.square().sum().backward()
    assert batched.get_parameter("conv.weight").grad is None
    for i, ref in enumerate(refs):
        ref(x).square().sum().backward()
        for name, p in ref.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(batched.get_parameter(name).grad[i], p.grad, rtol=1e-10, atol=1e-10)


class SeqHead(nn.Module):
    """A linear over B,T,I (the char-LSTM head's shape), one without bias, and a vector input's."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 4, bias=False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("per_model_input", [False, True])
@pytest.mark.parametrize("shape", [(4, 3, 6), (6,)], ids=["B,T,I", "I"])
def test_linear_loop_input_gradients_and_double_backward(per_model_input, shape):
    """The loop lowering (mbcompile::linear_loop, its own backward op) against each model alone, for a
    B,T,I input and a vector."""
    batched = assert_loop_op_matches_alone(SeqHead, shape, "loop", per_model_input, 1e-12)
    assert sum(s.startswith("linear") and "loop (forced" in s for s in notes(batched)) == 2, notes(batched)


def test_linear_loop_is_one_op_bit_for_bit_in_float32_with_frozen_weights():
    """The loop runs each model's own GEMMs: float32 outputs and gradients equal each model alone bit
    for bit; a frozen weight gets no gradient and the op computes none; the graph holds one loop op per
    linear (no stack of per-model outputs)."""
    models = [SeqHead() for _ in range(4)]
    for m in models:
        m.a.weight.requires_grad_(False)
    refs = copy.deepcopy(models)
    x = torch.randn(8, 3, 6)
    with lowering.force("loop"):
        batched = mbcompile.batch(models)
        out = batched(x)
    out.square().sum().backward()
    targets = [nd.target for nd in batched._last_program.gm.graph.nodes if nd.op == "call_function"]
    assert batched.get_parameter("a.weight").grad is None
    for i, ref in enumerate(refs):
        o = ref(x)
        assert torch.equal(out[i], o)
        o.square().sum().backward()
        for name, p in ref.named_parameters():
            if p.requires_grad:
                assert torch.equal(batched.get_parameter(name).grad[i], p.grad), name
    assert sum(t is torch.ops.mbcompile.linear_loop.default for t in targets) == 2, targets
    assert torch.ops.aten.stack.default not in targets
