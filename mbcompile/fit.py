"""``mbcompile.fit``: one training loop for n models, returning one History with a curve per model.

    batched = mbcompile.batch(model, n=16)
    opt = mbcompile.optimizer(batched, torch.optim.AdamW, lr=lrs)
    hist = mbcompile.fit(batched, train_loader, F.cross_entropy, opt, epochs=10, val_data=val_loader,
                         metrics=["accuracy"], callbacks=[mbcompile.EarlyStopping(patience=3)])
    print(hist)                      # per-model table: hyperparameters, final/best metrics, rank
    hist.export("best.pt")           # the winner as a plain state_dict

Every model is trained exactly as ``torch.optim`` would train it alone on the same batches: its loss
is ``loss_fn(out_i, y_i)`` (vectorised by :func:`mbcompile.loss`), the backward of the summed losses
gives each model its own gradient, and clipping, scaling and the optimizer step are per model.
Models are addressed by their original index everywhere (logs, history, callbacks), also after
stopped models were removed from the batch.
"""
from __future__ import annotations

import collections.abc
import contextlib
import math
import os
import warnings

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from .callbacks import Checkpoint
from .data import MODES, weighted_losses
from .history import History
from .loss import loss as per_model_loss
from .errors import InvalidInputError, InvalidTypeError


def accuracy(out, target):
    """Fraction of samples whose arg-max class equals the target (higher is better)."""
    return (out.argmax(-1) == target).to(torch.float32 if not out.is_floating_point() else out.dtype).mean()


accuracy.mode = "max"
METRICS = {"accuracy": accuracy, "acc": accuracy}


def _metric_fns(metrics):
    if metrics is None:
        return {}
    if isinstance(metrics, dict):
        items = list(metrics.items())
    else:
        items = []
        for m in ([metrics] if isinstance(metrics, str) or callable(metrics) else metrics):
            items.append((m, m) if isinstance(m, str) else (getattr(m, "__name__", "metric"), m))
    out = {}
    for name, fn in items:
        if isinstance(fn, str):
            if fn not in METRICS:
                raise InvalidInputError(f"unknown metric {fn!r}; built in: {sorted(METRICS)}, or pass a function "
                                        f"fn(out_i, y_i) -> scalar")
            fn = METRICS[fn]
        out[name] = fn
    return out


def _hparams_of(optimizer, n, extra):
    """Per-model hyperparameters for the table: the optimizer's that differ between models (and lr),
    plus the user's ``hparams``."""
    hp = {}
    for k, v in (extra or {}).items():
        v = v.tolist() if isinstance(v, torch.Tensor) else list(v)
        if len(v) != n:
            raise InvalidInputError(f"hparams[{k!r}] has {len(v)} values, expected one per model (n={n})")
        hp[k] = v
    groups = getattr(optimizer, "param_groups", [])
    if len(groups) == n:
        for k in groups[0]:
            if k in ("params", "initial_lr"):
                continue
            vals = [g[k] for g in groups]
            vals = [v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v for v in vals]
            if not all(isinstance(v, (int, float, bool, tuple)) for v in vals):
                continue
            if k == "lr" or len({repr(v) for v in vals}) > 1:
                hp.setdefault(k, [list(v) if isinstance(v, tuple) else v for v in vals])
    return hp


class Run:
    """What callbacks see: the batch, optimizer, scaler, schedulers, history and counters.

    ``run.active[k]`` is the original index of the model at position k of the batch; ``run.frozen``
    the original indices of frozen models; ``run.epoch`` the number of completed epochs (during an
    epoch: its 0-based index); ``run.step`` the number of optimizer steps taken."""

    def __init__(self, batched, optimizer, scaler, schedulers, history, callbacks):
        self.batched, self.optimizer, self.scaler = batched, optimizer, scaler
        self.schedulers, self.history, self.callbacks = schedulers, history, callbacks
        self.n_total = history.n
        self.frozen: set = set()
        self.epoch = self.step = self.step_in_epoch = 0
        self.stop_training = False
        self.epoch_rng = None       # torch's global RNG state at the start of the epoch (loader shuffles)
        self.loader_rng = None      # the loader's own generators' states at the start of the epoch
        self.loader_gens = []       # those generators (their states now go into a checkpoint too)
        self.loader_rng_now = None  # from a checkpoint: their states when it was written
        self.resume_rng = None
        self.acc = {"sum": torch.zeros(self.n_total, dtype=torch.float64),
                    "count": torch.zeros(self.n_total, dtype=torch.float64)}
        self._refresh()

    def _refresh(self):
        """Cache the index tensors that every step uses (after the set of models changed)."""
        self.rows = torch.tensor(self.active, dtype=torch.long)              # position -> original index
        self.frozen_pos = torch.tensor([i in self.frozen for i in self.active], dtype=torch.bool)
        mask = torch.zeros(self.n_total, dtype=torch.bool)
        mask[self.rows] = True
        mask[list(self.frozen)] = False
        self._training = mask

    @property
    def active(self) -> list:
        return self.history.active

    @property
    def n(self) -> int:
        """Models in the batch now."""
        return len(self.active)

    def training_mask(self) -> torch.Tensor:
        """bool ``[n_total]``: the models that are still training (in the batch and not frozen)."""
        return self._training.clone()

    def per_model(self, values, fill=math.nan) -> torch.Tensor:
        """``[n]`` values for the models in the batch -> float64 ``[n_total]`` by original index."""
        out = torch.full((self.n_total,), fill, dtype=torch.float64)
        v = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float64)
        return out.index_copy_(0, self.rows, v.detach().to("cpu", torch.float64))

    def lrs(self) -> torch.Tensor:
        groups = self.optimizer.param_groups
        return self.per_model([float(g["lr"]) for g in groups] if len(groups) == self.n else
                              [float(groups[0]["lr"])] * self.n)

    # ---- acting on models --------------------------------------------------------------------------
    def stop(self, models, action="drop", reason="stopped"):
        """Stop training models (original indices): ``"drop"`` removes them from the batch (their final
        weights are kept in ``history.retired``), ``"freeze"`` keeps them, unchanged, in the batch."""
        models = [int(i) for i in models if int(i) in self.active and int(i) not in self.frozen]
        if not models:
            return
        for i in models:
            self.history.status[i] = reason
        keep = [k for k, i in enumerate(self.active) if i not in models]
        if action == "drop" and keep:
            from .optim import shrink_
            for k, i in enumerate(self.active):
                if i in models:
                    self.history.retired[i] = {name: t.clone() for name, t in
                                               self.batched.unbatch(k).state_dict().items()}
                    self.history.retired_consts[i] = self.batched.model_consts(k)
            shrink_(keep, self.batched, self.optimizer, self.scaler, self.schedulers)
            self.history.active[:] = [self.active[k] for k in keep]
        else:  # freeze (also for a drop that would empty the batch)
            self.optimizer.freeze([self.active.index(i) for i in models])
            self.frozen.update(models)
        self._refresh()
        if not bool(self.training_mask().any()):
            self.stop_training = True

    # ---- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        s = {"format": ckpt.FORMAT, "version": ckpt.VERSION, "n": self.n_total,
             "active": list(self.active), "frozen": sorted(self.frozen),
             "model": self.batched.state_dict(), "rng": self.batched.get_rng_state(),
             "optimizer": self.optimizer.state_dict(),
             "scaler": self.scaler.state_dict() if self.scaler is not None else None,
             "schedulers": [s.state_dict() for s in self.schedulers],
             "callbacks": [cb.state_dict() for cb in self.callbacks],
             "epoch": self.epoch, "step": self.step, "step_in_epoch": self.step_in_epoch,
             "acc": {k: v.clone() for k, v in self.acc.items()},
             "history": self.history.state_dict(),
             "retired": {int(i): sd for i, sd in self.history.retired.items()},
             "retired_consts": {int(i): c for i, c in self.history.retired_consts.items()},
             "torch_rng": torch.get_rng_state(), "epoch_rng": self.epoch_rng, "loader_rng": self.loader_rng,
             "loader_rng_now": [g.get_state() for g in self.loader_gens],
             "lowering": ckpt.lowering_choices(),
             "fused_paths": [[k[0], st.path_state()] for k, st in (self.fused or {}).items()]}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            s["cuda_rng"] = torch.cuda.get_rng_state_all()
        return s

    def save(self, path):
        """Write the whole run to ``path`` atomically (see :mod:`mbcompile.checkpoint`)."""
        ckpt.atomic_save(self.state_dict(), path)
        return path

    def restore(self, s: dict, path):
        ckpt.check_fits(s, path, self.n_total, self.batched.n)
        ckpt.restore_lowering_choices(s.get("lowering"))
        self.batched._programs.clear()  # recaptured with the restored lowering choices
        try:
            if list(s["active"]) != list(range(self.n_total)):
                from .optim import shrink_
                shrink_(list(s["active"]), self.batched, self.optimizer, self.scaler, self.schedulers)
            self.batched.load_state_dict(s["model"])
            self.batched.set_rng_state(s["rng"])
            self.optimizer.load_state_dict(s["optimizer"])
            if self.scaler is not None and s["scaler"] is not None:
                self.scaler.load_state_dict(s["scaler"])
            if len(s["schedulers"]) != len(self.schedulers):
                raise InvalidInputError(f"the checkpoint has {len(s['schedulers'])} schedulers, this run "
                                        f"{len(self.schedulers)}")
            for sch, st in zip(self.schedulers, s["schedulers"]):
                sch.load_state_dict(st)
            if len(s["callbacks"]) != len(self.callbacks):
                raise InvalidInputError(f"the checkpoint has state for {len(s['callbacks'])} callbacks, this run "
                                        f"has {len(self.callbacks)}; pass the same callbacks in the same order")
            for cb, st in zip(self.callbacks, s["callbacks"]):
                cb.load_state_dict(st)
        except (ValueError, RuntimeError, KeyError) as e:
            raise ckpt.CheckpointError(f"checkpoint {os.fspath(path)!r} does not fit this run: {e}") from e
        self.history.load_state_dict(s["history"])
        self.history.retired = {int(i): sd for i, sd in s["retired"].items()}
        self.history.retired_consts = {int(i): c for i, c in s.get("retired_consts", {}).items()}
        self.frozen = set(s["frozen"])
        if self.frozen and hasattr(self.optimizer, "freeze"):
            self.optimizer.freeze([self.active.index(i) for i in self.frozen])
        self.epoch, self.step, self.step_in_epoch = s["epoch"], s["step"], s["step_in_epoch"]
        self.acc = {k: v.clone() for k, v in s["acc"].items()}
        self.epoch_rng, self.loader_rng, self.resume_rng = s["epoch_rng"], s["loader_rng"], s["torch_rng"]
        self.loader_rng_now = s.get("loader_rng_now")
        self.fused_paths = {tdim: st for tdim, st in s.get("fused_paths", [])}   # train_step's path, per layout
        if "cuda_rng" in s and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda_rng"])
        self._refresh()
        if not bool(self.training_mask().any()):
            self.stop_training = True


# ---- routing one batch ------------------------------------------------------------------------------
def _call(batched, inputs):
    if isinstance(inputs, dict):
        return batched(**inputs)
    if isinstance(inputs, (tuple, list)):
        return batched(*inputs)
    return batched(inputs)


def _select(x, rows, n_total, n_now):
    """Per-model tensors come as [n_total, ...]; keep the rows of the models still in the batch."""
    if isinstance(x, torch.Tensor):
        if x.dim() and x.shape[0] == n_total and n_now != n_total:
            return x.index_select(0, rows.to(x.device))
        return x
    if isinstance(x, dict):
        return {k: _select(v, rows, n_total, n_now) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_select(v, rows, n_total, n_now) for v in x)
    return x


class _Router:
    """Splits a batch into (inputs, target, weights) for the models in the batch now."""

    def __init__(self, run, mode):
        if mode not in MODES:
            raise InvalidInputError(f"data must be one of {MODES}, got {mode!r}")
        self.run, self.mode = run, "weights" if mode == "mask" else mode
        self.expand = self.mode != "per_model" and getattr(run.batched, "_in_dims", None) == 0
        if self.mode == "weights":
            _warn_batch_coupled(run.batched)
        if self.mode == "per_model" and getattr(run.batched, "_in_dims", 0) is None:
            raise InvalidInputError("data='per_model' feeds inputs of shape [n, B, ...]: build the batch with "
                                    "mbcompile.batch(..., in_dims=0)")

    def __call__(self, batch):
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise InvalidInputError(f"each batch must be (inputs, target) or, with data='weights', (inputs, target, "
                                    f"weights [n, B]); got {type(batch).__name__}"
                             + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
        run = self.run
        rows = run.rows
        x, y = batch[0], batch[1]
        w = batch[2] if len(batch) == 3 else None
        if self.expand:  # a shared batch for a batch built with in_dims=0: one view per model
            x = _expand(x, run.n)
        if self.mode == "weights":
            if w is None:
                raise InvalidInputError("data='weights' needs batches (inputs, target, weights) with weights [n, B] "
                                        "(bool mask or float weights)")
            if w.dim() != 2 or w.shape[0] not in (run.n_total, run.n):
                raise InvalidInputError(f"weights must be [n, B] with n={run.n_total}, got {tuple(w.shape)}")
            return x, y, None, _select(w, rows, run.n_total, run.n)
        if w is not None:
            raise InvalidInputError("a batch has 3 entries (inputs, target, weights): pass data='weights' to fit")
        if self.mode == "per_model":
            x, y = _select(x, rows, run.n_total, run.n), _select(y, rows, run.n_total, run.n)
            if isinstance(y, torch.Tensor) and (y.dim() == 0 or y.shape[0] != run.n):
                raise InvalidInputError(f"data='per_model' needs per-model targets [n, B, ...] with n={run.n_total}, "
                                        f"got {tuple(y.shape)}")
            return x, y, 0, None
        return x, y, None, None


def _warn_batch_coupled(batched):
    """data='weights' runs every model on the whole shared batch: a batch norm in training then takes its
    statistics over samples the model does not own, so model i is not the model trained alone on its
    subset (and in cross-validation sees its held-out fold through them). Said, not refused."""
    template = getattr(batched, "_template", batched)
    where = next((p for p, m in template.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
    if where is not None:
        warnings.warn(f"fit(data='weights'/'mask'): the model has a batch norm ({where!r}) whose training "
                      f"statistics are taken over the whole shared batch, samples a model does not own included: "
                      f"model i does not train exactly as alone on its own subset (for cross-validation, its "
                      f"held-out samples reach it through those statistics). Use GroupNorm/LayerNorm, or "
                      f"data='per_model' with each model's own batches.", stacklevel=4)


def _expand(x, n):
    if isinstance(x, torch.Tensor):
        return x.expand(n, *x.shape)
    if isinstance(x, dict):
        return {k: _expand(v, n) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_expand(v, n) for v in x)
    return x


def _is_plateau(s):
    return hasattr(s, "num_bad_epochs_per_model") or isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau)


def _losses(fn, out, y, tdim, w):
    """(loss [n], samples [n]) for one batch."""
    if w is not None:
        return weighted_losses(fn, out, y, w, tdim)
    val = per_model_loss(fn, out, y, target_in_dim=tdim)
    b = out.shape[1] if out.dim() > 1 else 1
    return val, torch.full_like(val, float(b), dtype=torch.float64)


# ---- the loop -----------------------------------------------------------------------------------------
def fit(batched, train_data, loss_fn, optimizer, *, epochs=1, val_data=None, metrics=None, callbacks=(),
        scheduler=None, scheduler_interval="epoch", scaler=None, max_grad_norm=None, progress=True,
        data="shared", val_data_mode=None, hparams=None, autocast=None, resume=None, fused=False) -> History:
    """Train the n models of ``batched`` for ``epochs`` epochs; returns a :class:`History`.

    - ``train_data`` / ``val_data``: re-iterable (a DataLoader, a list, :mod:`mbcompile.data` loaders)
      of ``(inputs, target)`` batches, or ``(inputs, target, weights)`` with ``data="weights"``.
      ``inputs`` is a tensor, a tuple (positional inputs) or a dict (keyword inputs).
    - ``data``: ``"shared"`` (one batch for every model), ``"per_model"`` (``[n, B, ...]`` inputs and
      targets; batch with ``in_dims=0``), ``"weights"``/``"mask"`` (a shared batch plus ``[n, B]`` per-model
      sample weights or a bool mask; see :mod:`mbcompile.data`). ``val_data_mode`` (default: ``data``)
      routes ``val_data`` the same way, e.g. shared validation batches for per-model training.
    - ``loss_fn(out_i, y_i) -> scalar`` for one model (e.g. ``F.cross_entropy``); ``metrics``: names
      (``"accuracy"``) or functions of the same form, evaluated on ``val_data`` as ``val_<name>``.
    - ``optimizer``: from :func:`mbcompile.optimizer`; ``scheduler``: one or a list of LR schedulers
      stepped every epoch (``scheduler_interval="step"``: every step); a per-model
      ``mbcompile.optim.ReduceLROnPlateau`` gets the ``[n]`` monitor metric.
    - ``scaler``: :class:`mbcompile.GradScaler`; ``autocast``: a dtype to run forward under
      ``torch.autocast``; ``max_grad_norm``: per-model gradient clipping.
    - ``callbacks``: :mod:`mbcompile.callbacks`; ``hparams``: extra per-model values for the table.
    - ``resume``: a checkpoint path to continue from, or ``True`` to continue from the
      :class:`~mbcompile.callbacks.Checkpoint` callback's file when it exists.
    - ``fused=True``: each training step is :func:`mbcompile.train_step` (forward, loss, backward,
      clipping and the update as one Inductor program; the fast path for small models). Equal to the
      default loop up to float rounding; ``p.grad`` is not filled; not with ``scaler``/``autocast``,
      and only for ``data="shared"``/``"per_model"`` with positional inputs.
    """
    n_total = batched.n
    schedulers = [] if scheduler is None else list(scheduler) if isinstance(scheduler, (list, tuple)) else [scheduler]
    for s in schedulers:
        if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau) and not hasattr(s, "num_bad_epochs_per_model"):
            raise InvalidTypeError("torch's ReduceLROnPlateau compares one number for all models; use "
                                   "mbcompile.optim.ReduceLROnPlateau(opt, ...), which keeps one per model")
        if getattr(s, "optimizer", optimizer) is not optimizer:
            raise InvalidInputError(f"the scheduler {type(s).__name__} steps another optimizer than the one fit "
                                    f"trains with: build it on that optimizer (opt), or it never changes an lr")
    if scheduler_interval not in ("epoch", "step"):
        raise InvalidInputError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
    if not getattr(optimizer, "_mbcompile_per_model", False):
        raise InvalidTypeError(f"fit needs a per-model optimizer, mbcompile.optimizer(batched, torch.optim.X, ...), "
                               f"got {type(optimizer).__name__}")
    if optimizer.n != n_total:
        raise InvalidInputError(f"the optimizer is for {optimizer.n} models, the batch has {n_total}")
    if isinstance(train_data, collections.abc.Iterator):
        raise InvalidTypeError("train_data is a one-shot iterator; pass something iterable once per epoch "
                               "(a DataLoader, a list of batches, mbcompile.data.SharedLoader/PerModelLoader)")
    if fused and (scaler is not None or autocast is not None or data not in ("shared", "per_model")):
        raise InvalidInputError("fit(fused=True) runs each step as one compiled program (mbcompile.train_step), "
                                "which takes neither a GradScaler nor autocast, and only data='shared' or "
                                "'per_model'; pass fused=False for this run")
    metric_fns = _metric_fns(metrics)
    callbacks = list(callbacks)
    callbacks.sort(key=lambda cb: isinstance(cb, Checkpoint))  # checkpoints see the other callbacks' effects
    modes = {f"val_{k}": getattr(f, "mode", None) for k, f in metric_fns.items() if getattr(f, "mode", None)}
    history = History(n_total, _hparams_of(optimizer, n_total, hparams), modes)
    history.batched = batched
    run = Run(batched, optimizer, scaler, schedulers, history, callbacks)
    run.interval = scheduler_interval
    run.fused = {} if fused else None
    router = _Router(run, data)
    val_router = _Router(run, val_data_mode or data)
    path = _resume_path(resume, callbacks)
    if path is not None:
        run.restore(ckpt.load(path), path)
    device = next(iter(batched.parameters())).device
    amp = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast is not None else contextlib.nullcontext

    steps_per_epoch = len(train_data) if hasattr(train_data, "__len__") else None
    bar = _bar(progress, epochs * steps_per_epoch if steps_per_epoch is not None else None,
               run.epoch * (steps_per_epoch or 0) + run.step_in_epoch)
    for cb in callbacks:
        cb.on_fit_start(run)
    try:
        while run.epoch < epochs and not run.stop_training:
            it = _epoch_iter(run, train_data)
            for batch in it:
                _train_step(run, router, batch, loss_fn, amp, _kept(max_grad_norm, run), scheduler_interval)
                if bar is not None:
                    _postfix(bar, run, epochs)
                for cb in callbacks:
                    cb.after_step(run)
                if run.stop_training:
                    break
            _end_epoch(run, val_router, val_data, loss_fn, metric_fns, amp)
        if run.resume_rng is not None:  # resumed a run that had already finished
            torch.set_rng_state(run.resume_rng)
            run.resume_rng = None
    finally:
        if bar is not None:
            bar.close()
    for cb in callbacks:
        cb.on_fit_end(run)
    return history


def _resume_path(resume, callbacks):
    if resume is None or resume is False:
        return None
    if resume is True:
        cps = [cb for cb in callbacks if isinstance(cb, Checkpoint)]
        if not cps:
            raise InvalidInputError("resume=True resumes from the Checkpoint callback's file, but no Checkpoint "
                                    "callback was given; pass resume=path instead")
        return cps[0].path if os.path.exists(cps[0].path) else None
    return os.fspath(resume)


def _epoch_iter(run, train_data):
    """The epoch's batch iterator; after a mid-epoch resume, replay the loader's randomness from the
    epoch start and skip the batches already trained on."""
    if hasattr(train_data, "set_epoch"):
        train_data.set_epoch(run.epoch)
    gens = [g for g in (getattr(train_data, "generator", None),
                        getattr(getattr(train_data, "sampler", None), "generator", None))
            if isinstance(g, torch.Generator)]   # a DataLoader's or its sampler's own generator
    run.loader_gens = gens
    if run.step_in_epoch == 0 and run.resume_rng is None:
        for cb in run.callbacks:
            cb.on_epoch_start(run)
        run.epoch_rng = torch.get_rng_state()
        run.loader_rng = [g.get_state() for g in gens]
        return iter(train_data)
    if run.step_in_epoch == 0:  # resumed at an epoch boundary: every stream as it was when saved
        torch.set_rng_state(run.resume_rng)
        for g, st in zip(gens, run.loader_rng_now or []):
            g.set_state(st)
        run.resume_rng = run.loader_rng_now = None
        return _epoch_iter(run, train_data)
    torch.set_rng_state(run.epoch_rng)
    for g, st in zip(gens, run.loader_rng or []):
        g.set_state(st)
    it = iter(train_data)
    for k in range(run.step_in_epoch):
        if next(it, None) is None:
            raise InvalidInputError(f"resuming epoch {run.epoch + 1} at batch {run.step_in_epoch}, but the training "
                                    f"data has only {k} batches now")
    torch.set_rng_state(run.resume_rng)
    run.resume_rng = None
    return it


def _kept(max_grad_norm, run):
    """A per-model max_grad_norm (one value per original model) for the models still in the batch."""
    if isinstance(max_grad_norm, torch.Tensor) and max_grad_norm.dim() == 1 and len(max_grad_norm) == run.n_total:
        return max_grad_norm[run.rows.to(max_grad_norm.device)]
    if isinstance(max_grad_norm, (list, tuple)) and len(max_grad_norm) == run.n_total:
        return [max_grad_norm[i] for i in run.active]
    return max_grad_norm


def _fused_step(run, x, y, tdim, loss_fn, max_grad_norm):
    """(loss [n], samples [n]) of one mbcompile.train_step program (one per target layout and batch)."""
    if isinstance(x, dict):
        raise InvalidInputError("fit(fused=True) takes positional inputs (a tensor or a tuple), not a dict")
    key = (tdim, id(run.batched), id(run.optimizer))
    step = run.fused.get(key)
    if step is None:
        from .backend import train_step
        step = run.fused[key] = train_step(run.batched, loss_fn, run.optimizer, max_grad_norm=max_grad_norm,
                                           target_in_dim=tdim)
        if tdim in getattr(run, "fused_paths", {}):                # resumed: the path the run had taken
            step.load_path_state(run.fused_paths[tdim])
    loss = step(*(tuple(x) if isinstance(x, (tuple, list)) else (x,)), y)
    yy = y if tdim is None else y.movedim(tdim, 0)[0]
    return loss, torch.full_like(loss, float(yy.shape[0] if yy.dim() else 1), dtype=torch.float64)


def _buffers_of(batched, rows):
    """The models ``rows``' slices of every stacked buffer (batch norm's running statistics)."""
    n = batched.n
    return {name: b[rows.to(b.device)].clone() for name, b in batched.named_buffers() if b.dim() and b.shape[0] == n}


@torch.no_grad()
def _put_buffers(batched, rows, saved):
    for name, b in batched.named_buffers():
        if name in saved:
            b[rows.to(b.device)] = saved[name]


def _train_step(run, router, batch, loss_fn, amp, max_grad_norm, interval):
    """One step. A model that does not train in it (frozen, or without a sample of its own in a masked
    batch) runs forward with the others, which would move its batch-norm statistics: they are put back,
    so a frozen model stays what it was when it stopped (as a dropped one does)."""
    x, y, tdim, w = router(batch)
    idle = run.frozen_pos.clone() if w is None else torch.ones(len(run.active), dtype=torch.bool)
    rows = idle.nonzero().flatten()
    saved = _buffers_of(run.batched, rows) if len(rows) else None
    loss, count, train = _one_step(run, x, y, tdim, w, loss_fn, amp, max_grad_norm)
    if saved:
        back = (idle & ~train)[rows]                    # of the saved rows, those that did not train
        if bool(back.any()):
            _put_buffers(run.batched, rows[back], {k: v[back.to(v.device)] for k, v in saved.items()})
    _after_step(run, loss, count, train, interval)


def _one_step(run, x, y, tdim, w, loss_fn, amp, max_grad_norm):
    batched, opt, scaler = run.batched, run.optimizer, run.scaler
    if run.fused is not None:
        loss, count = _fused_step(run, x, y, tdim, loss_fn, max_grad_norm)
        return loss, count, ~run.frozen_pos & (count.cpu() > 0)
    opt.zero_grad(set_to_none=True)
    with amp():
        out = _call(batched, x)
        loss, count = _losses(loss_fn, out, y, tdim, w)
    frozen = run.frozen_pos
    train = ~frozen & (count.cpu() > 0)
    mask = train.to(loss.device)
    total = torch.where(mask, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    (scaler.scale(total) if scaler is not None else total).sum().backward()
    skip = (~train & ~frozen).nonzero().flatten().tolist()  # no sample of theirs in this batch: no step
    if skip:
        opt.freeze(skip)
    try:
        if max_grad_norm is not None:
            from .clip import clip_grad_norm_
            if scaler is not None:
                scaler.unscale_(opt)
            clip_grad_norm_(batched, max_grad_norm)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    finally:
        if skip:
            opt.unfreeze(skip)
    return loss, count, train


def _after_step(run, loss, count, train, interval):
    """Schedulers, counters, per-model loss bookkeeping, callbacks and history after one step."""
    if interval == "step":
        for s in run.schedulers:
            if not _is_plateau(s):
                s.step()
    run.step += 1
    run.step_in_epoch += 1
    lt = loss.detach().to("cpu", torch.float64)
    ct = count.detach().to("cpu", torch.float64)
    rows = run.rows
    run.acc["sum"].index_add_(0, rows, torch.where(train, lt * ct, torch.zeros((), dtype=torch.float64)))
    run.acc["count"].index_add_(0, rows, torch.where(train, ct, torch.zeros((), dtype=torch.float64)))
    logs = {"loss": run.per_model(torch.where(train, lt, torch.full_like(lt, math.nan))),
            "samples": run.per_model(torch.where(train, ct, torch.zeros_like(ct)), fill=0.0)}
    for cb in run.callbacks:
        cb.on_step_end(run, logs)
    run.history.log_step(run.step, logs["loss"])
    done = len(run.history.steps["step"]) - 1
    for key, v in logs.items():                     # what callbacks added ("lr" from LRLogger): one row a step
        if key not in ("loss", "samples"):
            v = (v.tolist() if v.dim() else float(v)) if isinstance(v, torch.Tensor) else v
            run.history.steps.setdefault(key, [None] * done).append(v)


@torch.no_grad()
def _evaluate(run, router, val_data, loss_fn, metric_fns, amp) -> dict:
    batched = run.batched
    was = batched.training
    batched.eval()
    names = ["val_loss", *(f"val_{k}" for k in metric_fns)]
    fns = [loss_fn, *metric_fns.values()]
    sums = {k: torch.zeros(run.n_total, dtype=torch.float64) for k in names}
    cnt = torch.zeros(run.n_total, dtype=torch.float64)
    try:
        for batch in val_data:
            x, y, tdim, w = router(batch)
            rows = run.rows
            with amp():
                out = _call(batched, x)
                for name, fn in zip(names, fns):
                    v, c = _losses(fn, out, y, tdim, w)
                    v, c = v.to("cpu", torch.float64), c.to("cpu", torch.float64)
                    sums[name].index_add_(0, rows, torch.where(c > 0, v * c, torch.zeros((), dtype=v.dtype)))
            cnt.index_add_(0, rows, c)
    finally:
        batched.train(was)
    live = run.training_mask() & (cnt > 0)
    nan = torch.full((run.n_total,), math.nan, dtype=torch.float64)
    return {k: torch.where(live, s / torch.where(cnt > 0, cnt, 1.0), nan) for k, s in sums.items()}


def _end_epoch(run, router, val_data, loss_fn, metric_fns, amp):
    live = run.training_mask()
    nan = torch.full((run.n_total,), math.nan, dtype=torch.float64)
    c = run.acc["count"]
    logs = {"loss": torch.where(c > 0, run.acc["sum"] / torch.where(c > 0, c, 1.0), nan)}  # also a model stopped mid-epoch
    if val_data is not None:
        logs.update(_evaluate(run, router, val_data, loss_fn, metric_fns, amp))
    for cb in run.callbacks:
        cb.on_epoch_end(run, logs)
    run.history.log_epoch(run.epoch + 1, logs)
    for s in run.schedulers:
        if _is_plateau(s):
            key = "val_loss" if "val_loss" in logs else "loss"
            s.step(logs[key][run.active])
        elif run.interval == "epoch":
            s.step()
    run.epoch += 1
    run.step_in_epoch = 0
    run.acc = {k: torch.zeros_like(v) for k, v in run.acc.items()}
    for cb in run.callbacks:
        cb.after_epoch(run)


# ---- progress -------------------------------------------------------------------------------------------
def _bar(progress, total, initial):
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="mbcompile.fit", unit="step", dynamic_ncols=True,
                leave=True)


def _postfix(bar, run, epochs):
    last = run.history.steps["loss"][-1] if run.history.steps["loss"] else []
    vals = torch.tensor([v for v in last if not math.isnan(v)], dtype=torch.float64)
    k = int(run.training_mask().sum())
    text = f"epoch {run.epoch + 1}/{epochs} models {k}/{run.n_total}"
    if vals.numel():
        text += f" loss best {vals.min().item():.4g} median {vals.median().item():.4g}"
    bar.set_postfix_str(text, refresh=False)
    bar.update(1)
