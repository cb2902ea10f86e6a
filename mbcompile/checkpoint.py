"""Checkpoints of a whole run, written atomically and readable with ``torch.load(weights_only=True)``.

A run checkpoint is a dict of tensors, dicts, lists, numbers and strings only::

    {"format": "mbcompile-run", "version": 1,
     "n": total models, "active": [original index of each model in the batch], "frozen": [...],
     "model": batched.state_dict(), "rng": batched.get_rng_state(),
     "optimizer": ..., "scaler": ..., "schedulers": [...], "callbacks": [...],
     "epoch": e, "step": global step, "step_in_epoch": k, "history": History.state_dict(),
     "retired": {i: state_dict of a model removed from the batch}, "retired_consts": {i: its Dropout.p, ...},
     "torch_rng": ..., ...}

``fit(..., resume=path)`` restores all of it and continues exactly where the run stopped.
"""
from __future__ import annotations

import os
import re
import stat
import tempfile
import zipfile

import torch

from .errors import MBCompileError

FORMAT, VERSION = "mbcompile-run", 1


class CheckpointError(MBCompileError):
    """A checkpoint file cannot be read (truncated, corrupt, not an mbcompile checkpoint) or does not
    fit the run it is loaded into."""


def _umask() -> int:
    try:                                         # Linux: read it without changing it (thread-safe)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def atomic_save(obj, path):
    """``torch.save(obj, path)`` through a temporary file in the same directory and ``os.replace``, so
    ``path`` always holds either the previous complete file or the new complete file. The file gets the
    mode a plain ``open(path, "wb")`` would give it: an existing file's, else ``0o666 & ~umask`` (not
    ``mkstemp``'s 0600)."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _damaged(path):
    """The first archive member whose CRC-32 does not match its bytes, else None (one more read of
    the file; a file torch.load read that is no zip archive has nothing to check)."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip()
    except zipfile.BadZipFile:
        return None


def load(path, map_location=None) -> dict:
    """Load a run checkpoint with ``weights_only=True``; any failure is a :class:`CheckpointError`
    that names the file and says what to do."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    size = os.path.getsize(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - every reader error means the same thing to the user
        why = re.sub(r"\x1b\[[0-9;]*m", "", (str(e).strip().splitlines() or [""])[0])[:200]
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found and zipfile.is_zipfile(path) and _damaged(path) is None:
            raise CheckpointError(
                f"{path!r} is not an mbcompile run checkpoint: it holds a pickled Python object ({found.group(1)}; "
                f"e.g. a whole module saved with torch.save(module)), which a checkpoint never does and "
                f"weights_only=True refuses to unpickle. Resume from a file fit's Checkpoint wrote; to read this "
                f"one, use torch.load(path, weights_only=False) on a file you trust.") from e
        raise CheckpointError(
            f"cannot read checkpoint {path!r} ({size} bytes): {type(e).__name__}{': ' + why if why else ''}. "
            f"The file is truncated or corrupt (mbcompile writes checkpoints atomically, so it was damaged "
            f"after writing or written by something else). Delete it and resume from an earlier checkpoint, "
            f"or start the run again.") from e
    bad = _damaged(path)
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {path!r} is damaged: the bytes of {bad!r} do not match the CRC-32 stored with them "
            f"(torch.load does not check it). It changed after it was written; delete it and resume from an "
            f"earlier checkpoint, or start the run again.")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not an mbcompile run checkpoint (no 'format': {FORMAT!r} entry); "
                              f"to load a plain state_dict use torch.load / module.load_state_dict")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path!r} was written by a newer mbcompile (checkpoint version "
                              f"{state.get('version')} > {VERSION}); upgrade mbcompile to resume it")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lacks {', '.join(repr(k) for k in missing)}: a run checkpoint holds "
                              f"all of {', '.join(REQUIRED)}. It was not written whole by fit's Checkpoint "
                              f"(edited, or written by another tool); resume from another checkpoint")
    return state


# what fit's Run.state_dict always writes (and restore reads); nothing is changed before this is checked
REQUIRED = ("n", "active", "frozen", "model", "rng", "optimizer", "scaler", "schedulers", "callbacks", "epoch",
            "step", "step_in_epoch", "acc", "history", "retired", "torch_rng", "epoch_rng", "loader_rng")


def export_model(source, i, path, *, module: bool = False):
    """Save model ``i`` of a batch as a plain ``state_dict`` file (or, with ``module=True``, the whole
    module of the original class, as ``torch.save(module)``), atomically.

    ``source`` is a :class:`~mbcompile.BatchedModule` (``i`` is the position in the batch) or the
    :class:`~mbcompile.History` returned by ``fit`` (``i`` is the original model index or ``"best"``,
    and models removed from the batch by early stopping are still available). Returns the module."""
    from .history import History
    if isinstance(source, History):
        m = source.model(i)
    else:
        m = source.unbatch(int(i))
    atomic_save(m if module else m.state_dict(), path)
    return m


# ---- lowering choices -------------------------------------------------------------------------------
# Where a rule picks between equivalent lowerings by timing them (mbcompile.lowering, the RNN rule),
# two processes may pick differently and round differently. A checkpoint carries the choices of the
# process that wrote it, so the resumed run continues with the very kernels the original run used.
def _plain_key(k):
    if isinstance(k, tuple):
        return all(_plain_key(v) for v in k)
    return k is None or isinstance(k, (bool, int, float, str, torch.dtype))


def lowering_choices() -> dict:
    out = {}
    try:
        from . import lowering
        out["lowering"] = [(k, v.name) for k, v in getattr(lowering, "_CACHE", {}).items()
                           if _plain_key(k) and isinstance(getattr(v, "name", None), str)]
    except ImportError:  # pragma: no cover
        pass
    return out


def restore_lowering_choices(state: dict):
    if not state:
        return
    try:
        from . import lowering
        cache, choice = getattr(lowering, "_CACHE", None), getattr(lowering, "Choice", None)
        if cache is not None and choice is not None:
            for k, name in state.get("lowering", []):
                cache[k] = choice(name, "restored from a checkpoint")
    except ImportError:  # pragma: no cover
        pass


def check_fits(state: dict, path, n_total: int, batched_n: int):
    if state["n"] != n_total:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} holds a run of {state['n']} models but this "
                              f"batch has {n_total}; resume with the same mbcompile.batch(..., n={state['n']})")
    if batched_n != n_total:
        raise CheckpointError(f"resume needs the full, unshrunk batch of {n_total} models (this one has "
                              f"{batched_n}); build it exactly as for the original run")
