"""The "mbcompile" torch.compile backend: compilation really happens (counted), and compiled training
(forward, gradients, batch-norm buffers, "sequential" dropout masks, optimizer steps) equals eager."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mbcompile
from _models import BNDropNet
from mbcompile import backend


def Net():
    return BNDropNet(hidden=16, p=0.4)


def train(batched, steps, x, y, model_call=None):
    """``steps`` SGD steps; returns the per-step outputs."""
    call = batched if model_call is None else model_call
    opt = torch.optim.SGD(batched.parameters(), lr=0.1, momentum=0.9)
    outs = []
    for _ in range(steps):
        opt.zero_grad()
        out = call(x)
        mbcompile.loss(F.cross_entropy, out, y).sum().backward()
        opt.step()
        outs.append(out.detach())
    return outs


def assert_same_training(eager, compiled, eager_outs, compiled_outs):
    for k, (a, b) in enumerate(zip(eager_outs, compiled_outs)):
        assert torch.equal(a == 0, b == 0), f"step {k}: dropout masks differ"     # bit-exact masks
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=lambda m: f"step {k}: {m}")
    for (name, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-11, atol=1e-12, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}.grad: {m}")
    for (name, a), (_, b) in zip(eager.named_buffers(), compiled.named_buffers()):
        torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert torch.equal(eager.get_rng_state()["states"]["cpu"], compiled.get_rng_state()["states"]["cpu"])


@pytest.fixture
def data():
    models = [Net().double() for _ in range(3)]
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    return models, x, y


def test_backend_is_registered_by_name():
    from torch._dynamo.backends.registry import lookup_backend
    assert lookup_backend("mbcompile") is backend.mbcompile_backend
    assert "mbcompile" in torch._dynamo.list_backends()


def test_batch_compile_true_trains_like_eager(data):
    models, x, y = data
    eager = mbcompile.batch(copy.deepcopy(models), seeds=[1, 2, 3])
    compiled = mbcompile.batch(copy.deepcopy(models), seeds=[1, 2, 3], compile=True)
    before = dict(backend.STATS)
    e_outs = train(eager, 3, x, y)
    c_outs = train(compiled, 3, x, y)
    # one program, compiled once: a forward and a backward graph through Inductor, no recompiles
    assert backend.STATS["backend_calls"] - before.get("backend_calls", 0) == 1
    assert backend.STATS["fw_graphs"] - before.get("fw_graphs", 0) == 1
    assert backend.STATS["bw_graphs"] - before.get("bw_graphs", 0) == 1
    prog = compiled._last_program
    assert isinstance(prog.call, backend.CompiledProgram) and prog.call.calls == 3
    assert prog.times["compile_s"] > 0 and "compile_s" in str(mbcompile.explain(compiled))
    assert_same_training(eager, compiled, e_outs, c_outs)


def test_torch_compile_of_batched_module_trains_like_eager(data):
    models, x, y = data
    eager = mbcompile.batch(copy.deepcopy(models), seeds=[4, 5, 6])
    batched = mbcompile.batch(copy.deepcopy(models), seeds=[4, 5, 6])
    compiled = torch.compile(batched, backend="mbcompile")
    before = dict(backend.STATS)
    e_outs = train(eager, 3, x, y)
    c_outs = train(batched, 3, x, y, model_call=compiled)
    assert backend.STATS["backend_calls"] - before.get("backend_calls", 0) == 1
    assert backend.STATS["fw_graphs"] - before.get("fw_graphs", 0) == 1
    assert backend.STATS["bw_graphs"] - before.get("bw_graphs", 0) == 1
    assert_same_training(eager, batched, e_outs, c_outs)
    # the eager module keeps working after compiling, and draws the next masks in turn
    torch.testing.assert_close(batched(x), eager(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("opt_cls, kw", [(torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
                                         (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True))])
def test_train_step_is_one_compiled_program_equal_to_eager(data, opt_cls, kw):
    models, x, y = data
    eager = mbcompile.batch(copy.deepcopy(models), seeds=[7, 8, 9])
    fused = mbcompile.batch(copy.deepcopy(models), seeds=[7, 8, 9])
    opt_e, opt_f = opt_cls(eager.parameters(), **kw), opt_cls(fused.parameters(), **kw)
    step = backend.train_step(fused, F.cross_entropy, opt_f)
    before = dict(backend.STATS)
    for k in range(3):
        opt_e.zero_grad()
        want = mbcompile.loss(F.cross_entropy, eager(x), y)
        want.sum().backward()
        opt_e.step()
        got = step(x, y)
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12, msg=lambda m: f"step {k}: {m}")
    # Adam: one program; SGD with momentum: a first-step program (buffer = gradient) and a later one
    compiles = 1 if opt_cls is torch.optim.AdamW else 2
    assert backend.STATS["backend_calls"] - before.get("backend_calls", 0) == compiles
    assert backend.STATS["fw_graphs"] - before.get("fw_graphs", 0) == compiles
    assert backend.STATS.get("bw_graphs", 0) == before.get("bw_graphs", 0)        # no autograd graph at all
    for (name, p), (_, q) in zip(eager.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    for (name, a), (_, b) in zip(eager.named_buffers(), fused.named_buffers()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert torch.equal(eager.get_rng_state()["states"]["cpu"], fused.get_rng_state()["states"]["cpu"])
    se, sf = opt_e.state_dict()["state"], opt_f.state_dict()["state"]       # torch's own state, kept
    assert se.keys() == sf.keys()
    for i in se:
        for key in se[i]:
            torch.testing.assert_close(sf[i][key], se[i][key], rtol=1e-10, atol=1e-12)


def test_train_step_refuses_what_it_does_not_fuse():
    b = mbcompile.batch(Net(), n=2)
    with pytest.raises(ValueError, match="amsgrad"):
        backend.train_step(b, F.cross_entropy, torch.optim.Adam(b.parameters(), amsgrad=True))
    with pytest.raises(ValueError, match="RMSprop"):
        backend.train_step(b, F.cross_entropy, torch.optim.RMSprop(b.parameters()))


class _Scatters(nn.Module):
    """Message passing into a buffer made in forward (shared by the models): index_add_, scatter_add_,
    index_put_ (accumulating and not) with per-model values."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 8)
        self.register_buffer("idx", torch.tensor([1, 0, 2, 1, 3, 4, 4, 5, 0, 2]))

    def forward(self, x):                                # B,6,5
        h = self.lin(x)
        a = torch.zeros(x.shape[0], 6, 8, dtype=x.dtype).index_add_(1, self.idx, h[:, self.idx])
        s = torch.zeros(x.shape[0], 6, 8, dtype=x.dtype).scatter_add_(
            1, self.idx[:6].view(1, 6, 1).expand(x.shape[0], 6, 8), h)
        p = torch.zeros(6, 8, dtype=x.dtype)
        p.index_put_((self.idx[:4],), h[0, :4], accumulate=True)
        q = torch.zeros(6, 8, dtype=x.dtype)
        q[self.idx[4:7]] = h[1, 1:4]
        return a.sum(1) + s.sum(1) + p.sum(0) + q.sum(0)


@pytest.mark.parametrize("how", ["compile", "train_step"])
def test_scatters_into_a_shared_buffer_stay_per_model_when_compiled(how):
    """Inductor writes an out-of-place scatter into its input's buffer: an expanded shared zeros
    would take every model's messages (found wrong by a held-out sweep). Each model against itself."""
    torch.manual_seed(0)
    models = [_Scatters().double() for _ in range(3)]
    refs = copy.deepcopy(models)
    x, y = torch.randn(4, 6, 5, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    b = mbcompile.batch(models, compile=how == "compile")
    if how == "compile":
        losses = mbcompile.loss(F.mse_loss, b(x), y)
    else:
        opt = mbcompile.optimizer(b, torch.optim.SGD, lr=[0.0] * 3)
        losses = mbcompile.train_step(b, F.mse_loss, opt)(x, y)
    want = torch.stack([F.mse_loss(r(x), y) for r in refs])
    torch.testing.assert_close(losses.detach(), want.detach(), rtol=1e-10, atol=1e-12)


class _PadAfterConv(nn.Module):
    """A replication pad of a conv's output: Inductor lays that out channels-last, and ATen's
    replication_pad*_backward (a fallback kernel) then failed Inductor's stride check."""
    def __init__(self, dims):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv, self.pad = conv(3, 4, 1), {1: (2, 1), 2: (1, 2, 3, 0), 3: (1, 0, 0, 2, 1, 1)}[dims]

    def forward(self, x):
        return F.pad(self.conv(x), self.pad, mode="replicate").square()


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_replication_pad_after_a_conv_compiles_with_each_models_gradients(dims):
    torch.manual_seed(0)
    models = [_PadAfterConv(dims).double() for _ in range(3)]
    refs = [copy.deepcopy(m) for m in models]
    x = torch.randn(2, 3, *[5] * dims, dtype=torch.float64)
    b = mbcompile.batch(models, compile=True)
    out = b(x)
    out.sum().backward()
    for i, r in enumerate(refs):
        ref = r(x)
        ref.sum().backward()
        torch.testing.assert_close(out[i], ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b.conv.weight.grad[i], r.conv.weight.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(b.conv.bias.grad[i], r.conv.bias.grad, rtol=1e-10, atol=1e-10)


class TwoBiases(nn.Module):
    """nn.LSTM: bias_ih and bias_hh get one and the same gradient value."""
    def __init__(self):
        super().__init__()
        self.lstm, self.head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


@pytest.mark.parametrize("how", ["compile=True", "torch.compile"])
def test_compiled_gradients_that_are_one_value_get_their_own_storage(how):
    """Inductor returns one tensor for two equal gradients; stored as both .grad, an in-place change of
    one (clipping, unscaling, a second backward accumulating) changed the other: each has its own."""
    torch.manual_seed(0)
    models = [TwoBiases().double() for _ in range(2)]
    x, y = torch.randn(3, 5, 3, dtype=torch.float64), torch.randint(0, 2, (3,))
    eager = mbcompile.batch(copy.deepcopy(models))
    b = mbcompile.batch(copy.deepcopy(models), compile=how == "compile=True")
    call = torch.compile(b, backend="mbcompile") if how == "torch.compile" else b
    for _ in range(2):                                        # accumulate over two backward passes
        mbcompile.loss(F.cross_entropy, eager(x), y).sum().backward()
        mbcompile.loss(F.cross_entropy, call(x), y).sum().backward()
    g_ih, g_hh = b.lstm.bias_ih_l0.grad, b.lstm.bias_hh_l0.grad
    assert g_ih.untyped_storage().data_ptr() != g_hh.untyped_storage().data_ptr()
    norms = mbcompile.clip_grad_norm_(b, 0.01)
    mbcompile.clip_grad_norm_(eager, 0.01)
    for (name, p), (_, q) in zip(eager.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-13, msg=name)
    assert norms.shape == (2,)


def test_torch_compile_keeps_compiling_past_dynamos_default_recompile_limit():
    """Each batched program is a cache entry of one dynamo frame shared by every batched module: past 8
    (dynamo's default) the next ones ran eagerly, silently; the backend raises the limit."""
    torch._dynamo.reset()                                     # the frame's cache entries of earlier tests
    x = torch.randn(5, 4)
    compiled = 0
    for width in range(2, 12):                               # 10 programs
        b = mbcompile.batch(nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2)), n=2)
        before = backend.STATS["backend_calls"]
        torch.compile(b, backend="mbcompile")(x).sum().backward()
        compiled += backend.STATS["backend_calls"] > before
    assert compiled == 10
