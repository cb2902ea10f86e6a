"""Test helper: a batched module for the optimizer / scaler / clipping tests.

``make_batched(models)`` uses ``mbcompile.batch`` when the package provides it and otherwise falls back to
:class:`Stacked`, a small stand-in with the same interface: ``named_parameters()`` yields the original
names, each parameter a leaf stacked to ``[n, *shape]``; ``batched(x)`` returns ``[n, B, ...]``;
``batched.n``; ``batched.unbatch(i)``; ``batched._shrink_(keep)``.  Set ``MBCOMPILE_TEST_STANDIN=1`` to
force the stand-in.
"""
from __future__ import annotations

import copy
import os

import pytest

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call


class Stacked(nn.Module):
    """n same-architecture models as one module with stacked parameters (vmap over functional_call)."""

    def __init__(self, models, in_dims=None):
        super().__init__()
        models = list(models)
        if not models:
            raise ValueError("need at least one model")
        self.n = len(models)
        self.in_dims = in_dims
        # the template is kept out of the module tree so that its own parameters are not listed
        object.__setattr__(self, "_template", copy.deepcopy(models[0]))
        named = dict(models[0].named_parameters())  # deduplicated: tied weights appear once
        self._param_names = list(named)
        for name, p0 in named.items():
            stacked = torch.stack([m.get_parameter(name).detach() for m in models]).clone()
            self._register(name, nn.Parameter(stacked, requires_grad=p0.requires_grad), buffer=False)
        self._buffer_names = [name for name, _ in models[0].named_buffers()]
        for name in self._buffer_names:
            stacked = torch.stack([m.get_buffer(name).detach() for m in models]).clone()
            self._register(name, stacked, buffer=True)

    def _owner(self, name, create=False):
        mod = self
        *path, leaf = name.split(".")
        for part in path:
            child = mod._modules.get(part)
            if child is None:
                if not create:
                    raise KeyError(name)
                child = nn.Module()
                mod.add_module(part, child)
            mod = child
        return mod, leaf

    def _register(self, name, value, buffer):
        mod, leaf = self._owner(name, create=True)
        if buffer:
            mod.register_buffer(leaf, value)
        else:
            mod.register_parameter(leaf, value)

    def _tensors(self):
        params = {name: self.get_parameter(name) for name in self._param_names}
        buffers = {name: self.get_buffer(name) for name in self._buffer_names}
        return params, buffers

    def forward(self, *args):
        params, buffers = self._tensors()
        tmpl = self._template
        tmpl.train(self.training)

        def one(p, b, *xs):
            return functional_call(tmpl, (p, b), xs)

        in_dims = self.in_dims
        if in_dims is None:
            arg_dims = (None,) * len(args)
        elif isinstance(in_dims, int):
            arg_dims = (in_dims,) * len(args)
        else:
            arg_dims = tuple(in_dims)
        return torch.vmap(one, in_dims=(0, 0, *arg_dims), randomness="different")(params, buffers, *args)

    def unbatch(self, i):
        m = copy.deepcopy(self._template)
        params, buffers = self._tensors()
        with torch.no_grad():
            for name, p in params.items():
                m.get_parameter(name).copy_(p[i])
            for name, b in buffers.items():
                m.get_buffer(name).copy_(b[i])
        return m

    @torch.no_grad()
    def _shrink_(self, keep):
        keep = [int(i) for i in keep]
        idx = torch.tensor(keep, dtype=torch.long)
        params, buffers = self._tensors()
        for p in params.values():
            p.data = p.data.index_select(0, idx.to(p.device))
            if p.grad is not None:
                p.grad = p.grad.index_select(0, idx.to(p.grad.device))
        for name, b in buffers.items():
            mod, leaf = self._owner(name)
            setattr(mod, leaf, b.index_select(0, idx.to(b.device)))
        self.n = len(keep)


def make_batched(models, in_dims=None):
    """mbcompile.batch(models) when it exists (and MBCOMPILE_TEST_STANDIN is not set), else Stacked."""
    if not os.environ.get("MBCOMPILE_TEST_STANDIN"):
        try:
            import mbcompile

            batch = getattr(mbcompile, "batch", None)
        except ImportError:  # pragma: no cover
            batch = None
        if batch is not None:
            return batch(models, in_dims=in_dims) if in_dims is not None else batch(models)
    return Stacked(models, in_dims=in_dims)


def per_model_loss(fn, out, target):
    """[n] losses: fn(out[i], target) for a shared target (what mbcompile.loss computes)."""
    return torch.vmap(fn, in_dims=(0, None))(out, target)


def cross_entropy_n(out, y):
    return per_model_loss(F.cross_entropy, out, y)


def step_together(batched, opt, refs, ropts, loss_fn, x, y):
    """One step of the batch (mbcompile.loss(...).sum()) and of each model alone with its own optimizer."""
    import mbcompile
    opt.zero_grad()
    mbcompile.loss(loss_fn, batched(x), y).sum().backward()
    opt.step()
    for r, o in zip(refs, ropts):
        o.zero_grad()
        loss_fn(r(x), y).backward()
        o.step()


def unbatched_params(batched, i):
    return dict(batched.unbatch(i).named_parameters())


class MLP(nn.Module):
    """The small model the optimizer tests train (6 -> 16 -> 3)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Tiny tensors: one intra-op thread is fastest and keeps these tests quick on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
