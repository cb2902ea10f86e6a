"""torch.nn layers one by one: forward and parameter gradients of each model equal the model alone,
for a shared input and for per-model inputs, with the fallback off (strict=True)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F


import mbcompile


class MHA(nn.Module):
    def __init__(self, need_weights):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x):
        pad = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
        pad[:, -1] = True
        out, w = self.attn(x, x, x, key_padding_mask=pad, need_weights=self.need_weights)
        return out if w is None else out + w.sum(-1, keepdim=True)


class Act(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        h = self.fc(x)
        return (F.gelu(h) + F.silu(h) + F.elu(h) + F.softplus(h) + F.hardswish(h) + F.mish(h)
                + F.leaky_relu(h, 0.1) + torch.clamp(h, -0.5, 0.5) + F.softmax(h, -1) + F.log_softmax(h, 0))


class Reduce(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        h = self.fc(x)
        return torch.stack([h.sum(), h.mean(), h.amax(), h.var(), h.std(0).sum(), h.logsumexp(-1).sum(),
                            h.cumsum(1).sum(), h.norm(), h.max(1).values.sum(), h.argmax(1).double().sum()])


class Shapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        h = self.fc(x)                                  # B,6
        a, b = h.chunk(2, -1)
        c = torch.cat([b, a, h[:, :1]], 1).unsqueeze(1).expand(-1, 2, -1)
        d = c.transpose(0, 1).reshape(2, -1).flip(1)
        e = torch.einsum("ij,kj->ik", d, d).sum() + (h.t() @ h[:, :2].repeat(1, 2)).sum()
        return e + torch.where(h > 0, h, h * 2).gather(1, torch.zeros(h.shape[0], 1, dtype=torch.long)).sum() \
            + h[torch.tensor([0, 2])].sum() + F.pad(h, (1, 2)).sum() + h.masked_fill(h < 0, 0.5).sum()


LAYERS = {
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), (5, 3, 7)),
    "conv2d_grouped": (lambda: nn.Conv2d(4, 6, 3, groups=2, stride=2), (2, 4, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), (2, 2, 4, 4, 4)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(3, 2, 3, stride=2, output_padding=1), (2, 3, 4, 4)),
    "conv_transpose1d_grouped": (lambda: nn.ConvTranspose1d(4, 6, 3, groups=2), (2, 4, 5)),
    "batchnorm1d": (lambda: nn.BatchNorm1d(5), (6, 5)),
    "batchnorm3d": (lambda: nn.BatchNorm3d(2), (3, 2, 2, 2, 2)),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (3, 4, 5)),
    "instancenorm": (lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True), (2, 3, 4, 4)),
    "layernorm_2d": (lambda: nn.LayerNorm([4, 5]), (3, 4, 5)),
    "embedding_pad": (lambda: nn.Embedding(10, 4, padding_idx=2), None),
    "embedding_max_norm": (lambda: nn.Embedding(10, 4, max_norm=1.0), None),      # renorms the weight in place
    "embedding_scale_grad": (lambda: nn.Embedding(10, 4, padding_idx=3, scale_grad_by_freq=True), None),
    "batchnorm_cumulative": (lambda: nn.BatchNorm1d(5, momentum=None), (6, 5)),    # 1/num_batches_tracked
    "maxpool_avgpool": (lambda: nn.Sequential(nn.Conv2d(2, 2, 1), nn.MaxPool2d(2), nn.AvgPool2d(2, ceil_mode=True),
                                              nn.AdaptiveMaxPool2d(1)), (2, 2, 9, 9)),
    "upsample": (lambda: nn.Sequential(nn.Conv2d(2, 2, 1), nn.Upsample(scale_factor=2, mode="bilinear")), (1, 2, 3, 3)),
    "unfold_fold": (lambda: nn.Sequential(nn.Conv2d(2, 2, 1), nn.Unfold(3, padding=1, stride=2),
                                          nn.Fold((6, 6), 3, padding=1, stride=2)), (2, 2, 6, 6)),
    "fold": (lambda: nn.Sequential(nn.Linear(9, 9), nn.Fold((6, 6), 3, padding=1, stride=2)), (2, 18, 9)),
    "mha_weights": (lambda: MHA(True), (2, 4, 8)),
    "mha_sdpa": (lambda: MHA(False), (2, 4, 8)),
    "activations": (Act, (4, 6)),
    "reductions": (Reduce, (4, 6)),
    "shapes": (Shapes, (4, 6)),
    "bilinear": (lambda: nn.Bilinear(3, 3, 2), None),
    "prelu": (lambda: nn.Sequential(nn.Linear(3, 4), nn.PReLU(4)), (5, 3)),
}


def _input(name, shape, g):
    if name.startswith("embedding"):
        return (torch.randint(0, 10, (3, 4), generator=g),)
    if name == "bilinear":
        return (torch.randn(4, 3, dtype=torch.float64, generator=g), torch.randn(4, 3, dtype=torch.float64, generator=g))
    return (torch.randn(*shape, dtype=torch.float64, generator=g),)


@pytest.mark.parametrize("mode", ["shared", "per_model"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_matches_each_model(name, mode):
    make, shape = LAYERS[name]
    n = 3
    models = [make().double().train() for _ in range(n)]
    refs = [copy.deepcopy(m) for m in models]
    batched = mbcompile.batch(models, in_dims=0 if mode == "per_model" else None, strict=True)
    g = torch.Generator().manual_seed(1)
    xs = [_input(name, shape, g) for _ in range(n)] if mode == "per_model" else [_input(name, shape, g)] * n
    x = tuple(torch.stack(t) for t in zip(*xs)) if mode == "per_model" else xs[0]
    out = batched(*x)
    out.square().sum().backward()
    params = dict(batched.named_parameters())
    for i, r in enumerate(refs):
        ref = r(*xs[i])
        torch.testing.assert_close(out[i], ref, rtol=1e-9, atol=1e-9)
        ref.square().sum().backward()
        for pname, p in r.named_parameters():
            torch.testing.assert_close(params[pname].grad[i], p.grad, rtol=1e-8, atol=1e-9,
                                       msg=lambda m: f"model {i} {pname}: {m}")
        for (bname, b), (_, c) in zip(r.state_dict().items(), batched.unbatch(i).state_dict().items()):
            torch.testing.assert_close(c, b, rtol=1e-9, atol=1e-9)        # buffers and renormed weights


class MultiLabel(nn.Module):
    def __init__(self, reduction):
        super().__init__()
        self.fc, self.reduction = nn.Linear(4, 6), reduction

    def forward(self, x, target):
        return F.multilabel_margin_loss(self.fc(x), target, reduction=self.reduction)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_multilabel_margin_loss_ignores_slots_after_the_end_marker(reduction):
    """Targets shorter than the row (a -1 ends each list, the usual padded case): torch 2.13's
    decomposition adds the slots after the -1 into the loss (torch.compile gives the same wrong numbers);
    capture uses a fixed one, so each model's loss and gradients are its own."""
    models = [MultiLabel(reduction).double() for _ in range(3)]
    refs = copy.deepcopy(models)
    x = torch.randn(3, 4, dtype=torch.float64)
    target = torch.tensor([[0, 3, -1, 0, 0, 0], [5, -1, 2, 2, 2, 2], [1, 2, 4, 5, -1, 0]])
    batched = mbcompile.batch(models, strict=True)
    out = batched(x, target)
    out.sum().backward()
    for i, ref in enumerate(refs):
        want = ref(x, target)
        want.sum().backward()
        torch.testing.assert_close(out[i], want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(batched.get_parameter("fc.weight").grad[i], ref.fc.weight.grad, rtol=1e-12,
                                   atol=1e-12)


def test_multilabel_margin_loss_as_train_steps_loss():
    """The same loss traced into train_step's compiled program (torch runs its wrong decomposition as the
    op's Python autograd kernel while tracing): each model's loss value and update are its own."""
    models = [nn.Linear(4, 6).double() for _ in range(3)]
    refs = copy.deepcopy(models)
    x = torch.randn(5, 4, dtype=torch.float64)
    target = torch.tensor([[0, 3, -1, 0, 0, 0], [5, -1, 2, 2, 2, 2], [1, 2, 4, 5, -1, 0], [2, -1, 0, 0, 0, 0],
                           [0, 1, 2, 3, 4, 5]])
    batched = mbcompile.batch(models)
    opt = mbcompile.optimizer(batched, torch.optim.SGD, lr=[0.1, 0.2, 0.3])
    step = mbcompile.train_step(batched, F.multilabel_margin_loss, opt, path="compiled")
    for _ in range(2):
        losses = step(x, target)
        want = []
        for i, ref in enumerate(refs):
            ref.zero_grad()
            loss = F.multilabel_margin_loss(ref(x), target)
            loss.backward()
            with torch.no_grad():
                for p in ref.parameters():
                    p -= [0.1, 0.2, 0.3][i] * p.grad
            want.append(loss.detach())
        torch.testing.assert_close(losses, torch.stack(want), rtol=1e-12, atol=1e-12)
    for i, ref in enumerate(refs):
        torch.testing.assert_close(batched.get_parameter("weight")[i].detach(), ref.weight.detach(), rtol=1e-12,
                                   atol=1e-12)


class TiedReduce(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.b, self.op = nn.Parameter(torch.zeros(2, 3, dtype=torch.float64)), op

    def forward(self, x):
        h = x + self.b
        return getattr(h, self.op)() * 3 + h.long().max()      # an integer max stays an integer max


@pytest.mark.parametrize("op", ["max", "min", "median", "nanmedian"])
@pytest.mark.parametrize("data", ["ties", "one_nan", "inf"])
def test_whole_tensor_selection_spreads_its_gradient_over_ties(op, data):
    """max() / min() / median() / nanmedian() of a whole tensor: torch gives the gradient to every element
    equal to the result, evenly (the .dim forms give it to one index); each model's gradient is its own."""
    x = {"ties": torch.tensor([[1.0, 2.0, 1.0], [2.0, 1.0, 2.0]]),
         "one_nan": torch.tensor([[1.0, float("nan"), 1.0], [2.0, 1.0, 2.0]]),
         "inf": torch.tensor([[1.0, float("inf"), -float("inf")], [2.0, 1.0, 2.0]])}[data].double()
    models = [TiedReduce(op) for _ in range(3)]
    with torch.no_grad():
        models[1].b[0, 0] = 1.0                       # model 1: another tie pattern
    refs = copy.deepcopy(models)
    batched = mbcompile.batch(models, strict=True)
    out = batched(x)
    out.sum().backward()
    for i, ref in enumerate(refs):
        want = ref(x)
        want.backward()
        torch.testing.assert_close(out[i], want, equal_nan=True)
        torch.testing.assert_close(batched.b.grad[i], ref.b.grad, rtol=1e-12, atol=1e-12, equal_nan=True)
