"""HuggingFace transformers: train a batch of HF models with ``transformers.Trainer``.

``mbcompile.batch`` captures HF models as they are (tied weights, non-persistent buffers, attention
masks; a decoder's key/value cache is off while capturing: ``past_key_values`` is None) and returns their ``ModelOutput`` with every tensor leaf
``[n, ...]`` (``out.loss`` is ``[n]``). :class:`BatchedTrainer` is a ``Trainer`` whose

* optimizer is ``mbcompile.optimizer(batched, optim_cls, **optim_kwargs)`` (one param group per model,
  so HF's LR scheduler acts per model; ``optim_kwargs={"lr": [...]}`` gives per-model rates);
* ``max_grad_norm`` (from ``TrainingArguments``, or a per-model list passed to the trainer) clips each
  model's own gradient norm: HF's one global norm would couple the models;
* gradient accumulation scales each model's loss as HF's Trainer does for that model alone (models whose
  ``forward`` takes ``**kwargs`` get ``num_items_in_batch`` and undivided micro-batch losses);
* logs carry ``loss_i`` / ``grad_norm_i`` / ``learning_rate_i`` / ``eval_loss_i`` for model i and the
  mean over models under HF's usual keys (``loss``, ``grad_norm``, ``eval_loss``, ``train_loss``);
* ``save_model(dir)`` writes ``dir/model_i/`` (``save_pretrained``) per model plus ``dir/batched.pt``
  (the stacked state and random streams, which ``resume_from_checkpoint`` reloads).

    batched = mbcompile.batch([BertForSequenceClassification(cfg) for _ in range(4)])
    trainer = BatchedTrainer(batched, TrainingArguments("out", max_grad_norm=1.0), train_dataset=ds,
                             optim_kwargs={"lr": [1e-4, 3e-4, 1e-3, 3e-3]})
    trainer.train()

Not supported: ``fp16`` (one GradScaler for all models; use ``bf16``), label smoothing, DataParallel
over several GPUs (shard models over processes with ``mbcompile.integrations.distributed`` instead).
HF leaves biases and LayerNorm weights out of weight decay; a per-model optimizer applies
``weight_decay`` to every parameter (HF's default is 0).
"""
from __future__ import annotations

import inspect
import os

import torch

from ..batching import BatchedModule
from ..clip import clip_grad_norm_
from ..optim import optimizer as batched_optimizer
from ..errors import InvalidInputError, InvalidTypeError

try:
    from transformers import Trainer
    from transformers.utils import can_return_loss, find_labels
except ImportError as e:  # pragma: no cover - depends on the extra
    raise ImportError("mbcompile.integrations.hf needs transformers and accelerate: "
                      "pip install 'mbcompile[hf]'") from e

__all__ = ["BatchedTrainer", "save_batched", "load_batched"]

BATCHED_FILE = "batched.pt"


def save_batched(batched: BatchedModule, directory, *, safe_serialization: bool = True):
    """``directory/model_i/`` per model (``save_pretrained`` when the model has it) and
    ``directory/batched.pt`` (stacked state dict, seeds and random streams) for resuming."""
    os.makedirs(directory, exist_ok=True)
    torch.save({"n": batched.n, "state_dict": batched.state_dict(), "rng": batched.get_rng_state()},
               os.path.join(directory, BATCHED_FILE))
    for i in range(batched.n):
        m = batched.unbatch(i)
        if hasattr(m, "save_pretrained"):
            m.save_pretrained(os.path.join(directory, f"model_{i}"), safe_serialization=safe_serialization)
        else:
            os.makedirs(os.path.join(directory, f"model_{i}"), exist_ok=True)
            torch.save(m.state_dict(), os.path.join(directory, f"model_{i}", "pytorch_model.bin"))


def load_batched(batched: BatchedModule, directory):
    """Load what :func:`save_batched` wrote into ``batched`` (same n)."""
    state = torch.load(os.path.join(directory, BATCHED_FILE), weights_only=False, map_location="cpu")
    if state["n"] != batched.n:
        raise InvalidInputError(f"{directory} holds a batch of n={state['n']} models, this batch has n={batched.n}")
    batched.load_state_dict(state["state_dict"])
    batched.set_rng_state(state["rng"])


class BatchedTrainer(Trainer):
    """A ``transformers.Trainer`` for an ``mbcompile.batch`` of HF models (see the module docstring).

    ``optim_cls`` / ``optim_kwargs``: the torch optimizer and its hyperparameters (lists of length n are
    per model); ``lr``, ``weight_decay`` and Adam's ``betas`` / ``eps`` default to ``TrainingArguments``.
    ``max_grad_norm``: a per-model list overriding ``args.max_grad_norm`` (which is applied per model).
    ``compute_loss_func(outputs, labels, num_items_in_batch=...)`` must return the ``[n]`` losses.
    """

    def __init__(self, model: BatchedModule, args=None, *, optim_cls=torch.optim.AdamW, optim_kwargs=None,
                 max_grad_norm=None, **kwargs):
        if not isinstance(model, BatchedModule):
            raise InvalidTypeError(f"BatchedTrainer trains an mbcompile.batch(...) module, got {type(model).__name__}; "
                                   f"for a single model use transformers.Trainer")
        opt = (kwargs.get("optimizers") or (None, None))[0]
        if opt is not None and not getattr(opt, "_mbcompile_per_model", False):
            raise InvalidInputError("optimizers=(opt, sched): opt must be mbcompile.optimizer(batched, ...); a plain "
                                    "torch optimizer would treat the n models as one")
        self.optim_cls, self.optim_kwargs = optim_cls, dict(optim_kwargs or {})
        self.per_model_max_grad_norm = max_grad_norm
        super().__init__(model=model, args=args, **kwargs)
        if self.args.fp16:
            raise InvalidInputError("fp16 uses one GradScaler for all models (an overflow in one would skip every "
                                    "model's step); use bf16, or a manual loop with mbcompile.GradScaler")
        if self.args.label_smoothing_factor:
            raise InvalidInputError("label_smoothing_factor is not supported: give the models a loss with "
                                    "label smoothing (e.g. a compute_loss_func returning the [n] losses)")
        template = type(model._template)
        if self.args.label_names is None:
            self.label_names = find_labels(template)
        self.can_return_loss = can_return_loss(template)
        # as HF decides for each model alone (it sees the batch's *args/**kwargs forward): a model whose forward
        # takes **kwargs gets num_items_in_batch, and its loss is then not divided by gradient_accumulation_steps
        self.model_accepts_loss_kwargs = getattr(model._template, "accepts_loss_kwargs", None)
        if self.model_accepts_loss_kwargs is None:
            self.model_accepts_loss_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in
                                                 inspect.signature(model._template.forward).parameters.values())
        self._reset_per_model()

    # ---- per-model bookkeeping -------------------------------------------------------------------
    def _reset_per_model(self):
        self._mb_interval = [None, 0]   # loss sum since the last log, micro-batches
        self._mb_total = [None, 0]      # over the whole train() call
        self._mb_eval = [None, 0]       # eval loss * examples, examples
        self._mb_grad_norms = None
        self._mb_lrs = None

    @staticmethod
    def _acc(slot, value, weight=1, count=None):
        v = value.detach().double().cpu() * weight
        slot[0] = v if slot[0] is None or slot[0].shape != v.shape else slot[0] + v
        slot[1] += weight if count is None else count

    def _scaled_for_ga(self, num_items_in_batch):
        """Whether HF's ``training_step`` leaves the loss undivided by the accumulation steps (its rule)."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:   # the batched forward takes *args, **kwargs: ask the model
            params = inspect.signature(self.model._template.forward).parameters
            self._signature_columns = list(params) + list(set(["label", "label_ids"] + self.label_names))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels") if self.compute_loss_func is not None and "labels" in inputs else None
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        outputs = model(**inputs)
        if self.compute_loss_func is not None:
            loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        else:
            if isinstance(outputs, dict) and "loss" not in outputs:
                raise InvalidInputError(f"the models returned no loss (keys: {', '.join(outputs.keys())}); pass labels "
                                        f"in the inputs or a compute_loss_func")
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        n = self.model.n
        if loss.shape != (n,):
            raise InvalidInputError(f"expected one loss per model, shape ({n},), got {tuple(loss.shape)}")
        if model.training:                      # logged per optimizer step, as HF logs what training_step returns
            ga = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
            w = 1 if self._scaled_for_ga(num_items_in_batch) else 1 / ga
            self._acc(self._mb_interval, loss, w, 1 / ga)
            self._acc(self._mb_total, loss, w, 1 / ga)
        else:
            bs = next((v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim()), 1)
            self._acc(self._mb_eval, loss, bs)
        total = loss.sum()   # the sum keeps each model's gradient its own
        return (total, outputs) if return_outputs else total

    def _clip_grad_norm(self, model):
        return self._per_model_norms(model, clip=True)

    def _get_grad_norm(self, model, grad_norm=None):
        norms = grad_norm if grad_norm is not None else self._per_model_norms(model, clip=False)
        self._mb_grad_norms = norms.detach().double().cpu()
        return self._mb_grad_norms.mean().item()

    def _per_model_norms(self, model, clip):
        max_norm = self.per_model_max_grad_norm if self.per_model_max_grad_norm is not None \
            else self.args.max_grad_norm
        if not clip or (not isinstance(max_norm, (list, tuple, torch.Tensor)) and not max_norm > 0):
            max_norm = float("inf")
        return clip_grad_norm_(self.model, max_norm)

    def _get_learning_rate(self):
        lrs = self.lr_scheduler.get_last_lr() if not isinstance(
            self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) \
            else [g["lr"] for g in self.optimizer.param_groups]
        self._mb_lrs = [float(v) for v in lrs]
        return self._mb_lrs[0] if len(set(self._mb_lrs)) == 1 else sum(self._mb_lrs) / len(self._mb_lrs)

    def log(self, logs, start_time=None):
        if "loss" in logs and self._mb_interval[1]:
            self._put(logs, "loss", self._mb_interval[0] / self._mb_interval[1])
            self._mb_interval = [None, 0]
            if self._mb_grad_norms is not None and "grad_norm" in logs:
                self._put(logs, "grad_norm", self._mb_grad_norms)
            if self._mb_lrs is not None and "learning_rate" in logs and len(set(self._mb_lrs)) > 1:
                self._put(logs, "learning_rate", torch.tensor(self._mb_lrs, dtype=torch.float64))
        if "train_loss" in logs and self._mb_total[1]:
            self._put(logs, "train_loss", self._mb_total[0] / self._mb_total[1])
        return super().log(logs, start_time)

    @staticmethod
    def _put(logs, key, per_model):
        logs[key] = per_model.mean().item()
        logs.update({f"{key}_{i}": v for i, v in enumerate(per_model.tolist())})

    def evaluation_loop(self, *args, **kwargs):
        self._mb_eval = [None, 0]
        out = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        if self._mb_eval[1]:
            per = self._mb_eval[0] / self._mb_eval[1]
            out.metrics[f"{prefix}_loss"] = per.mean().item()
            out.metrics.update({f"{prefix}_loss_{i}": v for i, v in enumerate(per.tolist())})
        return out

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if logits is not None:   # n,B,... -> B,n,...: HF concatenates predictions over batches on dim 0
            n = self.model.n
            logits = torch.utils._pytree.tree_map(
                lambda t: t.movedim(0, 1) if isinstance(t, torch.Tensor) and t.dim() > 1 and t.shape[0] == n
                else t, logits)
        return loss, logits, labels

    def train(self, *args, **kwargs):
        self._mb_interval, self._mb_total = [None, 0], [None, 0]
        out = super().train(*args, **kwargs)
        return out._replace(training_loss=out.metrics.get("train_loss", out.training_loss))

    # ---- optimizer, saving -----------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            kw = dict(self.optim_kwargs)
            allowed = inspect.signature(self.optim_cls.__init__).parameters
            kw.setdefault("lr", self.args.learning_rate)
            if "weight_decay" in allowed:
                kw.setdefault("weight_decay", self.args.weight_decay)
            if self.optim_cls in (torch.optim.Adam, torch.optim.AdamW):
                kw.setdefault("betas", (self.args.adam_beta1, self.args.adam_beta2))
                kw.setdefault("eps", self.args.adam_epsilon)
            self.optimizer = batched_optimizer(self.model if model is None else model, self.optim_cls, **kw)
        return self.optimizer

    def _save(self, output_dir=None, state_dict=None):
        from transformers.trainer import TRAINING_ARGS_NAME
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_batched(self.model, output_dir, safe_serialization=getattr(self.args, "save_safetensors", True))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        load_batched(self.model if model is None else model, resume_from_checkpoint)

    def _load_best_model(self):
        load_batched(self.model, self.state.best_model_checkpoint)
