"""The batched model's submodules are of their original classes (code that walks modules() by type),
their plain attributes are the models' and setting one changes what runs."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mbcompile
from mbcompile.errors import InvalidInputError

D = torch.float64


class Net(nn.Module):
    def __init__(self, p=0.0):
        super().__init__()
        self.l1 = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(p)
        self.l2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.l2(self.drop(F.relu(self.bn(self.l1(x)))))


def _models(n=3, **kw):
    out = []
    for i in range(n):
        torch.manual_seed(i)
        out.append(Net(**kw).to(D))
    return out


def _data(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 4, generator=g, dtype=D), torch.randint(0, 3, (6,), generator=g)) for _ in range(k)]


def test_submodules_have_the_original_classes():
    models = _models()
    b = mbcompile.batch(models)
    pairs = list(zip(list(b.named_modules())[1:], list(models[0].named_modules())[1:]))
    assert [(p, m._get_name()) for (p, m), _ in pairs] == [(p, type(m).__name__) for _, (p, m) in pairs]
    assert all(isinstance(m, type(o)) for (_, m), (_, o) in pairs)
    assert isinstance(b.bn, nn.modules.batchnorm._BatchNorm) and isinstance(b.l1, nn.Linear)
    assert b.bn.momentum == 0.1 and b.bn.eps == 1e-5 and b.l1.in_features == 4
    assert "BatchNorm1d(8, eps=1e-05" in repr(b)


def test_swa_update_bn_recomputes_each_models_statistics():
    models = _models()
    refs = [copy.deepcopy(m) for m in models]
    b = mbcompile.batch(models)
    loader = [x for x, _ in _data(4)]
    torch.optim.swa_utils.update_bn(loader, b)            # found the BatchNorm: reset, momentum None, 4 batches
    for r in refs:
        torch.optim.swa_utils.update_bn(loader, r)
    for i, r in enumerate(refs):
        torch.testing.assert_close(b.bn.running_mean[i], r.bn.running_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b.bn.running_var[i], r.bn.running_var, rtol=1e-12, atol=1e-14)
    assert b.bn.num_batches_tracked.tolist() == [4] * 3
    assert b.bn.momentum == 0.1                             # put back, as on the single models


def test_freezing_batchnorm_by_type_mid_training():
    models = _models()
    refs = [copy.deepcopy(m) for m in models]
    b = mbcompile.batch(models)
    lrs = [0.05, 0.1, 0.2]
    opt = mbcompile.optimizer(b, torch.optim.SGD, lr=lrs)
    ropts = [torch.optim.SGD(r.parameters(), lr=lr) for r, lr in zip(refs, lrs)]
    for step, (x, y) in enumerate(_data(4)):
        if step == 2:
            for net in [b, *refs]:
                for m in net.modules():
                    if isinstance(m, nn.BatchNorm1d):
                        m.eval()
        opt.zero_grad()
        mbcompile.loss(F.cross_entropy, b(x), y).sum().backward()
        opt.step()
        for r, o in zip(refs, ropts):
            o.zero_grad()
            F.cross_entropy(r(x), y).backward()
            o.step()
    assert not b.bn.training
    for i, r in enumerate(refs):
        for name, p in r.named_parameters():
            torch.testing.assert_close(b.get_parameter(name)[i], p, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b.bn.running_mean[i], r.bn.running_mean, rtol=1e-12, atol=1e-14)


def test_setting_an_attribute_on_a_submodule_sets_it_for_every_model():
    models = _models()
    refs = [copy.deepcopy(m) for m in models]
    b = mbcompile.batch(models)
    x = _data(1)[0][0]
    b(x)                                                   # captured with momentum 0.1
    b.bn.momentum = 0.5
    out = b(x)
    for i, r in enumerate(refs):
        r(x)
        r.bn.momentum = 0.5
        r(x)
        torch.testing.assert_close(b.bn.running_mean[i], r.bn.running_mean, rtol=1e-12, atol=1e-14)
    b.bn.momentum = 0.1                                    # back: the first program again
    assert b(x).shape == out.shape


def test_a_per_model_attribute_set_on_the_submodule_is_every_models():
    models = _models()
    for m, p in zip(models, [0.0, 0.5, 0.9]):
        m.drop.p = p
    b = mbcompile.batch(models, randomness="different")
    x = _data(1)[0][0]
    b.train()
    assert not torch.equal(b(x), b(x))                     # fresh masks for models 1 and 2
    b.drop.p = 0.0                                         # no dropout for any model from here
    torch.testing.assert_close(b(x), b(x), rtol=0, atol=0)
    assert [b.unbatch(i).drop.p for i in range(3)] == [0.0] * 3
    b.drop.p = 0.25                                        # unbatch before any call sees it too
    assert [b.unbatch(i).drop.p for i in range(3)] == [0.25] * 3


def test_a_submodule_is_not_called_on_its_own():
    b = mbcompile.batch(_models())
    with pytest.raises(InvalidInputError, match="submodule of a batched model.*unbatch"):
        b.l1(torch.randn(2, 4, dtype=D))


def test_whole_model_save_load_and_deepcopy_keep_the_classes():
    models = _models()
    b = mbcompile.batch(models)
    x = _data(1)[0][0]
    b.eval()
    want = b(x)
    buf = io.BytesIO()
    torch.save(b, buf)
    buf.seek(0)
    for other in (torch.load(buf, weights_only=False), copy.deepcopy(b)):
        assert isinstance(other.bn, nn.BatchNorm1d)
        torch.testing.assert_close(other(x), want, rtol=0, atol=0)
        with pytest.raises(InvalidInputError, match="submodule of a batched model"):
            other.bn(x)


def test_rnn_submodule_moves_with_nn_modules_own_apply():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(3, 5, batch_first=True)
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    models = []
    for i in range(2):
        torch.manual_seed(i)
        models.append(Seq())
    b = mbcompile.batch(models).double()                   # RNNBase._apply would re-flatten one model's weights
    assert isinstance(b.rnn, nn.LSTM) and b.rnn.weight_ih_l0.dtype == D
    x = torch.randn(4, 6, 3, dtype=D)
    out = b(x)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m.double()(x), rtol=1e-10, atol=1e-12)


def test_repr_survives_an_extra_repr_that_reads_what_a_shell_lacks():
    class Odd(nn.Linear):
        def extra_repr(self):
            return f"scale={self.scale_tensor.item()}"

    m = Odd(2, 2)
    m.scale_tensor = torch.tensor(2.0)                     # an unregistered tensor: not on the shell
    b = mbcompile.batch(nn.Sequential(m), n=2)
    assert "Odd()" in repr(b)


def test_a_hook_on_a_submodule_warns_that_it_never_runs():
    b = mbcompile.batch(_models())
    seen = []
    with pytest.warns(UserWarning, match="register_forward_hook.*never runs.*before"):
        h = b.l1.register_forward_hook(lambda m, i, o: seen.append(o))
    b(_data(1)[0][0])
    assert seen == []
    h.remove()


def test_an_attribute_set_anew_every_step_warns_once_that_each_value_captures():
    b = mbcompile.batch(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.0)), n=2, randomness="different")
    x = torch.randn(2, 3)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for k in range(10):
            b.get_submodule("1").p = k / 20
            b(x)
    msgs = [str(w.message) for w in rec if "combinations" in str(w.message)]
    assert len(msgs) == 1 and "1.p" in msgs[0] and "every step" in msgs[0]


def test_a_batched_sequential_is_indexed_as_the_model_is():
    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    b = mbcompile.batch(seq, n=2)
    assert isinstance(b[0], nn.Linear) and isinstance(b[-1], nn.Linear) and b[2] is b.get_submodule("2")
    assert [m._get_name() for m in b] == ["Linear", "ReLU", "Linear"]
    with pytest.raises(IndexError):
        b[3]
    with pytest.raises(TypeError, match="slicing"):
        b[0:2]
    with pytest.raises(TypeError, match="Net takes no"):
        mbcompile.batch(_models())[0]


class GRUSeq(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


def test_an_rnn_model_saves_whole_and_reloads():
    b = mbcompile.batch(GRUSeq(), n=2)
    x = torch.randn(2, 5, 3)
    buf = io.BytesIO()
    torch.save(b, buf)                                     # RNNBase's weakrefs are not copied to the shell
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x), b(x), rtol=0, atol=0)


def test_initialising_through_the_batched_model_is_refused_or_warned():
    b = mbcompile.batch(_models())
    with pytest.raises(InvalidInputError, match="reset_parameters.*stacked.*before"):
        b.l1.reset_parameters()
    with pytest.warns(UserWarning, match="apply.*stacked.*before mbcompile.batch"):
        b.apply(lambda m: None)


def test_a_registry_of_subclasses_keeps_the_users_class():
    registry = {}

    class Base(nn.Module):
        def __init_subclass__(cls, **kw):
            super().__init_subclass__(**kw)
            registry[cls.__name__] = cls

    class Block(Base):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(2, 2)

        def forward(self, x):
            return self.l(x)

    b = mbcompile.batch(nn.Sequential(Block()), n=2)
    assert registry["Block"] is Block and isinstance(b[0], Block) and b[0]._get_name() == "Block"


def test_a_numpy_scalar_set_on_a_submodule_is_its_number_and_a_tensor_warns():
    import numpy as np
    models = _models()
    for m in models:
        m.drop.p = 0.5
    b = mbcompile.batch(models, randomness="different")
    x = _data(1)[0][0]
    b.drop.p = np.float32(0.0)
    assert type(b.drop.p) is float
    torch.testing.assert_close(b(x), b(x), rtol=0, atol=0)  # no dropout: the program saw 0.0
    with pytest.warns(UserWarning, match="only sees numbers"):
        b.drop.p = torch.tensor(0.1)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 2)
        self.temperature = 1.0

    def forward(self, x):
        return self.l(x) / self.temperature


def test_a_top_level_attribute_set_on_the_batched_model_is_every_models():
    models = [Scaled().double() for _ in range(2)]
    b = mbcompile.batch(models)
    x = torch.randn(4, 3, dtype=D)
    before = b(x)
    assert b.temperature == 1.0
    b.temperature = 2.0
    torch.testing.assert_close(b(x), before / 2, rtol=1e-12, atol=1e-14)
    assert b.unbatch(1).temperature == 2.0
    with pytest.raises(InvalidInputError, match="only sees numbers"):
        b.temperature = torch.tensor(3.0)


def test_a_batched_module_dict_iterates_its_keys():
    b = mbcompile.batch(nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)}), n=2)
    assert list(b) == ["a", "b"] and "a" in b and isinstance(b["b"], nn.Linear)
    with pytest.raises(TypeError, match="not iterable"):
        iter(mbcompile.batch(_models()))
