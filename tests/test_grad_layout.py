"""Gradients come back in their activation's layout. On CPU a batched conv chain runs channels-last;
a sum/mean over its spatial dims (global average pooling) used to hand back an NCHW gradient, and
every backward kernel of the chain then mixed layouts (batch norm's backward 60x slower, a 0.4x
MobileNet-style step). Values are checked against each model alone; layouts by watching the backward's
batch-norm and activation kernels."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import mbcompile
from mbcompile import lowering
from mbcompile.passes import linalg


class Pooled(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu6(self.b1(self.c1(x)))
        h = F.relu6(self.b2(self.c2(h)))
        if self.how == "adaptive":
            h = F.adaptive_avg_pool2d(h, 1).flatten(1)
        elif self.how == "mean":
            h = h.mean((2, 3))
        elif self.how == "sum_keepdim":
            h = h.sum((-1, -2), keepdim=True).flatten(1) / 64
        return self.fc(h)


def _order(t):
    """Dims from outermost to innermost in memory (size-1 dims left out: their stride is arbitrary)."""
    return [k for k in sorted(range(t.dim()), key=lambda k: -t.stride(k)) if t.shape[k] > 1]


class Layouts(TorchDispatchMode):
    """The strides of the gradient and the input of every batch-norm / relu6 backward kernel."""
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.native_batch_norm_backward.default, torch.ops.aten.hardtanh_backward.default,
                    torch.ops.aten.threshold_backward.default):
            g, x = args[0], args[1]
            self.seen.append((func.__name__, 0 in g.stride() or _order(g) == _order(x)))   # expanded: no layout
        return func(*args, **(kwargs or {}))


def _chain_layouts_and_numbers(models, x, notes=None, **force):
    """Batch ``models`` as a channels-last chain (``force``: more lowerings), check that every batch-norm
    / activation backward kernel gets its gradient in its input's layout, and each model's output and
    gradients against the model alone. Returns the kernels seen; ``notes``, a list, gets explain()."""
    refs = copy.deepcopy(models)
    with lowering.force(conv="grouped_nhwc", conv_shared_input="concat_nhwc", **force):   # channels-last
        b = mbcompile.batch(models, strict=True)                                # (timing may pick im2col,
        out = b(x)                                                              # which leaves another layout)
    if notes is not None:
        notes.append(str(mbcompile.explain(b)))
    mode = Layouts()
    with mode:
        out.square().sum().backward()
    assert all(same for _, same in mode.seen), mode.seen
    for i, r in enumerate(refs):
        o = r(x)
        torch.testing.assert_close(out[i], o, rtol=1e-12, atol=1e-12)
        o.square().sum().backward()
        for (name, p), (_, q) in zip(r.named_parameters(), b.named_parameters()):
            torch.testing.assert_close(q.grad[i], p.grad, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    return mode.seen


@pytest.mark.parametrize("how", ["adaptive", "mean", "sum_keepdim"])
def test_global_pooling_keeps_the_chain_layout_and_each_models_numbers(how):
    models = [Pooled(how).double() for _ in range(3)]
    assert len(_chain_layouts_and_numbers(models, torch.randn(4, 3, 8, 8, dtype=torch.float64))) == 4


@pytest.mark.parametrize("dims, keepdim", [((2, 3), False), ((-1,), True), ((1, 3), False), ((0, 2), True)])
@pytest.mark.parametrize("op", [torch.sum, torch.mean])
def test_reductions_of_a_channels_last_per_model_tensor(op, dims, keepdim):
    """sum/mean over any dims of a per-model channels-last input, values and gradients vs a loop."""
    n = 3
    x = torch.randn(n, 2, 5, 4, 3, dtype=torch.float64)
    w = torch.randn(n, 2, 5, 4, 3, dtype=torch.float64)

    class M(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.w = nn.Parameter(w)

        def forward(self, x):
            h = (x * self.w).contiguous(memory_format=torch.channels_last)
            return op(h, dims, keepdim=keepdim)

    models = [M(w[i].clone()) for i in range(n)]
    refs = copy.deepcopy(models)
    b = mbcompile.batch(models, strict=True, in_dims=0)
    out = b(x)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    for i, r in enumerate(refs):
        o = r(x[i])
        torch.testing.assert_close(out[i], o, rtol=1e-12, atol=1e-12)
        (o * g[i]).sum().backward()
        torch.testing.assert_close(b.w.grad[i], r.w.grad, rtol=1e-12, atol=1e-12)


class SkipCat(nn.Module):
    """A U-Net skip (channels cat) and a squeeze-excitation gate (B,C,H,W * B,C,1,1)."""
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.se = nn.Linear(8, 8)
        self.c3, self.b3 = nn.Conv2d(16, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        a = F.relu(self.b1(self.c1(x)))
        b = F.relu(self.b2(self.c2(a)))
        b = b * torch.sigmoid(self.se(a.mean((2, 3))))[:, :, None, None]      # B,n,C,H,W * n,B,C,1,1
        h = torch.cat([a, b], 1)
        return F.relu(self.b3(self.c3(h)))


def test_skip_concatenation_and_gating_keep_the_chain_layout():
    n = 3
    models = [SkipCat().double() for _ in range(n)]
    assert len(_chain_layouts_and_numbers(models, torch.randn(2, 3, 8, 8, dtype=torch.float64))) == 6


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1, self.se, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 8), \
            nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        a = F.relu(self.b1(self.c1(x)))
        return self.c2(a * torch.sigmoid(self.se(a.mean((2, 3))))[:, :, None, None])


def test_a_gated_activation_stays_in_the_channels_last_chain():
    """B,n,C,H,W * n,B,C,1,1 keeps the big operand's model dim (1), so the next conv sees its input as
    part of the channels-last chain (offered only channels-last candidates) instead of an n-major
    tensor that it measures in both layouts (and a squeeze-excitation net then ran at 0.69x)."""
    lowering.clear_cache()
    models = [Gated().double() for _ in range(3)]
    refs = copy.deepcopy(models)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    b = mbcompile.batch(models, strict=True)
    out = b(x)
    note = next(line for line in str(mbcompile.explain(b)).splitlines() if line.rstrip().endswith("[c2]"))
    assert "grouped_nhwc" in note and "grouped " not in note and "loop" not in note, note
    for i, r in enumerate(refs):
        torch.testing.assert_close(out[i], r(x), rtol=1e-12, atol=1e-12)


class DropChain(nn.Module):
    def __init__(self, drop):
        super().__init__()
        self.c1, self.b1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1)
        self.drop = nn.Dropout2d(0.3) if drop else nn.Identity()

    def forward(self, x):
        return self.c2(F.max_pool2d(self.drop(F.relu(self.b1(self.c1(x)))), 2))


def test_dropout_in_a_channels_last_chain_adds_no_copy():
    """Dropout keeps its input's model dim: a B,n,C,H,W activation stays one, and the pooling after it
    folds it as a view (it used to come back n-major, and the pooling copied it)."""
    from _streams import Streams
    seeds = [1, 2, 3]
    copies = {}
    for drop in (False, True):
        models = [DropChain(drop).double() for _ in seeds]
        refs = copy.deepcopy(models)
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
        with lowering.force(conv="grouped_nhwc", conv_shared_input="concat_nhwc"):
            b = mbcompile.batch(models, seeds=seeds, strict=True)
            out = b(x)
        copies[drop] = mbcompile.explain(b).copies
        streams = Streams(seeds)
        for i, r in enumerate(refs):
            torch.testing.assert_close(out[i], streams.run(i, r, x), rtol=1e-12, atol=1e-12)
    assert copies[True] == copies[False], copies


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("affine, track", [(True, False), (False, False), (True, True)])
def test_instance_norm_batches_as_group_norm_and_matches_each_model(dims, affine, track):
    """InstanceNorm (a view to 1,(B*C) around batch norm in ATen) is rewritten to group_norm with one group
    per channel, which keeps the B,n,C,.. layout; with running stats it is left as batch norm."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    norm = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims]
    models = [nn.Sequential(conv(3, 4, 3, padding=1), norm(4, affine=affine, track_running_stats=track),
                            nn.ReLU()).double() for _ in range(3)]
    for m in models:
        if affine:
            with torch.no_grad():
                m[1].weight.uniform_(0.5, 1.5)
                m[1].bias.uniform_(-1, 1)
    refs = copy.deepcopy(models)
    b = mbcompile.batch(models, strict=True)
    x = torch.randn(2, 3, *([5] * dims), dtype=torch.float64)
    for step in range(2):
        out = b(x)
        out.square().sum().backward()
        for i, r in enumerate(refs):
            o = r(x)
            o.square().sum().backward()
            torch.testing.assert_close(out[i], o, rtol=1e-10, atol=1e-10)
            for (name, p), (_, q) in zip(r.named_parameters(), b.named_parameters()):
                torch.testing.assert_close(q.grad[i], p.grad, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
    assert ("aten.group_norm" in str(mbcompile.explain(b))) == (not track)
    if track:
        for i, r in enumerate(refs):
            torch.testing.assert_close(b.unbatch(i)[1].running_mean, r[1].running_mean, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["as_is", "nchw"])
def test_group_norm_lowerings_in_a_channels_last_chain(mode):
    """Both group-norm candidates on a channels-last input (ATen's CPU kernel is slower there, so the
    NCHW one is measured too) give each model's numbers."""
    models = [nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(),
                            nn.Conv2d(8, 4, 3, padding=1)).double() for _ in range(3)]
    notes = []
    _chain_layouts_and_numbers(models, torch.randn(2, 3, 6, 6, dtype=torch.float64), notes, group_norm=mode)
    assert f"group_norm lowering: {mode} (forced" in notes[0]


class Copies(TorchDispatchMode):
    """Shapes of every copy_ kernel (AccumulateGrad's layout copies run as copy_)."""
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.copy_.default:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("in_dims", [0, None])
def test_a_batched_linear_gives_its_weight_gradient_in_the_weights_layout_without_a_copy(in_dims, monkeypatch):
    """baddbmm's own backward gives the transposed weight's gradient (n,I,O); its transpose then had to be
    copied into the weight's n,O,I layout every step. mbcompile::linear_bmm computes g^T @ x directly
    (for weights from LINEAR_BMM_MIN_NUMEL elements: here every one)."""
    monkeypatch.setattr(linalg, "LINEAR_BMM_MIN_NUMEL", 0)
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 5)).double() for _ in range(3)]
    refs = copy.deepcopy(models)
    x = torch.randn(3, 4, 7, dtype=torch.float64) if in_dims == 0 else torch.randn(4, 7, dtype=torch.float64)
    with lowering.force(linear="baddbmm", linear_shared_input="bmm"):
        b = mbcompile.batch(models, in_dims=in_dims, strict=True)
        out = b(x)
    mode = Copies()
    with mode:
        out.square().sum().backward()
    weights = {tuple(p.shape) for k, p in b.named_parameters() if k.endswith("weight")}
    assert not weights & set(mode.shapes), mode.shapes
    for i, r in enumerate(refs):
        r(x[i] if in_dims == 0 else x).square().sum().backward()
        for (name, p), (_, q) in zip(r.named_parameters(), b.named_parameters()):
            assert q.grad.is_contiguous()
            torch.testing.assert_close(q.grad[i], p.grad, rtol=1e-12, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("min_numel", [0, 1 << 30], ids=["linear_bmm", "baddbmm"])
def test_a_gradient_penalty_differentiates_the_batched_linear_twice(min_numel, monkeypatch):
    monkeypatch.setattr(linalg, "LINEAR_BMM_MIN_NUMEL", min_numel)
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double() for _ in range(3)]
    refs = copy.deepcopy(models)
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    with lowering.force(linear="baddbmm"):
        b = mbcompile.batch(models, in_dims=0)
        xb = x.clone().requires_grad_()
        g, = torch.autograd.grad(b(xb).square().sum(), xb, create_graph=True)
    g.square().sum().backward()
    for i, r in enumerate(refs):
        xi = x[i].clone().requires_grad_()
        gi, = torch.autograd.grad(r(xi).square().sum(), xi, create_graph=True)
        gi.square().sum().backward()
        for (name, p), (_, q) in zip(r.named_parameters(), b.named_parameters()):
            torch.testing.assert_close(q.grad[i], p.grad, rtol=1e-12, atol=1e-13, msg=lambda m, name=name: f"{name}: {m}")


def test_small_batched_linears_run_as_plain_baddbmm_and_big_ones_as_linear_bmm():
    """The custom op's dispatch costs more than the weight copy it saves below LINEAR_BMM_MIN_NUMEL."""
    big = linalg.LINEAR_BMM_MIN_NUMEL // 3 + 1             # n=3: n*O*I past the threshold
    for width, custom in ((4, False), (big, True)):
        models = [nn.Linear(1, width).double() for _ in range(3)]
        with lowering.force(linear="baddbmm"):
            b = mbcompile.batch(models, in_dims=0, strict=True)
            x = torch.randn(3, 2, 1, dtype=torch.float64)
            out = b(x)
        targets = {nd.target for nd in b._last_program.gm.graph.nodes}
        assert (torch.ops.mbcompile.linear_bmm.default in targets) == custom, targets
        for i, m in enumerate(models):
            torch.testing.assert_close(out[i], m(x[i]), rtol=1e-12, atol=1e-12)


def test_the_batched_linear_op_runs_under_torch_vmap():
    """torch.vmap over a batched module's op (an ensemble of ensembles): the op's vmap rule."""
    from mbcompile import ops  # noqa: F401 - registers mbcompile::linear_bmm
    x = torch.randn(5, 2, 4, 3, dtype=torch.float64)
    w, b = torch.randn(2, 6, 3, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    out = torch.vmap(lambda xx: torch.ops.mbcompile.linear_bmm(xx, w, b))(x)
    ws = torch.randn(5, 2, 6, 3, dtype=torch.float64)
    out_w = torch.vmap(lambda ww: torch.ops.mbcompile.linear_bmm(x[0], ww, None))(ws)
    for k in range(5):
        torch.testing.assert_close(out[k], torch.baddbmm(b.unsqueeze(1), x[k], w.transpose(1, 2)))
        torch.testing.assert_close(out_w[k], torch.bmm(x[0], ws[k].transpose(1, 2)))
