"""Train/eval per submodule: a BatchNorm frozen with .eval() inside a model in train mode (fine-tuning,
detection backbones) normalises with its running stats and leaves them alone, exactly as each model
alone; models whose modes differ are refused."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import mbcompile
from _streams import Streams

F64 = torch.float64


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def make(frozen=True):
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                      nn.Linear(64, 2)).to(F64)
    m[1].running_mean.uniform_(-1, 1)
    m.train()
    if frozen:
        m[1].eval()
    return m


def check(batched, refs, x, streams):
    out = batched(x)
    out.square().sum().backward()
    for i, r in enumerate(refs):
        want = streams.run(i, r, x)
        want.square().sum().backward()
        torch.testing.assert_close(out[i], want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(batched.get_parameter("0.weight").grad[i], r[0].weight.grad)
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(batched.get_buffer(f"1.{k}")[i], r[1].get_buffer(k), rtol=1e-12, atol=1e-14)


def test_frozen_batchnorm_inside_a_training_model():
    seeds = [3, 4, 5]
    models = [make() for _ in range(3)]
    refs = copy.deepcopy(models)
    batched = mbcompile.batch(models, seeds=seeds, strict=True)
    assert batched.training and not batched.get_submodule("1").training
    x = torch.randn(5, 3, 6, 6, dtype=F64)
    streams = Streams(seeds)
    check(batched, refs, x, streams)
    before = refs[0][1].running_mean.clone()
    check(batched, refs, x, streams)                    # dropout still on, the bn's stats unchanged
    assert torch.equal(refs[0][1].running_mean, before)
    assert torch.equal(batched.get_buffer("1.running_mean")[0], before)
    m1 = batched.unbatch(1)                            # model 1 comes back with the same modes
    assert m1.training and not m1[1].training and m1[3].training


def test_switching_a_submodule_mode_recaptures():
    seeds = [1, 2]
    models = [make(frozen=False) for _ in range(2)]
    refs = copy.deepcopy(models)
    batched = mbcompile.batch(models, seeds=seeds)
    x = torch.randn(4, 3, 6, 6, dtype=F64)
    streams = Streams(seeds)
    check(batched, refs, x, streams)
    batched.get_submodule("1").eval()                  # freeze the bn now, on the batched module
    for r in refs:
        r[1].eval()
    check(batched, refs, x, streams)
    batched.train()                                    # and unfreeze it again
    for r in refs:
        r.train()
    check(batched, refs, x, streams)


def test_models_in_different_modes_are_refused():
    a, b = make(frozen=False), make(frozen=False)
    b.eval()
    with pytest.raises(ValueError, match="model 1 is in eval mode at"):
        mbcompile.batch([a, b])
    b.train()
    b[1].eval()
    with pytest.raises(mbcompile.MBCompileError, match="at '1'"):
        mbcompile.batch([a, b])


def test_explain_shows_the_program_that_ran():
    b = mbcompile.batch([make(frozen=False) for _ in range(2)])
    x = torch.randn(4, 3, 6, 6, dtype=F64)
    b(x)
    b.eval()(x)
    b.train()(x)                                       # a cached program: explain must follow it
    assert "dropout" in str(mbcompile.explain(b))
    b.eval()(x)
    assert "dropout" not in str(mbcompile.explain(b))


@pytest.mark.parametrize("compile", [False, True])
def test_changing_the_parameters_dtype_after_the_first_call(compile):
    models = [nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 2)) for _ in range(2)]
    b = mbcompile.batch(copy.deepcopy(models), compile=compile).eval()
    x = torch.randint(0, 7, (5, 3))
    assert b(x).dtype == torch.float32
    b.double()
    out = b(x)
    assert out.dtype == F64
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m.double().eval()(x), rtol=1e-12, atol=1e-12)


def test_a_new_input_layout_gets_its_own_program():
    """The traced program keeps the views its first input allowed: an expanded (stride 0) input of the
    same shape later is a new signature, not a crash (conv's im2col lowering views its input)."""
    models = [nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2)).double() for _ in range(3)]
    b = mbcompile.batch(copy.deepcopy(models), in_dims=0)
    real = torch.randn(5, 2, 4, 4, dtype=F64)
    with mbcompile.lowering.force(conv="unfold"):
        b(torch.randn(3, 5, 2, 4, 4, dtype=F64))
        out = b(real.expand(3, *real.shape))
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(real), rtol=1e-12, atol=1e-12)


def test_autocast_conv_norm_conv_keeps_eager_dtypes():
    """Under CPU bf16 autocast a norm between convs returns its input's dtype alone; the batched rule
    (per-model float32 weights) must hand the next conv the same dtype."""
    for norm in (lambda: nn.GroupNorm(2, 8), lambda: nn.LayerNorm(8)):
        models = [nn.Sequential(nn.Conv2d(3, 8, 1), norm(), nn.Conv2d(8, 8, 3, padding=1)) for _ in range(2)]
        x = torch.randn(4, 3, 8, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mbcompile.batch(models)(x)
            for i, m in enumerate(models):
                want = m(x)
                assert out[i].dtype == want.dtype
                torch.testing.assert_close(out[i].float(), want.float(), rtol=2e-2, atol=2e-2)


def test_a_training_forward_under_inference_mode_updates_buffers_in_place_like_eager():
    """Batch norm's running stats updated by a train-mode call under torch.inference_mode stay normal
    tensors (eager updates them in place), so the next training step can save them for backward."""
    models = [nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6)).double() for _ in range(3)]
    refs = copy.deepcopy(models)
    batched = mbcompile.batch(models).train()
    x = torch.randn(4, 8, dtype=torch.float64)
    with torch.inference_mode():
        batched(x)
    assert not any(b.is_inference() for b in batched.buffers())
    out = batched(x)
    out.square().sum().backward()
    for i, r in enumerate(refs):
        with torch.inference_mode():
            r(x)
        ref = r(x)
        ref.square().sum().backward()
        torch.testing.assert_close(out[i], ref, rtol=1e-10, atol=1e-12)
        for (name, b), (_, c) in zip(r.named_buffers(), batched.unbatch(i).named_buffers()):
            torch.testing.assert_close(c, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"model {i} {name}: {m}")
        torch.testing.assert_close(batched.get_parameter("0.weight").grad[i], r[0].weight.grad)
