"""train_step cases a held-out sweep found wrong, each against the eager normal loop (float64): a model
with several outputs (the loss gets all of them, as mbcompile.loss now does in eager), requires_grad
switched between calls, and a torch.optim Adam / SGD whose parameters sat out different numbers of
steps (each keeps its own step count and momentum buffer, as torch.optim does)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mbcompile

LRS = [0.05, 0.02]


class TwoOut(nn.Module):
    def __init__(self, as_dict=False):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
        self.as_dict = as_dict

    def forward(self, x):
        h = torch.tanh(self.a(x))
        logits, aux = self.b(h), h.pow(2).mean()
        return {"logits": logits, "aux": aux} if self.as_dict else (logits, aux)


def _models(cls=TwoOut, **kw):
    torch.manual_seed(0)
    return [cls(**kw).double() for _ in LRS]


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("as_dict", [False, True])
def test_a_model_with_several_outputs_gives_the_loss_all_of_them(as_dict):
    def loss_fn(out, y):
        logits, aux = (out["logits"], out["aux"]) if as_dict else out
        return F.mse_loss(logits, y) + 0.5 * aux
    models = _models(as_dict=as_dict)
    a = mbcompile.batch(copy.deepcopy(models))
    oa = mbcompile.optimizer(a, torch.optim.Adam, lr=LRS)
    b = mbcompile.batch(copy.deepcopy(models))
    step = mbcompile.train_step(b, loss_fn, mbcompile.optimizer(b, torch.optim.Adam, lr=LRS))
    for k in range(3):
        x, y = _data(k)
        alone = [a.unbatch(i) for i in range(len(LRS))]     # each model as it stands, run alone
        want = torch.stack([loss_fn(m(x), y) for m in alone]).detach()
        oa.zero_grad()
        eager = mbcompile.loss(loss_fn, a(x), y)
        eager.sum().backward()
        oa.step()
        got = step(x, y)
        torch.testing.assert_close(eager.detach(), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for (k, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12, msg=k)


def test_a_loss_that_takes_one_tensor_given_several_outputs_says_which_to_pass():
    b = mbcompile.batch(_models())
    x, y = _data()
    with pytest.raises(TypeError, match=r"out\[0\]") as e:
        mbcompile.loss(F.mse_loss, b(x), y)
    assert isinstance(e.value, mbcompile.MBCompileError)


def _loop(b, opt, x, y):
    opt.zero_grad()
    mbcompile.loss(lambda o, t: F.mse_loss(o[0], t), b(x), y).sum().backward()
    opt.step()


def _pair(make_opt):
    models = _models()
    a, b = mbcompile.batch(copy.deepcopy(models)), mbcompile.batch(copy.deepcopy(models))
    oa, ob = make_opt(a), make_opt(b)
    step = mbcompile.train_step(b, lambda o, t: F.mse_loss(o[0], t), ob)
    return a, oa, b, ob, step


def _same(a, b, tol=1e-12):
    for (k, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(q, p, rtol=tol, atol=tol, msg=k)


@pytest.mark.parametrize("make_opt", [
    lambda m: mbcompile.optimizer(m, torch.optim.Adam, lr=LRS),
    lambda m: torch.optim.Adam(m.parameters(), lr=0.01),
    lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
], ids=["per_model_adam", "torch_adam", "torch_sgd_momentum"])
def test_requires_grad_switched_between_calls_trains_what_eager_trains(make_opt):
    a, oa, b, ob, step = _pair(make_opt)
    for k in range(6):
        frozen = 2 <= k < 4                                 # a.weight sits out steps 2 and 3
        for m in (a, b):
            m.get_parameter("a.weight").requires_grad_(not frozen)
        x, y = _data(k)
        before = b.get_parameter("a.weight").detach().clone()
        _loop(a, oa, x, y)
        step(x, y)
        if frozen:
            assert torch.equal(b.get_parameter("a.weight"), before)
        _same(a, b)
    if isinstance(oa, torch.optim.Adam):                    # its own step count: 4 against 6
        steps = [float(oa.state[p]["step"]) for p in a.parameters()]
        assert steps == [float(ob.state[p]["step"]) for p in b.parameters()] and steps[0] == 4 and steps[1] == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_torch_adam_state_step_has_torch_optims_dtype(dtype):
    """torch.optim keeps ``step`` in float64 under a float64 default dtype, float32 otherwise; so
    does train_step's state (checkpoints then match torch's)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        b = mbcompile.batch(nn.Linear(4, 3), n=2)
        opt = torch.optim.Adam(b.parameters(), lr=0.01)
        mbcompile.train_step(b, F.mse_loss, opt)(torch.randn(5, 4), torch.randn(5, 3))
        ref = nn.Linear(4, 3)
        ropt = torch.optim.Adam(ref.parameters(), lr=0.01)
        F.mse_loss(ref(torch.randn(5, 4)), torch.randn(5, 3)).backward()
        ropt.step()
    finally:
        torch.set_default_dtype(saved)
    assert {st["step"].dtype for st in opt.state.values()} == {ropt.state[ref.weight]["step"].dtype} == {dtype}


@pytest.mark.parametrize("path", ["compiled", "eager"])
def test_a_tuple_target_as_mbcompile_loss_takes_it(path):
    """(labels, per-sample weights) as the target, with per-model weights [n, B] next to shared labels:
    the compiled program takes the target's tensors as inputs (it used to take the target for one tensor:
    "cannot create weak reference to 'tuple' object"), and every model trains as alone."""
    torch.manual_seed(0)
    models = [nn.Linear(4, 3).double() for _ in range(3)]
    refs = copy.deepcopy(models)
    batched = mbcompile.batch(models)
    lrs = [0.1, 0.2, 0.3]
    opt = mbcompile.optimizer(batched, torch.optim.SGD, lr=lrs)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    w = torch.rand(3, 5, dtype=torch.float64)

    def weighted(o, t):
        labels, weights = t
        return (F.cross_entropy(o, labels, reduction="none") * weights).mean()
    step = mbcompile.train_step(batched, weighted, opt, path=path)
    for _ in range(3):
        losses = step(x, (y, w))
        for i, ref in enumerate(refs):
            ref.zero_grad()
            loss = weighted(ref(x), (y, w[i]))
            loss.backward()
            with torch.no_grad():
                for p in ref.parameters():
                    p -= lrs[i] * p.grad
            torch.testing.assert_close(losses[i], loss.detach(), rtol=1e-12, atol=1e-12)
    for i, ref in enumerate(refs):
        torch.testing.assert_close(batched.weight[i].detach(), ref.weight.detach(), rtol=1e-12, atol=1e-12)


def _normal_nll(o, y):   # validates its values (explicitly: torch._dynamo turns the default off process-wide)
    return -torch.distributions.Normal(o, torch.ones_like(o), validate_args=True).log_prob(y).mean()


def test_a_loss_that_checks_its_values_runs_the_normal_loop_under_auto():
    """torch.distributions validates its arguments' values in Python, which the compiled program cannot
    trace: "auto" says so once and runs the normal loop (the same steps as path="eager"); "compiled"
    refuses with a CaptureError that names the cause and the way out (it used to report a target shape)."""
    torch.manual_seed(0)
    models = [nn.Linear(2, 1).double() for _ in range(2)]
    x, y = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    runs = {}
    for path in ("auto", "eager"):
        batched = mbcompile.batch(copy.deepcopy(models))
        step = mbcompile.train_step(batched, _normal_nll, mbcompile.optimizer(batched, torch.optim.SGD, lr=[0.1, 0.2]),
                                    path=path)
        if path == "auto":
            with pytest.warns(UserWarning, match="cannot be traced.*runs the normal loop"):
                losses = [step(x, y) for _ in range(3)]
            assert step.chosen == "eager"
        else:
            losses = [step(x, y) for _ in range(3)]
        runs[path] = (torch.stack(losses), batched.weight.detach().clone())
    assert torch.equal(runs["auto"][0], runs["eager"][0]) and torch.equal(runs["auto"][1], runs["eager"][1])
    batched = mbcompile.batch(copy.deepcopy(models))
    step = mbcompile.train_step(batched, _normal_nll, mbcompile.optimizer(batched, torch.optim.SGD, lr=0.1),
                                path="compiled")
    with pytest.raises(mbcompile.CaptureError, match="looks at the data's values.*validate_args=False"):
        step(x, y)
