"""Linear layers and matrix products.

linear, shared input:     B,I  x  n,O,I   -> concat: one matmul on (n*O),I weights -> n,B,O (a copy)
                                            | concat_t: (n*O),I @ I,B, transposed  -> n,B,O (a copy)
                                            | bmm: input expanded to n,B,I         -> n,B,O
                                            | loop: n linears                      -> n,B,O
linear, per-model input:  n,B,I  x  n,O,I -> baddbmm | loop (mbcompile::linear_loop) -> n,B,O
(chosen per shape by measurement: lowering.py)
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .axes import front, front_padded, per_model
from .registry import aten, rule
from .. import lowering, ops  # noqa: F401 - mbcompile::linear_bmm

mb = torch.ops.mbcompile


@rule(aten.linear.default)
def linear(ctx, args, dims, kwargs):
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else kwargs.get("bias")
    dx, dw = dims[0], dims[1]
    db = dims[2] if len(dims) > 2 else None
    n = ctx.n
    if dw is None and db is None:                      # shared weights: model dim is a batch dim
        if dx is not None and dx == x.dim() - 1:
            x = x.movedim(dx, 0)
            dx = 0
        ctx.note("shared weights")
        return aten.linear(x, w, b), dx
    w = front(w, dw, n)                                # n,O,I
    bias = None if b is None else front(b, db, n)      # n,O
    if dx is None:                                     # shared input
        cands = {"concat": _linear_concat, "concat_t": _linear_concat_t,
                 "bmm": lambda x, w, bias: _linear_bmm(x, None, w, bias, n),
                 "loop": lambda x, w, bias: _linear_loop(x, None, w, bias, n)}
        family = "linear_shared_input"
    else:                                              # per-model input
        cands = {"baddbmm": lambda x, w, bias: _linear_bmm(x, dx, w, bias, n),
                 "loop": lambda x, w, bias: _linear_loop(x, dx, w, bias, n)}
        family = "linear"
    choice = lowering.choose(family, cands, (x, w, bias), n, extra=(dx,),
                             grad=(lowering.input_needs_grad(ctx), True, True))
    ctx.note(choice.note(family))
    out = cands[choice.name](x, w, bias)
    return out, 0


def _linear_concat(x, w, bias):
    """B..,I @ (n*O),I^T -> B..,(n*O) -> a contiguous n,B..,O. Left as the B..,n,O view, every op
    after it that meets a model-first tensor (a per-model dropout mask, a norm's per-model affine, the
    next gradient) ran strided: a dropout MLP's elementwise ops 5x slower than the copy; the copy is
    part of what is timed."""
    n, o, i = w.shape
    out = aten.linear(x, w.reshape(n * o, i), None if bias is None else bias.reshape(n * o))
    return out.unflatten(-1, (n, o)).movedim(-2, 0).contiguous()


def _linear_concat_t(x, w, bias):
    """The same product with the weights as the tall left operand: (n*O),I @ I,(B..) -> (n*O),(B..);
    BLAS runs a tall-skinny GEMM faster than a short-wide one on CPU (MLP 784's fc1 at n=16: 2.1 vs
    3.0 ms). Returned as a contiguous n,B..,O (model dim 0): as a transposed view its innermost stride
    is B, so every elementwise op after it, and its backward against the next bmm's contiguous
    gradient, ran strided (relu's backward 5x slower at n=64); the copy is part of what is timed."""
    n, o, i = w.shape
    x2, w2 = x.reshape(-1, i).t(), w.reshape(n * o, i)            # I,(B..) ; (n*O),I
    out = torch.mm(w2, x2) if bias is None else torch.addmm(bias.reshape(n * o, 1), w2, x2)
    return out.view(n, o, -1).transpose(1, 2).contiguous().view(n, *x.shape[:-1], o)   # n,O,B -> n,B,O


# n*O*I from which the batched linear runs as mbcompile::linear_bmm (the weight's gradient in its own
# layout, no transposing copy of it each step) rather than plain baddbmm: the custom op's dispatch costs
# ~20 us a call in grad mode, the copy it saves about that at 64K elements (2-core EPYC, fwd+bwd: 8K
# elements 103 against 79 us, 64K 264 / 260 us, 256K 1320 / 1601 us, 1M 5090 / 6427 us)
LINEAR_BMM_MIN_NUMEL = 1 << 16


def _linear_bmm(x, dx, w, bias, n):
    """n,B,I @ n,I,O (+ n,1,O) -> n,B,O; a shared input is expanded (a view)."""
    x = front(x, dx, n)                                # n,B..,I
    lead, i = x.shape[1:-1], x.shape[-1]
    x3 = x.reshape(n, -1, i)
    if w.numel() >= LINEAR_BMM_MIN_NUMEL:
        out = torch.ops.mbcompile.linear_bmm(x3, w, bias)   # baddbmm; the weight's grad in its own layout
    else:
        out = ops.linear_bmm_decomposition(x3, w, bias)
    return out.reshape(n, *lead, w.shape[1])


def _linear_loop(x, dx, w, bias, n):
    """n separate linears written into n,B..,O (mbcompile::linear_loop)."""
    return mb.linear_loop(x if dx is None else front(x, dx, n), w, bias, dx is None)


# mbcompile::linear_loop: torch's linear model after model as one op, each output GEMM written straight
# into its slice of the stacked n,B..,O result (addmm out=), each model's input and weight gradients
# likewise in the backward op. A loop of aten linears stacked its outputs in one more pass over memory
# and autograd stacked the input gradients in another (char-LSTM head, 16 x [1024,128] @ [128,65]:
# ~1-3 ms of cat a step). The numbers are the per-model kernels' of a linear alone.
#   x: B..,I (shared) or n,B..,I; w: n,O,I; bias: n,O -> n,B..,O

def _rows(t):
    """B..,K -> (B..),K (a view when t is contiguous)."""
    return t.reshape(-1, t.shape[-1])


@torch.library.custom_op("mbcompile::linear_loop", mutates_args=())
def linear_loop(x: Tensor, w: Tensor, bias: Optional[Tensor], shared: bool) -> Tensor:
    n, o = w.shape[0], w.shape[1]
    xs = per_model(x, shared, n)
    out = x.new_empty(n, *xs[0].shape[:-1], o)
    for i in range(n):
        x2, o2 = _rows(xs[i]), out[i].view(-1, o)
        if bias is None:
            torch.mm(x2, w[i].t(), out=o2)
        else:
            torch.addmm(bias[i], x2, w[i].t(), out=o2)
    return out


@linear_loop.register_fake
def _(x, w, bias, shared):
    lead = x.shape[:-1] if shared else x.shape[1:-1]
    return x.new_empty(w.shape[0], *lead, w.shape[1])


@torch.library.custom_op("mbcompile::linear_loop_backward", mutates_args=())
def linear_loop_backward(g: Tensor, x: Tensor, w: Tensor, shared: bool, mask: List[bool]) -> List[Tensor]:
    """(x, w, bias) gradients of linear_loop where ``mask`` asks for them (else empty); a shared x's is
    summed over models."""
    n = w.shape[0]
    xs = per_model(x, shared, n)
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if mask[0] else x.new_empty(0)
    gw = torch.empty_like(w, memory_format=torch.contiguous_format) if mask[1] else w.new_empty(0)
    gb = w.new_empty(n, w.shape[1]) if mask[2] else w.new_empty(0)
    for i in range(n):
        g2 = _rows(g[i])                                            # (B..),O
        if mask[0]:
            if not shared:
                torch.mm(g2, w[i], out=gx[i].view(-1, w.shape[2]))
            elif i == 0:
                torch.mm(g2, w[i], out=gx.view(-1, w.shape[2]))
            else:
                gx.view(-1, w.shape[2]).addmm_(g2, w[i])
        if mask[1]:
            torch.mm(g2.t(), _rows(xs[i]), out=gw[i])               # O,(B..) @ (B..),I -> O,I
        if mask[2]:
            torch.sum(g2, 0, out=gb[i])
    return [gx, gw, gb]


@linear_loop_backward.register_fake
def _(g, x, w, shared, mask):
    return [torch.empty_like(x) if mask[0] else x.new_empty(0), torch.empty_like(w) if mask[1] else w.new_empty(0),
            w.new_empty(w.shape[0], w.shape[1]) if mask[2] else w.new_empty(0)]


def _linear_loop_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.has_bias, ctx.shared = inputs[2] is not None, inputs[3]


def _linear_loop_bwd(ctx, g):
    x, w = ctx.saved_tensors
    mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]), bool(ctx.needs_input_grad[2] and ctx.has_bias)]
    g = g.contiguous()
    if torch.is_grad_enabled():                                 # create_graph: differentiable ops instead
        xs = per_model(x, ctx.shared, w.shape[0])
        grads = [torch.stack([g[i] @ w[i] for i in range(w.shape[0])]) if mask[0] else None,
                 torch.stack([_rows(g[i]).t() @ _rows(xs[i]) for i in range(w.shape[0])]) if mask[1] else None,
                 g.reshape(w.shape[0], -1, w.shape[1]).sum(1) if mask[2] else None]
        if mask[0] and ctx.shared:
            grads[0] = grads[0].sum(0)
    else:
        grads = mb.linear_loop_backward(g, x, w, ctx.shared, mask)
    return tuple(t if m else None for t, m in zip(grads, mask)) + (None,)


linear_loop.register_autograd(_linear_loop_bwd, setup_context=_linear_loop_setup)


def _mat(ctx, a, da, b, db):
    """Batched matmul of two values whose unbatched ranks are the op's own. Vectors become matrices
    first so the model dim is never read as a matrix dim:  n,K @ K,N -> n,1,K @ K,N -> n,N."""
    n = ctx.n
    ra, rb = a.dim() - (da is not None), b.dim() - (db is not None)
    if ra == 1:                                        # K -> 1,K
        a, da = (a.unsqueeze(-2), None) if da is None else (front(a, da, n).unsqueeze(-2), 0)
    if rb == 1:                                        # K -> K,1
        b, db = (b.unsqueeze(-1), None) if db is None else (front(b, db, n).unsqueeze(-1), 0)
    r = max(ra, rb, 2)
    out = torch.matmul(front_padded(a, da, r, n), front_padded(b, db, r, n))   # n,..,M,N
    if rb == 1:
        out = out.squeeze(-1)
    if ra == 1:
        out = out.squeeze(-1 if rb == 1 else -2)
    return out, 0


@rule(aten.mm.default, aten.bmm.default, aten.matmul.default, aten.mv.default, aten.dot.default,
      aten.vdot.default)
def mm(ctx, args, dims, kwargs):
    """n,M,K @ n,K,N -> n,M,N  (bmm: n,B,M,K @ n,B,K,N; shared operands broadcast)."""
    a, b = args[0], args[1]
    if ctx.op is aten.vdot.default:
        a = a.conj()
    return _mat(ctx, a, dims[0], b, dims[1])


@rule(aten.addmm.default, aten.baddbmm.default, aten.addmv.default, aten.addbmm.default)
def addmm(ctx, args, dims, kwargs):
    """beta*c + alpha*(a@b), with the product batched as in mm (addbmm: n,B,M,N summed over B)."""
    c, a, b = args[:3]
    dc, da, db = dims[:3]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    mmop = {aten.addmm.default: aten.mm.default, aten.baddbmm.default: aten.bmm.default,
            aten.addmv.default: aten.mv.default, aten.addbmm.default: aten.bmm.default}[ctx.op]
    ctx2 = type(ctx)(n=ctx.n, op=mmop)
    p, _ = mm(ctx2, (a, b), (da, db), {})
    mapped = da is not None or db is not None          # else p is shared: M,N
    if ctx.op is aten.addbmm.default:
        p = p.sum(1 if mapped else 0)
    if alpha != 1:
        p = p * alpha
    rank = p.dim() - mapped
    c = front_padded(c, dc, rank, ctx.n)
    if beta != 1:
        c = c * beta
    return (p + c) if beta != 0 else p, 0


@rule(aten.bilinear.default)
def bilinear(ctx, args, dims, kwargs):
    """n,B,I x n,O,I,J x n,B,J -> n,B,O  (one einsum; shared inputs are expanded views)."""
    x1, x2, w = args[:3]
    b = args[3] if len(args) > 3 else None
    n = ctx.n
    rank = max(x1.dim() - (dims[0] is not None), x2.dim() - (dims[1] is not None))
    a1, a2 = front_padded(x1, dims[0], rank, n), front_padded(x2, dims[1], rank, n)
    a1 = a1 if dims[0] is not None else a1.unsqueeze(0)
    a2 = a2 if dims[1] is not None else a2.unsqueeze(0)
    out = torch.einsum("n...i,noij,n...j->n...o", a1.expand(n, *a1.shape[1:]), front(w, dims[2], n),
                       a2.expand(n, *a2.shape[1:]))
    if b is not None:
        out = out + front_padded(b, dims[3], rank, n)
    return out, 0


def _same(out, d):
    return tuple(d for _ in out) if isinstance(out, (tuple, list)) else d


def defbatched(*ops, core=None):
    """Ops that take leading batch dims on every operand (linalg factorisations and solves, cdist):
    n goes in front.  n,*B,M,M -> n,*B,...  With several operands, ``core`` gives each argument's
    core (non-batch) rank, or a function of the unbatched shapes that does; batch dims are then
    broadcast and every operand expanded to n,*batch,*core (a view)."""
    def batched(ctx, args, dims, kwargs):
        n = ctx.n
        pos = [k for k, a in enumerate(args) if isinstance(a, torch.Tensor)]
        args = list(args)
        if len(pos) == 1 or core is None:
            for k in pos:
                args[k] = front(args[k], dims[k], n)
        else:
            shapes = {k: _lshape(args[k], dims[k]) for k in pos}
            cores = core(shapes) if callable(core) else core
            batch = torch.broadcast_shapes(*[shapes[k][:len(shapes[k]) - cores[k]] for k in pos])
            for k in pos:
                c = shapes[k][len(shapes[k]) - cores[k]:]
                a = front_padded(args[k], dims[k], len(batch) + cores[k], n)
                args[k] = a.expand(n, *batch, *c)
        out = ctx.op(*args, **kwargs)
        return out, _same(out, 0)
    rule(*ops)(batched)


def _lshape(t, d):
    return tuple(s for j, s in enumerate(t.shape) if j != d)


def _solve_core(shapes):
    """linalg.solve: B is a (batch of) vector(s) when it has one dim, or one dim less than A and
    A's batch shape (the rule of torch.linalg.solve)."""
    a, b = shapes[0], shapes[1]
    vec = len(b) == 1 or (len(b) == len(a) - 1 and b == a[:-1])
    return {0: 2, 1: 1 if vec else 2}


defbatched(aten._linalg_svd.default, aten._linalg_eigh.default, aten.linalg_qr.default,
           aten.linalg_lu_factor_ex.default, aten.linalg_eig.default, aten._linalg_eigvals.default,
           aten._linalg_slogdet.default, aten._linalg_det.default, aten.linalg_matrix_exp.default,
           aten.linalg_lu.default, aten.linalg_ldl_factor_ex.default, aten.linalg_inv_ex.default,
           aten.linalg_cholesky_ex.default, aten.geqrf.default, aten.cholesky.default,
           aten.cholesky_inverse.default)
defbatched(aten.linalg_lu_solve.default, aten.linalg_ldl_solve.default, aten.ormqr.default,
           core={0: 2, 1: 1, 2: 2})
defbatched(aten.lu_unpack.default, aten.linalg_householder_product.default, core={0: 2, 1: 1})
defbatched(aten.triangular_solve.default, aten.linalg_solve_triangular.default, aten.cholesky_solve.default,
           aten._cdist_forward.default, aten._euclidean_dist.default, core={0: 2, 1: 2})
# _euclidean_dist: cdist's matmul path (above 25 rows, or compute_mode="use_mm..."), kept whole: its own
# backward gives 0 at a zero distance, where its decomposition (mm, clamp, sqrt) gave NaN
defbatched(aten.linalg_pinv.atol_rtol_tensor, core={0: 2, 1: 0, 2: 0})
defbatched(aten._linalg_solve_ex.default, core=_solve_core)


@rule(aten._linalg_check_errors.default)
def check_errors(ctx, args, dims, kwargs):
    """Error codes n,..: one check over every model's codes, read as a batch."""
    aten._linalg_check_errors(front(args[0], dims[0], ctx.n), args[1], is_matrix=False)
    return None, None

