"""PyTorch Lightning: a LightningModule that trains an ``mbcompile.batch`` with automatic optimization.

:class:`BatchedLightningModule` wraps a batch and

* returns the sum of the ``[n]`` per-model losses from ``training_step`` (the sum keeps each model's
  gradient its own); Lightning calls ``optimizer.step(closure)`` on ``mbcompile.optimizer(...)``;
* clips each model's gradient norm on its own in ``configure_gradient_clipping`` (with ``max_grad_norm``,
  or ``Trainer(gradient_clip_val=...)``, which here means per model; ``"value"`` clips per model too);
* logs one column per model plus the mean: ``train_loss_3``, ``train_loss``, ``val_loss_3``, ``val_loss``.
  Columns are named by each model's original index (``model_ids``), which stays stable when models
  leave the batch.

:class:`PerModelEarlyStopping` drops a model from the batch (``mbcompile.shrink_``: its compute stops,
the optimizer and schedulers narrow with it) when its own monitored metric stops improving, and stops
training when none is left. :class:`PerModelCheckpoint` keeps each model's best weights as
``dirpath/model_{id}.pt`` (a ``state_dict`` of the original class).

    module = BatchedLightningModule(mbcompile.batch(net, n=8), F.cross_entropy, torch.optim.SGD,
                                    lr=[0.01 * 2**i for i in range(8)], momentum=0.9, max_grad_norm=1.0)
    trainer = L.Trainer(max_epochs=10, callbacks=[PerModelEarlyStopping("val_loss", patience=3),
                                                  PerModelCheckpoint(dirpath="ckpt", monitor="val_loss")])
    trainer.fit(module, train_loader, val_loader)
"""
from __future__ import annotations

import json
import math
import os

import torch

from ..batching import BatchedModule
from ..clip import clip_grad_norm_, clip_grad_value_
from ..loss import loss as per_model_loss
from ..optim import optimizer as batched_optimizer
from ..optim import shrink_
from ..errors import InvalidInputError, InvalidTypeError, NotSupportedError

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the older package name
    try:
        import pytorch_lightning as pl
    except ImportError as e:
        raise ImportError("mbcompile.integrations.lightning needs Lightning: pip install 'mbcompile[lightning]'") from e

__all__ = ["BatchedLightningModule", "PerModelEarlyStopping", "PerModelCheckpoint"]


class BatchedLightningModule(pl.LightningModule):
    """A LightningModule over ``batched`` (see the module docstring).

    ``loss_fn(out_i, target)`` is applied per model by ``mbcompile.loss`` to batches ``(x, y)``; override
    :meth:`losses` for other batch layouts. ``optim_cls`` / ``**hparams`` go to ``mbcompile.optimizer``
    (lists of length n are per model). ``scheduler``: ``None`` or ``fn(optimizer) -> LRScheduler`` (or a
    Lightning ``lr_scheduler`` dict). ``max_grad_norm``: float or per-model list, clipped per model.
    """

    def __init__(self, batched: BatchedModule, loss_fn=None, optim_cls=torch.optim.SGD, *, scheduler=None,
                 max_grad_norm=None, **hparams):
        super().__init__()
        if not isinstance(batched, BatchedModule):
            raise InvalidTypeError(f"BatchedLightningModule wraps an mbcompile.batch(...) module, got "
                                   f"{type(batched).__name__}")
        self.batched = batched
        self.loss_fn, self.optim_cls, self.hparams_per_model = loss_fn, optim_cls, hparams
        self.scheduler_fn, self.max_grad_norm = scheduler, max_grad_norm
        self.model_ids = list(range(batched.n))     # original index of each slot of the batch

    @property
    def n(self) -> int:
        return self.batched.n

    def forward(self, *args, **kwargs):
        return self.batched(*args, **kwargs)

    # ---- steps -----------------------------------------------------------------------------------
    def losses(self, batch):
        """The ``[n]`` per-model losses of one batch. Default: ``(x, y)`` and ``loss_fn``."""
        if self.loss_fn is None:
            raise NotSupportedError("give BatchedLightningModule a loss_fn or override losses(batch)")
        x, y = batch
        return per_model_loss(self.loss_fn, self(x), y)

    def training_step(self, batch, batch_idx):
        losses = self.losses(batch)
        self.log_per_model("train_loss", losses, batch, on_step=True, on_epoch=True)
        return losses.sum()

    def validation_step(self, batch, batch_idx):
        self.log_per_model("val_loss", self.losses(batch), batch, on_step=False, on_epoch=True)

    def test_step(self, batch, batch_idx):
        self.log_per_model("test_loss", self.losses(batch), batch, on_step=False, on_epoch=True)

    def log_per_model(self, name, values, batch=None, **kwargs):
        """``log_dict`` with one column ``{name}_{id}`` per model and ``{name}`` = their mean."""
        values = values.detach()
        if values.shape != (self.n,):
            raise InvalidInputError(f"{name}: expected one value per model, shape ({self.n},), got "
                                    f"{tuple(values.shape)}")
        if batch is not None and "batch_size" not in kwargs:
            leaf = batch[0] if isinstance(batch, (tuple, list)) else next(iter(batch.values())) \
                if isinstance(batch, dict) else batch
            if isinstance(leaf, torch.Tensor) and leaf.dim():
                kwargs["batch_size"] = leaf.shape[0]
        cols = {f"{name}_{mid}": v for mid, v in zip(self.model_ids, values)}
        cols[name] = values.mean()
        self.log_dict(cols, **kwargs)

    # ---- optimizer, clipping ---------------------------------------------------------------------
    def configure_optimizers(self):
        opt = batched_optimizer(self.batched, self.optim_cls, **self.hparams_per_model)
        if self.scheduler_fn is None:
            return opt
        sched = self.scheduler_fn(opt)
        return {"optimizer": opt, "lr_scheduler": sched if isinstance(sched, dict) else {"scheduler": sched}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        value = self.max_grad_norm if self.max_grad_norm is not None else gradient_clip_val
        if value is None or (not isinstance(value, (list, tuple, torch.Tensor)) and value <= 0):
            return
        if gradient_clip_algorithm == "value":
            clip_grad_value_(self.batched, value)
        else:
            self.last_grad_norms = clip_grad_norm_(self.batched, value)

    # ---- shrinking -------------------------------------------------------------------------------
    def keep_models(self, keep_ids):
        """Keep only the models with original indices ``keep_ids`` (the others leave the batch); per-model
        hyperparameters and ``max_grad_norm`` narrow with the batch."""
        keep = [self.model_ids.index(i) for i in keep_ids]
        trainer = self._trainer
        opts = trainer.optimizers if trainer is not None else []
        scheds = [c.scheduler for c in trainer.lr_scheduler_configs] if trainer is not None else []
        n = self.n
        shrink_(keep, self.batched, opts[0] if opts else None, schedulers=scheds)
        self.model_ids = [self.model_ids[k] for k in keep]
        self.hparams_per_model = {k: _narrow(v, keep, n) for k, v in self.hparams_per_model.items()}
        self.max_grad_norm = _narrow(self.max_grad_norm, keep, n)

    # ---- Lightning checkpoints -------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        """Lightning's checkpoint (``ModelCheckpoint``) also holds every model's random stream and which
        models are in the batch, so that ``trainer.fit(..., ckpt_path=...)`` resumes exactly."""
        checkpoint["mbcompile"] = {"rng_state": self.batched.get_rng_state(), "model_ids": list(self.model_ids)}

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint.get("mbcompile")
        if state is None:
            return
        ids = [int(i) for i in state["model_ids"]]
        if ids != self.model_ids:        # models had left the batch: leave it here too, before the weights load
            if not set(ids) <= set(self.model_ids):
                raise InvalidInputError(f"the checkpoint holds models {ids}, this module has {self.model_ids}")
            self.keep_models(ids)
        self.batched.set_rng_state(state["rng_state"])


def _narrow(v, keep, n):
    """A per-model value (a list or 1-D tensor of length n) for the models ``keep``; anything else as is."""
    if isinstance(v, list) and len(v) == n:
        return [v[k] for k in keep]
    if isinstance(v, torch.Tensor) and v.dim() == 1 and len(v) == n:
        return v[torch.tensor(keep, device=v.device)]
    return v


def _metric(trainer, key):
    v = trainer.callback_metrics.get(key)
    return None if v is None else float(v)


class _PerModelMonitor(pl.Callback):
    def __init__(self, monitor, mode, min_delta=0.0):
        if mode not in ("min", "max"):
            raise InvalidInputError(f"mode must be 'min' or 'max', got {mode!r}")
        self.monitor, self.mode, self.min_delta = monitor, mode, float(min_delta)
        self.best: dict = {}

    def _improved(self, mid, v):
        b = self.best.get(mid, math.inf if self.mode == "min" else -math.inf)
        return v < b - self.min_delta if self.mode == "min" else v > b + self.min_delta

    def _values(self, trainer, module):
        if trainer.sanity_checking:
            return {}
        out = {}
        for mid in module.model_ids:
            v = _metric(trainer, f"{self.monitor}_{mid}")
            if v is not None:
                out[mid] = v
        return out

    def state_dict(self):
        return {"best": dict(self.best)}

    def load_state_dict(self, state):
        self.best = {int(k): v for k, v in state["best"].items()}


class PerModelEarlyStopping(_PerModelMonitor):
    """Drop model i from the batch when ``{monitor}_{i}`` has not improved by more than ``min_delta`` for
    ``patience`` validations (a nan counts as no improvement); stop when no model is left."""

    def __init__(self, monitor="val_loss", patience=3, mode="min", min_delta=0.0):
        super().__init__(monitor, mode, min_delta)
        self.patience = int(patience)
        self.wait: dict = {}
        self.stopped: dict = {}         # original id -> epoch at which it left the batch

    def on_validation_end(self, trainer, module):
        vals = self._values(trainer, module)
        if not vals:
            return
        stop = []
        for mid, v in vals.items():
            if self._improved(mid, v):
                self.best[mid], self.wait[mid] = v, 0
            else:
                self.wait[mid] = self.wait.get(mid, 0) + 1
                if self.wait[mid] >= self.patience:
                    stop.append(mid)
        if not stop:
            return
        for mid in stop:
            self.stopped[mid] = trainer.current_epoch
        keep = [mid for mid in module.model_ids if mid not in stop]
        if keep:
            module.keep_models(keep)
        else:
            trainer.should_stop = True

    def state_dict(self):
        return {**super().state_dict(), "wait": dict(self.wait), "stopped": dict(self.stopped)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.wait = {int(k): v for k, v in state["wait"].items()}
        self.stopped = {int(k): v for k, v in state["stopped"].items()}


class PerModelCheckpoint(_PerModelMonitor):
    """Save model i (``unbatch``: a ``state_dict`` of the original class) to ``dirpath/model_{i}.pt``
    whenever ``{monitor}_{i}`` improves; ``best_scores`` and ``best_model_paths`` say which and where
    (also written to ``dirpath/best.json``)."""

    def __init__(self, dirpath, monitor="val_loss", mode="min", min_delta=0.0):
        super().__init__(monitor, mode, min_delta)
        self.dirpath = str(dirpath)
        self.best_model_paths: dict = {}
        self.best_epochs: dict = {}

    @property
    def best_scores(self) -> dict:
        return dict(self.best)

    def on_validation_end(self, trainer, module):
        vals = self._values(trainer, module)
        changed = False
        for mid, v in vals.items():
            if self._improved(mid, v):
                os.makedirs(self.dirpath, exist_ok=True)
                path = os.path.join(self.dirpath, f"model_{mid}.pt")
                model = module.batched.unbatch(module.model_ids.index(mid))
                torch.save(model.state_dict(), path)
                self.best[mid], self.best_model_paths[mid] = v, path
                self.best_epochs[mid] = trainer.current_epoch
                changed = True
        if changed:
            with open(os.path.join(self.dirpath, "best.json"), "w") as f:
                json.dump({str(k): {"score": self.best[k], "path": p, "epoch": self.best_epochs[k]}
                           for k, p in self.best_model_paths.items()}, f, indent=1)
