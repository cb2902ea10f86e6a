"""Every error mbcompile raises derives from MBCompileError."""


class MBCompileError(Exception):
    """Base class of mbcompile's errors."""


class CaptureError(MBCompileError):
    """The model's forward could not be captured as one graph (e.g. data-dependent control flow)."""


class UnsupportedOpError(MBCompileError):
    """An op has no batching rule and the fallback is off (``strict=True``)."""


def source_line(node) -> str:
    """The user's own source line that produced an FX node, as best the node's metadata knows it."""
    trace = (getattr(node, "meta", None) or {}).get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    for i in range(len(lines) - 2, -1, -1):  # innermost frame outside torch itself
        if lines[i].startswith("File ") and "/torch/" not in lines[i]:
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            return f"{lines[i]}: {code}".rstrip(": ")
    return lines[-2] + ": " + lines[-1] if len(lines) >= 2 else "(source unknown)"
