"""Bad input gets a clear mbcompile error (every one an MBCompileError, and the builtin type a caller
would expect: ValueError, TypeError, IndexError)."""
import dataclasses
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mbcompile
from mbcompile.optim import ReduceLROnPlateau


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def mlp(eps=1e-5):
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, eps=eps), nn.Linear(5, 2))


@pytest.mark.parametrize("call,exc,match", [
    (lambda: mbcompile.batch(mlp(), n=2, in_dims=0)(torch.randn(3, 6, 4)), ValueError, "leading dim must be n=2"),
    (lambda: mbcompile.batch([mlp(), nn.Sequential(nn.Linear(4, 5))]), ValueError, "model 1 has a different module tree"),
    (lambda: mbcompile.batch([mlp(), mlp(eps=1e-3)]), ValueError, "eps"),
    (lambda: mbcompile.batch(mlp(), n=2, seeds=[1]), ValueError, "seeds"),
    (lambda: mbcompile.batch(mlp(), n=0), ValueError, "n >= 1"),
    (lambda: mbcompile.batch(mlp(), n=2).unbatch(2), IndexError, "out of range"),
    (lambda: mbcompile.optimizer(mbcompile.batch(mlp(), n=2), torch.optim.SGD, lr=[0.1, 0.2, 0.3]), ValueError, "n=2"),
    (lambda: mbcompile.optimizer(mbcompile.batch(mlp(), n=2), torch.optim.SGD, lr=[0.1, -1.0]), ValueError,
     "model 1"),
    (lambda: ReduceLROnPlateau(mbcompile.optimizer(mbcompile.batch(mlp(), n=2), torch.optim.SGD, lr=0.1)).step(0.5),
     ValueError, "one metric per model"),
    (lambda: mbcompile.batch(lambda x: x * 2, n=2), TypeError, r"got function \(wrap a function in an nn.Module\)"),
    (lambda: mbcompile.batch(3, n=2), TypeError, "nn.Module or a non-empty list of nn.Modules, got int"),
    (lambda: mbcompile.batch([nn.Linear(2, 2), "x"]), TypeError, "a list holding str"),
    (lambda: mbcompile.batch([]), ValueError, "got an empty list"),
    (lambda: mbcompile.loss(F.cross_entropy, torch.randn(3, 5, 4), torch.randint(0, 4, (7,))), ValueError,
     r"model 0's output \(5, 4\) and its target, shared by every model: \(7,\).*B=5.*n=3"),
    (lambda: mbcompile.loss(F.cross_entropy, torch.randn(3, 5, 4), torch.randint(0, 4, (3, 7))), ValueError,
     r"per model \(target_in_dim=0\): target\[0\] \(7,\)"),
    (lambda: mbcompile.loss(F.mse_loss, torch.randn(3, 5, 4), torch.randn(5, 3)), ValueError,
     r"model 0's output \(5, 4\).*\(5, 3\)"),
])
def test_bad_input_is_a_clear_mbcompile_error(call, exc, match):
    with pytest.raises(exc, match=match) as info:
        call()
    assert isinstance(info.value, mbcompile.MBCompileError)


class BoolMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(6, 3)

    def forward(self, x):
        return self.l(x[x[:, 0] > 0])


def test_data_dependent_shape_is_a_capture_error_naming_the_line():
    with pytest.raises(mbcompile.CaptureError, match=r"shape depends on the data.*x\[x\[:, 0\] > 0\].*torch.where"):
        mbcompile.batch(BoolMask(), n=2)(torch.randn(4, 6))


def test_plain_dataclass_output_needs_no_registration():
    import dataclasses

    @dataclasses.dataclass
    class Inner:
        feat: torch.Tensor

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor
        inner: Inner

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 2)

        def forward(self, x):
            f = self.a(x)
            return Out(self.b(f), Inner(f))

    models = [M().double() for _ in range(3)]
    x = torch.randn(6, 4, dtype=torch.float64)
    out = mbcompile.batch(models)(x)
    assert isinstance(out, Out) and isinstance(out.inner, Inner)
    for i, m in enumerate(models):
        want = m(x)
        torch.testing.assert_close(out.logits[i], want.logits)
        torch.testing.assert_close(out.inner.feat[i], want.inner.feat)


class ReadsDropoutRate(nn.Module):
    """forward passes its Dropout's rate to another op (as HF attention does with dropout_p)."""
    def __init__(self, p):
        super().__init__()
        self.l, self.drop = nn.Linear(4, 4), nn.Dropout(p)

    def forward(self, x):
        q = self.l(x)
        return self.drop(q) + torch.nn.functional.dropout(q, self.drop.p, self.training)


def test_a_per_model_rate_read_outside_its_module_is_refused_not_given_model_0s_value():
    models = [ReadsDropoutRate(p) for p in (0.1, 0.5)]
    with pytest.raises(ValueError, match=r"drop.p.*outside its module.*F.dropout|drop.p.*outside its module") as info:
        mbcompile.batch(models)(torch.randn(3, 4))
    assert isinstance(info.value, mbcompile.MBCompileError)
    out = mbcompile.batch([ReadsDropoutRate(0.3) for _ in range(2)])(torch.randn(3, 4))  # same rate: fine
    assert out.shape == (2, 3, 4)
    mbcompile.batch(models).eval()(torch.randn(3, 4))                   # eval: the rate is not used


class MomentumEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        for pq, pk in zip(self.q.parameters(), self.k.parameters()):
            pk.data.mul_(0.9).add_(pq.data, alpha=0.1)
        return self.q(x) + self.k(x).detach()


def test_data_in_forward_is_a_capture_error_with_the_fix():
    with pytest.raises(mbcompile.CaptureError, match=r"uses .data.*torch.no_grad"):
        mbcompile.batch(MomentumEncoder(), n=2)(torch.randn(3, 4))


def test_a_top_level_name_that_is_a_batched_attribute_is_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.n = nn.Linear(4, 4), nn.LayerNorm(4)

        def forward(self, x):
            return self.n(self.c(x))

    with pytest.raises(ValueError, match="named 'n'.*nn.Sequential"):
        mbcompile.batch([M(), M()])
    out = mbcompile.batch([nn.Sequential(M()), nn.Sequential(M())])(torch.randn(3, 4))
    assert out.shape == (2, 3, 4)


def test_loss_of_a_tuple_output_says_which_to_pass():
    with pytest.raises(TypeError, match=r"out\[0\]") as info:
        mbcompile.loss(torch.nn.functional.mse_loss, (torch.randn(2, 3, 4),), torch.randn(3, 4))
    assert isinstance(info.value, mbcompile.MBCompileError)
    with pytest.raises(TypeError, match="tensor, or a tuple / dict of them"):
        mbcompile.loss(torch.nn.functional.mse_loss, ("logits",), torch.randn(3, 4))


def test_distribution_argument_checks_get_the_validate_args_hint():
    class Flow(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)

        def forward(self, x):
            return torch.distributions.Normal(0.0, 1.0, validate_args=True).log_prob(self.l(x)).sum(-1)

    with pytest.raises(mbcompile.CaptureError, match="validate_args=False"):
        mbcompile.batch(Flow(), n=2)(torch.randn(4, 3))


def test_data_dependent_branch_prints_no_partial_graph(capfd):
    """torch prints the partial graph to stderr when export stops at a data-dependent branch; the
    CaptureError says what to do, and nothing else reaches the user's terminal."""
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)

        def forward(self, x):
            y = self.l(x)
            return y * 2 if y.sum() > 0 else y

    with pytest.raises(mbcompile.CaptureError, match="torch.cond"):
        mbcompile.batch(Branch(), n=2)(torch.randn(4, 3))
    err = capfd.readouterr().err
    assert "def forward" not in err and "Unable to find user code" not in err, err[:400]


def test_forward_own_value_error_stays_a_value_error():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    with pytest.raises(ValueError, match="more than 1 value per channel") as info:
        mbcompile.batch(m, n=2)(torch.randn(1, 3, 1, 1))
    assert isinstance(info.value, mbcompile.CaptureError)


class _PyLayerDrop(nn.Module):
    """LayerDrop with Python's random module: each model alone skips different layers at every call."""

    def __init__(self, np_random=False):
        super().__init__()
        self.layers, self.np_random = nn.ModuleList([nn.Linear(6, 6) for _ in range(3)]), np_random

    def forward(self, x):
        import random
        for layer in self.layers:
            u = __import__("numpy").random.rand() if self.np_random else random.uniform(0, 1)
            if self.training and u < 0.5:
                continue
            x = x + torch.tanh(layer(x))
        return x


class _Anneal(nn.Module):
    """A step counter kept in a Python int and read by forward."""

    def __init__(self):
        super().__init__()
        self.fc, self.calls, self.mode = nn.Linear(6, 3), 0, "train"

    def forward(self, x):
        self.calls += 1
        self.mode = "train"                      # assigning the value it has is no change
        return self.fc(x) / (1.0 + self.calls)


@pytest.mark.parametrize("np_random", [False, True], ids=["random", "numpy"])
def test_python_random_in_forward_is_refused_and_its_stream_left_alone(np_random):
    import random
    if np_random:
        np = pytest.importorskip("numpy")
        np.random.seed(3)
        want = np.random.get_state()[1].copy()
    random.seed(3)
    state = random.getstate()
    with pytest.raises(mbcompile.CaptureError, match="numpy's global random" if np_random else "Python's random module"):
        mbcompile.batch(_PyLayerDrop(np_random), n=2)(torch.randn(4, 6))
    assert random.getstate() == state
    if np_random:
        assert (np.random.get_state()[1] == want).all()


def test_a_python_attribute_changed_by_forward_warns_and_strict_refuses():
    with pytest.warns(UserWarning, match=r"changes plain Python attributes \('calls': 0 -> 1\)\. A captured") as rec:
        mbcompile.batch(_Anneal(), n=2)(torch.randn(4, 6))
    assert not any("'mode'" in str(w.message) for w in rec)
    with pytest.raises(mbcompile.CaptureError, match="'calls': 0 -> 1.*register_buffer"):
        mbcompile.batch(_Anneal(), n=2, strict=True)(torch.randn(4, 6))


def test_an_uninitialized_lazy_module_is_a_clear_error():
    with pytest.raises(mbcompile.MBCompileError, match="uninitialized lazy parameter 'weight'.*Run each model once"):
        mbcompile.batch([nn.LazyLinear(3), nn.LazyLinear(3)])


def test_a_per_model_input_of_the_wrong_size_is_named_as_the_caller_passed_it():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, bias=None, extra=None):
            return self.lin(x) + bias + extra["a"][0]

    b = mbcompile.batch(M(), n=3, in_dims=0)
    ok = torch.randn(3, 5, 4)
    for kwargs, name in [(dict(bias=torch.randn(2, 5, 4), extra={"a": [ok]}), "keyword input 'bias'"),
                         (dict(bias=ok, extra={"a": [torch.randn(2, 5, 4)]}), "keyword input 'extra'['a'][0]")]:
        with pytest.raises(mbcompile.MBCompileError, match=re.escape(name) + " is per-model.*n=3.*leading size 2"):
            b(ok, **kwargs)
    with pytest.raises(mbcompile.MBCompileError, match="positional input 0 is per-model"):
        b(torch.randn(2, 5, 4), bias=ok, extra={"a": [ok]})


def test_an_input_of_the_wrong_dtype_fails_as_alone_with_the_op_named():
    b = mbcompile.batch(nn.Linear(4, 3), n=2)
    with pytest.raises(RuntimeError, match="must have the same dtype") as e:
        b(torch.randn(5, 4, dtype=torch.float64))
    notes = "\n".join(getattr(e.value, "__notes__", []))
    assert "aten.linear.default" in notes and "linear.py" in notes


def test_an_op_with_a_data_dependent_output_shape_names_the_line_and_the_way_out():
    class Ctc(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(6, 5)

        def forward(self, x, tgt):
            lp = torch.log_softmax(self.l(x), -1)
            return torch.nn.functional.ctc_loss(lp, tgt, [4] * x.shape[1], [2] * x.shape[1], reduction="none")
    b = mbcompile.batch(Ctc(), n=2)
    with pytest.raises(mbcompile.CaptureError, match=r"(?s)_ctc_loss.*mbcompile.loss.*test_errors\.py:\d+: return"):
        b(torch.randn(4, 3, 6), torch.tensor([[1, 2], [3, 3], [2, 4]]))


def test_max_norm_on_a_tied_embedding_says_which_weights_and_what_to_do():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(9, 4, max_norm=1.0)
            self.fc = nn.Linear(4, 9, bias=False)
            self.fc.weight = self.emb.weight

        def forward(self, x):
            return self.fc(self.emb(x))

    b = mbcompile.batch(Tied(), n=2)
    with pytest.raises(mbcompile.errors.CaptureError, match="'emb' is an nn.Embedding with max_norm.*tied to "
                                                           "'fc.weight'.*Untie"):
        b(torch.randint(0, 9, (3, 5)))


def test_an_op_inside_a_torch_layer_names_the_layer_and_the_users_call():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.FractionalMaxPool2d(2, output_size=(3, 3))

        def forward(self, x):
            return self.pool(x) * 2          # the user's call of the layer

    with pytest.raises(mbcompile.UnsupportedOpError) as e:
        mbcompile.batch(Net(), n=2, strict=True)(torch.randn(2, 1, 8, 8))
    msg = str(e.value)
    assert "module 'pool'" in msg and "pooling.py" in msg
    assert "called from" in msg and "test_errors.py" in msg and "self.pool(x) * 2" in msg


class _GaussianNLL(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x, y):
        h = self.fc(x)
        return F.gaussian_nll_loss(h, y, h.exp() + 0.1)


def test_a_branch_inside_torchs_own_function_says_so():
    """gaussian_nll_loss checks its variance's values (a Python branch inside torch): the error says the
    branch is torch's, names the function, and points to mbcompile.loss, besides the user's line."""
    batched = mbcompile.batch([_GaussianNLL() for _ in range(2)])
    with pytest.raises(mbcompile.CaptureError) as err:
        batched(torch.randn(3, 4), torch.randn(3, 6))
    msg = str(err.value)
    assert "torch's own gaussian_nll_loss (torch/nn/functional.py:" in msg, msg
    assert "mbcompile.loss" in msg and "test_errors.py" in msg, msg


@pytest.mark.parametrize("index", [True, 1.0, "1", None])
def test_unbatch_refuses_what_is_not_an_index(index):
    """unbatch(True) used to index with a bool (a module whose weight had an extra dim); the others gave
    torch's or Python's raw errors."""
    batched = mbcompile.batch(nn.Linear(2, 3), n=3)
    with pytest.raises(mbcompile.InvalidTypeError, match="unbatch takes a model index"):
        batched.unbatch(index)
    assert batched.unbatch(torch.tensor(2)).weight.shape == (3, 2)      # an integer tensor is an index


@dataclasses.dataclass
class _Inputs:
    x: torch.Tensor


class _TakesDataclass(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)

    def forward(self, inp):
        return self.fc(inp.x)


def test_an_argument_export_cannot_take_gets_advice_for_its_kind():
    """An unregistered dataclass is told to register as a pytree (a dtype keeps the string advice, a numpy
    array is told to pass a tensor); the registered dataclass then batches."""
    batched = mbcompile.batch(_TakesDataclass(), n=2)
    with pytest.raises(mbcompile.CaptureError, match=r"register_dataclass"):
        batched(_Inputs(torch.randn(3, 4)))
    with pytest.raises(mbcompile.CaptureError, match=r"numpy.ndarray.*torch.as_tensor"):
        batched(np.ones(3))
