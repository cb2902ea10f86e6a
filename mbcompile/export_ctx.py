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

from .errors import CaptureError


@contextlib.contextmanager
def _cumulative_batch_norm(model):
    """BatchNorm with momentum=None averages with 1/float(num_batches_tracked), a data-dependent Python
    float; during capture such layers (in training) compute the factor as a tensor instead."""
    with _forward_of([m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                      and m.momentum is None and m.training and m.track_running_stats], _bn_cumulative_forward):
        yield


@contextlib.contextmanager
def _forward_of(modules, fn):
    """``fn`` as these modules' forward (an instance attribute), removed afterwards."""
    for m in modules:
        m.forward = types.MethodType(fn, m)
    try:
        yield
    finally:
        for m in modules:
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

    grad = torch.autograd.grad

    def autograd_grad(*args, **kwargs):
        if "/torch/" not in sys._getframe(1).f_code.co_filename:
            raise CaptureError(
                f"forward calls torch.autograd.grad at {_user_line()}: a gradient taken inside forward (a gradient "
                f"penalty, an input-gradient feature) cannot be captured into the batched graph. Take it outside "
                f"forward, on the batched output: pass the input per model (in_dims=0) with requires_grad=True and "
                f"call torch.autograd.grad(out.sum(), x, create_graph=True) in the loss; slice i is model i's gradient")
        return grad(*args, **kwargs)

    data = torch._C.TensorBase.__dict__["data"]

    def set_data(self, value):
        if "/torch/" not in sys._getframe(1).f_code.co_filename:
            raise CaptureError(
                f"forward assigns a tensor's .data at {_user_line()}: export does not follow the assignment, so "
                f"the batched module would never see the new value. Write it as an in-place copy under "
                f"torch.no_grad() (self.buf.copy_(new)), or assign the buffer itself (self.buf = new)")
        data.__set__(self, value)

    torch.autograd.Function.apply, torch.Tensor.register_hook = classmethod(apply), register_hook
    torch.autograd.grad = autograd_grad
    torch.Tensor.data = property(data.__get__, set_data)
    try:
        yield seen
    finally:
        torch.autograd.Function.apply, torch.Tensor.register_hook = fn_apply, hook
        torch.autograd.grad = grad
        del torch.Tensor.data


def _library_code(fn) -> bool:
    """A hook of torch (weight_norm, spectral_norm, prune: they set the weight forward reads), mbcompile
    or an installed package (transformers' enable_input_require_grads hook sets requires_grad on its
    output): the user's own hooks are what may store activations."""
    mod = getattr(fn, "__module__", None) or type(fn).__module__
    code = getattr(getattr(fn, "__func__", fn), "__code__", None) or getattr(type(fn).__call__, "__code__", None)
    path = code.co_filename if code is not None else ""
    return mod.startswith(("mbcompile", "torch.")) or "site-packages" in path or "dist-packages" in path


@contextlib.contextmanager
def _side_effect_hooks(template):
    """Record the forward (pre-)hooks that return None and set no module attribute while they run:
    they only have side effects (an activation appended to a list, a log line), which happen once,
    while capturing, on placeholder tensors, and never in the batched program's calls."""
    lost, setting = [], [0]
    setattr_ = torch.nn.Module.__setattr__

    def counting(self, name, value):
        setting[0] += 1
        setattr_(self, name, value)

    def wrap(hook, where):
        def run(*args, **kwargs):
            before = setting[0]
            out = hook(*args, **kwargs)
            if out is None and setting[0] == before:
                lost.append(f"{where}: {getattr(hook, '__qualname__', type(hook).__name__)}")
            return out
        return run

    saved = []
    for path, m in template.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks"):
            hooks = getattr(m, kind)
            for k, h in list(hooks.items()):
                if not _library_code(h):
                    saved.append((hooks, k, h))
                    hooks[k] = wrap(h, path or type(template).__name__)
    torch.nn.Module.__setattr__ = counting
    try:
        yield lost
    finally:
        torch.nn.Module.__setattr__ = setattr_
        for hooks, k, h in saved:
            hooks[k] = h


@contextlib.contextmanager
def _nested_encoder_padding(template):
    """nn.TransformerEncoder in eval mode with a src_key_padding_mask runs, eagerly and without grad, a
    nested-tensor fast path that returns 0 at every padded position; traced, it runs the regular path
    (other values there, the same elsewhere). While capturing, such encoders zero their padded positions
    where eager's fast path would (its conditions, the mask's left alignment as a tensor predicate)."""
    with _forward_of([m for m in template.modules() if isinstance(m, torch.nn.TransformerEncoder)], _encoder_forward):
        yield


def _encoder_forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
    out = torch.nn.TransformerEncoder.forward(self, src, mask=mask, src_key_padding_mask=src_key_padding_mask,
                                              is_causal=is_causal)
    first = self.layers[0]
    if not (torch.backends.mha.get_fastpath_enabled() and getattr(self, "use_nested_tensor", False)
            and not first.training and src.dim() == 3 and src_key_padding_mask is not None and mask is None
            and not torch.is_autocast_enabled() and not out.is_nested
            and not (torch.is_grad_enabled() and (src.requires_grad or any(p.requires_grad for p in first.parameters())))):
        return out
    pad = src_key_padding_mask if src_key_padding_mask.dtype == torch.bool else src_key_padding_mask != 0  # B,S
    keep = ~pad
    zero = pad.unsqueeze(-1) if first.self_attn.batch_first else pad.t().unsqueeze(-1)   # B,S,1 / S,B,1
    if getattr(self, "mask_check", True):      # fast path only when every row's kept tokens come first
        aligned = ~(keep[:, 1:] & ~keep[:, :-1]).any()
        zero = zero & aligned
    return out.masked_fill(zero, 0.0)


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
