"""Convolutions (1-3d, transposed, grouped).

shared weights:  n,B,C,H,W * O,C,k,k       -> models folded into the batch: (n*B),C,H,W      -> n,B,O,H,W
per-model weights, lowerings chosen by measurement (lowering.py), all -> B,n,O,H,W (model dim 1):
  grouped: B,(n*C),H,W * (n*O),C/g,k,k  -> one conv, groups = n*g         -> B,(n*O),H,W (a view of B,n,O,H,W)
  concat:  B,C,H,W (shared) * (n*O),C,k,k -> one conv on concatenated weights -> B,(n*O),H,W
  *_nhwc:  the same on channels-last input (2-d), which keeps the chain after it channels-last
  loop:    n convs B,C,H,W * O,C,k,k     -> B,n,O,H,W (mbcompile::conv_loop, torch's kernels per model)
  unfold:  im2col (n*B),(C*k*k),L ; n,O,(C*k*k) @ n,(C*k*k),(B*L) -> n,O,B,L   (2-d, groups=1)
Keeping the model dim next to the channels (B,n,C,H,W = B,(n*C),H,W) lets bn, relu and pooling run on
the folded layout without copies (see norms.py, pooling.py).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .axes import fold, front, per_model
from .registry import aten, rule
from .. import lowering

mb = torch.ops.mbcompile


@rule(aten.convolution.default)
def convolution(ctx, args, dims, kwargs):
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = args
    dx, dw, db = dims[:3]
    n = ctx.n
    unbatched_x = x.dim() - (dx is not None) == w.dim() - (dw is not None) - 1
    if unbatched_x:                                      # C,H,W input: add a batch dim of 1
        x = x.unsqueeze(0 if dx is None else 0)
        dx = None if dx is None else dx + 1
        out, d = convolution(ctx, (x, w, b, stride, padding, dilation, transposed, output_padding, groups),
                             (dx, dw, db), kwargs)
        return out.select(0 if d != 0 else 1, 0), (d - 1 if d != 0 else 0)
    if dw is None and db is None:                        # shared weights: fold n into the batch dim
        x = front(x, dx, n).flatten(0, 1)
        out = aten.convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups)
        ctx.note("shared weights: models folded into the batch")
        return out.unflatten(0, (n, -1)), 0
    w = front(w, dw, n)                                  # n,O,C/g,k..  (transposed: n,C,O/g,k..)
    bias = None if b is None else front(b, db, n)
    conv = (stride, padding, dilation, transposed, output_padding, groups)
    cands = {}
    nhwc = w.dim() == 5 and not transposed              # 2-d: a channels-last (NHWC) variant too
    if dx is None and groups == 1 and not transposed:
        cands["concat"] = lambda x, w, bias: _concat(x, w, bias, n, *conv)
        if nhwc:
            cands["concat_nhwc"] = lambda x, w, bias: _concat(x, w, bias, n, *conv, nhwc=True)
    else:
        cands["grouped"] = lambda x, w, bias: _grouped(x, dx, w, bias, n, *conv)
        if nhwc:
            cands["grouped_nhwc"] = lambda x, w, bias: _grouped(x, dx, w, bias, n, *conv, nhwc=True)
    cands["loop"] = lambda x, w, bias: _loop(x, dx, w, bias, n, *conv)
    if dx is not None and groups == 1 and not transposed and w.dim() == 5 and (
            _im2col_fits(x, w, conv) or lowering.forced("conv", "unfold")):
        cands["unfold"] = lambda x, w, bias: _unfold(x, dx, w, bias, n, *conv)
    family = "conv" if dx is not None else "conv_shared_input"
    starts_chain = (x.device.type == "cpu" and lowering.measured(family) and lowering.measured("conv")
                    and _feeds_conv(ctx.node))
    if nhwc and (_is_nhwc(x, dx) or starts_chain):
        # a channels-last chain stays so, and on CPU a conv chain starts so: mixing layouts costs more
        # than one op gains, and timing the first conv alone cannot see what its layout costs the chain
        cands = {k: f for k, f in cands.items()
                 if k.endswith("_nhwc") or k == "unfold" or lowering.forced(family, k)}
    choice = lowering.choose(family, cands, (x, w, bias), n, extra=(dx,) + tuple(map(_tup, conv)),
                             grad=(lowering.input_needs_grad(ctx), True, True))
    ctx.note(choice.note(family))
    return cands[choice.name](x, w, bias), 1


IM2COL_MAX_BYTES = {"cpu": 64 << 20}      # other devices: 512 MiB


def _im2col_fits(x, w, conv):
    """Whether unfold's im2col buffer, n,(C*k*k),(B*L), is small enough to be worth timing: a big
    one is never the fastest (ResNet-8's 3x3 convs at n=16: 302 MB, 255 ms against grouped's 34 ms)
    and its one timed run would cost more than the whole measurement of the others."""
    stride, padding, dilation = conv[0], conv[1], conv[2]
    n, _, c, kh, kw = w.shape                        # n,O,C,kh,kw
    numel = x.numel() // max(1, x.shape[-1] * x.shape[-2] * c) * c * kh * kw   # n*B*C*k*k
    for size, k, st, pd, dl in zip(x.shape[-2:], (kh, kw), stride, padding, dilation):
        numel *= max(0, (size + 2 * pd - dl * (k - 1) - 1) // st + 1)
    return numel * x.element_size() <= IM2COL_MAX_BYTES.get(x.device.type, 512 << 20)


def _feeds_conv(node):
    """Whether another convolution depends on this node's output (the captured graph's users)."""
    seen, todo = set(), list(node.users) if node is not None else []
    while todo:
        u = todo.pop()
        if u in seen:
            continue
        seen.add(u)
        if u.target is aten.convolution.default:
            return True
        todo += list(u.users)
    return False


def _tup(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def _concat(x, w, bias, n, stride, padding, dilation, transposed, output_padding, groups, nhwc=False):
    """B,C,H,W * (n*O),C,k,k -> B,(n*O),H,W -> B,n,O,H,W."""
    w = w.flatten(0, 1)
    x, w = (_nhwc(x), w.contiguous(memory_format=torch.channels_last)) if nhwc else (x, w)
    out = aten.convolution(x, w, None if bias is None else bias.flatten(),
                           stride, padding, dilation, False, output_padding, 1)
    return out.unflatten(1, (n, -1))


def _is_nhwc(x, dx):
    """Whether B,C,H,W (shared) or B,n,C,H,W (model dim 1) input already sits channels-last."""
    if dx is None:
        return x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last)
    return dx == 1 and x.dim() == 5 and x.shape[1] * x.shape[2] > 1 and x.stride(2) == 1 \
        and x.stride(1) == x.shape[2] and x.stride(4) == x.shape[1] * x.shape[2]


def _nhwc(x):
    """B,C,H,W in channels-last memory (weights too: oneDNN goes channels-last only when both are).
    oneDNN's grouped and few-channel convs run several times faster so on CPU; the output is NHWC too,
    and relu, pooling and batch norm keep that layout through their B,n,C,H,W = B,(n*C),H,W views, so a
    conv chain stays NHWC until a view needs C,H,W contiguous (views.py). mbcompile::relayout gives
    the gradient back in x's layout, so the ops before run their backward in their own layout."""
    if x.is_contiguous(memory_format=torch.channels_last):
        return x
    return torch.ops.mbcompile.relayout(x, True)


def _grouped(x, dx, w, bias, n, stride, padding, dilation, transposed, output_padding, groups, nhwc=False):
    """B,(n*C),H,W * (n*O),C/g,k,k, groups=n*g -> B,(n*O),H,W -> B,n,O,H,W."""
    xf, w = fold(x, dx, 1, n), w.flatten(0, 1)
    xf, w = (_nhwc(xf), w.contiguous(memory_format=torch.channels_last)) if nhwc else (xf, w)
    out = aten.convolution(xf, w, None if bias is None else bias.flatten(),
                           stride, padding, dilation, transposed, output_padding, n * groups)
    return out.unflatten(1, (n, -1))


def _loop(x, dx, w, bias, n, stride, padding, dilation, transposed, output_padding, groups):
    """n convs of B,C,H,W, written into B,n,O,H,W (mbcompile::conv_loop)."""
    return mb.conv_loop(x if dx is None else front(x, dx, n), w, bias, list(stride), list(padding),
                        list(dilation), transposed, list(output_padding), groups)


# mbcompile::conv_loop: torch's conv model after model as one op, each output written into the stacked
# result while in cache, each model's input gradient likewise in the backward op. (A loop of aten convs
# stacks its outputs in one more pass over memory, and autograd stacks the input gradients in another:
# Conv1d 64->64, k=5, B=64, L=100, n=16, forward+backward 39 ms that way, 35.7 this way, 33-34 for 16
# separate models.) The numbers are torch's per-model kernels'.
#   x: B,C,.. (shared) or n,B,C,..; w: n,O,C/g,k.. (transposed: n,C,O/g,k..); bias: n,O -> B,n,O,..

def _per_model(x, w):
    """Model i's input for every i (x is shared when it has a conv input's rank, w's minus the model dim)."""
    return per_model(x, x.dim() == w.dim() - 1, w.shape[0])


@torch.library.custom_op("mbcompile::conv_loop", mutates_args=())
def conv_loop(x: Tensor, w: Tensor, bias: Optional[Tensor], stride: List[int], padding: List[int],
              dilation: List[int], transposed: bool, output_padding: List[int], groups: int) -> Tensor:
    n, out = w.shape[0], None
    xs, ws, bs = _per_model(x, w), w.unbind(0), [None] * w.shape[0] if bias is None else bias.unbind(0)
    for i in range(n):
        y = aten.convolution(xs[i], ws[i], bs[i], stride, padding, dilation, transposed, output_padding, groups)
        if out is None:
            out = y.new_empty(y.shape[0], n, *y.shape[1:])
        out[:, i].copy_(y)                                      # B,O,.. into B,n,O,..
    return out


@conv_loop.register_fake
def _(x, w, bias, stride, padding, dilation, transposed, output_padding, groups):
    y = aten.convolution(_per_model(x, w)[0], w[0], None if bias is None else bias[0], stride, padding, dilation,
                         transposed, output_padding, groups)
    return y.new_empty(y.shape[0], w.shape[0], *y.shape[1:])


@torch.library.custom_op("mbcompile::conv_loop_backward", mutates_args=())
def conv_loop_backward(g: Tensor, x: Tensor, w: Tensor, has_bias: bool, stride: List[int], padding: List[int],
                       dilation: List[int], transposed: bool, output_padding: List[int], groups: int,
                       mask: List[bool]) -> List[Tensor]:
    """(x, w, bias) gradients of conv_loop where ``mask`` asks for them (else empty); a shared x's summed
    over models."""
    n, shared = w.shape[0], x.dim() == w.dim() - 1
    xs, ws = _per_model(x, w), w.unbind(0)
    mask = [mask[0], mask[1], mask[2] and has_bias]
    gx = (torch.zeros_like(x) if shared else torch.empty_like(x)) if mask[0] else x.new_empty(0)
    gw = torch.empty_like(w) if mask[1] else w.new_empty(0)
    gb = w.new_empty(n, g.shape[2]) if mask[2] else w.new_empty(0)
    for i in range(n):
        a, b, c = aten.convolution_backward(g[:, i], xs[i], ws[i], [g.shape[2]] if has_bias else None, stride,
                                            padding, dilation, transposed, output_padding, groups, mask)
        if mask[0]:
            gx.add_(a) if shared else gx[i].copy_(a)
        if mask[1]:
            gw[i].copy_(b)
        if mask[2]:
            gb[i].copy_(c)
    return [gx, gw, gb]


@conv_loop_backward.register_fake
def _(g, x, w, has_bias, stride, padding, dilation, transposed, output_padding, groups, mask):
    return [torch.empty_like(x) if mask[0] else x.new_empty(0), torch.empty_like(w) if mask[1] else w.new_empty(0),
            w.new_empty(w.shape[0], g.shape[2]) if mask[2] and has_bias else w.new_empty(0)]


def _loop_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.has_bias, ctx.conv = inputs[2] is not None, inputs[3:]


def _loop_backward(ctx, g):
    x, w = ctx.saved_tensors
    mask = [bool(v) for v in ctx.needs_input_grad[:3]]
    mask[2] = mask[2] and ctx.has_bias
    if torch.is_grad_enabled():                                 # create_graph: differentiable ops instead
        grads = _loop_backward_differentiable(g, x, w, ctx.has_bias, ctx.conv, mask)
    else:
        grads = mb.conv_loop_backward(g, x, w, ctx.has_bias, *ctx.conv, mask)
    return tuple(t if m else None for t, m in zip(grads, mask)) + (None,) * 6


def _loop_backward_differentiable(g, x, w, has_bias, conv, mask):
    """The same gradients from torch's differentiable convolution_backward (double backward works)."""
    bias_sizes = [g.shape[2]] if has_bias else None
    grads = [aten.convolution_backward(g[:, i], xi, wi, bias_sizes, *conv, mask)
             for i, (xi, wi) in enumerate(zip(_per_model(x, w), w.unbind(0)))]
    out = [torch.stack([r[k] for r in grads]) if mask[k] else None for k in range(3)]
    if mask[0] and x.dim() == w.dim() - 1:                      # a shared input: summed over models
        out[0] = out[0].sum(0)
    return out


conv_loop.register_autograd(_loop_backward, setup_context=_loop_setup)


def _unfold(x, dx, w, bias, n, stride, padding, dilation, transposed, output_padding, groups):
    """im2col: (n*B),(C*k*k),L ; n,O,(C*k*k) @ n,(C*k*k),(B*L) -> n,O,B,L -> B,n,O,Ho,Wo."""
    xs = front(x, dx, n)                                 # n,B,C,H,W
    nb, (kh, kw) = xs.shape[1], w.shape[-2:]
    cols = aten.im2col(xs.flatten(0, 1), [kh, kw], list(dilation), list(padding), list(stride))
    L = cols.shape[-1]
    cols = cols.unflatten(0, (n, nb)).permute(0, 2, 1, 3).reshape(n, cols.shape[1], nb * L)
    out = torch.bmm(w.flatten(2), cols)                  # n,O,(B*L)
    if bias is not None:
        out = out + bias.unsqueeze(-1)
    ho = (xs.shape[-2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    return out.unflatten(2, (nb, ho, L // ho)).permute(2, 0, 1, 3, 4)
