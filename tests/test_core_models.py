"""Model-level equivalence: forward and three SGD steps of each model equal each model alone."""
import copy

import pytest
import torch

import mbcompile
from _models import BNCNN, MLP, EmbBag, Encoder, ResNetTiny, inputs_for

MODELS = [MLP, BNCNN, ResNetTiny, Encoder, EmbBag]


def _sgd(params, lr):
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)
                p.grad = None


@pytest.mark.parametrize("per_model_input", [False, True], ids=["shared", "per_model"])
@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_three_training_steps_match_each_model_alone(cls, per_model_input):
    n = 3
    models = [cls().double() for _ in range(n)]
    refs = [copy.deepcopy(m) for m in models]
    batched = mbcompile.batch(models, in_dims=0 if per_model_input else None, strict=True)
    g = torch.Generator().manual_seed(5)
    for step in range(3):
        if per_model_input:
            xs = [inputs_for(cls, 4, g) for _ in range(n)]
            x = tuple(torch.stack(t) for t in zip(*xs))
        else:
            x = inputs_for(cls, 4, g)
            xs = [x] * n
        out = batched(*x)
        assert out.shape[0] == n
        loss = out.square().flatten(1).mean(1)
        loss.sum().backward()
        _sgd(batched.parameters(), 0.1)
        for i, r in enumerate(refs):
            ref_out = r(*xs[i])
            torch.testing.assert_close(out[i], ref_out, rtol=1e-9, atol=1e-9)
            ref_out.square().mean().backward()
            _sgd(r.parameters(), 0.1)
    for i, r in enumerate(refs):
        got = batched.unbatch(i)
        for (name, p), (_, q) in zip(r.named_parameters(), got.named_parameters()):
            torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-9, msg=lambda m: f"model {i} {name}: {m}")
        for (name, b), (_, c) in zip(r.named_buffers(), got.named_buffers()):
            torch.testing.assert_close(c, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"model {i} {name}: {m}")


def test_eval_mode_uses_running_stats_per_model():
    models = [ResNetTiny().double() for _ in range(2)]
    refs = [copy.deepcopy(m) for m in models]
    batched = mbcompile.batch(models)
    for _ in range(2):
        x = inputs_for(ResNetTiny, 4)[0]
        batched(x)
        for r in refs:
            r(x)
    batched.eval()
    x = inputs_for(ResNetTiny, 3)[0]
    out = batched(x)
    for i, r in enumerate(refs):
        torch.testing.assert_close(out[i], r.eval()(x), rtol=1e-9, atol=1e-9)
