"""``mbcompile.train_step`` with mbcompile's per-model optimizer: the one-program step (forward, per-model
loss, backward, update) equals the normal loop (``mbcompile.loss(...).sum().backward(); opt.step()``) for
every supported optimizer with per-model hyperparameters, keeps the optimizer's state where the normal
step keeps it, does not recompile when a scheduler changes values, and honours frozen models."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mbcompile
from _models import BNDropNet
from mbcompile import backend

N = 3
SEEDS = [11, 12, 13]
LRS = [0.05, 0.02, 0.01]


def Net():
    return BNDropNet(hidden=12, p=0.3)


@pytest.fixture
def data():
    models = [Net().double() for _ in range(N)]
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    return models, x, y


def pair(models, cls, kw):
    """Two identical batches with their own per-model optimizers: one for the normal loop, one for
    train_step."""
    a = mbcompile.batch(copy.deepcopy(models), seeds=SEEDS)
    b = mbcompile.batch(copy.deepcopy(models), seeds=SEEDS)
    return a, mbcompile.optimizer(a, cls, **kw), b, mbcompile.optimizer(b, cls, **kw)


def loop_step(batched, opt, x, y, max_norm=None):
    opt.zero_grad()
    losses = mbcompile.loss(F.cross_entropy, batched(x), y)
    losses.sum().backward()
    norms = None if max_norm is None else mbcompile.clip_grad_norm_(batched, max_norm)
    opt.step()
    return losses.detach(), norms


def compiles():
    return backend.STATS["backend_calls"]


def assert_same(a, oa, b, ob, tol=1e-10):
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(q, p, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")
    for (name, u), (_, v) in zip(a.named_buffers(), b.named_buffers()):
        torch.testing.assert_close(v, u, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["state"].keys() == sb["state"].keys() and sa["state"]
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys(), i
        for key, want in sa["state"][i].items():
            torch.testing.assert_close(sb["state"][i][key], want, rtol=tol, atol=tol,
                                       msg=lambda m, i=i, key=key: f"state[{i}][{key}]: {m}")
    assert sa["mbcompile"]["frozen"] == sb["mbcompile"]["frozen"]
    # every "sequential" dropout stream has drawn the same masks, as many times
    assert torch.equal(a.get_rng_state()["states"]["cpu"], b.get_rng_state()["states"]["cpu"])


CASES = [
    (torch.optim.SGD, dict(lr=LRS, momentum=[0.9, 0.8, 0.5], nesterov=True, weight_decay=[0.0, 1e-2, 0.1])),
    (torch.optim.SGD, dict(lr=LRS, momentum=[0.9, 0.0, 0.5], dampening=[0.0, 0.0, 0.3], weight_decay=1e-2)),
    (torch.optim.Adam, dict(lr=LRS, betas=[(0.9, 0.999), (0.8, 0.99), (0.95, 0.9)], weight_decay=[0.0, 1e-2, 0.1],
                            amsgrad=True)),
    (torch.optim.Adam, dict(lr=LRS, amsgrad=[True, False, True], maximize=[False, True, False])),
    (torch.optim.AdamW, dict(lr=LRS, weight_decay=[0.01, 0.1, 0.0], eps=[1e-8, 1e-6, 1e-8])),
    (torch.optim.RMSprop, dict(lr=[0.01, 0.005, 0.02], alpha=[0.99, 0.9, 0.95], centered=True,
                               momentum=[0.9, 0.5, 0.0], weight_decay=[0.0, 1e-2, 0.0])),
    (torch.optim.Adagrad, dict(lr=LRS, lr_decay=[0.0, 0.01, 0.1], weight_decay=[0.0, 1e-2, 0.0],
                               initial_accumulator_value=[0.0, 0.1, 0.5])),
    (torch.optim.Adamax, dict(lr=LRS, betas=[(0.9, 0.999), (0.8, 0.99), (0.95, 0.9)], weight_decay=[0.0, 1e-2, 0.0])),
    (torch.optim.NAdam, dict(lr=LRS, momentum_decay=[4e-3, 1e-3, 4e-3], weight_decay=[0.0, 1e-2, 0.1],
                             decoupled_weight_decay=[False, False, True])),
    # rho_t passes 5 at step 6 for beta2 0.9 and 0.999, never for 0.5: both branches, one program
    (torch.optim.RAdam, dict(lr=LRS, betas=[(0.9, 0.999), (0.9, 0.9), (0.9, 0.5)], weight_decay=[0.0, 1e-2, 0.1])),
]


@pytest.mark.parametrize("cls, kw", CASES, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(CASES)])
def test_train_step_equals_normal_loop(data, cls, kw):
    models, x, y = data
    a, oa, b, ob = pair(models, cls, kw)
    step = mbcompile.train_step(b, F.cross_entropy, ob)
    before = compiles()
    for k in range(7 if cls is torch.optim.RAdam else 3):
        want, _ = loop_step(a, oa, x, y)
        got = step(x, y)
        # the losses depend on each model's dropout mask: equal losses, equal masks
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m, k=k: f"step {k}: {m}")
    assert compiles() - before == 1                      # one program, reused by every step
    assert_same(a, oa, b, ob)
    start = dict(mbcompile.batch(copy.deepcopy(models)).named_parameters())
    for name, p in b.named_parameters():                 # every model moved
        assert (p - start[name]).flatten(1).abs().amax(1).min() > 1e-6, name


@pytest.mark.parametrize("cls, kw", [CASES[0], CASES[4], (torch.optim.SGD, dict(lr=0.05))],
                         ids=["SGD-momentum", "AdamW", "torch-SGD"])
def test_parameters_written_after_the_program_equal_the_normal_loop(data, cls, kw, monkeypatch):
    """torch < 2.13 (UPDATE_IN_GRAPH False): the program returns the new parameters and train_step
    copies them in; its Inductor had run an update before a backward bmm read the old weights."""
    monkeypatch.setattr(backend, "UPDATE_IN_GRAPH", False)
    models, x, y = data
    a, oa, b, ob = pair(models, cls, kw)
    if "momentum" not in kw and not isinstance(kw["lr"], list):            # a torch.optim optimizer
        oa, ob = cls(a.parameters(), **kw), cls(b.parameters(), **kw)
    step = mbcompile.train_step(b, F.cross_entropy, ob, path="compiled")
    for k in range(3):
        want, _ = loop_step(a, oa, x, y)
        torch.testing.assert_close(step(x, y), want, rtol=1e-10, atol=1e-10, msg=lambda m, k=k: f"step {k}: {m}")
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


def test_normal_loop_equals_each_model_alone_with_dropout(data):
    """The reference for the tests above: the normal batched loop is each model trained alone by
    torch.optim, its dropout drawing from torch.manual_seed(seeds[i]); so is train_step."""
    models, x, y = data
    kw = dict(lr=LRS, betas=[(0.9, 0.999), (0.8, 0.99), (0.95, 0.9)], weight_decay=[0.0, 1e-2, 0.1])
    a, oa, b, ob = pair(models, torch.optim.Adam, kw)
    step = mbcompile.train_step(b, F.cross_entropy, ob)
    for _ in range(3):
        loop_step(a, oa, x, y)
        step(x, y)
    for i, m in enumerate(copy.deepcopy(models)):
        opt = torch.optim.Adam(m.parameters(), lr=LRS[i], betas=kw["betas"][i], weight_decay=kw["weight_decay"][i])
        torch.manual_seed(SEEDS[i])
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        for batched in (a, b):
            got = dict(batched.unbatch(i).named_parameters())
            for name, want in m.named_parameters():
                torch.testing.assert_close(got[name], want, rtol=1e-10, atol=1e-10,
                                           msg=lambda msg, name=name: f"model {i}, {name}: {msg}")


@pytest.mark.parametrize("make_sched", [
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    # OneCycleLR also cycles Adam's beta1 per step
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[0.1, 0.05, 0.2], total_steps=10),
], ids=["StepLR", "OneCycleLR"])
def test_scheduler_and_changed_hyperparameters_do_not_recompile(data, make_sched):
    models, x, y = data
    a, oa, b, ob = pair(models, torch.optim.Adam, dict(lr=LRS, weight_decay=[0.0, 1e-2, 0.1]))
    sa, sb = make_sched(oa), make_sched(ob)
    step = mbcompile.train_step(b, F.cross_entropy, ob)
    before = compiles()
    lrs = []
    for k in range(4):
        if k == 2:                                        # a changed value is an input, not a constant
            for o in (oa, ob):
                o.param_groups[1]["weight_decay"] = 0.05
        loop_step(a, oa, x, y)
        step(x, y)
        sa.step()
        sb.step()
        lrs.append([g["lr"] for g in ob.param_groups])
    assert len({tuple(v) for v in lrs}) == 4              # lr really changed every step
    assert compiles() - before == 1
    assert_same(a, oa, b, ob)


def test_frozen_model_does_not_move_and_unfreeze_continues(data):
    models, x, y = data
    a, oa, b, ob = pair(models, torch.optim.SGD, dict(lr=LRS, momentum=0.9, weight_decay=1e-2))
    step = mbcompile.train_step(b, F.cross_entropy, ob)
    loop_step(a, oa, x, y)
    step(x, y)
    for o in (oa, ob):
        o.freeze(1)
    p1 = [p[1].clone() for p in b.parameters()]
    buf1 = [ob.state[p]["momentum_buffer"][1].clone() for p in b.parameters()]
    for _ in range(2):
        loop_step(a, oa, x, y)
        step(x, y)
    for p, want in zip(b.parameters(), p1):
        assert torch.equal(p[1], want)                    # frozen: not one bit changes
    for p, want in zip(b.parameters(), buf1):
        assert torch.equal(ob.state[p]["momentum_buffer"][1], want)
    assert_same(a, oa, b, ob)
    for o in (oa, ob):                                    # every model frozen: forward and backward only
        o.freeze([0, 1, 2])
    pall = [p.clone() for p in b.parameters()]
    loop_step(a, oa, x, y)
    step(x, y)
    assert all(torch.equal(p, q) for p, q in zip(b.parameters(), pall))
    assert_same(a, oa, b, ob)
    for o in (oa, ob):
        o.unfreeze([0, 1, 2])
    for _ in range(2):
        loop_step(a, oa, x, y)
        step(x, y)
    assert not torch.equal(next(iter(b.parameters()))[1], p1[0])
    assert_same(a, oa, b, ob)


@pytest.mark.parametrize("cls, kw", [(torch.optim.SGD, dict(lr=LRS, momentum=[0.9, 0.0, 0.5], nesterov=False)),
                                     (torch.optim.NAdam, dict(lr=LRS, weight_decay=[0.0, 1e-2, 0.1]))],
                         ids=["SGD", "NAdam"])
def test_mixing_train_step_and_normal_steps(data, cls, kw):
    """train_step and opt.step() share the optimizer's state: any interleaving is the normal loop."""
    models, x, y = data
    a, oa, b, ob = pair(models, cls, kw)
    step = mbcompile.train_step(b, F.cross_entropy, ob)
    for k in range(5):
        loop_step(a, oa, x, y)
        if k in (0, 3):
            loop_step(b, ob, x, y)
        else:
            step(x, y)
    assert_same(a, oa, b, ob)


def test_state_dict_round_trip_and_shrink(data):
    models, x, y = data
    kw = dict(lr=LRS, betas=[(0.9, 0.999), (0.8, 0.99), (0.95, 0.9)])
    a, oa, b, ob = pair(models, torch.optim.Adam, kw)
    step = mbcompile.train_step(b, F.cross_entropy, ob)
    for _ in range(2):
        loop_step(a, oa, x, y)
        step(x, y)
    # a fresh optimizer loaded from the state dict continues exactly where train_step stopped
    ob2 = mbcompile.optimizer(b, torch.optim.Adam, **kw)
    ob2.load_state_dict(ob.state_dict())
    step2 = mbcompile.train_step(b, F.cross_entropy, ob2)
    loop_step(a, oa, x, y)
    step2(x, y)
    assert_same(a, oa, b, ob2)
    for batched, o in ((a, oa), (b, ob2)):
        mbcompile.shrink_([2, 0], batched, o)
    for _ in range(2):
        loop_step(a, oa, x, y)
        step2(x, y)
    assert b.n == 2
    assert_same(a, oa, b, ob2)


@pytest.mark.parametrize("as_tensor", [False, True], ids=["list", "tensor"])
def test_a_per_model_max_grad_norm_is_narrowed_by_shrink(data, as_tensor):
    models, x, y = data
    norms = [0.05, 1.0, 0.2]
    a, oa, b, ob = pair(models, torch.optim.SGD, dict(lr=LRS, momentum=0.9))
    step = mbcompile.train_step(b, F.cross_entropy, ob,
                                max_grad_norm=torch.tensor(norms, dtype=torch.float64) if as_tensor else list(norms))
    loop_step(a, oa, x, y, norms)
    step(x, y)
    for batched, o in ((a, oa), (b, ob)):
        mbcompile.shrink_([2, 0], batched, o)
    for _ in range(2):
        loop_step(a, oa, x, y, [norms[2], norms[0]])
        step(x, y)
    assert_same(a, oa, b, ob)


def test_max_grad_norm_equals_clip_grad_norm(data):
    models, x, y = data
    max_norm = [0.05, 1.0, 100.0]
    a, oa, b, ob = pair(models, torch.optim.AdamW, dict(lr=LRS))
    step = mbcompile.train_step(b, F.cross_entropy, ob, max_grad_norm=max_norm)
    for _ in range(3):
        _, norms = loop_step(a, oa, x, y, max_norm=max_norm)
        step(x, y)
        torch.testing.assert_close(step.last_grad_norms, norms, rtol=1e-10, atol=1e-10)
    assert norms[0] > max_norm[0] and norms[2] < max_norm[2]   # model 0 clipped, model 2 not
    assert_same(a, oa, b, ob)


def test_max_grad_norm_with_a_torch_optimizer(data):
    """The torch.optim path (shared hyperparameters) clips too; a shared float max_norm."""
    models, x, y = data
    a = mbcompile.batch(copy.deepcopy(models), seeds=SEEDS)
    b = mbcompile.batch(copy.deepcopy(models), seeds=SEEDS)
    oa, ob = torch.optim.Adam(a.parameters(), lr=0.01), torch.optim.Adam(b.parameters(), lr=0.01)
    step = mbcompile.train_step(b, F.cross_entropy, ob, max_grad_norm=0.1)
    for _ in range(3):
        _, norms = loop_step(a, oa, x, y, max_norm=0.1)
        step(x, y)
        torch.testing.assert_close(step.last_grad_norms, norms, rtol=1e-10, atol=1e-10)
    assert (norms > 0.1).any()
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


def test_train_step_refuses_what_it_does_not_fuse():
    b = mbcompile.batch(Net(), n=2)
    with pytest.raises(ValueError, match="GradScaler"):
        mbcompile.train_step(b, F.cross_entropy, mbcompile.optimizer(b, torch.optim.Adam, lr=[0.1, 0.2]),
                             scaler=mbcompile.GradScaler(b))
    with pytest.raises(ValueError, match="closure"):
        mbcompile.train_step(b, F.cross_entropy, torch.optim.LBFGS(b.parameters()))
    with pytest.raises(ValueError, match="mbcompile.optimizer"):
        mbcompile.train_step(b, F.cross_entropy, torch.optim.Rprop(b.parameters()))
    with pytest.raises(TypeError, match="one optimizer.*several optimizers.*normal loop"):
        mbcompile.train_step(b, F.cross_entropy, [mbcompile.optimizer(b, torch.optim.SGD, lr=0.1)])
    other = mbcompile.batch(Net(), n=3)
    with pytest.raises(ValueError, match="n=3"):
        mbcompile.train_step(b, F.cross_entropy, mbcompile.optimizer(other, torch.optim.SGD, lr=0.1))


class TiedLM(nn.Module):
    """An embedding tied to the output head (one parameter, two uses) and a pooler forward never uses."""

    def __init__(self, v=7):
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(v, 5), nn.Linear(5, 5), nn.Linear(5, v, bias=False)
        self.head.weight = self.emb.weight
        self.pooler = nn.Linear(5, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x)))).flatten(0, 1)


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.l, self.pooler = nn.Linear(6, 3), nn.Linear(6, 6)

    def forward(self, x):
        return self.l(x)


@pytest.mark.parametrize("make, vocab", [(TiedLM, 7), (Unused, None)], ids=["tied-and-unused", "unused"])
def test_tied_and_unused_parameters(make, vocab):
    """A tied parameter is one tensor whose gradient sums both uses; one forward never uses keeps grad None
    in the normal loop, so the optimizer skips it: no state, no AdamW weight decay. train_step does the
    same, with the per-model optimizer and with a torch.optim one, and so does each model alone."""
    models = [make().double() for _ in range(N)]
    if vocab:
        x, y = torch.randint(0, vocab, (4, 3)), torch.randint(0, vocab, (12,))
    else:
        x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    kw = dict(lr=LRS, weight_decay=[0.1, 0.5, 0.0])
    a, oa, b, ob = pair(models, torch.optim.AdamW, kw)
    step = mbcompile.train_step(b, F.cross_entropy, ob)
    for _ in range(3):
        want, _ = loop_step(a, oa, x, y)
        torch.testing.assert_close(step(x, y), want, rtol=1e-10, atol=1e-10)
    assert_same(a, oa, b, ob)
    names = [name for name, _ in b.named_parameters()]
    assert "head.weight" not in names and len(ob.state_dict()["state"]) == len(names) - 2   # pooler: no state
    for i, m in enumerate(copy.deepcopy(models)):            # each model alone with torch.optim
        opt = torch.optim.AdamW(m.parameters(), lr=LRS[i], weight_decay=kw["weight_decay"][i])
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        assert m.pooler.weight not in opt.state and torch.equal(b.unbatch(i).pooler.weight, models[i].pooler.weight)
        got = dict(b.unbatch(i).named_parameters())
        for name, want in m.named_parameters():
            torch.testing.assert_close(got[name], want, rtol=1e-10, atol=1e-10,
                                       msg=lambda msg, name=name: f"model {i}, {name}: {msg}")
    # a torch.optim AdamW over the stacked parameters (shared hyperparameters): the same
    a, b = (mbcompile.batch(copy.deepcopy(models), seeds=SEEDS) for _ in range(2))
    oa, ob = (torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.3) for m in (a, b))
    step = mbcompile.train_step(b, F.cross_entropy, ob)
    for _ in range(3):
        oa.zero_grad()
        mbcompile.loss(F.cross_entropy, a(x), y).sum().backward()
        oa.step()
        step(x, y)
    assert ob.state_dict()["state"].keys() == oa.state_dict()["state"].keys()
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
        if p in oa.state:
            for key, want in oa.state[p].items():
                torch.testing.assert_close(ob.state[q][key], want, rtol=1e-10, atol=1e-10)
    assert torch.equal(b.pooler.weight, a.pooler.weight) and b.pooler.weight not in ob.state


class MaxNormEmbedding(nn.Module):
    """Embedding(max_norm) renormalises rows of its weight in place during forward; the update then
    applies to the renormalised rows (eager), not to the weight as it was before forward."""
    def __init__(self):
        super().__init__()
        self.e, self.l = nn.Embedding(10, 4, max_norm=1.0), nn.Linear(4, 3)
        with torch.no_grad():
            self.e.weight.mul_(3)

    def forward(self, x):
        return self.l(self.e(x).mean(1))


@pytest.mark.parametrize("cls,kw", [(torch.optim.SGD, dict(lr=[0.5, 0.1, 0.2])),
                                    (torch.optim.AdamW, dict(lr=[0.05, 0.01, 0.02], weight_decay=0.1))])
def test_a_parameter_changed_in_forward_keeps_the_update(cls, kw):
    models = [MaxNormEmbedding().double() for _ in range(3)]
    a, oa, b, ob = pair(models, cls, kw)
    step = mbcompile.train_step(b, F.cross_entropy, ob)
    x, y = torch.randint(0, 10, (5, 3)), torch.randint(0, 3, (5,))
    for _ in range(3):
        loop_step(a, oa, x, y)
        step(x, y)
    assert_same(a, oa, b, ob)


def torch_pair(models, make_opt):
    """Two identical batches, each with a plain torch.optim optimizer built by ``make_opt(batched)``."""
    a, b = (mbcompile.batch(copy.deepcopy(models), seeds=SEEDS) for _ in range(2))
    return a, make_opt(a), b, make_opt(b)


def torch_loop_steps(a, oa, b, ob, x, y, steps=3):
    """``steps`` normal-loop steps of (a, oa) and train_step steps of (b, ob); their losses agree."""
    step = mbcompile.train_step(b, F.cross_entropy, ob)
    for k in range(steps):
        oa.zero_grad()
        want = mbcompile.loss(F.cross_entropy, a(x), y)
        want.sum().backward()
        oa.step()
        torch.testing.assert_close(step(x, y), want.detach(), rtol=1e-10, atol=1e-10, msg=lambda m: f"step {k}: {m}")
    assert ob.state_dict()["state"].keys() == oa.state_dict()["state"].keys()
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
        for key, want in oa.state.get(p, {}).items():
            torch.testing.assert_close(ob.state[q][key], want, rtol=1e-10, atol=1e-10)


def test_torch_adam_with_decoupled_weight_decay_is_adamw(data):
    """torch's AdamW is Adam(decoupled_weight_decay=True): train_step decays the parameter as AdamW does
    (not L2 added to the gradient), equal to the normal loop and to torch.optim.AdamW on each model alone."""
    models, x, y = data
    a, oa, b, ob = torch_pair(models, lambda m: torch.optim.Adam(m.parameters(), lr=0.05, weight_decay=0.5,
                                                                 decoupled_weight_decay=True))
    torch_loop_steps(a, oa, b, ob, x, y)
    for i, m in enumerate(copy.deepcopy(models)):            # each model alone with AdamW, its own dropout
        opt, gen = torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.5), torch.Generator().manual_seed(SEEDS[i])
        for _ in range(3):
            cur = torch.get_rng_state()
            torch.set_rng_state(gen.get_state())
            out = m(x)
            gen.set_state(torch.get_rng_state())
            torch.set_rng_state(cur)
            opt.zero_grad()
            F.cross_entropy(out, y).backward()
            opt.step()
        got = dict(b.unbatch(i).named_parameters())
        for name, want in m.named_parameters():
            torch.testing.assert_close(got[name], want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls,kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                    (torch.optim.AdamW, dict(lr=0.05, weight_decay=0.1))])
def test_torch_optimizer_over_some_parameters_updates_only_those(data, cls, kw):
    """As ``opt.step()`` in the normal loop: parameters the optimizer does not hold keep their values and get
    no optimizer state."""
    models, x, y = data
    a, oa, b, ob = torch_pair(models, lambda m: cls(m.fc2.parameters(), **kw))
    before = {name: p.detach().clone() for name, p in b.named_parameters()}
    torch_loop_steps(a, oa, b, ob, x, y)
    for name, p in b.named_parameters():
        assert torch.equal(p, before[name]) != name.startswith("fc2"), name
        assert (p in ob.state) == name.startswith("fc2"), name
    with pytest.raises(mbcompile.MBCompileError, match="holds no trainable parameter"):
        mbcompile.train_step(b, F.cross_entropy, torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1))(x, y)
