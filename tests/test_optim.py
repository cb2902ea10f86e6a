"""The per-model optimizer against n stock torch.optim optimizers, one per model.

Most tests feed the batched optimizer exactly the gradients the reference models computed (stacked), so
the comparison isolates the optimizer and can demand bit-for-bit equality (torch.equal); end-to-end tests
(a real batched forward/backward, whose gradients may differ from the single models' in the last bit)
compare within 1e-12 relative in float64.
"""
import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mbcompile
from _stacked import MLP, _seed_and_one_thread, cross_entropy_n, make_batched  # noqa: F401
from mbcompile.optim import (
    BatchedOptimizer,
    ReduceLROnPlateau,
    UnsupportedOptimizerError,
    optimizer,
    shrink_,
)

N = 4
LRS = [0.1, 0.05, 0.02, 0.01]


def make_models(n=N, dtype=torch.float64, cls=MLP):
    return [cls().to(dtype) for _ in range(n)]


def per_model(kwargs, i):
    return {k: (v[i] if isinstance(v, list) else v) for k, v in kwargs.items()}


def batches(steps, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randn(8, 6, generator=g, dtype=dtype), torch.randint(0, 3, (8,), generator=g)


def ref_backward(refs, x, y):
    for r in refs:
        for p in r.parameters():
            p.grad = None
        F.cross_entropy(r(x), y).backward()


def inject_grads(batched, refs):
    """The stacked gradient of each parameter is the reference models' gradients, stacked."""
    for name, p in batched.named_parameters():
        grads = [r.get_parameter(name).grad for r in refs]
        p.grad = None if grads[0] is None else torch.stack(grads)


def assert_exact(batched, refs, models=None):
    params = dict(batched.named_parameters())
    for j, i in enumerate(models if models is not None else range(len(refs))):
        for name, want in refs[i].named_parameters():
            got = params[name][j]
            assert torch.equal(got, want), f"model {i}, {name}: max diff {(got - want).abs().max().item()}"


def assert_close_all(batched, refs, rtol=1e-12, atol=1e-12):
    for i, ref in enumerate(refs):
        got = dict(batched.unbatch(i).named_parameters())
        for name, want in ref.named_parameters():
            torch.testing.assert_close(got[name], want, rtol=rtol, atol=atol,
                                       msg=lambda m, i=i, name=name: f"model {i}, {name}: {m}")


def run_injected(cls, kwargs, dtype=torch.float64, steps=6, make_sched=None):
    """Batched optimizer and n torch optimizers fed the same gradients; returns everything."""
    models = make_models(dtype=dtype)
    refs = copy.deepcopy(models)
    batched = make_batched(models)
    opt = optimizer(batched, cls, **kwargs)
    ref_opts = [cls(r.parameters(), **per_model(kwargs, i)) for i, r in enumerate(refs)]
    sched = make_sched(opt) if make_sched else None
    ref_scheds = [make_sched(o) for o in ref_opts] if make_sched else []
    for x, y in batches(steps, dtype):
        ref_backward(refs, x, y)
        inject_grads(batched, refs)
        opt.step()
        for o in ref_opts:
            o.step()
        if sched is not None:
            sched.step()
            for s in ref_scheds:
                s.step()
    return batched, refs, opt, ref_opts


BETAS = [(0.9, 0.999), (0.8, 0.99), (0.95, 0.9), (0.5, 0.999)]
WDS = [0.0, 1e-3, 1e-2, 1e-1]
CASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05)),
    "sgd-momentum": (torch.optim.SGD, dict(lr=LRS, momentum=0.9)),
    "sgd-dampening-wd": (torch.optim.SGD, dict(lr=LRS, momentum=[0.9, 0.5, 0.0, 0.99],
                                                dampening=[0.0, 0.1, 0.5, 0.3], weight_decay=WDS)),
    "sgd-nesterov": (torch.optim.SGD, dict(lr=LRS, momentum=[0.9, 0.8, 0.7, 0.6], nesterov=True,
                                            weight_decay=WDS)),
    "sgd-maximize": (torch.optim.SGD, dict(lr=LRS, momentum=0.5, maximize=[True, False, True, False])),
    "sgd-mixed-nesterov": (torch.optim.SGD, dict(lr=0.01, momentum=0.9, nesterov=[True, False, True, False])),
    "adam": (torch.optim.Adam, dict(lr=[1e-3, 3e-3, 1e-2, 3e-2], betas=BETAS)),
    "adam-eps-wd": (torch.optim.Adam, dict(lr=1e-2, eps=[1e-8, 1e-6, 1e-3, 1e-1], weight_decay=WDS)),
    "adam-amsgrad": (torch.optim.Adam, dict(lr=1e-2, amsgrad=True, weight_decay=[0.0, 0.1, 0.2, 0.3])),
    "adam-amsgrad-mixed": (torch.optim.Adam, dict(lr=LRS, amsgrad=[True, False, True, False], maximize=True)),
    "adam-decoupled": (torch.optim.Adam, dict(lr=LRS, weight_decay=0.1, decoupled_weight_decay=True)),
    "adamw": (torch.optim.AdamW, dict(lr=[1e-3, 3e-3, 1e-2, 3e-2], weight_decay=[0.0, 0.01, 0.1, 1.0])),
    "adamw-amsgrad": (torch.optim.AdamW, dict(lr=1e-2, betas=BETAS, amsgrad=True, maximize=[False, True] * 2)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=[1e-3, 3e-3, 1e-2, 3e-2], alpha=0.9, momentum=0.5)),
    "rmsprop-centered": (torch.optim.RMSprop, dict(lr=LRS, alpha=[0.9, 0.8, 0.99, 0.7], centered=True,
                                                    eps=[1e-8, 1e-6, 1e-4, 1e-2], weight_decay=WDS)),
    "rmsprop-mixed": (torch.optim.RMSprop, dict(lr=LRS, momentum=[0.0, 0.5, 0.0, 0.9],
                                                 centered=[True, False, False, True], maximize=[False, True] * 2)),
    "adagrad": (torch.optim.Adagrad, dict(lr=LRS)),
    "adagrad-options": (torch.optim.Adagrad, dict(lr=LRS, lr_decay=[0.0, 0.1, 0.01, 0.5], weight_decay=WDS,
                                                   initial_accumulator_value=[0.0, 0.1, 1.0, 0.5],
                                                   eps=[1e-10, 1e-6, 1e-3, 1e-1])),
    "adamax": (torch.optim.Adamax, dict(lr=LRS, betas=BETAS, weight_decay=WDS, maximize=[True, False] * 2)),
    "nadam": (torch.optim.NAdam, dict(lr=LRS, betas=BETAS, momentum_decay=[4e-3, 1e-2, 0.0, 4e-3],
                                       weight_decay=WDS, decoupled_weight_decay=[True, False, True, False])),
    "radam": (torch.optim.RAdam, dict(lr=LRS, betas=[(0.9, 0.999), (0.8, 0.9), (0.95, 0.5), (0.5, 0.999)],
                                       weight_decay=WDS, decoupled_weight_decay=[True, False, True, False])),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_n_torch_optimizers_bit_for_bit(case, dtype):
    cls, kwargs = CASES[case]
    batched, refs, opt, ref_opts = run_injected(cls, kwargs, dtype=dtype, steps=8)
    assert_exact(batched, refs)
    # the optimizer state agrees too, model by model
    params = dict(batched.named_parameters())
    for i, (r, ro) in enumerate(zip(refs, ref_opts)):
        for name, rp in r.named_parameters():
            want, got = ro.state[rp], opt.state[params[name]]
            for key, v in want.items():
                if key == "momentum_buffer" and v is None:
                    continue
                if key == "step":
                    assert float(got[key][i]) == float(v)
                elif isinstance(v, torch.Tensor) and v.dim() == 0:
                    assert float(got[key][i]) == float(v), key
                else:
                    assert torch.equal(got[key][i], v), f"model {i} {name} state {key}"


def test_optimizer_is_a_torch_optimizer_with_one_group_per_model():
    batched = make_batched(make_models())
    opt = optimizer(batched, torch.optim.AdamW, lr=torch.tensor([1e-3, 2e-3, 3e-3, 4e-3]), weight_decay=0.01,
                    betas=[(0.9, 0.99)] * 4)
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, BatchedOptimizer)
    assert len(opt.param_groups) == N
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 2e-3, 3e-3, 4e-3])
    assert all(g["weight_decay"] == 0.01 and g["betas"] == (0.9, 0.99) for g in opt.param_groups)
    # every stacked tensor is listed once (group 0), so loops over param_groups see each one once
    listed = [p for g in opt.param_groups for p in g["params"]]
    assert len(listed) == len(list(batched.parameters())) == len(set(listed))
    loss = cross_entropy_n(batched(torch.randn(8, 6, dtype=torch.float64)), torch.randint(0, 3, (8,)))
    loss.sum().backward()
    opt.step()
    opt.zero_grad()
    assert all(p.grad is None for p in batched.parameters())


def test_end_to_end_real_backward_within_1e12():
    models = make_models()
    refs = copy.deepcopy(models)
    batched = make_batched(models)
    kw = dict(lr=[1e-3, 3e-3, 1e-2, 3e-2], weight_decay=[0.0, 0.01, 0.1, 1.0], amsgrad=True)
    opt = optimizer(batched, torch.optim.AdamW, **kw)
    ref_opts = [torch.optim.AdamW(r.parameters(), **per_model(kw, i)) for i, r in enumerate(refs)]
    for x, y in batches(10):
        opt.zero_grad()
        cross_entropy_n(batched(x), y).sum().backward()
        opt.step()
        ref_backward(refs, x, y)
        for o in ref_opts:
            o.step()
    assert_close_all(batched, refs)


def test_closure_is_called_and_its_loss_returned():
    models = make_models()
    refs = copy.deepcopy(models)
    batched = make_batched(models)
    opt = optimizer(batched, torch.optim.SGD, lr=LRS, momentum=0.9)
    ref_opts = [torch.optim.SGD(r.parameters(), lr=lr, momentum=0.9) for r, lr in zip(refs, LRS)]
    for x, y in batches(3):
        ref_backward(refs, x, y)

        def closure():
            opt.zero_grad()
            inject_grads(batched, refs)
            return torch.ones(N)

        assert torch.equal(opt.step(closure), torch.ones(N))
        for o in ref_opts:
            o.step()
    assert_exact(batched, refs)


# ---------------------------------------------------------------------------------------------------
# schedulers
# ---------------------------------------------------------------------------------------------------
lr_scheduler = torch.optim.lr_scheduler
SCHEDULERS = {
    "step": lambda o: lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "multistep": lambda o: lr_scheduler.MultiStepLR(o, milestones=[2, 5], gamma=0.3),
    "exponential": lambda o: lr_scheduler.ExponentialLR(o, gamma=0.8),
    "cosine": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=5, eta_min=1e-3),
    "lambda": lambda o: lr_scheduler.LambdaLR(o, lambda step: 1.0 / (1 + step)),
    "linear": lambda o: lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=4),
    "onecycle": lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.3, total_steps=10),
    "sequential": lambda o: lr_scheduler.SequentialLR(
        o, [lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=3),
            lr_scheduler.CosineAnnealingLR(o, T_max=5, eta_min=1e-4)], milestones=[3]),
    "cosine-restarts": lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3, eta_min=1e-3),
    "polynomial": lambda o: lr_scheduler.PolynomialLR(o, total_iters=6, power=2.0),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam], ids=["sgd", "adam"])
def test_torch_schedulers_act_per_model(name, cls):
    kwargs = dict(lr=[0.2, 0.1, 0.05, 0.01])
    if cls is torch.optim.SGD:
        kwargs["momentum"] = [0.9, 0.8, 0.5, 0.0] if name != "onecycle" else 0.9
    else:
        kwargs["betas"] = BETAS
    batched, refs, opt, ref_opts = run_injected(cls, kwargs, steps=8, make_sched=SCHEDULERS[name])
    assert [g["lr"] for g in opt.param_groups] == [o.param_groups[0]["lr"] for o in ref_opts]
    if name == "onecycle":  # cycles momentum / beta1 per group too
        key = "momentum" if cls is torch.optim.SGD else "betas"
        assert [g[key] for g in opt.param_groups] == [o.param_groups[0][key] for o in ref_opts]
    assert_exact(batched, refs)


def test_lambda_lr_with_one_lambda_per_model():
    lambdas = [lambda s, k=k: 1.0 / (1 + k * s) for k in range(N)]
    batched, refs, opt, ref_opts = run_injected(
        torch.optim.SGD, dict(lr=0.1, momentum=0.9), steps=5,
        make_sched=lambda o: lr_scheduler.LambdaLR(o, lambdas if len(o.param_groups) == N else lambdas[0]))
    # the reference uses model 0's lambda for all: compare only the lrs of the batched run
    assert [g["lr"] for g in opt.param_groups] == [0.1 / (1 + k * 5) for k in range(N)]


def test_reduce_lr_on_plateau_per_model():
    models = make_models()
    refs = copy.deepcopy(models)
    batched = make_batched(models)
    opt = optimizer(batched, torch.optim.SGD, lr=LRS)
    sched = ReduceLROnPlateau(opt, factor=0.5, patience=1, min_lr=[0.0, 0.02, 0.0, 0.0])
    ref_opts = [torch.optim.SGD(r.parameters(), lr=lr) for r, lr in zip(refs, LRS)]
    ref_scheds = [lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=1, min_lr=m)
                  for o, m in zip(ref_opts, [0.0, 0.02, 0.0, 0.0])]
    metrics = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.9, 1.1, 1.0, 0.5], [0.8, 1.2, 1.0, 0.6],
                            [0.7, 1.3, 1.0, 0.7], [0.7, 1.4, 0.9, 0.8], [0.7, 1.5, 0.9, 0.9]],
                           dtype=torch.float64)
    for (x, y), m in zip(batches(6), metrics):
        ref_backward(refs, x, y)
        inject_grads(batched, refs)
        opt.step()
        sched.step(m)
        for o, s, mi in zip(ref_opts, ref_scheds, m.tolist()):
            o.step()
            s.step(mi)
        assert [g["lr"] for g in opt.param_groups] == [o.param_groups[0]["lr"] for o in ref_opts]
    assert len(set(g["lr"] for g in opt.param_groups)) > 1  # the models did diverge
    assert_exact(batched, refs)
    with pytest.raises(ValueError, match="n=4"):
        sched.step(torch.ones(3))
    # torch's own ReduceLROnPlateau takes one number: an [n] metric is refused, not silently reduced
    with pytest.raises((TypeError, ValueError, RuntimeError)):
        lr_scheduler.ReduceLROnPlateau(opt).step(torch.ones(N))
    # state_dict round trip
    sd = sched.state_dict()
    sched2 = ReduceLROnPlateau(opt, factor=0.5, patience=1)
    sched2.load_state_dict(sd)
    assert sched2.num_bad_epochs_per_model == sched.num_bad_epochs_per_model


# ---------------------------------------------------------------------------------------------------
# state_dict
# ---------------------------------------------------------------------------------------------------
RESUME = {
    "sgd": (torch.optim.SGD, dict(lr=LRS, momentum=[0.9, 0.0, 0.5, 0.9], nesterov=False)),
    "adam": (torch.optim.Adam, dict(lr=LRS, betas=BETAS, amsgrad=True)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=[1e-3, 3e-3, 1e-2, 3e-2], centered=True, momentum=0.5)),
    "adagrad": (torch.optim.Adagrad, dict(lr=LRS, lr_decay=0.01)),
    "nadam": (torch.optim.NAdam, dict(lr=LRS)),
    "radam": (torch.optim.RAdam, dict(lr=LRS)),
}


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("case", sorted(RESUME))
def test_state_dict_resume_is_bit_exact(case):
    cls, kwargs = RESUME[case]
    make_sched = lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=6, eta_min=1e-3)  # noqa: E731
    models = make_models()
    data = list(batches(8))

    def train(batched, opt, sched, steps):
        for x, y in steps:
            opt.zero_grad()
            cross_entropy_n(batched(x), y).sum().backward()
            opt.step()
            sched.step()

    # uninterrupted
    b1 = make_batched(copy.deepcopy(models))
    o1 = optimizer(b1, cls, **kwargs)
    o1.freeze(2)
    s1 = make_sched(o1)
    train(b1, o1, s1, data[:4])
    o1.unfreeze(2)
    train(b1, o1, s1, data[4:])
    # interrupted after 4 steps, restored into fresh objects
    b2 = make_batched(copy.deepcopy(models))
    o2 = optimizer(b2, cls, **kwargs)
    o2.freeze(2)
    s2 = make_sched(o2)
    train(b2, o2, s2, data[:4])
    ckpt = _roundtrip({"model": b2.state_dict(), "opt": o2.state_dict(), "sched": s2.state_dict()})
    b3 = make_batched(copy.deepcopy(models))
    b3.load_state_dict(ckpt["model"])
    o3 = optimizer(b3, cls, **kwargs)
    s3 = make_sched(o3)
    o3.load_state_dict(ckpt["opt"])
    s3.load_state_dict(ckpt["sched"])
    assert o3.frozen.tolist() == [False, False, True, False]
    o3.unfreeze(2)
    train(b3, o3, s3, data[4:])
    for (name, p1), (_, p3) in zip(b1.named_parameters(), b3.named_parameters()):
        assert torch.equal(p1, p3), name
    assert [g["lr"] for g in o1.param_groups] == [g["lr"] for g in o3.param_groups]


def test_load_state_dict_checks_what_it_loads():
    batched = make_batched(make_models())
    opt = optimizer(batched, torch.optim.Adam, lr=1e-3)
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="SGD|Adam"):
        optimizer(batched, torch.optim.SGD, lr=0.1).load_state_dict(sd)
    with pytest.raises(ValueError, match="n=3"):
        optimizer(make_batched(make_models(3)), torch.optim.Adam, lr=1e-3).load_state_dict(sd)


# ---------------------------------------------------------------------------------------------------
# fault isolation
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs", [
    (torch.optim.SGD, dict(momentum=0.9, weight_decay=1e-2)),
    (torch.optim.Adam, dict(amsgrad=True)),
    (torch.optim.RMSprop, dict(centered=True, momentum=0.3)),
    (torch.optim.NAdam, dict()),
], ids=["sgd", "adam", "rmsprop", "nadam"])
def test_a_diverging_model_changes_no_other_models_numbers(cls, kwargs):
    """Run the same batch twice, once with model 1 at lr=inf: models 0, 2, 3 are bit-identical."""
    models = make_models()
    runs = []
    for lr1 in (0.01, float("inf")):
        batched = make_batched(copy.deepcopy(models))
        opt = optimizer(batched, cls, lr=[0.01, lr1, 0.02, 0.03], **kwargs)
        for x, y in batches(5):
            opt.zero_grad()
            loss = cross_entropy_n(batched(x), y)
            loss.sum().backward()
            opt.step()
        runs.append((batched, loss))
    (ok, _), (bad, bad_loss) = runs
    assert not torch.isfinite(bad_loss[1]), "model 1 was meant to diverge"
    assert not all(torch.isfinite(p[1]).all() for p in bad.parameters())
    for (name, p_ok), (_, p_bad) in zip(ok.named_parameters(), bad.named_parameters()):
        for i in (0, 2, 3):
            assert torch.equal(p_ok[i], p_bad[i]), (name, i)


# ---------------------------------------------------------------------------------------------------
# freezing
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs", [
    (torch.optim.SGD, dict(lr=LRS, momentum=0.9)),
    (torch.optim.Adam, dict(lr=LRS, amsgrad=True)),
    (torch.optim.NAdam, dict(lr=LRS)),
    (torch.optim.Adagrad, dict(lr=LRS)),
], ids=["sgd", "adam", "nadam", "adagrad"])
def test_freezing_keeps_params_and_state_and_resumes_exactly(cls, kwargs):
    models = make_models()
    refs = copy.deepcopy(models)
    batched = make_batched(models)
    opt = optimizer(batched, cls, **kwargs)
    ref_opts = [cls(r.parameters(), **per_model(kwargs, i)) for i, r in enumerate(refs)]
    data = list(batches(16))

    def step(x, y, frozen=()):
        ref_backward(refs, x, y)
        inject_grads(batched, refs)
        opt.step()
        for i, o in enumerate(ref_opts):
            if i not in frozen:  # model i, on its own, simply does not step while frozen
                o.step()

    for x, y in data[:3]:
        step(x, y)
    opt.freeze(1)
    assert opt.frozen.tolist() == [False, True, False, False]
    p_before = {k: v[1].clone() for k, v in batched.named_parameters()}
    s_before = {k: {sk: sv.clone() for sk, sv in opt.state[p].items()} for k, p in batched.named_parameters()}
    for x, y in data[3:13]:  # 10 steps frozen
        step(x, y, frozen=(1,))
    for k, v in batched.named_parameters():
        assert torch.equal(v[1], p_before[k]), k  # zero drift
        for sk, sv in opt.state[v].items():
            assert torch.equal(sv[1], s_before[k][sk][1]), (k, sk)
    opt.unfreeze([1])
    for x, y in data[13:]:
        step(x, y)
    assert_exact(batched, refs)


def test_step_with_active_mask():
    batched, refs, opt, ref_opts = run_injected(torch.optim.Adam, dict(lr=LRS), steps=2)
    for k, (x, y) in enumerate(batches(4, seed=5)):
        ref_backward(refs, x, y)
        inject_grads(batched, refs)
        active = torch.tensor([True, k % 2 == 0, True, k == 3])
        opt.step(active=active)
        for i, o in enumerate(ref_opts):
            if active[i]:
                o.step()
    assert_exact(batched, refs)
    opt.step(active=[False] * N)  # nothing steps
    assert_exact(batched, refs)


# ---------------------------------------------------------------------------------------------------
# shrinking
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs", [
    (torch.optim.SGD, dict(lr=LRS, momentum=[0.9, 0.8, 0.7, 0.6])),
    (torch.optim.AdamW, dict(lr=LRS, betas=BETAS, weight_decay=WDS)),
    (torch.optim.NAdam, dict(lr=LRS)),
], ids=["sgd", "adamw", "nadam"])
def test_shrink_keeps_models_exactly_on_course(cls, kwargs):
    models = make_models()
    refs = copy.deepcopy(models)
    batched = make_batched(models)
    opt = optimizer(batched, cls, **kwargs)
    lambdas = [lambda s, k=k: 0.9 ** (k * s) for k in range(N)]

    def scheds(o, lam):
        return [lr_scheduler.LambdaLR(o, lam),
                lr_scheduler.SequentialLR(o, [lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2),
                                              lr_scheduler.ExponentialLR(o, gamma=0.9)], milestones=[4])]

    sched = scheds(opt, lambdas)
    ref_opts = [cls(r.parameters(), **per_model(kwargs, i)) for i, r in enumerate(refs)]
    ref_scheds = [scheds(o, lambdas[i]) for i, o in enumerate(ref_opts)]
    data = list(batches(10))
    keep = [3, 1]

    def step(x, y, alive):
        ref_backward([refs[i] for i in alive], x, y)
        inject_grads(batched, [refs[i] for i in alive])
        opt.step()
        for s in sched:
            s.step()
        for i in alive:
            ref_opts[i].step()
            for s in ref_scheds[i]:
                s.step()

    for x, y in data[:4]:
        step(x, y, range(N))
    opt.freeze(0)  # frozen flags follow the models they belong to
    shrink_(keep, batched, optimizer=opt, schedulers=sched)
    assert batched.n == 2 and opt.n == 2 and len(opt.param_groups) == 2
    assert all(p.shape[0] == 2 for p in batched.parameters())
    assert opt.frozen.tolist() == [False, False]
    for x, y in data[4:]:
        step(x, y, keep)
    assert_exact(batched, refs, models=keep)
    assert [g["lr"] for g in opt.param_groups] == [ref_opts[i].param_groups[0]["lr"] for i in keep]


def test_shrink_while_the_last_loss_is_still_referenced():
    """The usual ``loss = ...`` variable keeps the last step's autograd graph alive across shrink_ (and
    with it each parameter's gradient accumulator, made for the old shape): the next backward works, and
    the kept models go on bit for bit as when the graph was freed first, and as each model alone."""
    models = make_models()
    kw = dict(lr=LRS, weight_decay=WDS)
    data, keep = list(batches(6)), [3, 1]
    runs = []
    for live in (True, False):
        batched = make_batched(copy.deepcopy(models))
        opt = optimizer(batched, torch.optim.AdamW, **kw)
        for k, (x, y) in enumerate(data):
            if k == 3:
                if not live:
                    del loss  # noqa: F821 - set by the previous iteration
                shrink_(keep, batched, optimizer=opt)
            opt.zero_grad()
            loss = cross_entropy_n(batched(x), y)
            loss.sum().backward()
            opt.step()
        runs.append((batched, opt))
    (a, oa), (b, ob) = runs
    assert a.n == 2 and all(p.shape[0] == 2 for p in a.parameters())
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
        assert all(torch.equal(v, ob.state[q][k]) for k, v in oa.state[p].items()), name
    refs = copy.deepcopy(models)
    for j, i in enumerate(keep):
        o = torch.optim.AdamW(refs[i].parameters(), **per_model(kw, i))
        for x, y in data:
            ref_backward([refs[i]], x, y)
            o.step()
        got = dict(a.unbatch(j).named_parameters())
        for name, want in refs[i].named_parameters():
            torch.testing.assert_close(got[name], want, rtol=1e-12, atol=1e-12)


def test_shrink_validates_before_changing_anything():
    batched = make_batched(make_models())
    opt = optimizer(batched, torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="duplicate"):
        shrink_([1, 1], batched, optimizer=opt)
    with pytest.raises(IndexError):
        shrink_([0, 7], batched, optimizer=opt)
    other = optimizer(make_batched(make_models(3)), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="n=3"):
        shrink_([0], batched, optimizer=other)
    assert batched.n == N and opt.n == N


# ---------------------------------------------------------------------------------------------------
# special parameters
# ---------------------------------------------------------------------------------------------------
class TiedFrozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.mid = nn.Linear(4, 4)
        self.out = nn.Linear(4, 5, bias=False)
        self.out.weight = self.emb.weight  # tied
        self.mid.bias.requires_grad_(False)  # frozen for every model

    def forward(self, x):
        return self.out(torch.tanh(self.mid(self.emb(x))))


def test_tied_and_frozen_parameters():
    models = make_models(cls=TiedFrozen)
    refs = copy.deepcopy(models)
    batched = make_batched(models)
    opt = optimizer(batched, torch.optim.Adam, lr=LRS)
    ref_opts = [torch.optim.Adam(r.parameters(), lr=lr) for r, lr in zip(refs, LRS)]
    bias0 = batched.get_parameter("mid.bias").detach().clone()
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        x, y = torch.randint(0, 5, (6,), generator=g), torch.randint(0, 5, (6,), generator=g)
        for r in refs:
            r.zero_grad()
            F.cross_entropy(r(x), y).backward()
        inject_grads(batched, refs)
        opt.step()
        for o in ref_opts:
            o.step()
    assert torch.equal(batched.get_parameter("mid.bias"), bias0)
    assert_exact(batched, refs)


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------
def test_clear_errors():
    batched = make_batched(make_models())
    with pytest.raises(UnsupportedOptimizerError, match="LBFGS"):
        optimizer(batched, torch.optim.LBFGS, lr=1.0)

    class MySGD(torch.optim.SGD):
        pass

    with pytest.raises(UnsupportedOptimizerError, match="MySGD"):
        optimizer(batched, MySGD, lr=0.1)
    for opt_kw in (dict(capturable=True), dict(differentiable=True)):
        with pytest.raises(UnsupportedOptimizerError, match=list(opt_kw)[0]):
            optimizer(batched, torch.optim.Adam, lr=1e-3, **opt_kw)
    with pytest.raises(UnsupportedOptimizerError, match="fused=True is, for torch.optim.Adam"):
        optimizer(batched, torch.optim.SGD, lr=1e-3, fused=True)
    with pytest.raises(UnsupportedOptimizerError, match="pass one of them"):
        optimizer(batched, torch.optim.Adam, lr=1e-3, fused=True, compile=True)
    with pytest.raises(UnsupportedOptimizerError, match="betaz"):
        optimizer(batched, torch.optim.Adam, lr=1e-3, betaz=(0.9, 0.99))
    with pytest.raises(ValueError, match="n=4"):
        optimizer(batched, torch.optim.SGD, lr=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="n=4"):
        optimizer(batched, torch.optim.SGD, lr=torch.ones(5))
    with pytest.raises(ValueError, match="tuples"):
        optimizer(batched, torch.optim.Adam, betas=[0.9, 0.99, 0.9, 0.99])
    with pytest.raises(ValueError, match="list of n=4 \\(beta1, beta2\\) tuples"):   # a list inside the tuple
        optimizer(batched, torch.optim.Adam, betas=([0.9, 0.8, 0.7, 0.6], 0.999))
    with pytest.raises(TypeError, match="torch.optim class such as"):
        optimizer(batched, "SGD", lr=0.1)
    with pytest.raises(ValueError, match="model 2"):
        optimizer(batched, torch.optim.SGD, lr=[0.1, 0.1, -1.0, 0.1])
    with pytest.raises(ValueError, match="model 1"):
        optimizer(batched, torch.optim.SGD, lr=0.1, momentum=[0.9, 0.0, 0.9, 0.9], nesterov=True)
    opt = optimizer(batched, torch.optim.SGD, lr=0.1, foreach=True)  # foreach is accepted (and ignored)
    with pytest.raises(UnsupportedOptimizerError, match="add_param_group"):
        opt.add_param_group({"params": [torch.zeros(N, 2, requires_grad=True)]})
    assert issubclass(UnsupportedOptimizerError, ValueError)


FUSED_CASES = [c for c in sorted(CASES) if CASES[c][0] in (torch.optim.Adam, torch.optim.AdamW)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_matches_n_fused_torch_optimizers_bit_for_bit(case, dtype):
    """fused=True runs torch's fused kernel on each model's slices: bit for bit n Adam(fused=True), the
    state included, also when models sit out steps (active) and after a state_dict round trip."""
    cls, kwargs = CASES[case]
    kwargs = dict(kwargs, fused=True)
    models = make_models(dtype=dtype)
    refs = copy.deepcopy(models)
    batched = make_batched(models)
    opt = optimizer(batched, cls, **kwargs)
    ref_opts = [cls(r.parameters(), **per_model(kwargs, i)) for i, r in enumerate(refs)]
    masks = [None, [True, False, True, True], None, [False, True, True, False], None]
    for k, ((x, y), act) in enumerate(zip(batches(len(masks), dtype), masks)):
        ref_backward(refs, x, y)
        inject_grads(batched, refs)
        if k == 2:                                           # resume from a saved state
            sd = copy.deepcopy(opt.state_dict())
            opt = optimizer(batched, cls, **kwargs)
            opt.load_state_dict(sd)
        opt.step(active=act)
        for i, o in enumerate(ref_opts):
            if act is None or act[i]:
                o.step()
    assert_exact(batched, refs)
    params = dict(batched.named_parameters())
    for i, (r, o) in enumerate(zip(refs, ref_opts)):
        for name, p in r.named_parameters():
            for key, want in o.state[p].items():
                got = opt.state[params[name]][key][i]
                assert torch.equal(got.to(want.dtype).reshape(want.shape), want), (i, name, key)


def test_compiled_step_matches_torch():
    kw = dict(lr=[1e-3, 3e-3, 1e-2, 3e-2], weight_decay=[0.0, 0.01, 0.1, 1.0])
    models = make_models()
    refs = copy.deepcopy(models)
    batched = make_batched(models)
    opt = optimizer(batched, torch.optim.AdamW, compile=True, **kw)
    ref_opts = [torch.optim.AdamW(r.parameters(), **per_model(kw, i)) for i, r in enumerate(refs)]
    sched = lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ref_scheds = [lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in ref_opts]
    for k, (x, y) in enumerate(batches(5)):
        ref_backward(refs, x, y)
        inject_grads(batched, refs)
        opt.step(active=[True, k != 2, True, True])
        for i, o in enumerate(ref_opts):
            if i != 1 or k != 2:
                o.step()
        sched.step()
        for s in ref_scheds:
            s.step()
    assert_close_all(batched, refs)


@pytest.mark.parametrize("case", ["sgd-dampening-wd", "adamw", "rmsprop-mixed", "nadam"])
def test_bfloat16_parameters_follow_torch_closely(case):
    """Half-precision parameters: torch computes in float32 and rounds once; so does the per-model
    step (within one unit in the last place, not bit for bit)."""
    cls, kwargs = CASES[case]
    batched, refs, opt, _ = run_injected(cls, kwargs, dtype=torch.bfloat16, steps=5)
    assert all(p.dtype == torch.bfloat16 for p in batched.parameters())
    assert_close_all(batched, refs, rtol=1e-2, atol=1e-2)


def test_per_model_values_collapse_only_when_bitwise_equal():
    """The per-step check that a hyperparameter is shared (optim._same): 0.0 and -0.0 differ (they
    differ as lr * grad signs), the same nan object matches itself, another nan does not."""
    from mbcompile.optim import _same
    nan = float("nan")
    assert _same([1e-3] * 64) and _same([0, 0.0, False]) and _same([nan, nan]) and _same([None, None])
    assert not _same([0.0, -0.0]) and not _same([0, -0.0]) and not _same([nan, float("nan")])
    assert not _same([1e-3] * 63 + [2e-3]) and not _same([True, False]) and not _same(["a", "b"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_large_tensors_take_one_call_per_model_bit_for_bit(case, monkeypatch):
    """On a CPU a per-model scalar of addcmul / addcdiv goes model by model, with torch's very op and
    a Python scalar, once a parameter is large (PER_MODEL_CALLS_NUMEL); here every parameter is."""
    from mbcompile import optim as mo
    monkeypatch.setattr(mo, "PER_MODEL_CALLS_NUMEL", 1)
    monkeypatch.setenv("MBCOMPILE_FLAT_STEP", "0")
    used = []
    real = mo._Ctx._per_model_calls

    def spy(self, x, t1, t2):
        used.append(real(self, x, t1, t2))
        return used[-1]
    monkeypatch.setattr(mo._Ctx, "_per_model_calls", spy)
    cls, kwargs = CASES[case]
    batched, refs, _, _ = run_injected(cls, kwargs, dtype=torch.float32, steps=6)
    assert_exact(batched, refs)
    if cls in (torch.optim.Adam, torch.optim.AdamW) and isinstance(kwargs["lr"], list):
        assert any(used), "no per-model call ran"       # the step size: p.addcdiv_(m, denom, value=-s_i)


_HALF = [(torch.optim.SGD, dict(momentum=0.0)), (torch.optim.SGD, dict(momentum=0.9)),
         (torch.optim.Adam, dict(weight_decay=0.1)), (torch.optim.AdamW, {})]


# float16 Adam with weight decay is not in the list: torch's float16 addcdiv rounds ~0.5% of elements
# differently from one float32 product-quotient-sum (bfloat16 matches); there it stays within an ulp
@pytest.mark.parametrize("dtype,cls,kwargs", [(torch.bfloat16, c, k) for c, k in _HALF]
                         + [(torch.float16, c, k) for c, k in _HALF if k != dict(weight_decay=0.1)],
                         ids=["bf16-sgd", "bf16-sgd-momentum", "bf16-adam-wd", "bf16-adamw",
                              "fp16-sgd", "fp16-sgd-momentum", "fp16-adamw"])
def test_half_precision_steps_are_torchs_bit_for_bit_on_vector_sized_tensors(dtype, cls, kwargs):
    """torch's CPU add rounds its alpha / scalar operand to the tensor's dtype (mul, div and lerp keep a
    float32 scalar); the per-model step does the same. On tensors of whole vector widths (no scalar
    tail, whose kernel rounds differently from the vector body) model i is bit for bit its own optimizer."""
    torch.manual_seed(0)
    models = [nn.Linear(64, 64).to(dtype) for _ in range(3)]
    refs = copy.deepcopy(models)
    lrs = [0.1, 0.05, 0.2] if cls is torch.optim.SGD else [1e-2, 3e-3, 2e-2]
    b = make_batched(models)
    opt = optimizer(b, cls, lr=lrs, **kwargs)
    ropts = [cls(r.parameters(), lr=lr, **kwargs) for r, lr in zip(refs, lrs)]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        gw, gb = torch.randn(3, 64, 64, generator=g).to(dtype), torch.randn(3, 64, generator=g).to(dtype)
        for j, r in enumerate(refs):
            r.weight.grad, r.bias.grad = gw[j].clone(), gb[j].clone()
        b.get_parameter("weight").grad, b.get_parameter("bias").grad = gw.clone(), gb.clone()
        opt.step()
        for o in ropts:
            o.step()
    for j, r in enumerate(refs):
        assert torch.equal(b.get_parameter("weight")[j], r.weight) and torch.equal(b.get_parameter("bias")[j], r.bias)


class _SparseBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(12, 4, sparse=True), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.emb(x).mean(1))


@pytest.mark.parametrize("cls,kw", [(torch.optim.Adam, {}), (torch.optim.RMSprop, {}), (torch.optim.NAdam, {}),
                                    (torch.optim.Adagrad, {"weight_decay": 0.1}),
                                    (torch.optim.SGD, {"weight_decay": 0.1})])
def test_sparse_embedding_refused_where_torch_refuses_sparse_gradients(cls, kw):
    """Alone, a model with nn.Embedding(sparse=True) gets a sparse gradient, which these optimizers refuse at
    their first step; the batched gradient is dense, so the per-model optimizer refuses up front, naming the
    weight (it trained silently). Without that weight (params=) it is fine."""
    m = _SparseBag()
    with pytest.raises(RuntimeError, match="sparse"):
        o = cls(m.parameters(), lr=0.1, **kw)
        F.cross_entropy(m(torch.randint(0, 12, (2, 3))), torch.tensor([0, 1])).backward()
        o.step()
    b = mbcompile.batch([_SparseBag() for _ in range(2)])
    with pytest.raises(mbcompile.optim.UnsupportedOptimizerError, match=r"'emb\.weight'.*sparse=True.*sparse"):
        mbcompile.optimizer(b, cls, lr=[0.1, 0.2], **kw)
    mbcompile.optimizer(b, cls, lr=[0.1, 0.2], params=lambda name: not name.startswith("emb"), **kw)


@pytest.mark.parametrize("cls,kw", [(torch.optim.SGD, {"momentum": 0.9}), (torch.optim.Adagrad, {})])
def test_sparse_embedding_trains_as_alone_where_torch_takes_sparse_gradients(cls, kw):
    torch.manual_seed(3)
    models = [_SparseBag().double() for _ in range(2)]
    refs = copy.deepcopy(models)
    xs, ys = torch.randint(0, 5, (3, 4, 6)), torch.randint(0, 3, (3, 4))   # repeated ids, untouched rows
    b = mbcompile.batch(models)
    opt = mbcompile.optimizer(b, cls, lr=[0.1, 0.2], **kw)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        mbcompile.loss(F.cross_entropy, b(x), y, target_in_dim=None).sum().backward()
        opt.step()
    for i, m in enumerate(refs):
        o = cls(m.parameters(), lr=[0.1, 0.2][i], **kw)
        for x, y in zip(xs, ys):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            assert m.emb.weight.grad.is_sparse
            o.step()
        for (name, p), q in zip(m.named_parameters(), b.unbatch(i).parameters()):
            torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12, msg=name)
