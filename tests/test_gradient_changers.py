"""What changes gradients outside forward's ops (a custom autograd.Function's backward, gradient hooks)
cannot be kept by the batched graph: refused with a clear error, never silently dropped. Models whose
forward hooks differ are refused too (one batched forward runs model 0's)."""
import warnings

import pytest
import torch
import torch.nn as nn

import mbcompile


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


class GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -g


class UsesFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 2)

    def forward(self, x):
        return GradReverse.apply(self.l(x))


class UsesTensorHook(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 2)

    def forward(self, x):
        h = self.l(x)
        if h.requires_grad:
            h.register_hook(lambda g: g * 5)
        return h


@pytest.mark.parametrize("cls,match", [(UsesFunction, "custom torch.autograd.Function GradReverse"),
                                       (UsesTensorHook, "Tensor.register_hook")])
def test_gradient_changers_in_forward_are_refused(cls, match):
    with pytest.raises(mbcompile.CaptureError, match=match):
        mbcompile.batch(cls(), n=2)(torch.randn(4, 3))


def test_backward_hooks_and_parameter_hooks_are_refused():
    m = nn.Sequential(nn.Linear(3, 2))
    m[0].register_full_backward_hook(lambda mod, gi, go: None)
    with pytest.raises(ValueError, match="backward hook"):
        mbcompile.batch(m, n=2)
    m = nn.Sequential(nn.Linear(3, 2))
    m[0].weight.register_hook(lambda g: g * 2)
    with pytest.raises(mbcompile.MBCompileError, match="batched.get_parameter"):
        mbcompile.batch(m, n=2)


def test_forward_hooks_must_be_the_same_function_on_every_model():
    def hook(mod, args, out):
        return out * 2

    a, b = nn.Sequential(nn.Linear(3, 2)), nn.Sequential(nn.Linear(3, 2))
    b[0].register_forward_hook(lambda mod, args, out: out * 100)
    with pytest.raises(ValueError, match="different forward hooks at '0'"):
        mbcompile.batch([a, b])
    a, b = nn.Sequential(nn.Linear(3, 2)).double(), nn.Sequential(nn.Linear(3, 2)).double()
    for m in (a, b):
        m[0].register_forward_hook(hook)
    x = torch.randn(4, 3, dtype=torch.float64)
    out = mbcompile.batch([a, b])(x)
    for i, m in enumerate((a, b)):
        torch.testing.assert_close(out[i], m(x))


class _Hooked(nn.Module):
    """Hooks written in __init__: a lambda over a plain value, a method of the model, and (when asked)
    a lambda over a module, which copying model 0 would not rebind."""

    def __init__(self, scale=0.5, over_module=False):
        super().__init__()
        self.a, self.b, self.g = nn.Linear(6, 6), nn.Linear(6, 3), nn.Parameter(torch.rand(3))
        s = scale
        self.a.register_forward_hook(lambda m, i, o: o * s + 0.1)
        self.b.register_forward_pre_hook(self._pre)
        self.b.register_forward_hook(self._post)
        if over_module:
            self.a.register_forward_pre_hook(lambda m, args: (args[0] * self.g.sum(),))

    def _pre(self, m, args):
        return (args[0] * 2,)

    def _post(self, m, i, o):
        return o * self.g                               # each model's own parameter

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_hooks_written_in_init_batch_when_they_do_the_same_on_every_model():
    ms = [_Hooked().double() for _ in range(3)]
    x = torch.randn(4, 6, dtype=torch.float64)
    out = mbcompile.batch(ms)(x)
    for i, m in enumerate(ms):
        torch.testing.assert_close(out[i], m(x))
    with pytest.raises(ValueError, match="different forward hooks at 'a'"):      # 0.5 vs 0.7 inside
        mbcompile.batch([_Hooked(0.5), _Hooked(0.7)])
    with pytest.raises(ValueError, match="different forward pre hooks at 'a'"):  # over self.g
        mbcompile.batch([_Hooked(over_module=True), _Hooked(over_module=True)])


class PenaltyInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 1)

    def forward(self, x):
        x = x.detach().requires_grad_(True)
        g, = torch.autograd.grad(self.l(x).sum(), x, create_graph=True)
        return g.norm(dim=1)


def test_autograd_grad_in_forward_is_refused_naming_the_line_and_the_way_out():
    with pytest.raises(mbcompile.CaptureError, match=r"calls torch.autograd.grad at .*test_gradient_changers.py:\d+: "
                                                     r"g, = torch.autograd.grad.*in_dims=0.*create_graph=True"):
        mbcompile.batch(PenaltyInForward(), n=2)(torch.randn(3, 4))


ACTS = []


def _store(mod, args, out):
    ACTS.append(out)


class Stores(nn.Module):
    def __init__(self, attr=False, hook=False):
        super().__init__()
        self.a, self.b, self.attr = nn.Linear(4, 4), nn.Linear(4, 2), attr
        if hook:
            self.a.register_forward_hook(_store)

    def forward(self, x):
        h = self.a(x)
        if self.attr:
            self.last = h
        return self.b(h)


@pytest.mark.parametrize("attr,hook,says", [(True, False, r"stores tensors on module attributes \('last'\)"),
                                            (False, True, r"forward hooks that return nothing \(a: _store\)")])
def test_side_effects_of_forward_warn(attr, hook, says):
    """Storing an activation (on an attribute, or from a hook into a list) happens once, at capture, on
    placeholder tensors: said, not silently lost (a warning, also with strict=True: the outputs are right)."""
    x = torch.randn(3, 4)
    for strict in (False, True):
        m = Stores(attr, hook)
        with pytest.warns(UserWarning, match=says + r".*Return the tensors from forward"):
            out = mbcompile.batch(m, n=2, strict=strict)(x)
        torch.testing.assert_close(out[1], m(x))
    ACTS.clear()


def test_hooks_that_return_or_set_what_forward_uses_do_not_warn():
    """A hook whose result replaces the output, torch's pruning pre-hook (it sets the weight forward
    reads) and weight_norm's: part of the program, no warning."""
    m = Stores()
    m.a.register_forward_hook(lambda mod, args, out: out * 2)
    import torch.nn.utils.prune as prune
    prune.l1_unstructured(m.b, "weight", amount=0.5)
    torch.nn.utils.weight_norm(m.a)
    x = torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = mbcompile.batch(m, n=2)(x)
    torch.testing.assert_close(out[1], m(x))


class AssignsData(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("mem", torch.zeros(2))

    def forward(self, x):
        self.mem.data = (self.mem + 1).detach()
        return self.lin(x) + self.mem


def test_assigning_data_in_forward_is_refused_naming_the_line():
    """``self.buf.data = new`` in forward: export drops it (the batched buffer would never change, as it
    does alone): refused, with the in-place copy that works instead."""
    with pytest.raises(mbcompile.CaptureError, match=r"assigns a tensor's .data at .*self.mem.data = .*copy_"):
        mbcompile.batch(AssignsData(), n=2)(torch.randn(3, 2))
    assert "data" not in torch.Tensor.__dict__                  # the class is as it was
