"""CUDA graphs for ``train_step``'s compiled program. On a GPU a small model's step is host-bound:
launching forward's, backward's and the update's kernels one by one takes longer than running them.
A captured graph launches them all at once.

The graph reads fixed addresses. Inputs the program writes (parameters, optimizer state) are read in
place, and so are those that were the same tensor (same object, same storage) in the last plain call
and in the captured one (cached masks, a batch tensor refilled in place). The others (a new batch, the
per-step optimizer scalars) are copied into static buffers before each replay. When an input read in
place changes (``p.data = ...``, a reloaded optimizer state), the step is captured again, after
warm-up calls; one the program only reads is then copied. Outputs are cloned: the graph's own are
overwritten by the next replay."""
from __future__ import annotations

import os

import torch

WARMUP = 2           # plain calls before a capture: lazy cuBLAS/Triton set-up happens outside the graph
MAX_CAPTURES = 4     # then replay no more: the inputs keep changing under the graph

# every mbcompile op is in one of these (tests/test_cudagraph.py checks): a new op must say which.
# PURE: device work only, safe to replay. HOST: reads or advances a generator state on the host.
_PURE = {"assigned", "relayout", "leaky_relu", "linear_bmm", "linear_loop", "linear_loop_backward", "conv_loop",
         "conv_loop_backward", "lstm_fused", "lstm_fused_backward"}
_HOST = {"draw", "draw_per_model", "dropout", "random_call", "random_call_per_model"}


def why_not(gm: torch.fx.GraphModule, inputs) -> str | None:
    """Why the traced step ``gm`` must not be replayed from a CUDA graph, or None when it may."""
    if os.environ.get("MBCOMPILE_CUDA_GRAPHS", "1") == "0":
        return "MBCOMPILE_CUDA_GRAPHS=0"
    if not all(isinstance(v, torch.Tensor) for v in inputs):
        return "an input is not a tensor"
    used = [bool(n.users) for n in gm.graph.nodes if n.op == "placeholder"]
    if not all(v.is_cuda for v, u in zip(inputs, used) if u):
        return "not every input is a CUDA tensor"
    return graph_reason(gm)


def graph_reason(gm: torch.fx.GraphModule) -> str | None:
    """What in ``gm`` a replay would get wrong: random ops (their generator state is read and advanced
    on the host at launch) and work on another device."""
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    for node in calls:
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            if torch.Tag.nondeterministic_seeded in t.tags or (t.namespace == "mbcompile" and t._opname not in _PURE):
                return f"random op {t} (its generator state is read on the host)"
        elif "rng" in getattr(t, "__name__", str(t)):
            return f"random op {t}"
    for node in calls:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.device.type != "cuda":
            return f"{node.name} is computed on {val.device}"
    return None


def written_inputs(gm: torch.fx.GraphModule) -> frozenset:
    """Positions of the inputs that ``gm`` writes in place, directly or through a view."""
    root = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    out = set()
    for node in gm.graph.nodes:
        t = node.target
        if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
            continue
        schema = t._schema
        given = list(zip(schema.arguments, node.args)) + [(a, node.kwargs[a.name]) for a in schema.arguments
                                                          if a.name in node.kwargs]
        for a, v in given:
            if a.alias_info is not None and a.alias_info.is_write and isinstance(v, torch.fx.Node) and v in root:
                out.add(root[v])
        first = node.args[0] if node.args else None
        if schema.returns and schema.returns[0].alias_info is not None and first in root:
            root[node] = root[first]            # a view (or the in-place op's own result) of that input
    return frozenset(out)


def _capture_cuda(fn, inputs):
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = fn(*inputs)
    return g, outs


class GraphedStep:
    """``step(*inputs)`` = ``fn(*inputs)``: plain calls first, then (unless ``reason`` says why not) one
    capture and a replay per call. ``written``: the input positions ``fn`` writes in place."""

    def __init__(self, fn, reason: str | None, written=frozenset()):
        self.fn, self.reason, self.written = fn, reason, frozenset(written)
        self.calls = self.captures = self.replays = 0
        self.prev = None              # the last plain call's inputs (held, so their ids stay theirs)
        self.copied: set = set()      # input positions the graph reads from static buffers
        self.graph = None

    @property
    def status(self) -> str:
        if self.graph is not None:
            return f"CUDA graph ({self.replays} replays, {self.captures} captures)"
        return f"no CUDA graph: {self.reason}" if self.reason else "CUDA graph: warming up"

    def __call__(self, *inputs):
        if self.graph is not None:
            if self._fits(inputs):
                for i in self.copied:
                    self.static[i].copy_(inputs[i])
                self.graph.replay()
                self.replays += 1
                return [o.clone() for o in self.outs]
            self.graph, self.static, self.outs, self.calls = None, None, None, 0
        if self.reason is not None:
            return self.fn(*inputs)
        self.calls += 1
        if self.calls <= WARMUP or self.prev is None:
            self.prev = [(v, v.data_ptr()) for v in inputs]
            return self.fn(*inputs)
        if self.captures >= MAX_CAPTURES:
            self.reason = f"the step's inputs changed under {MAX_CAPTURES} captured graphs"
            return self.fn(*inputs)
        self.copied |= {i for i, (v, (u, ptr)) in enumerate(zip(inputs, self.prev))
                        if (v is not u or v.data_ptr() != ptr) and i not in self.written}
        self.prev = None
        static = [v.clone() if i in self.copied else v for i, v in enumerate(inputs)]
        self.captures += 1
        try:
            graph, outs = _capture_cuda(self.fn, static)
        except Exception as e:   # noqa: BLE001 - an op that cannot be captured: plain calls from now on
            self.reason = f"capture failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            return self.fn(*inputs)
        self.graph, self.static, self.outs = graph, static, list(outs)
        self.ptrs = [v.data_ptr() for v in static]
        graph.replay()                  # capturing ran nothing: this is the call's step
        self.replays += 1
        return [o.clone() for o in self.outs]

    def _fits(self, inputs) -> bool:
        """Whether the captured graph computes ``fn(*inputs)``: in-place inputs are the same tensors
        on the same storage, copied ones have the static buffers' shape, strides and dtype. An
        in-place input that changed and that ``fn`` only reads is copied after the next capture."""
        st, ok = self.static, True
        for i, v in enumerate(inputs):
            s = st[i]
            if i in self.copied:
                if v.shape != s.shape or v.stride() != s.stride() or v.dtype != s.dtype or v.device != s.device:
                    return False
            elif v is not s or v.data_ptr() != self.ptrs[i]:
                if i not in self.written:
                    self.copied.add(i)
                ok = False
        return ok
