"""Models in one list must agree in whatever their forward reads: module attributes of any kind
(callables, tensor constants, lists, dicts, private names) and which weights are tied. A difference is
refused with the module and attribute named, never run with model 0's value; equal values in distinct
objects are accepted. Checked against each model alone where the batch is accepted."""
import copy
import functools

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mbcompile

X = torch.randn(4, 6, dtype=torch.float64)


class Holder(nn.Module):
    """A linear layer and one attribute ``v`` that its forward applies."""

    def __init__(self, v, name="v"):
        super().__init__()
        self.l = nn.Linear(6, 5)
        setattr(self, name, v)
        self.name = name

    def forward(self, x):
        v = getattr(self, self.name)
        h = self.l(x)
        if callable(v):
            return v(h)
        if isinstance(v, torch.Tensor):
            return h / v
        if isinstance(v, list):
            return h * v[0] + h.pow(2) * v[1]
        if isinstance(v, dict):
            return h * v["scale"]
        return h * v


def _pair(a, b, name="v"):
    torch.manual_seed(0)
    m0 = Holder(a, name).double()
    torch.manual_seed(0)
    return m0, Holder(b, name).double()


@pytest.mark.parametrize("a,b,name,shown", [
    (F.relu, torch.tanh, "v", "relu"),
    (torch.tensor(1.0, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64), "v", "tensor(1.0)"),
    ([1.0, 0.0], [0.0, 1.0], "v", "v[0]' (Holder): 0.0 vs 1.0"),
    ({"scale": 1.0}, {"scale": 3.0}, "v", "v['scale']' (Holder): 3.0 vs 1.0"),
    (1.0, 3.0, "_scale", "1.0"),
    (functools.partial(F.leaky_relu, negative_slope=0.1), functools.partial(F.leaky_relu, negative_slope=0.3),
     "v", "partial"),
])
def test_a_differing_attribute_of_any_kind_is_refused_naming_it(a, b, name, shown):
    with pytest.raises(ValueError, match=rf"model 1 differs from model 0 in '<root>\.{name}") as e:
        mbcompile.batch(list(_pair(a, b, name)))
    assert shown in str(e.value)


@pytest.mark.parametrize("a,b", [
    (torch.tensor(2.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)),
    ([0.5, 0.25], [0.5, 0.25]),
    ({"scale": 2.0}, {"scale": 2.0}),
    (functools.partial(F.leaky_relu, negative_slope=0.2), functools.partial(F.leaky_relu, negative_slope=0.2)),
    (lambda h: h * 3.0, None),                     # one lambda written per model: same code, same closure
])
def test_equal_values_in_distinct_objects_are_batched_and_match_each_model(a, b):
    if b is None:
        def make():
            k = 3.0
            return lambda h: h * k
        a, b = make(), make()
    assert a is not b
    m0, m1 = _pair(a, b)
    with torch.no_grad():
        m1.l.weight.mul_(2)
    out = mbcompile.batch([m0, m1])(X)
    torch.testing.assert_close(out[0], m0(X), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[1], m1(X), rtol=1e-12, atol=1e-12)


class Cfg:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_a_config_object_names_the_field_that_differs():
    with pytest.raises(ValueError, match=r"in '<root>\.v\.scale' \(Holder\): 3\.0 vs 2\.0"):
        mbcompile.batch(list(_pair(Cfg(bias=1.0, scale=2.0), Cfg(bias=1.0, scale=3.0))))


def test_a_closure_over_different_values_is_refused():
    def make(k):
        return lambda h: h * k
    with pytest.raises(ValueError, match="differs from model 0 in '<root>.v'"):
        mbcompile.batch(list(_pair(make(1.0), make(2.0))))


class Lm(nn.Module):
    def __init__(self, tie):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, t):
        return self.head(self.emb(t))


@pytest.mark.parametrize("ties", [(True, False), (False, True)])
def test_models_that_differ_in_weight_tying_are_refused(ties):
    first = "model 0" if ties[0] else "model 1"
    with pytest.raises(ValueError, match=rf"{first} shares parameters emb.weight = head.weight"):
        mbcompile.batch([Lm(t) for t in ties])


def test_tied_models_batch_and_stay_tied():
    models = [Lm(True).double() for _ in range(2)]
    t = torch.randint(0, 10, (3,))
    b = mbcompile.batch(models)
    for i, m in enumerate(models):
        torch.testing.assert_close(b(t)[i], m(t), rtol=1e-12, atol=1e-12)
    u = b.unbatch(1)
    assert u.head.weight is u.emb.weight


class Reuse(nn.Module):
    def __init__(self, reuse):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a if reuse else nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_a_module_reused_in_one_model_only_is_refused_naming_the_module():
    with pytest.raises(ValueError, match="model 0 shares modules a = b"):
        mbcompile.batch([Reuse(True), Reuse(False)])


def test_an_attribute_only_one_model_has_is_refused():
    m0, m1 = _pair(2.0, 2.0)
    m1.extra = 1.0
    with pytest.raises(ValueError, match="only one of them has the attribute 'extra'"):
        mbcompile.batch([m0, m1])


def test_parameters_held_in_a_plain_list_compare_by_their_names():
    class Listed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 5)
            self.order = [self.a, self.b]               # modules in a plain list: same paths in each model

        def forward(self, x):
            for m in self.order:
                x = m(x)
            return x
    models = [Listed().double() for _ in range(3)]
    b = mbcompile.batch(models)
    for i, m in enumerate(models):
        torch.testing.assert_close(b(X)[i], m(X), rtol=1e-12, atol=1e-12)
    swapped = copy.deepcopy(models[1])
    swapped.order = [swapped.b, swapped.a]
    with pytest.raises(ValueError, match=r"'<root>\.order\[0\]' \(Listed\): <module 'b'> vs <module 'a'>"):
        mbcompile.batch([models[0], swapped])


def test_numpy_arrays_compare_by_value():
    np = pytest.importorskip("numpy")
    m0, m1 = _pair(2.0, 2.0)
    m0.table, m1.table = np.array([1.0, 2.0]), np.array([1.0, 2.0])
    mbcompile.batch([m0, m1])
    m1.table = np.array([1.0, 3.0])
    with pytest.raises(ValueError, match=r"'<root>\.table' \(Holder\): array\(\[1\., 3\.\]\)"):
        mbcompile.batch([m0, m1])


def _factory(width, act=torch.tanh):
    """A class statement run once per model (the usual sweep factory), closing over its arguments."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(6, width)

        def forward(self, x):
            return act(self.l(x))
    return Net().double()


def test_classes_from_one_factory_batch_and_match_each_model():
    models = [_factory(5) for _ in range(3)]
    assert type(models[0]) is not type(models[1])
    out = mbcompile.batch(copy.deepcopy(models))(X)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(X), rtol=1e-12, atol=1e-12)


def test_classes_from_one_factory_that_differ_are_refused_naming_what_differs():
    with pytest.raises(ValueError, match=r"at 'l.weight': shape/dtype \(4, 6\)"):
        mbcompile.batch([_factory(5), _factory(4)])
    with pytest.raises(ValueError, match=r"_factory.<locals>.Net vs .*_factory.<locals>.Net \(two classes of that name "
                                         r"whose bodies differ"):
        mbcompile.batch([_factory(5), _factory(5, act=torch.sigmoid)])     # forward closes over another act


def test_an_int_and_an_equal_float_attribute_differ():
    """2 == 2.0 in Python, but x * 2 keeps an integer tensor's dtype and x * 2.0 does not: models whose
    attribute differs only so are refused (model 1 used to get model 0's integer result)."""
    class Scaled(nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.fc, self.scale = nn.Linear(2, 2), scale

        def forward(self, x, counts):
            return self.fc(x), counts * self.scale
    with pytest.raises(ValueError, match=r"'<root>.scale'.*2.0 vs 2"):
        mbcompile.batch([Scaled(2), Scaled(2.0)])
    with pytest.raises(ValueError, match=r"'<root>.scale'"):
        mbcompile.batch([Scaled(1), Scaled(True)])
    mbcompile.batch([Scaled(2.0), Scaled(2.0)])
