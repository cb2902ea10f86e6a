"""``train_step(path=...)``: the compiled program and the normal loop's eager step are the same step, and
"auto" keeps the faster of the two after timing both (CPU)."""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

import mbcompile
from _models import BNDropNet
from test_train_step import LRS, N, SEEDS, assert_same, loop_step

CASES = [
    (torch.optim.SGD, dict(lr=LRS, momentum=[0.9, 0.0, 0.5], weight_decay=1e-2), [1.0, 0.1, 5.0]),
    (torch.optim.Adam, dict(lr=LRS, betas=[(0.9, 0.999), (0.8, 0.99), (0.95, 0.9)], amsgrad=True), 0.3),
    (torch.optim.AdamW, dict(lr=LRS, weight_decay=[0.01, 0.1, 0.0]), None),
]


def _setup(cls, kw):
    torch.manual_seed(0)
    models = [BNDropNet(hidden=12, p=0.3).double() for _ in range(N)]
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    out = []
    for _ in range(2):
        b = mbcompile.batch(copy.deepcopy(models), seeds=SEEDS)
        out += [b, mbcompile.optimizer(b, cls, **kw)]
    return out, x, y


@pytest.mark.parametrize("path", ["eager", "compiled"])
@pytest.mark.parametrize("cls, kw, max_norm", CASES, ids=[c.__name__ for c, _, _ in CASES])
def test_each_path_equals_the_normal_loop(cls, kw, max_norm, path):
    (a, oa, b, ob), x, y = _setup(cls, kw)
    step = mbcompile.train_step(b, F.cross_entropy, ob, max_grad_norm=max_norm, path=path)
    for _ in range(4):
        want, norms = loop_step(a, oa, x, y, max_norm)
        got = step(x, y)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        if max_norm is not None:
            torch.testing.assert_close(step.last_grad_norms.to(norms.dtype), norms, rtol=1e-10, atol=1e-12)
    assert_same(a, oa, b, ob)
    assert step.chosen is None


def test_the_eager_path_puts_back_what_p_grad_was():
    (_, _, b, ob), x, y = _setup(torch.optim.SGD, dict(lr=LRS))
    marks = {name: torch.full_like(p, 7.0) for name, p in b.named_parameters()}
    for name, p in b.named_parameters():
        p.grad = marks[name]
    mbcompile.train_step(b, F.cross_entropy, ob, path="eager")(x, y)
    assert all(p.grad is marks[name] for name, p in b.named_parameters())


def _fake_clock(compiled_s, eager_s, step):
    """A clock that makes each call of ``step`` last compiled_s or eager_s, by the path it took."""
    t = itertools.count()
    state = {"now": 0.0, "start": True}

    def clock():
        next(t)
        if state["start"]:
            state["start"] = False
            return state["now"]
        state["start"] = True
        state["now"] += eager_s if step._last is None else compiled_s
        return state["now"]
    return clock


@pytest.mark.parametrize("faster", ["eager", "compiled"])
def test_auto_keeps_the_faster_path_and_the_steps_stay_the_normal_loops(faster):
    (a, oa, b, ob), x, y = _setup(torch.optim.Adam, dict(lr=LRS))
    step = mbcompile.train_step(b, F.cross_entropy, ob, path="auto")
    step._clock = _fake_clock(1.0 if faster == "eager" else 0.1, 0.2, step)
    for k in range(8):
        want, _ = loop_step(a, oa, x, y)
        torch.testing.assert_close(step(x, y), want, rtol=1e-10, atol=1e-12)
        assert step.chosen == (None if k < 6 else faster)
    assert step.times["eager_step_ms"] == pytest.approx(200.0)
    assert_same(a, oa, b, ob)


def test_a_bad_path_is_refused():
    (_, _, b, ob), _, _ = _setup(torch.optim.SGD, dict(lr=LRS))
    with pytest.raises(ValueError, match="path must be 'auto', 'compiled' or 'eager'"):
        mbcompile.train_step(b, F.cross_entropy, ob, path="fast")
