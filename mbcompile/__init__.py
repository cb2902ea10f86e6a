"""mbcompile: train N independent copies of a PyTorch model as one compiled program."""
from . import ops  # noqa: F401  (registers the mbcompile:: custom ops)
from .errors import CaptureError, MBCompileError, UnsupportedOpError
from .batching import BatchedModule, batch
from .loss import loss
from .explain import explain

__all__ = ["batch", "BatchedModule", "loss", "explain", "MBCompileError", "CaptureError",
           "UnsupportedOpError"]
__version__ = "0.1.0"
