"""mbcompile: train N independent copies of a PyTorch model as one compiled program."""
from . import ops  # noqa: F401  (registers the mbcompile:: custom ops)
from . import backend  # noqa: F401  (registers the "mbcompile" torch.compile backend)
from .backend import train_step
from .errors import (CaptureError, InvalidInputError, InvalidTypeError, MBCompileError, NotFoundError,
                     NotSupportedError, OutOfRangeError, StateError, UnsupportedOpError)
from .batching import BatchedModule, batch
from .loss import loss
from .explain import explain
from .optim import optimizer, shrink_
from .amp import GradScaler
from .clip import clip_grad_norm_, clip_grad_value_
from . import callbacks, data  # noqa: F401
from .fit import fit
from .history import History
from .callbacks import Callback, Checkpoint, EarlyStopping, LRLogger, NaNGuard
from .checkpoint import CheckpointError, export_model

__all__ = ["batch", "BatchedModule", "loss", "explain", "train_step", "optimizer", "shrink_", "GradScaler",
           "clip_grad_norm_", "clip_grad_value_", "fit", "History", "Callback", "Checkpoint", "EarlyStopping",
           "LRLogger", "NaNGuard", "CheckpointError", "export_model", "MBCompileError", "CaptureError",
           "UnsupportedOpError",
           "InvalidInputError", "InvalidTypeError", "OutOfRangeError", "NotFoundError", "StateError",
           "NotSupportedError"]
__version__ = "0.1.0"
