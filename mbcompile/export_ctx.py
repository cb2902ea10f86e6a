"""What capture changes while torch.export traces forward, each undone afterwards: cumulative batch norm
as a tensor, causal-mask detection off, plain dataclass outputs registered, and a record of what gives
gradients of its own (a custom autograd.Function, Tensor.register_hook), which capture then refuses."""
from __future__ import annotations

import contextlib
import sys
import traceback
import types

import torch
from torch.utils import _pytree as pytree


@contextlib.contextmanager
def _cumulative_batch_norm(model):
    """BatchNorm with momentum=None averages with 1/float(num_batches_tracked), a data-dependent Python
    float; during capture such layers (in training) compute the factor as a tensor instead."""
    patched = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
               and m.momentum is None and m.training and m.track_running_stats]
    for m in patched:
        m.forward = types.MethodType(_bn_cumulative_forward, m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _bn_cumulative_forward(self, x):
    self._check_input_dim(x)
    self.num_batches_tracked.add_(1)
    f = 1.0 / self.num_batches_tracked.to(x.dtype)             # the cumulative-average factor
    dims = [0] + list(range(2, x.dim()))
    mean, var = x.mean(dims), x.var(dims, correction=1)        # running_var uses the unbiased variance
    with torch.no_grad():
        self.running_mean.mul_(1 - f).add_(mean.detach() * f)
        self.running_var.mul_(1 - f).add_(var.detach() * f)
    return torch.nn.functional.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


def _user_line():
    for fr in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in fr.filename and "/mbcompile/" not in fr.filename:
            return f"{fr.filename}:{fr.lineno}: {fr.line}"
    return "(see the traceback)"


@contextlib.contextmanager
def _gradient_changers():
    """Record what gives gradients of its own, which a captured graph cannot keep: a user-defined
    torch.autograd.Function (its backward) and Tensor.register_hook inside forward."""
    seen = []
    fn_apply, hook = torch.autograd.Function.__dict__["apply"], torch.Tensor.register_hook

    def apply(cls, *args, **kwargs):
        if cls.__module__ == "torch.utils.checkpoint" and cls.__name__ == "CheckpointFunction":
            # checkpoint(fn, *args, use_reentrant=True) runs fn under no_grad and recomputes it in its
            # backward: traced so, the graph would hold fn's ops as constants. Capture fn itself (the
            # batched program then keeps fn's activations, as without checkpointing)
            fn, _preserve_rng, *fn_args = args
            if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in fn_args):
                with torch.no_grad():        # as torch: no input needs grad, so fn's parameters get none
                    return fn(*fn_args)
            return fn(*fn_args)
        if not cls.__module__.startswith("torch."):          # torch's own (checkpoint) differentiate alike
            seen.append(f"applies the custom torch.autograd.Function {cls.__qualname__} at {_user_line()}, "
                        f"whose backward defines its gradients")
        return fn_apply.__func__(cls, *args, **kwargs)

    def register_hook(self, fn):
        if "/torch/" not in sys._getframe(1).f_code.co_filename:
            seen.append(f"registers a gradient hook (Tensor.register_hook) at {_user_line()}")
        return hook(self, fn)

    torch.autograd.Function.apply, torch.Tensor.register_hook = classmethod(apply), register_hook
    try:
        yield seen
    finally:
        torch.autograd.Function.apply, torch.Tensor.register_hook = fn_apply, hook


@contextlib.contextmanager
def _no_kv_cache(template):
    """A transformers decoder with ``config.use_cache`` returns a key/value cache object (DynamicCache),
    which is no tensor pytree; training never reads it. Capture with ``use_cache=False`` (the output's
    ``past_key_values`` is None); a call passing ``use_cache=True`` itself is still refused."""
    cfgs = {id(c): c for c in (getattr(m, "config", None) for m in template.modules())
            if getattr(c, "use_cache", False) is True}   # every submodule's (T5's stacks copy theirs)
    for c in cfgs.values():
        c.use_cache = False
    try:
        yield
    finally:
        for c in cfgs.values():
            c.use_cache = True


@contextlib.contextmanager
def _dataclass_outputs(template):
    """A plain @dataclass in the output (not registered with pytree) is registered as one when forward
    returns it, so that export can flatten it (as it does a transformers ModelOutput)."""
    import dataclasses

    def register(mod, args, out):
        for v in pytree.tree_flatten(out)[0]:
            if dataclasses.is_dataclass(v) and not isinstance(v, type) and type(v) not in pytree.SUPPORTED_NODES:
                pytree.register_dataclass(type(v))
                register(mod, args, v)

    handle = template.register_forward_hook(register)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _no_causal_mask_detection():
    """nn.Transformer{Encoder,Decoder} given a mask and no is_causal compare the mask with a causal one,
    ``bool((mask == causal).all())``, a data-dependent branch. is_causal is only a hint that the mask is
    causal: during capture the mask is used as it is (same result, no branch)."""
    tr = torch.nn.modules.transformer
    saved = tr._detect_is_causal_mask
    tr._detect_is_causal_mask = lambda mask, is_causal=None, size=None: is_causal is True
    try:
        yield
    finally:
        tr._detect_is_causal_mask = saved
