"""Callbacks for ``mbcompile.fit``. They see per-model values as ``[n]`` float64 tensors indexed by the
model's original position (nan for a model that is no longer training) and act on models through
``run.stop(models, action, reason)``: ``"drop"`` removes them from the batch (``mbcompile.shrink_``,
so they stop costing compute; their final weights stay available through the history) and
``"freeze"`` keeps them in the batch with weights and optimizer state unchanged.

Hooks, in the order ``fit`` calls them::

    on_fit_start(run)
      on_epoch_start(run)
        on_step_end(run, logs)     # logs: {"loss": [n], "samples": [n]} after the optimizer step
        after_step(run)            # the step is complete (counters advanced): a consistent state
      on_epoch_end(run, logs)      # logs: {"loss", "val_loss", "val_<metric>", ...}; may add entries
      after_epoch(run)             # history row logged, epoch schedulers stepped: a consistent state
    on_fit_end(run)

A callback with state that must survive a resume implements ``state_dict()`` / ``load_state_dict()``.
"""
from __future__ import annotations

import math
import os

import torch

from .history import default_mode
from .errors import InvalidInputError, NotFoundError


class Callback:
    def on_fit_start(self, run): ...
    def on_epoch_start(self, run): ...
    def on_step_end(self, run, logs): ...
    def after_step(self, run): ...
    def on_epoch_end(self, run, logs): ...
    def after_epoch(self, run): ...
    def on_fit_end(self, run): ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict):
        pass


class EarlyStopping(Callback):
    """Stop each model on its own when ``monitor`` has not improved by more than ``min_delta`` for
    ``patience`` epochs. ``action="drop"`` (default) removes stopped models from the batch, ``"freeze"``
    keeps them in place unchanged. Training ends when every model has stopped."""

    def __init__(self, monitor="val_loss", patience=5, min_delta=0.0, mode=None, action="drop",
                 start_epoch=0):
        if action not in ("drop", "freeze"):
            raise InvalidInputError(f"action must be 'drop' or 'freeze', got {action!r}")
        self.monitor, self.patience, self.min_delta = monitor, int(patience), float(min_delta)
        self.mode, self.action, self.start_epoch = mode or default_mode(monitor), action, int(start_epoch)
        self.best, self.wait = None, None

    def on_fit_start(self, run):
        if self.best is None:
            fill = math.inf if self.mode == "min" else -math.inf
            self.best = torch.full((run.n_total,), fill, dtype=torch.float64)
            self.wait = torch.zeros(run.n_total, dtype=torch.long)

    def on_epoch_end(self, run, logs):
        if self.monitor not in logs:
            raise NotFoundError(f"EarlyStopping monitors {self.monitor!r} but the epoch logged only "
                                f"{sorted(logs)}; pass val_data to fit or monitor 'loss'")
        v = logs[self.monitor].to(torch.float64)
        live = run.training_mask()
        better = (v < self.best - self.min_delta) if self.mode == "min" else (v > self.best + self.min_delta)
        better &= live & ~torch.isnan(v)
        self.best = torch.where(better, v, self.best)
        self.wait = torch.where(better, torch.zeros_like(self.wait), self.wait + live.long())
        if run.epoch + 1 <= self.start_epoch:
            return
        stop = live & (self.wait >= self.patience)
        if stop.any():
            run.stop(stop.nonzero().flatten().tolist(), self.action,
                     f"early stopped (epoch {run.epoch + 1})")

    def state_dict(self):
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state):
        self.best, self.wait = state["best"].clone(), state["wait"].clone()


class NaNGuard(Callback):
    """After every step, stop the models whose loss is nan or inf (``action="drop"`` or ``"freeze"``),
    so one diverged configuration neither wastes compute nor fills the table with nan."""

    def __init__(self, action="drop"):
        if action not in ("drop", "freeze"):
            raise InvalidInputError(f"action must be 'drop' or 'freeze', got {action!r}")
        self.action = action

    def on_step_end(self, run, logs):
        loss = logs["loss"]
        bad = run.training_mask() & (logs["samples"] > 0) & ~torch.isfinite(loss)
        if bad.any():
            run.stop(bad.nonzero().flatten().tolist(), self.action,
                     f"diverged (epoch {run.epoch + 1}, step {run.step})")


class LRLogger(Callback):
    """Log every model's learning rate: ``lr`` (the rate used during the epoch) in the history's epoch
    rows, and with ``every_step=True`` also the step rows."""

    def __init__(self, every_step=False):
        self.every_step = every_step
        self._lr = None

    def on_epoch_start(self, run):
        self._lr = run.lrs()

    def on_step_end(self, run, logs):
        if self.every_step:
            logs["lr"] = run.lrs()

    def on_epoch_end(self, run, logs):
        logs["lr"] = self._lr if self._lr is not None else run.lrs()

    def state_dict(self):                # the epoch's rates, for a run resumed within the epoch
        return {"lr": None if self._lr is None else torch.as_tensor(self._lr, dtype=torch.float64).clone()}

    def load_state_dict(self, state):
        lr = state.get("lr")
        self._lr = None if lr is None else lr.clone()


class Checkpoint(Callback):
    """Save the whole run to ``path`` (atomically) every ``every_steps`` optimizer steps and/or every
    ``every_epochs`` epochs, and at the end of fit. Pass ``fit(..., resume=True)`` to continue from
    ``path`` when it exists (the same script can be rerun after a crash or preemption)."""

    def __init__(self, path, every_steps=None, every_epochs=1, at_end=True):
        self.path = os.fspath(path)
        self.every_steps, self.every_epochs, self.at_end = every_steps, every_epochs, at_end
        self.saved = 0

    def save(self, run):
        run.save(self.path)
        self.saved += 1

    def after_step(self, run):
        if self.every_steps and run.step % self.every_steps == 0:
            self.save(run)

    def after_epoch(self, run):
        if self.every_epochs and run.epoch % self.every_epochs == 0:
            self.save(run)

    def on_fit_end(self, run):
        if self.at_end:
            self.save(run)


class Lambda(Callback):
    """A callback from plain functions: ``Lambda(on_step_end=lambda run, logs: ...)``."""

    def __init__(self, **hooks):
        for name, fn in hooks.items():
            if not hasattr(Callback, name):
                raise InvalidInputError(f"unknown hook {name!r}")
            setattr(self, name, fn)
