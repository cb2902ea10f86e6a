"""The batched module's API at its edges (found by a held-out sweep), each against the model alone:
non-tensor inputs with compile=True, a first call under inference_mode then training, pickling after a
call, one tensor passed as a per-model and a shared input, requires_grad_ after batching carried to
unbatch, n of the wrong type, and explain() of what is not a batch."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn

import mbcompile


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 3)

    def forward(self, x, k=1, mode="a"):
        h = self.l(x) * k
        return h if mode == "a" else -h


def _models():
    torch.manual_seed(0)
    return [Scaled().double() for _ in range(2)]


X = torch.randn(4, 3, dtype=torch.float64)


def test_compile_true_takes_non_tensor_inputs():
    models = _models()
    b = mbcompile.batch(copy.deepcopy(models), compile=True)
    for args, kw in (((X, 2), {}), ((X,), {"mode": "b"}), ((X, 3), {"mode": "a"})):
        out = b(*args, **kw)
        for i, m in enumerate(models):
            torch.testing.assert_close(out[i], m(*args, **kw), rtol=1e-12, atol=1e-12)


def test_a_first_call_under_inference_mode_does_not_stop_training_later():
    m = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    b = mbcompile.batch(m, n=2, seeds=[0, 1])
    with torch.inference_mode():
        b(X)
    b(X).sum().backward()                               # the per-model RNG states are normal tensors
    assert b.get_parameter("0.weight").grad is not None


def test_a_batch_pickles_after_a_call_and_trains_on_after_loading():
    models = _models()
    b = mbcompile.batch(copy.deepcopy(models))
    b(X, 2)
    buf = io.BytesIO()
    torch.save(b, buf)
    pickle.dumps(b)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    out = back(X, 2)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(X, 2), rtol=1e-12, atol=1e-12)


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 3)

    def forward(self, a, c):
        return self.l(a) + c.mean(0)


def test_one_tensor_as_a_per_model_and_a_shared_input():
    torch.manual_seed(0)
    models = [Two().double() for _ in range(2)]
    xs = torch.randn(2, 4, 3, dtype=torch.float64)
    b = mbcompile.batch(models, in_dims=(0,))
    out = b(xs, c=xs)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(xs[i], c=xs), rtol=1e-12, atol=1e-12)


def test_requires_grad_set_after_batching_carries_to_unbatch():
    b = mbcompile.batch(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), n=3)
    b.get_parameter("0.weight").requires_grad_(False)
    u = b.unbatch(1)
    assert not u[0].weight.requires_grad and u[0].bias.requires_grad and u[2].weight.requires_grad


@pytest.mark.parametrize("n", [2.5, True, "3", None])
def test_n_of_the_wrong_type_is_a_type_error(n):
    with pytest.raises((TypeError, ValueError), match="needs n"):
        mbcompile.batch(nn.Linear(3, 2), n=n)


def test_n_may_be_a_numpy_int():
    np = pytest.importorskip("numpy")
    assert mbcompile.batch(nn.Linear(3, 2), n=np.int64(3)).n == 3


def test_explain_says_what_it_needs():
    with pytest.raises(TypeError, match="takes a batched module"):
        mbcompile.explain(nn.Linear(2, 2))
    assert "nothing captured yet" in str(mbcompile.explain(mbcompile.batch(nn.Linear(2, 2), n=2)))


def test_a_dtype_argument_is_a_capture_error_that_says_what_to_do():
    class ToDtype(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)

        def forward(self, x, dt=torch.float32):
            return self.l(x).to(dt)
    b = mbcompile.batch(ToDtype(), n=2)
    with pytest.raises(mbcompile.CaptureError, match=r"torch\.dtype.*as a string"):
        b(torch.randn(2, 3), dt=torch.float64)


class _TwoWay(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(4, 2), nn.Linear(2, 4)

    def decode(self, z):
        return self.dec(z)

    def forward(self, x, mode="full"):
        return self.decode(x) if mode == "decode" else self.decode(self.enc(x))


def test_a_models_other_methods_say_forward_is_batched_and_a_mode_argument_reaches_them():
    """Only forward is batched: batched.decode is an AttributeError that says so (never model 0's
    decode on model 0's weights); a string argument to forward reaches the method per model."""
    models = [_TwoWay().double() for _ in range(2)]
    b = mbcompile.batch(copy.deepcopy(models))
    z = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(AttributeError, match="batches forward only.*mode='decode'.*unbatch\\(i\\).decode"):
        b.decode(z)
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        b.nothing
    out = b(z, mode="decode")
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m.decode(z), rtol=1e-12, atol=1e-12)


def test_load_state_dict_with_assign_runs_in_the_assigned_dtype():
    """assign=True replaces the parameters: the program key's dtype follows them (a float64 state into a
    float32 batch runs in float64, as nn.Module's assign does), not the old parameters'."""
    batched = mbcompile.batch([nn.Linear(3, 2) for _ in range(2)])
    batched(torch.randn(4, 3))
    state = {k: v.double() for k, v in batched.state_dict().items()}
    batched.load_state_dict(state, assign=True)
    assert batched.weight.dtype == torch.float64 and batched._param_dtype()[0] == torch.float64
    out = batched(torch.randn(4, 3, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_functional_call_with_swapped_in_tensors_on_a_new_input_shape():
    """torch.func.functional_call(batched, params, args) with plain tensors (a MAML inner step, p - a*g):
    a call that captures (first call, a new query shape) reads the swapped-in tensors as a cached one
    does (it raised torch's "`weight` is not an nn.Parameter"); second-order gradients are each model's."""
    from torch.func import functional_call
    models = [nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double() for _ in range(3)]
    refs = copy.deepcopy(models)
    batched = mbcompile.batch(models)
    xs, xq = torch.randn(5, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    params = dict(batched.named_parameters())
    g = torch.autograd.grad(batched(xs).square().sum(), list(params.values()), create_graph=True)
    fast = {k: p - 0.1 * gk for (k, p), gk in zip(params.items(), g)}
    outer = functional_call(batched, fast, (xq,)).square().sum()
    outer.backward()
    for i, ref in enumerate(refs):
        rp = dict(ref.named_parameters())
        rg = torch.autograd.grad(ref(xs).square().sum(), list(rp.values()), create_graph=True)
        rfast = {k: p - 0.1 * gk for (k, p), gk in zip(rp.items(), rg)}
        functional_call(ref, rfast, (xq,)).square().sum().backward()
        for k, p in rp.items():
            torch.testing.assert_close(params[k].grad[i], p.grad, rtol=1e-12, atol=1e-12, msg=k)


def test_a_python_number_changed_every_call_warns_once():
    """A float argument annealed every step (a temperature) is a constant of each captured program: at the
    ninth value a warning says so and what to pass instead; a tensor argument does not recapture."""
    class Tempered(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x, temperature):
            return self.fc(x) / temperature

    batched = mbcompile.batch(Tempered(), n=2)
    x = torch.randn(4, 3)
    with pytest.warns(UserWarning, match=r"non-tensor arguments have taken 9 values \(positional input 1=1.8"):
        for k in range(10):
            batched(x, 1.0 + 0.1 * k)
    n_programs = len(batched._programs)
    for k in range(5):
        out = batched(x, torch.tensor(1.0 + 0.1 * k))
    assert len(batched._programs) == n_programs + 1
    torch.testing.assert_close(out, batched(x, 1.4))
