"""Every error mbcompile raises derives from MBCompileError."""


class MBCompileError(Exception):
    """Base class of mbcompile's errors."""


class CaptureError(MBCompileError):
    """The model's forward could not be captured as one graph (e.g. data-dependent control flow)."""


class UnsupportedOpError(MBCompileError):
    """An op has no batching rule and the fallback is off (``strict=True``)."""


class CaptureValueError(CaptureError, ValueError):
    """forward itself raised a ValueError while being captured (as it would alone, e.g. BatchNorm in train
    mode on one value per channel): still a ValueError for ``except ValueError``."""


class CaptureTypeError(CaptureError, TypeError):
    """forward itself raised a TypeError while being captured."""


# Bad input of the usual kinds: each is also the builtin exception a caller would expect.
class InvalidInputError(MBCompileError, ValueError):
    """A wrong value: sizes, mismatched models, options."""


class InvalidTypeError(MBCompileError, TypeError):
    """An argument of the wrong type."""


class OutOfRangeError(MBCompileError, IndexError):
    """A model index outside 0..n-1."""


class NotFoundError(MBCompileError, KeyError):
    """A name (metric, model) that is not there."""


class StateError(MBCompileError, RuntimeError):
    """A call at the wrong time or on the wrong state (as torch's RuntimeErrors for the same misuse)."""


class NotSupportedError(MBCompileError, NotImplementedError):
    """A documented limit (sparse gradients, ...)."""


def source_line(node) -> str:
    """The source line that produced an FX node: the innermost frame of the user's own code; inside a
    torch.nn layer, the layer's line and the user's call of it; never mbcompile's or torch's machinery."""
    meta = getattr(node, "meta", None) or {}
    trace = meta.get("stack_trace") or ""
    frames, lines = [], [ln.rstrip() for ln in trace.strip().splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        s = ln.strip()
        if s.startswith("File "):
            code = lines[i + 1].strip() if i + 1 < len(lines) and not lines[i + 1].strip().startswith("File ") else ""
            frames.append((s, code))

    def where(kind):
        for s, code in reversed(frames):
            path = s.split('"')[1] if '"' in s else s
            if ("/mbcompile/" in path and "/tests/" not in path) or path.startswith("<eval_with_key>"):
                continue                               # ours, or code FX generated (a cond's dynamo graph)
            is_torch = "/torch/" in path
            if kind == "user" and not is_torch:
                return f"{s}: {code}"
            if kind == "nn" and "/torch/nn/" in path:
                return f"{s}: {code}"
        return None

    user, lib = where("user"), where("nn")
    if frames and "/torch/nn/" in frames[-1][0] and lib:      # inside a torch.nn layer: it, and the user's call
        found = lib + (f"; called from {user}" if user else "")
    else:
        found = user or lib
    stack = meta.get("nn_module_stack") or {}
    mod = list(stack.values())[-1] if stack else None
    prefix = f"module {mod[0]!r} ({getattr(mod[1], '__name__', mod[1])}), " if mod else ""
    return prefix + (found or "source unknown")
