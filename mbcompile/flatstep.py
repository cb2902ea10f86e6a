"""Eager optimizer steps over many parameters at once.

An eager ``BatchedOptimizer.step`` runs its rule once per parameter: 10-25 small ops each. On a GPU each
op is a kernel launch, on a CPU a few microseconds of dispatch, more than the arithmetic of a small
parameter. Here the parameters that share their per-model scalars (equal ``sc`` dicts), dtype, device and
state keys are updated as one: their state lives in one ``[n, total]`` buffer per key (each parameter's
state entry is a view of its columns), parameters and gradients are gathered by one ``cat`` each, the
rule runs once, and the parameters are written back. The rules are elementwise, so every element sees
the same ops and the same scalars as in the per-parameter step.

Costs: three passes over the chunk's parameters (gather p, gather g, write p back), so only parameters
of at most ``MAX_NUMEL`` elements (``n * numel``) take part: there the dispatch (CPU) or the kernel
launches (CUDA) saved are worth more than the passes. Larger ones keep the per-parameter step.
``MBCOMPILE_FLAT_STEP=0`` turns it off, ``=1`` sends every parameter through it (tests).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

# n * numel of a parameter that joins a chunk: up to about what one pass over it costs against the
# dispatch (CPU) or kernel launches (CUDA: ~5 us, ~15 MB at 3 TB/s) that joining saves
MAX_NUMEL = {"cpu": 1 << 16, "cuda": 1 << 22}
CHUNK_NUMEL = {"cpu": 1 << 20, "cuda": 1 << 24}   # n * numel of one chunk (its scratch: 2 such buffers)


def _mode() -> str:
    return os.environ.get("MBCOMPILE_FLAT_STEP", "auto")


def _eligible(p: Tensor, mode: str) -> bool:
    if p.is_sparse or not p.is_floating_point() or p.dim() == 0:
        return False
    if mode == "1":
        return True
    return p.numel() <= MAX_NUMEL.get(p.device.type, 0)


def _frozen(v):
    """A hashable key equal for two scalars that the rule would use identically (floats bit for bit)."""
    if isinstance(v, float):
        return v.hex()
    if isinstance(v, (list, tuple)):
        return tuple(map(_frozen, v))
    if isinstance(v, (bool, int, str, type(None))):
        return (type(v).__name__, v)
    return ("id", id(v))                              # a tensor: only itself


def plan(todo: list, keys_of) -> tuple[list, list]:
    """Split ``todo`` ([(p, g, st, sc)]) into chunks to run as one and the rest (run per parameter).
    ``keys_of(st)`` gives the state keys ``rule.apply`` reads and writes."""
    mode = _mode()
    if mode == "0":
        return [], todo
    groups: dict = {}
    rest = []
    scs: dict = {}                                    # id -> sc; parameters often share one sc dict
    for item in todo:
        p, _, st, sc = item
        if not _eligible(p, mode):
            rest.append(item)
            continue
        keys = keys_of(st)
        if any(st[k].shape != p.shape for k in keys):
            rest.append(item)
            continue
        scs[id(sc)] = sc
        key = (id(sc), p.dtype, p.device, item[1].dtype, tuple((k, st[k].dtype, st[k].device) for k in keys))
        groups.setdefault(key, []).append(item)
    if len(scs) > 1:                                  # distinct dicts with equal values join (SGD's)
        frozen = {i: tuple(sorted((k, _frozen(v)) for k, v in sc.items())) for i, sc in scs.items()}
        merged: dict = {}
        for key, items in groups.items():
            merged.setdefault((frozen[key[0]],) + key[1:], []).extend(items)
        groups = merged
    chunks = []
    for (_, _, dev, _, _), items in groups.items():
        cap = CHUNK_NUMEL.get(dev.type, CHUNK_NUMEL["cpu"]) if mode != "1" else 1 << 62
        cur, size = [], 0
        for it in items:
            if cur and size + it[0].numel() > cap:
                chunks.append(cur)
                cur, size = [], 0
            cur.append(it)
            size += it[0].numel()
        if cur:
            chunks.append(cur)
    for ch in [c for c in chunks if len(c) < 2]:      # one parameter: nothing to gain
        chunks.remove(ch)
        rest += ch
    return chunks, rest


class Flat:
    """The device state of some parameters as one ``[n, total]`` buffer per key; each parameter's
    ``st[key]`` is a view of its columns (``[n, a:b] -> p.shape``)."""

    def __init__(self, params: list, sts: list, keys: tuple, n: int):
        self.pids = tuple(map(id, params))
        self.keys = keys
        self.spans, a = [], 0
        for p in params:
            b = a + p.numel() // n
            self.spans.append((a, b))
            a = b
        self.bufs = {k: torch.cat([st[k].reshape(n, -1) for st in sts], dim=1) for k in keys}
        self.views = []
        for p, st, (a, b) in zip(params, sts, self.spans):
            for k in keys:
                st[k] = self.bufs[k][:, a:b].view(p.shape)
            self.views.append(tuple(st[k] for k in keys))

    def valid(self, sts: list) -> bool:
        return all(st.get(k) is v for st, vs in zip(sts, self.views) for k, v in zip(self.keys, vs))

    def view_ids(self) -> set:
        return {id(v) for vs in self.views for v in vs}


def _scratch(ws: dict, slot: str, n: int, total: int, like: Tensor) -> Tensor:
    key = ("flat_" + slot, like.dtype, like.device)
    buf = ws.get(key)
    if buf is None or buf.numel() < n * total:
        buf = ws[key] = torch.empty(n * total, dtype=like.dtype, device=like.device)
    return buf[:n * total].view(n, total)


def run(opt, c, chunk: list, keys_of) -> None:
    """One rule application over a chunk of ``(p, g, st, sc)`` from :func:`plan`."""
    n = opt.n
    params = [it[0] for it in chunk]
    sts = [it[2] for it in chunk]
    keys = keys_of(sts[0])
    recs, owner = opt.__dict__.setdefault("_flat", {}), opt.__dict__.setdefault("_flat_owner", {})
    fkey = (tuple(map(id, params)), keys)
    rec = recs.get(fkey)
    if rec is None or not rec.valid(sts):
        for pid in fkey[0]:                        # records that held these parameters are stale now
            old = owner.pop(pid, None)
            if old is not None:
                recs.pop(old, None)
        rec = recs[fkey] = Flat(params, sts, keys, n)
        for pid in fkey[0]:
            owner[pid] = fkey
    total = rec.spans[-1][1]
    p0 = params[0]
    fp = torch.cat([p.reshape(n, -1) for p in params], dim=1, out=_scratch(opt._workspace, "p", n, total, p0))
    g0 = chunk[0][1]
    fg = torch.cat([it[1].reshape(n, -1) for it in chunk], dim=1, out=_scratch(opt._workspace, "g", n, total, g0))
    opt._rule.apply(c, fp, fg, rec.bufs, chunk[0][3])
    torch._foreach_copy_(params, [fp[:, a:b].view(p.shape) for p, (a, b) in zip(params, rec.spans)])


def unflatten(opt) -> None:
    """Give every state entry its own storage again (in its parameter's memory format) and stop
    flattening: compiled steps take the state tensors as graph inputs, which must not alias."""
    opt.__dict__["_flat_off"] = True
    ids = flat_view_ids(opt)
    if not ids:
        return
    for p, st in opt.state.items():
        for k, v in list(st.items()):
            if id(v) in ids:
                st[k] = torch.empty_like(p, memory_format=torch.preserve_format).copy_(v) \
                    if v.shape == p.shape else v.clone()
    opt.__dict__["_flat"].clear()
    opt.__dict__.get("_flat_owner", {}).clear()


def flat_view_ids(opt) -> set:
    recs = opt.__dict__.get("_flat") or {}
    return set().union(*(r.view_ids() for r in recs.values())) if recs else set()
