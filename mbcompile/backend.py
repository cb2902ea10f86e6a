"""The ``"mbcompile"`` torch.compile backend: mbcompile's graph passes, then TorchInductor.

    torch.compile(batched, backend="mbcompile")     # dynamo traces the call of the batched graph
    mbcompile.batch(model, n, compile=True)         # the batched graph, compiled without dynamo
    opt = mbcompile.optimizer(batched, torch.optim.AdamW, lr=[...])   # per model (or a torch.optim SGD/Adam)
    step = train_step(batched, F.cross_entropy, opt)  # forward+loss+backward+update: ONE program
    losses = step(x, y)

The backend gets dynamo's FX graph; ``compile_fx`` runs AOTAutograd, so the forward and the backward
graphs are both compiled by Inductor. ``compile=True`` hands the batched graph (already aten-level and
functional: make_fx traced it) straight to AOTAutograd + Inductor (``CompiledProgram``): no dynamo
guards per call. ``TrainStep`` traces forward, per-model loss, ``autograd.grad`` and the optimizer
update into one graph and compiles it as one Inductor program (the fast path for small models, where
per-op and per-call overhead dominates). ``STATS`` counts what happened (backend calls, forward and
backward graphs Inductor compiled, seconds spent), so tests can prove that compilation took place.
"""
from __future__ import annotations

import copy
import time
import warnings
from collections import Counter

import torch
import torch.fx as fx
from torch.optim.optimizer import _get_scalar_dtype

from .capture import FIXED_DECOMPOSITIONS, fixed_kernels
from .errors import CaptureError, InvalidInputError, InvalidTypeError
from .cudagraph import GraphedStep, why_not as graph_unsafe, written_inputs

_TENSOR_SPEC = torch.utils._pytree.tree_flatten(torch.empty(0))[1]   # a target that is one tensor
STATS: Counter = Counter()        # backend_calls, fw_graphs, bw_graphs, compile_s (float)
GRAPH_PASSES: list = []           # fn(gm) -> bool (changed); run in order before Inductor


def graph_pass(fn):
    """Register a pass over the dynamo graph: ``fn(gm) -> changed``."""
    GRAPH_PASSES.append(fn)
    return fn


def _with_passes(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a batched program's graph with GRAPH_PASSES run on it (the program keeps its own)."""
    gm = copy.deepcopy(gm)
    for p in GRAPH_PASSES:
        p(gm)
    return gm


@graph_pass
def drop_dead_code(gm: fx.GraphModule) -> bool:
    """Nodes without users and side effects (views and clones left by the batching rules)."""
    changed = gm.graph.eliminate_dead_code()
    if changed:
        gm.recompile()
    return changed


@graph_pass
def weight_grad_layout(gm: fx.GraphModule) -> bool:
    """A small linear (passes/linalg.py: plain baddbmm below LINEAR_BMM_MIN_NUMEL, for eager's dispatch
    cost) whose O < I becomes mbcompile::linear_bmm in compiled programs, so its weight gradient is
    g^T @ x in the weight's n,O,I layout: autograd's x^T @ g is n,I,O, a GEMM with O columns (MLP 784's
    256->10 head at n=16: 0.16 ms against 0.04) read transposed by the update.
        baddbmm(unsqueeze(b, 1), x, transpose(w, 1, 2)) | bmm(x, transpose(w, 1, 2))  ->  linear_bmm(x, w, b)"""
    aten = torch.ops.aten
    changed = False
    for nd in list(gm.graph.nodes):
        if nd.op != "call_function" or nd.target not in (aten.baddbmm.default, aten.bmm.default) or nd.kwargs:
            continue
        x, wt = nd.args[-2:]
        if not (isinstance(wt, fx.Node) and wt.target is aten.transpose.int and tuple(wt.args[1:]) == (1, 2)):
            continue
        w = wt.args[0]
        wv = w.meta.get("val") if isinstance(w, fx.Node) else None
        xv = x.meta.get("val") if isinstance(x, fx.Node) else None
        if wv is None or xv is None or wv.dim() != 3 or xv.dim() != 3 or wv.shape[1] >= wv.shape[2]:
            continue
        bias = None
        if nd.target is aten.baddbmm.default:
            b = nd.args[0]
            bv = b.args[0].meta.get("val") if isinstance(b, fx.Node) and b.target is aten.unsqueeze.default \
                and b.args[1] == 1 and isinstance(b.args[0], fx.Node) else None
            if bv is None or bv.dim() != 2 or bv.dtype != wv.dtype:
                continue
            bias = b.args[0]
        with gm.graph.inserting_before(nd):
            new = gm.graph.call_function(torch.ops.mbcompile.linear_bmm.default, (x, w, bias))
        new.meta = dict(nd.meta)
        nd.replace_all_uses_with(new)
        gm.graph.erase_node(nd)
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return changed


def _distinct_outputs(gm):
    """A backward graph returning one value for two inputs' gradients (an LSTM's two biases): each later
    use gets its own clone, else AccumulateGrad stores one tensor as both ``.grad`` and an in-place
    change of one (clipping, unscaling, accumulation) changes the other."""
    out = next(nd for nd in reversed(gm.graph.nodes) if nd.op == "output")
    seen, vals = set(), list(out.args[0])
    for k, v in enumerate(vals):
        if isinstance(v, fx.Node):
            if v in seen:
                with gm.graph.inserting_before(out):
                    vals[k] = gm.graph.call_function(torch.ops.aten.clone.default, (v,))
                    vals[k].meta = dict(v.meta)
            seen.add(v)
    if any(a is not b for a, b in zip(vals, out.args[0])):
        out.args = (type(out.args[0])(vals),) + tuple(out.args[1:])
        gm.recompile()


def _counting_inner(inner):
    def compile_inner(gm, example_inputs, **kwargs):
        if kwargs.get("is_backward"):
            _distinct_outputs(gm)
        STATS["bw_graphs" if kwargs.get("is_backward") else "fw_graphs"] += 1
        t0 = time.perf_counter()
        try:
            return inner(gm, example_inputs, **kwargs)
        finally:
            STATS["compile_s"] += time.perf_counter() - t0
    return compile_inner


_DECOMPS: dict = {}


def _register_fallback(op):
    """Register Inductor's fallback for ``op`` explicitly: an implicit one for an op that has a
    decomposition is an error when the CI environment variable is set (a check meant for PyTorch's CI)."""
    from torch._inductor import lowering
    if op not in lowering.lowerings:
        lowering.make_fallback(op, warn=False, override_decomp=True)


def _decompositions(cpu: bool, joint: bool = False):
    """Inductor's table. On CPU without
    - embedding_dense_backward's: Inductor's scatter-add is a loop of atomic float adds (a 5000x64
      bag-of-words table at n=16: its train_step 13.3 ms with it, 8.8 ms with ATen's kernel);
    - for a forward graph (not ``joint``: train_step's one graph saves nothing) threshold_backward's (relu
      backward), so that the forward saves the float activation, not a bool mask: Inductor's vectorised
      bool stores run ~25x slower than float stores on the AVX-512 CPUs measured here (docs/performance.md)."""
    key = (cpu, cpu and joint)
    if key not in _DECOMPS:
        from torch._inductor.decomposition import select_decomp_table
        table = dict(select_decomp_table())
        aten = torch.ops.aten
        if cpu:
            for op in (aten.embedding_dense_backward.default,) + (() if joint else (aten.threshold_backward.default,)):
                table.pop(op, None)
                _register_fallback(op)
        from . import ops                    # mbcompile's layout-keeping ops: their aten forms
        table[torch.ops.mbcompile.linear_bmm.default] = ops.linear_bmm_decomposition
        table.update(FIXED_DECOMPOSITIONS)   # torch's wrong ones, fixed
        for op in (aten.replication_pad1d_backward, aten.replication_pad2d_backward,
                   aten.replication_pad3d_backward):
            table[op.default] = _replication_pad_backward
        _DECOMPS[key] = table
    return _DECOMPS[key]


def _replication_pad_backward(grad, x, padding):
    """Replication padding's gradient as slices and sums, for Inductor to generate. Its fallback to
    ATen's kernel failed Inductor's stride check whenever Inductor laid the padded input out
    channels-last (after a conv): ATen returns the gradient in the input's layout, the meta kernel
    contiguous. Per padded dim:  g[..., :lo] sums into the first element, g[..., lo+size:] into the last."""
    g = grad
    for d in range(len(padding) // 2):
        dim, lo, hi = x.dim() - 1 - d, padding[2 * d], padding[2 * d + 1]
        size = x.shape[dim]
        if lo < 0 or hi < 0:
            return NotImplemented
        mid = g.narrow(dim, lo, size)
        first = mid.narrow(dim, 0, 1) + g.narrow(dim, 0, lo).sum(dim, keepdim=True)
        last = g.narrow(dim, lo + size, hi).sum(dim, keepdim=True)
        if size == 1:
            g = first + last
        else:
            g = torch.cat([first, mid.narrow(dim, 1, size - 2), mid.narrow(dim, size - 1, 1) + last], dim)
    return g


RECOMPILE_LIMIT = 64


def mbcompile_backend(gm: fx.GraphModule, example_inputs, **kwargs):
    """torch.compile backend: mbcompile's graph passes, then Inductor (forward and backward)."""
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner
    STATS["backend_calls"] += 1
    # every batched program (module, input signature, mode) is a cache entry of one dynamo frame, the
    # resume function after forward's capture step, shared by all batched modules: dynamo's default of 8
    # would run the 9th program of a process eagerly, silently
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
    for p in GRAPH_PASSES:
        p(gm)
    cpu = not any(isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in example_inputs)
    kwargs.setdefault("decompositions", _decompositions(cpu))
    # AOTAutograd's cache keys on the dynamo graph, not on the decomposition table: bypass it (Inductor's
    # FX graph cache, keyed on the decomposed graph, still serves repeated compiles)
    with torch._functorch.config.patch(enable_autograd_cache=False), fixed_kernels():
        return compile_fx(gm, example_inputs, inner_compile=_counting_inner(compile_fx_inner), **kwargs)


class CompiledProgram:
    """The batched graph ``gm`` (already an aten-level, functional graph: make_fx traced it) compiled by
    AOTAutograd + Inductor directly, without dynamo: a Program is built per input signature already,
    so the only guards needed are grad mode, which inputs require grad, and strides; each combination
    compiles once. Compiles at its first call, timed into ``times["compile_s"]``. If the direct path
    fails, falls back to ``torch.compile(gm, backend=mbcompile_backend, fullgraph=True)``."""

    def __init__(self, gm, times=None):
        self.gm, self.times = gm, times if times is not None else {}
        self.compiled = {}
        self.calls = 0
        self.dynamo = None

    def _key(self, args):
        return (torch.is_grad_enabled(), tuple((a.requires_grad, a.stride()) if isinstance(a, torch.Tensor)
                                               else (type(a).__name__, repr(a)) for a in args))

    def _compile(self, args):
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner
        STATS["backend_calls"] += 1
        cpu = all(a.device.type == "cpu" for a in args)
        gm = _with_passes(self.gm)
        with torch._functorch.config.patch(enable_autograd_cache=False), fixed_kernels():
            return compile_fx(gm, list(args), inner_compile=_counting_inner(compile_fx_inner),
                              decompositions=_decompositions(cpu))

    def __call__(self, *args):
        self.calls += 1
        if self.dynamo is not None:
            return self.dynamo(*args)
        key = self._key(args)
        fn = self.compiled.get(key)
        if fn is None:
            t0 = time.perf_counter()
            try:
                fn = self.compiled[key] = self._compile(args)
            except Exception:  # noqa: BLE001 - dynamo's path handles what the direct one cannot
                self.dynamo = torch.compile(self.gm, backend=mbcompile_backend, fullgraph=True, dynamic=False)
                out = self.dynamo(*args)
                self.times["compile_s"] = self.times.get("compile_s", 0.0) + time.perf_counter() - t0
                return out
            out = fn(*args)
            self.times["compile_s"] = self.times.get("compile_s", 0.0) + time.perf_counter() - t0
            return out
        return fn(*args)


def compile_program(gm: fx.GraphModule, times=None):
    """The batched forward ``gm(*inputs, rng_states)`` as one compiled callable."""
    return CompiledProgram(gm, times)


def _register():
    """Register the backend by name on import. If torch already discovered the ``torch_dynamo_backends``
    entry point (so ``lookup_backend`` may be importing us right now and will register it itself), or
    it is registered already, do nothing: registering twice is an error in torch."""
    from torch._dynamo.backends import registry
    if "mbcompile" in registry._COMPILER_FNS or registry._BACKENDS.get("mbcompile") is not None:
        return
    registry.register_backend(mbcompile_backend, name="mbcompile")


_register()


# ---- one compiled training step --------------------------------------------------------------------

# torch < 2.13's Inductor can schedule an in-place update of a graph input before an extern kernel (a
# bmm of the backward) that still reads the old value: seen on 2.11, per-model SGD's train_step moved the
# first layer by 64-99% of its true step. There the program returns the new parameters and they are
# copied in after it (one more pass over the parameters); 2.13 orders the update after its readers.
UPDATE_IN_GRAPH = torch.__version__ >= (2, 13)          # a TorchVersion compares with tuples
TRIALS = 2                    # timed calls of each path before train_step(path="auto") chooses
DEFAULT_PATH = "auto"         # train_step's path when none is given (the test suite pins "compiled")


class TrainStep:
    """``losses = step(*inputs, target)``: forward, per-model loss, backward and the optimizer update of
    a batched module as ONE Inductor-compiled program (make_fx traces forward and ``autograd.grad``
    into a single graph, then the update is appended). For models small enough that per-op overhead
    dominates, this is the fast path: one call per step instead of a forward, a backward and an
    optimizer step, each with its own Python and autograd overhead.

    ``optimizer`` is either

    * mbcompile's per-model optimizer (``mbcompile.optimizer(batched, torch.optim.X, lr=[...], ...)``,
      any of its classes: SGD, Adam, AdamW, RMSprop, Adagrad, Adamax, NAdam, RAdam, with per-model
      hyperparameters and frozen models). Each call does the host side of its ``step`` (state
      creation, step counters of the models that step, the per-model scalars such as bias
      corrections) in Python and passes the scalars to the program as tensors, so LR schedulers and
      changed hyperparameter values do not recompile; what changes the program's structure does
      (a flag such as ``nesterov``/``amsgrad``, a hyperparameter that becomes per-model, freezing
      every model or no longer every model, which parameters have state). Or
    * a ``torch.optim.SGD``, ``Adam`` (``decoupled_weight_decay=True`` is AdamW) or ``AdamW`` with one
      param group holding the batched module's stacked parameters, all or some of them (as ``opt.step()``
      would, only those are updated; every model shares its hyperparameters; ``lr`` and the other scalars
      are read at every call, so LR schedulers work without recompiling; SGD with momentum compiles a
      second program after its first step).

    The optimizer's state lives in ``optimizer.state`` under the keys its own ``step`` uses, so
    ``optimizer.step()``, ``state_dict()`` / ``load_state_dict()``, freezing and ``mbcompile.shrink_``
    keep working and train_step calls can alternate with normal steps. ``loss_fn`` gets the output as
    ``mbcompile.loss`` gives it (a model with several outputs: model i's outputs in their structure);
    ``requires_grad_`` changes between calls change which parameters train (a new program, once).
    ``max_grad_norm`` (a float, or a list / 1-D tensor with one value per model) clips each model's
    gradient norm inside the program as ``mbcompile.clip_grad_norm_(batched, max_grad_norm)`` does in
    the normal loop; the per-model norms
    before clipping are then in ``step.last_grad_norms``. Results equal the separate steps up to float
    rounding (Inductor fuses the update), not bit for bit; ``p.grad`` is not filled, and the
    optimizer's step hooks do not run. Batch-norm buffers and "sequential" RNG streams advance as in
    eager. Not supported: a GradScaler (mixed-precision loss scaling), closure-based optimizers
    (LBFGS), other optimizers. As in the normal loop, a tied parameter is updated once with the sum of its
    uses' gradients, and one the loss does not depend on (grad None there) is skipped: no update, no
    optimizer state. Returns the per-model losses, shape [n] (detached).

    ``path``: "compiled" (that program), "eager" (the normal loop's forward, backward, clipping and
    ``opt.step()``, with ``p.grad`` put back as it was) or "auto" (the default): on CUDA the program; on
    the CPU both are timed on the first calls (each a real step) and the faster is kept
    (``step.chosen``; ``step.times`` has both times), as Inductor's program loses to the eager lowerings
    on some conv models. ``MBCOMPILE_LOWERING=default`` (no timing anywhere) makes "auto" the program;
    ``MBCOMPILE_LOWERING=train_step=eager`` (or ``=compiled``) picks one. A model or loss that looks at
    the data's values in Python (torch.distributions' argument checks) cannot be traced: "auto" then
    warns once and runs the normal loop, "compiled" raises a CaptureError. The target may be a tensor
    or a tuple / dict of them, as for ``mbcompile.loss``.

    On CUDA the program is replayed from a CUDA graph from its third call (``mbcompile.cudagraph``; not
    with random ops or inputs on the host); ``step.cuda_graph`` says whether the last call was, or why not."""

    def __init__(self, batched, loss_fn, optimizer, *, max_grad_norm=None, path=None, **loss_kwargs):
        from .amp import GradScaler
        self.batched, self.loss_fn, self.opt, self.loss_kwargs = batched, loss_fn, optimizer, loss_kwargs
        path = DEFAULT_PATH if path is None else path
        if path not in ("auto", "compiled", "eager"):
            raise InvalidInputError(f"mbcompile.train_step: path must be 'auto', 'compiled' or 'eager', got {path!r}")
        self.path, self._trials, self._clock = path, {"compiled": [], "eager": []}, time.perf_counter
        self.chosen = None          # the path "auto" settled on ("compiled" or "eager"); None while timing
        for k, v in loss_kwargs.items():
            if k in ("scaler", "grad_scaler") or isinstance(v, (GradScaler, torch.amp.GradScaler)):
                raise InvalidInputError("mbcompile.train_step does not support a GradScaler (loss scaling skips steps "
                                        "per model on the host); use the normal loop with mbcompile.GradScaler")
            if k == "closure":
                raise InvalidInputError("mbcompile.train_step computes the loss itself and takes no closure")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise InvalidTypeError(
                f"mbcompile.train_step takes one optimizer over every trainable parameter of the batched module, "
                f"got {type(optimizer).__name__}; several optimizers (per-parameter settings through params=) "
                f"train in the normal loop: batched(x), mbcompile.loss(...).sum().backward(), then each opt.step()")
        self.per_model = bool(getattr(optimizer, "_mbcompile_per_model", False))
        kind = type(optimizer).__name__
        if self.per_model:
            if optimizer.n != batched.n:
                raise InvalidInputError(f"the optimizer is for n={optimizer.n} models, the batch has n={batched.n}")
            kind = optimizer._optim_cls.__name__
        else:
            if isinstance(optimizer, torch.optim.LBFGS):
                raise InvalidInputError("mbcompile.train_step does not support closure-based optimizers (LBFGS "
                                        "re-evaluates the model several times per step)")
            if kind not in ("SGD", "Adam", "AdamW") or len(optimizer.param_groups) != 1:
                from .optim import supported_optimizers
                names = ", ".join(c.__name__ for c in supported_optimizers())
                raise InvalidInputError(
                    f"mbcompile.train_step supports mbcompile.optimizer(batched, torch.optim.X, ...) for X in {names}, "
                    f"or torch.optim.SGD/Adam/AdamW with one param group over the batched parameters; got {kind} "
                    f"with {len(optimizer.param_groups)} groups")
            g = optimizer.param_groups[0]
            if g.get("amsgrad") or g.get("maximize") or g.get("differentiable"):
                raise InvalidInputError("mbcompile.train_step with a torch.optim optimizer does not support amsgrad, "
                                        "maximize or differentiable (mbcompile.optimizer(batched, ...) supports them)")
        self.kind = kind
        self.max_grad_norm = max_grad_norm
        self._clip = None                      # (n, [n] float64 tensor) of max_grad_norm
        from .batching import on_shrink
        on_shrink(batched, self)
        self.last_grad_norms = None
        self.compiled, self.times, self._pidx, self._hp_cache = {}, {}, {}, None
        self._last = None                      # the last call's program (its CUDA-graph status)

    @property
    def cuda_graph(self):
        """Whether the last call's program was replayed from a CUDA graph, or why not (None before a call)."""
        return None if self._last is None else self._last.status

    # ---- torch.optim SGD/Adam/AdamW (shared hyperparameters) -----------------------------------------
    def _hp(self, params):
        """[k, 7] float64 scalars (one row per distinct step count; SGD: one row) and the row of each
        parameter: a parameter that sat out steps (requires_grad off, no gradient) keeps its own
        count and bias corrections, as torch.optim's per-parameter state does."""
        g = self.opt.param_groups[0]
        if self.kind == "SGD":
            rows = [(g["lr"], g["momentum"], g["dampening"], g["weight_decay"], 0.0, 0.0, 0.0)]
            where = (0,) * len(params)
            flags = (g["momentum"] != 0, bool(g["nesterov"]), g["weight_decay"] != 0)
        else:                                    # bias corrections in Python floats, as torch.optim does
            lr, (b1, b2) = float(g["lr"]), g["betas"]
            steps = []
            for p in params:
                st = self.opt.state.get(p, {}).get("step")
                steps.append((float(st) if st is not None else 0.0) + 1)
            order = sorted(set(steps))
            where = tuple(order.index(s) for s in steps)
            rows = [(lr, b1, b2, g["eps"], g["weight_decay"], lr / (1 - b1 ** step), (1 - b2 ** step) ** 0.5)
                    for step in order]
            # torch's AdamW is Adam with decoupled_weight_decay=True: either spelling decays decoupled
            flags = (g["weight_decay"] != 0, self.kind == "AdamW" or bool(g.get("decoupled_weight_decay")))
        vals = tuple(tuple(float(v) for v in r) for r in rows)
        if self._hp_cache is None or self._hp_cache[0] != vals:
            self._hp_cache = (vals, torch.tensor(vals, dtype=torch.float64))
        return self._hp_cache[1], flags, where

    def _opt_tensors(self, params, flags):
        """Optimizer state tensors in graph order, created as torch.optim would; and, per parameter,
        whether this is SGD's first momentum step for it (its buffer starts as its gradient)."""
        first, out = [False] * len(params), []
        for k, p in enumerate(params):
            if self.kind == "SGD" and not flags[0]:
                continue                                   # plain SGD keeps no state
            st = self.opt.state[p]
            if self.kind == "SGD":
                if flags[0]:
                    if st.get("momentum_buffer") is None:
                        st["momentum_buffer"], first[k] = torch.zeros_like(p), True
                    out.append(st["momentum_buffer"])
            else:
                if "step" not in st:
                    st["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                out += (st["step"], st["exp_avg"], st["exp_avg_sq"])
        return out, tuple(first)

    def _torch_update(self, params):
        """Graph inputs, cache key and in-graph update for a torch.optim optimizer."""
        hp, flags, where = self._hp(params)
        opt_t, first = self._opt_tensors(params, flags)
        kind, n_opt = self.kind, len(opt_t)

        def update(ps, grads, tail):
            _update(kind, flags, first, ps, grads, list(tail[:n_opt]), tail[n_opt], where)
        return opt_t + [hp], (flags, first, where, tuple(hp.shape)), update

    # ---- mbcompile's per-model optimizer -------------------------------------------------------------
    def _per_model_update(self, params):
        """The host side of ``BatchedOptimizer.step`` (state, step counters, per-model scalars), done
        here; the tensor side (``_apply_all``, as ``step(compile=True)`` runs it) goes into the program,
        its state tensors and scalars as inputs. Returns graph inputs, cache key and the update."""
        from .optim import tensor_update
        opt = self.opt
        act = opt._active_list(None)
        if act is not None and not any(act):
            return [], ("all frozen",), None              # forward and backward only, as opt.step() does
        return tensor_update(opt, params, act)

    def _shrink_(self, keep):
        """mbcompile.shrink_ dropped models: a per-model max_grad_norm keeps the kept models' values."""
        m = self.max_grad_norm
        if isinstance(m, torch.Tensor) and m.dim() == 1:
            self.max_grad_norm = m[torch.tensor(keep, device=m.device)]
        elif isinstance(m, (list, tuple)):
            self.max_grad_norm = [m[k] for k in keep]
        self._clip = None

    def _max_norm(self, n):
        if self.max_grad_norm is None:
            return None
        if self._clip is None or self._clip[0] != n:
            from .optim import _split_per_model
            vals = _split_per_model("max_grad_norm", self.max_grad_norm, n)
            self._clip = (n, torch.tensor([float(v) for v in vals], dtype=torch.float64))
        return self._clip[1]

    def __call__(self, *args):
        path = self._path()
        t0 = self._clock()
        try:
            res = self._eager(*args) if path == "eager" else self._compiled_step(*args)
        except Exception as e:  # noqa: BLE001 - only a tracer's refusal is handled, the rest re-raised
            from .loss import _traced_data
            if path == "eager" or not _traced_data(e):
                raise
            why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
            if self.path != "auto":
                raise CaptureError(
                    f"mbcompile.train_step cannot trace its compiled program: the model or the loss looks at the "
                    f"data's values in Python ({why}), e.g. torch.distributions' argument checks (pass "
                    f"validate_args=False). path='eager' (or the default 'auto') runs the normal loop") from e
            warnings.warn(f"mbcompile.train_step: the compiled program cannot be traced (the model or the loss looks "
                          f"at the data's values in Python: {why}); every step runs the normal loop (path='eager')",
                          UserWarning, stacklevel=2)
            self.chosen, self.times["compiled_refused"] = "eager", why
            return self._eager(*args)
        if self.path == "auto" and self.chosen is None:
            self._trials[path].append(self._clock() - t0)
        return res

    def path_state(self) -> dict:
        """What "auto" has settled or timed so far (for a checkpoint: a resumed run takes the same path)."""
        return {"chosen": self.chosen, "trials": {k: list(v) for k, v in self._trials.items()}}

    def load_path_state(self, state: dict):
        self.chosen = state.get("chosen")
        self._trials = {k: list(state.get("trials", {}).get(k, [])) for k in ("compiled", "eager")}

    def _path(self):
        """CPU, path="auto": the compiled program for TRIALS + 1 calls (the first compiles), then the normal
        loop's forward, backward and opt.step for as many (the first may capture), then the faster of the
        two by their best times: Inductor's program loses to the eager lowerings on some conv models."""
        if self.path != "auto":
            return self.path
        if self.chosen is not None:
            return self.chosen
        from . import lowering
        setting = lowering._setting("train_step")           # MBCOMPILE_LOWERING=default / train_step=eager
        p = self.batched._p0
        if setting != "measure" or (p is not None and p.device.type != "cpu"):
            self.chosen = setting if setting in ("compiled", "eager") else "compiled"
            return self.chosen
        c, e = self._trials["compiled"], self._trials["eager"]
        if len(c) <= TRIALS:
            return "compiled"
        if len(e) <= TRIALS:
            return "eager"
        tc, te = min(c[1:]), min(e[1:])
        self.chosen = "eager" if te < tc else "compiled"
        self.times.update(compiled_step_ms=1e3 * tc, eager_step_ms=1e3 * te)
        return self.chosen

    def _eager(self, *args):
        """One step as the normal loop takes it (p.grad as it was before, the step's own left out)."""
        from .clip import clip_grad_norm_
        from .loss import loss as per_model_loss
        *inputs, target = args
        b, opt = self.batched, self.opt
        params = [p for g in opt.param_groups for p in g["params"]]
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            with torch.enable_grad():
                losses = per_model_loss(self.loss_fn, b(*inputs), target, **self.loss_kwargs)
                losses.sum().backward()
            max_norm = self._max_norm(b.n)
            if max_norm is not None:
                self.last_grad_norms = clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
            opt.step()
        finally:
            for p, g in zip(params, saved):
                p.grad = g
        self._last = None
        return losses.detach()

    def _compiled_step(self, *args):
        *inputs, target = args
        tleaves, tspec = ([target], _TENSOR_SPEC) if isinstance(target, torch.Tensor) else \
            torch.utils._pytree.tree_flatten(target)                 # a tensor, or a tuple / dict of them
        tt = [t for t in tleaves if isinstance(t, torch.Tensor)]
        tkey = (tspec, tuple((t.shape, t.dtype) if isinstance(t, torch.Tensor) else ("c", repr(t)) for t in tleaves))
        b = self.batched
        prog, vals, leaves = b._prepare(tuple(inputs), {})
        flat, slot, seen = [], [], {}           # a tensor at several inputs (tied weights) is one input
        for v in vals:
            j = seen.setdefault(id(v), len(flat))
            if j == len(flat):
                flat.append(v)
            slot.append(j)
        slot = tuple(slot)
        grad_on = tuple(isinstance(v, torch.Tensor) and v.requires_grad for v in flat)
        hit = self._pidx.get((id(prog), slot, grad_on))  # holds prog: its id is not reused for another program
        if hit is None:                                   # (requires_grad_ changes which parameters train)
            hit = self._pidx[(id(prog), slot, grad_on)] = (prog, self._trained(prog, vals, flat, slot, target))
        pidx = hit[1]
        params = [flat[i] for i in pidx]
        if self.per_model:
            tail, okey, update = self._per_model_update(params)
        else:
            tail, okey, update = self._torch_update(params)
        max_norm = self._max_norm(b.n)
        if max_norm is not None:
            tail = tail + [max_norm.to(params[0].device)]
        flat = flat + tail + tt
        key = (id(prog), slot, tuple(pidx), self.per_model, okey, max_norm is not None, tkey)
        fn = self.compiled.get(key)
        if fn is None:
            t0 = time.perf_counter()
            example = [v.detach() if isinstance(v, torch.Tensor) else v for v in flat]
            fn = self.compiled[key] = self._compile(prog, slot, pidx, example, len(tail), update,
                                                    max_norm is not None, (tleaves, tspec))
            self.times["compile_s"] = self.times.get("compile_s", 0.0) + time.perf_counter() - t0
        with torch.no_grad():
            res = fn(*flat)
        self._last = fn
        self.opt._opt_called = True        # what torch's LR schedulers check (their wrapper of opt.step sets it)
        if max_norm is not None:
            self.last_grad_norms, res = res[-1], res[:-1]
        if prog.captured.outputs and any(k != "user" for k, _ in prog.captured.outputs):
            b._outputs(prog, res[:-1], leaves)         # batch-norm buffers, mutated inputs
        return res[-1]

    def _trained(self, prog, vals, flat, slot, target):
        """Indices into ``flat`` of the parameters the step updates: every trainable parameter once (a
        tied one is one tensor, its gradient the sum over its uses) that the optimizer holds (a torch.optim
        one may hold some only), less those the loss does not depend on. Autograd decides that, on fake
        tensors, as in the normal loop, where such a parameter keeps grad None and the optimizer skips it
        (no update, no state, no weight decay)."""
        from torch._subclasses.fake_tensor import FakeTensorMode
        cand = sorted({slot[i] for i, (k, _) in enumerate(prog.captured.inputs)
                       if k == "param" and vals[i].requires_grad})
        if not cand:
            raise InvalidInputError("mbcompile.train_step: the batched module has no parameter that requires grad")
        if not self.per_model:                 # as opt.step() in the normal loop: only the optimizer's parameters
            mine = {id(p) for g in self.opt.param_groups for p in g["params"]}
            cand = [i for i in cand if id(flat[i]) in mine]
            if not cand:
                raise InvalidInputError("mbcompile.train_step: the optimizer holds no trainable parameter of the "
                                        "batched module")
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in flat]
            ftarget = torch.utils._pytree.tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor)
                                                   else t, target)
            grads = _forward_backward(prog, prog.gm, self.loss_fn, self.loss_kwargs, fake, slot, cand, ftarget)[2]
        pidx = [i for i, g in zip(cand, grads) if g is not None]
        if not pidx:
            raise InvalidInputError("mbcompile.train_step: the loss depends on no parameter that requires grad")
        if self.per_model:
            mine = {id(p) for p in self.opt._params}
            if any(id(flat[i]) not in mine for i in pidx):
                raise InvalidInputError("mbcompile.train_step: the optimizer does not hold every trainable "
                                        "parameter of the batched module; several optimizers over parts of it "
                                        "(params=) train in the normal loop, each with its own opt.step()")
        return pidx

    def _compile(self, prog, slot, pidx, flat, n_tail, update, clip, target_tree):
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner
        from .batching import _trace
        tleaves, tspec = target_tree
        n_t = sum(isinstance(t, torch.Tensor) for t in tleaves)
        nv = len(flat) - n_tail - n_t

        def target_of(a):                            # the target's tensors are the last n_t inputs
            it = iter(a[len(a) - n_t:])
            return torch.utils._pytree.tree_unflatten(
                [next(it) if isinstance(t, torch.Tensor) else t for t in tleaves], tspec)
        loss_fn, kw, gm = self.loss_fn, self.loss_kwargs, prog.gm
        from . import chunking
        k = chunking.compiled_chunk(prog, self.batched.n, [flat[s] for s in slot])
        if k is not None:                            # big CPU program: chunks, as the eager chooser measured
            gm = chunking.traced(prog, self.batched.n, k, [flat[s] for s in slot], [])
            self.times["chunks"] = max(k, 1)
        gm = _with_passes(gm)

        where = {t: j for j, (k, t) in enumerate(prog.captured.inputs) if k == "param"}
        muts = [(k, where[t]) for k, (kind, t) in enumerate(prog.captured.outputs) if kind == "param"]

        def joint(*a):
            tail = a[nv:nv + n_tail]
            outs, losses, grads = _forward_backward(prog, gm, loss_fn, kw, a[:nv], slot, pidx, target_of(a))
            extra = []
            if clip:
                tail, max_norm = tail[:-1], tail[-1]
                grads, norms = _clip_grad_norm(list(grads), max_norm)
                extra.append(norms)
            outs = list(outs)
            for k, j in muts:                        # forward renormalised a parameter in place (embedding
                a[slot[j]].copy_(outs[k].detach())   # max_norm): the update applies to that, as in eager
            new = []
            if update is not None:
                ps = [a[i] for i in pidx] if UPDATE_IN_GRAPH else [a[i].clone() for i in pidx]
                update(ps, list(grads), tail)
                new = [] if UPDATE_IN_GRAPH else [p.detach() for p in ps]
            for k, j in muts:
                outs[k] = a[slot[j]]
            return [o.detach() for o in outs] + [losses.detach()] + extra + new

        traced = _trace(joint, flat)
        STATS["backend_calls"] += 1
        with torch._functorch.config.patch(enable_autograd_cache=False), fixed_kernels():
            cpu = all(v.device.type == "cpu" for v in flat if isinstance(v, torch.Tensor))
            fn = compile_fx(traced, flat, inner_compile=_counting_inner(compile_fx_inner),
                            decompositions=_decompositions(cpu, joint=True))
        written = written_inputs(traced)
        if update is not None and not UPDATE_IN_GRAPH:
            fn, written = _copied_in(fn, pidx), written | frozenset(pidx)
        return GraphedStep(fn, graph_unsafe(traced, flat), written)   # CUDA: a graph replay


def _copied_in(fn, pidx):
    """``fn``, whose last len(pidx) results are the new values of its inputs at pidx, writing them
    there (inside a CUDA graph's capture too) and returning the other results."""
    k = len(pidx)

    def step(*flat):
        res = fn(*flat)
        torch._foreach_copy_([flat[i] for i in pidx], list(res[-k:]))
        return res[:-k]
    return step


def _forward_backward(prog, gm, loss_fn, kw, a, slot, pidx, target):
    """The batched forward ``gm`` (its inputs ``a[s] for s in slot``), the per-model losses and the
    gradients of the parameters ``a[i]``, i in ``pidx`` (None where the loss does not depend on one)."""
    from .loss import loss as per_model_loss
    with torch.enable_grad():
        a = list(a)
        ps = [a[i].detach().requires_grad_() for i in pidx]
        for i, p in zip(pidx, ps):
            a[i] = p
        outs = gm(*[a[s] for s in slot])
        user = [o for (k, _), o in zip(prog.captured.outputs, outs) if k == "user"]
        out = torch.utils._pytree.tree_unflatten(user, prog.captured.out_spec)   # as batched(x) returns it
        losses = per_model_loss(loss_fn, out, target, **kw)
        return outs, losses, torch.autograd.grad(losses.sum(), ps, allow_unused=True)


def _clip_grad_norm(grads, max_norm):
    """Per-model gradient-norm clipping with ``mbcompile.clip_grad_norm_``'s arithmetic (norm 2):
    returns the clipped gradients and the [n] norms before clipping."""
    from .clip import total_norms
    n = grads[0].shape[0]
    total = total_norms(grads, n)
    coef = torch.clamp((total + 1e-6).reciprocal() * max_norm.to(total.dtype), max=1.0)
    return [g * coef.to(g.dtype).view(n, *([1] * (g.dim() - 1))) for g in grads], total


def _update(kind, flags, first, params, grads, opt_t, hp, where):
    """The optimizer update, in place on params and state, with torch.optim's single-tensor formulas
    (scalars arrive as float64 tensors: ``hp[where[k]]`` is parameter k's row)."""
    if kind == "SGD":
        lr, momentum, dampening, wd = hp[0, 0], hp[0, 1], hp[0, 2], hp[0, 3]
        has_m, nesterov, has_wd = flags
        for k, (p, g) in enumerate(zip(params, grads)):
            d = g + wd.to(g.dtype) * p if has_wd else g
            if has_m:
                buf = opt_t[k]
                new = d if first[k] else buf * momentum.to(g.dtype) + (1 - dampening).to(g.dtype) * d
                buf.copy_(new)
                d = d + momentum.to(g.dtype) * new if nesterov else new
            p.sub_((lr.to(g.dtype)) * d)
        return
    lr, b1, b2, eps, wd = hp[0, 0], hp[0, 1], hp[0, 2], hp[0, 3], hp[0, 4]
    has_wd, decoupled = flags
    if not params:
        return
    dt = params[0].dtype
    for k in range(len(params)):                   # each parameter's own step count
        opt_t[3 * k].copy_(opt_t[3 * k] + 1)
    one_m_b1, b2_, one_m_b2, eps_, wd_, decay = ((1 - b1).to(dt), b2.to(dt), (1 - b2).to(dt), eps.to(dt),
                                                 wd.to(dt), (1 - lr * wd).to(dt))
    for k, (p, g) in enumerate(zip(params, grads)):
        # computed outside the graph (hp[:, 5:]): Inductor would inline pow/sqrt into every vector iteration
        step_size, bc2_sqrt = hp[where[k], 5].to(dt), hp[where[k], 6].to(dt)
        m, v = opt_t[3 * k + 1], opt_t[3 * k + 2]
        if decoupled:
            p.mul_(decay)
        elif has_wd:
            g = g + wd_ * p
        m.lerp_(g, one_m_b1)
        v.mul_(b2_).addcmul_(g, g * one_m_b2)
        p.sub_(step_size * (m / (v.sqrt() / bc2_sqrt + eps_)))


def train_step(batched, loss_fn, optimizer, *, max_grad_norm=None, path=None, **loss_kwargs):
    """One compiled program per training step: see :class:`TrainStep`."""
    return TrainStep(batched, loss_fn, optimizer, max_grad_norm=max_grad_norm, path=path, **loss_kwargs)
