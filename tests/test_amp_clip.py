"""Per-model GradScaler and gradient clipping against n torch.amp.GradScaler / torch.nn.utils.clip_grad_*."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _stacked import MLP, _seed_and_one_thread, cross_entropy_n, make_batched, per_model_loss  # noqa: F401
from mbcompile.amp import GradScaler
from mbcompile.clip import clip_grad_norm_, clip_grad_value_
from mbcompile.optim import optimizer, shrink_

N = 4


def make_models(n=N, dtype=torch.float64):
    return [MLP().to(dtype) for _ in range(n)]


def per_model_data(steps, dtype, seed=1, bad=()):
    """Per-model inputs [N, 8, 6]; bad: (step, model) pairs whose input gets an inf."""
    g = torch.Generator().manual_seed(seed)
    for k in range(steps):
        xs = torch.randn(N, 8, 6, generator=g).to(dtype)
        for s, i in bad:
            if s == k:
                xs[i, 0, 0] = float("inf")
        yield xs, torch.randint(0, 3, (8,), generator=g)


def inject_grads(batched, refs):
    for name, p in batched.named_parameters():
        p.grad = torch.stack([r.get_parameter(name).grad for r in refs])


def assert_exact(batched, refs):
    params = dict(batched.named_parameters())
    for i, r in enumerate(refs):
        for name, want in r.named_parameters():
            assert torch.equal(params[name][i], want), f"model {i}, {name}"


# ---------------------------------------------------------------------------------------------------
# GradScaler
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("clip", [False, True], ids=["step", "unscale-clip-step"])
def test_grad_scaler_bit_exact_against_n_torch_scalers(clip, fused):
    """Odd growth/backoff factors, per-model initial scales; models 1 and 3 overflow at different
    steps: only they are skipped (Adam's step count included) and every scale matches torch's.
    Fused Adam without unscale_: the kernel divides by each model's scale, as torch's scaler has it."""
    dtype = torch.float32
    models = make_models(dtype=dtype)
    refs = copy.deepcopy(models)
    batched = make_batched(models, in_dims=0)
    lrs = [1e-2, 2e-2, 3e-2, 4e-2]
    init = [2.0**10, 2.0**12, 1000.0, 2.0**3]
    kw = dict(growth_factor=3.0, backoff_factor=0.3, growth_interval=2)
    opt = optimizer(batched, torch.optim.Adam, lr=lrs, fused=fused)
    scaler = GradScaler(batched, init_scale=init, **kw)
    ref_opts = [torch.optim.Adam(r.parameters(), lr=lr, fused=fused) for r, lr in zip(refs, lrs)]
    ref_scalers = [torch.amp.GradScaler("cpu", init_scale=s, **kw) for s in init]
    bad = [(2, 1), (3, 1), (5, 3), (6, 1)]
    for xs, y in per_model_data(9, dtype, bad=bad):
        for i, (r, o, s) in enumerate(zip(refs, ref_opts, ref_scalers)):
            o.zero_grad()
            s.scale(F.cross_entropy(r(xs[i]), y)).backward()
        opt.zero_grad()
        scaled = scaler.scale(torch.ones(N))  # initialises the per-model scales
        assert torch.equal(scaled, torch.tensor([s.get_scale() for s in ref_scalers]))
        inject_grads(batched, refs)  # the very same scaled gradients
        if clip:
            scaler.unscale_(opt)
            clip_grad_norm_(batched, max_norm=0.5)
        scaler.step(opt)
        scaler.update()
        for r, o, s in zip(refs, ref_opts, ref_scalers):
            if clip:
                s.unscale_(o)
                torch.nn.utils.clip_grad_norm_(r.parameters(), max_norm=0.5)
            s.step(o)
            s.update()
        assert scaler.get_scale().tolist() == [s.get_scale() for s in ref_scalers]
        assert scaler._get_growth_tracker() == [s._get_growth_tracker() for s in ref_scalers]
    assert_exact(batched, refs)
    steps = opt.state[batched.get_parameter("fc1.weight")]["step"].tolist()
    assert steps == [float(o.state[r.fc1.weight]["step"]) for r, o in zip(refs, ref_opts)]
    assert steps[1] < steps[0] and steps[3] < steps[0]
    # checkpointing
    sd = scaler.state_dict()
    assert sd["scale"] == [s.get_scale() for s in ref_scalers]
    for i, s in enumerate(ref_scalers):
        assert scaler.model_state_dict(i) == s.state_dict()
    other = GradScaler(batched)
    other.load_state_dict(sd)
    assert other.get_scale().tolist() == scaler.get_scale().tolist()
    assert other._get_growth_tracker() == scaler._get_growth_tracker()


def test_grad_scaler_end_to_end_with_real_backward():
    dtype = torch.float32
    models = make_models(dtype=dtype)
    refs = copy.deepcopy(models)
    batched = make_batched(models, in_dims=0)
    opt = optimizer(batched, torch.optim.SGD, lr=[0.1, 0.2, 0.3, 0.4], momentum=0.9)
    scaler = GradScaler(batched, init_scale=2.0**10, growth_interval=2)
    ref_opts = [torch.optim.SGD(r.parameters(), lr=0.1 * (i + 1), momentum=0.9) for i, r in enumerate(refs)]
    ref_scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) for _ in refs]
    for xs, y in per_model_data(6, dtype, bad=[(2, 1), (3, 1), (4, 2)]):
        opt.zero_grad()
        out = batched(xs)
        scaler.scale(cross_entropy_n(out, y)).sum().backward()
        scaler.step(opt)
        scaler.update()
        for i, (r, o, s) in enumerate(zip(refs, ref_opts, ref_scalers)):
            o.zero_grad()
            s.scale(F.cross_entropy(r(xs[i]), y)).backward()
            s.step(o)
            s.update()
    assert scaler.get_scale().tolist() == [s.get_scale() for s in ref_scalers]
    for i, r in enumerate(refs):
        got = dict(batched.unbatch(i).named_parameters())
        for name, want in r.named_parameters():
            torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_grad_scaler_with_cpu_autocast(amp_dtype):
    models = make_models(dtype=torch.float32)
    refs = copy.deepcopy(models)
    batched = make_batched(models)
    opt = optimizer(batched, torch.optim.AdamW, lr=1e-2)
    scaler = GradScaler(batched, init_scale=2.0**8, growth_interval=2)
    ref_opts = [torch.optim.AdamW(r.parameters(), lr=1e-2) for r in refs]
    ref_scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2) for _ in refs]
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=amp_dtype):
            out = batched(x)
            loss = per_model_loss(F.cross_entropy, out.float(), y)
        scaler.scale(loss).sum().backward()
        scaler.step(opt)
        scaler.update()
        for r, o, s in zip(refs, ref_opts, ref_scalers):
            o.zero_grad()
            with torch.autocast("cpu", dtype=amp_dtype):
                ref_loss = F.cross_entropy(r(x).float(), y)
            s.scale(ref_loss).backward()
            s.step(o)
            s.update()
    assert scaler.get_scale().tolist() == [s.get_scale() for s in ref_scalers]
    for i, r in enumerate(refs):
        got = dict(batched.unbatch(i).named_parameters())
        for name, want in r.named_parameters():
            assert got[name].dtype == torch.float32
            torch.testing.assert_close(got[name], want, rtol=2e-2, atol=2e-3)


def test_grad_scaler_misuse_is_a_clear_error():
    batched = make_batched(make_models())
    opt = optimizer(batched, torch.optim.SGD, lr=0.1)
    scaler = GradScaler(batched)
    with pytest.raises(ValueError, match="n=4"):
        scaler.scale(torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="scale"):
        scaler.unscale_(opt)  # before scale()
    out = scaler.scale(cross_entropy_n(batched(torch.randn(8, 6, dtype=torch.float64)), torch.randint(0, 3, (8,))))
    out.sum().backward()
    with pytest.raises(TypeError, match="per-model optimizer"):
        scaler.step(torch.optim.SGD(batched.parameters(), lr=0.1))
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already"):
        scaler.unscale_(opt)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="already"):
        scaler.step(opt)
    scaler.update()
    with pytest.raises(ValueError, match="growth factor"):
        GradScaler(batched, growth_factor=[2.0, 2.0, 0.5, 2.0])
    disabled = GradScaler(batched, enabled=False)
    assert disabled.scale(out) is out
    assert torch.equal(disabled.get_scale(), torch.ones(N))


def test_grad_scaler_shrinks_with_the_batch():
    batched = make_batched(make_models())
    opt = optimizer(batched, torch.optim.SGD, lr=0.1)
    scaler = GradScaler(batched, init_scale=[1.0, 2.0, 4.0, 8.0], growth_interval=[1, 2, 3, 4])
    scaler.scale(torch.ones(N))
    shrink_([2, 0], batched, optimizer=opt, scaler=scaler)
    assert scaler.n == 2 and scaler.get_scale().tolist() == [4.0, 1.0]
    assert scaler.get_growth_interval() == [3, 1]


# ---------------------------------------------------------------------------------------------------
# clipping
# ---------------------------------------------------------------------------------------------------
def grads_from_refs(refs, scale=10.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    for i, r in enumerate(refs):
        r.zero_grad()
        (scale * (i + 1) * F.cross_entropy(r(x), y)).backward()


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf"), 3.0])
def test_clip_grad_norm_per_model_matches_torch(norm_type):
    models = make_models()
    refs = copy.deepcopy(models)
    batched = make_batched(models)
    grads_from_refs(refs)
    inject_grads(batched, refs)
    norms = clip_grad_norm_(batched, max_norm=0.5, norm_type=norm_type)
    assert norms.shape == (N,)
    for i, r in enumerate(refs):
        want = torch.nn.utils.clip_grad_norm_(r.parameters(), max_norm=0.5, norm_type=norm_type)
        assert torch.equal(norms[i], want), (i, norms[i].item(), want.item())
        for name, p in r.named_parameters():
            assert torch.equal(batched.get_parameter(name).grad[i], p.grad), (i, name)


def test_clip_grad_norm_per_model_max_norm_and_inputs():
    models = make_models()
    refs = copy.deepcopy(models)
    maxes = [0.1, 1.0, 5.0, 1e9]
    batched = make_batched(models)
    # a list of parameters, the batched module and the optimizer are all accepted
    for target in ("params", "module", "optimizer"):
        grads_from_refs(refs)
        inject_grads(batched, refs)
        arg = {"params": list(batched.parameters()), "module": batched,
               "optimizer": optimizer(batched, torch.optim.SGD, lr=0.1)}[target]
        norms = clip_grad_norm_(arg, max_norm=maxes)
        for i, r in enumerate(refs):
            want = torch.nn.utils.clip_grad_norm_(r.parameters(), max_norm=maxes[i])
            assert torch.equal(norms[i], want)
            for name, p in r.named_parameters():
                assert torch.equal(batched.get_parameter(name).grad[i], p.grad), (target, i, name)


def test_clip_grad_norm_nonfinite_model_is_isolated():
    models = make_models()
    refs = copy.deepcopy(models)
    batched = make_batched(models)
    grads_from_refs(refs)
    refs[2].fc1.weight.grad[0, 0] = float("nan")
    inject_grads(batched, refs)
    with pytest.raises(RuntimeError, match=r"models \[2\]"):
        clip_grad_norm_(batched, max_norm=0.5, error_if_nonfinite=True)
    norms = clip_grad_norm_(batched, max_norm=0.5)
    assert torch.isnan(norms[2]) and torch.isfinite(norms[[0, 1, 3]]).all()
    for i in (0, 1, 3):
        want = torch.nn.utils.clip_grad_norm_(refs[i].parameters(), max_norm=0.5)
        assert torch.equal(norms[i], want)
        for name, p in refs[i].named_parameters():
            assert torch.equal(batched.get_parameter(name).grad[i], p.grad)


@pytest.mark.parametrize("clip_value", [0.05, [0.01, 0.05, 0.1, 1e9]], ids=["shared", "per-model"])
def test_clip_grad_value_per_model(clip_value):
    models = make_models()
    refs = copy.deepcopy(models)
    batched = make_batched(models)
    grads_from_refs(refs)
    inject_grads(batched, refs)
    clip_grad_value_(batched, clip_value)
    for i, r in enumerate(refs):
        torch.nn.utils.clip_grad_value_(r.parameters(), clip_value[i] if isinstance(clip_value, list) else clip_value)
        for name, p in r.named_parameters():
            assert torch.equal(batched.get_parameter(name).grad[i], p.grad), (i, name)
