"""History of a run: one curve per model per metric, indexed by the model's original position.

A model that stopped (early stopping, NaN guard) keeps its curve up to the epoch it stopped; later
entries are nan. ``str(history)`` is the per-model summary table (hyperparameters, final and best value
of every metric, status, rank)."""
from __future__ import annotations

import csv
import io
import json
import math
import os

import torch
from .errors import InvalidInputError, NotFoundError

_MAX_WORDS = ("acc", "accuracy", "f1", "auc", "auroc", "r2", "score", "precision", "recall", "iou")


def default_mode(name: str) -> str:
    """"max" for metrics where higher is better (by name: ``*acc*``, ``f1``, ``auc``, ...), else "min"."""
    low = name.lower().removeprefix("val_").removeprefix("train_")
    return "max" if any(low == w or low.endswith("_" + w) or low.startswith(w) for w in _MAX_WORDS) else "min"


def _f(v):
    v = float(v)
    return v


def _fmt(v, digits=4):
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.{digits}g}"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(_fmt(x, 3) for x in v) + ")"
    return str(v)


class History:
    """Per-model curves. ``history["val_loss"]`` is a float64 tensor ``[epochs, n]``; ``history.curve(
    "val_loss", i)`` is model i's list; ``best_model()`` is the index of the winner."""

    def __init__(self, n: int, hparams: dict | None = None, modes: dict | None = None):
        self.n = int(n)
        self.hparams = {k: list(v) for k, v in (hparams or {}).items()}
        self.modes = dict(modes or {})
        self.epochs: list = []                 # epoch number of each recorded row
        self.metrics: dict = {}                # name -> list of rows, each a list of n floats
        self.steps: dict = {"step": [], "loss": []}   # per optimizer step: the step number, [n] losses
        self.status = ["active"] * self.n      # "active" | "early stopped (epoch 4)" | "diverged (step 17)" ...
        self.batched = None                    # the live batch (not saved); used by model() / export()
        self.active = list(range(self.n))      # original index of each model still in the batch
        self.retired: dict = {}                # original index -> state_dict of a model removed from the batch
        self.retired_consts: dict = {}         # original index -> its per-model attributes (Dropout.p, ...)

    # ---- recording -------------------------------------------------------------------------------
    def log_epoch(self, epoch: int, values: dict):
        """Record one row per metric; ``values[name]`` is ``[n]`` (tensor or list), nan where absent."""
        row = len(self.epochs)
        self.epochs.append(int(epoch))
        for name, v in values.items():
            rows = self.metrics.setdefault(name, [[math.nan] * self.n for _ in range(row)])
            rows.append([_f(x) for x in (v.tolist() if isinstance(v, torch.Tensor) else v)])
        for name, rows in self.metrics.items():
            if len(rows) < row + 1:
                rows.append([math.nan] * self.n)

    def log_step(self, step: int, loss):
        self.steps["step"].append(int(step))
        self.steps["loss"].append([_f(x) for x in (loss.tolist() if isinstance(loss, torch.Tensor) else loss)])

    # ---- reading ---------------------------------------------------------------------------------
    def __getitem__(self, name) -> torch.Tensor:
        if name not in self.metrics:
            raise NotFoundError(f"no metric {name!r}; recorded: {sorted(self.metrics)}")
        return torch.tensor(self.metrics[name], dtype=torch.float64).reshape(len(self.epochs), self.n)

    def __contains__(self, name):
        return name in self.metrics

    def __len__(self):
        return len(self.epochs)

    def curve(self, name: str, i: int) -> list:
        return [row[i] for row in self.metrics[name]]

    def mode(self, name: str) -> str:
        return self.modes.get(name) or default_mode(name)

    @property
    def monitor(self) -> str:
        """The metric that ranks models: ``val_loss`` if recorded, else ``loss``, else the first one."""
        for name in ("val_loss", "loss"):
            if name in self.metrics:
                return name
        if not self.metrics:
            raise InvalidInputError("the history is empty")
        return next(iter(self.metrics))

    def final(self, name: str) -> torch.Tensor:
        """``[n]``: each model's last recorded (non-nan) value of ``name``."""
        t = self[name]
        out = torch.full((self.n,), math.nan, dtype=torch.float64)
        for i in range(self.n):
            col = t[:, i][~torch.isnan(t[:, i])]
            if col.numel():
                out[i] = col[-1]
        return out

    def best(self, name: str | None = None, mode: str | None = None) -> torch.Tensor:
        """``[n]``: each model's best value of ``name`` (min or max by ``mode``), nan if none."""
        name = name or self.monitor
        mode = mode or self.mode(name)
        t = self[name]
        fill = math.inf if mode == "min" else -math.inf
        t = torch.where(torch.isnan(t), torch.full_like(t, fill), t)
        b = t.min(0).values if mode == "min" else t.max(0).values
        return torch.where(torch.isinf(b) & (b == fill), torch.full_like(b, math.nan), b)

    def rank(self, name: str | None = None, mode: str | None = None) -> list:
        """Rank (1 = best) of every model by its best ``name``; models without a value rank last."""
        name = name or self.monitor
        mode = mode or self.mode(name)
        b = self.best(name, mode).tolist()
        key = (lambda i: (math.isnan(b[i]), b[i] if mode == "min" else -b[i], i))
        order = sorted(range(self.n), key=key)
        ranks = [0] * self.n
        for r, i in enumerate(order, 1):
            ranks[i] = r
        return ranks

    def best_model(self, name: str | None = None, mode: str | None = None) -> int:
        """Original index of the model with the best ``name`` (default: the monitor metric)."""
        return self.rank(name, mode).index(1)

    # ---- models ------------------------------------------------------------------------------------
    def state_of(self, i: int) -> dict:
        """Model i's plain state_dict, from the live batch or, if it was removed from the batch, the copy
        kept when it was removed."""
        return self.model(i).state_dict()

    def model(self, i: int | str = "best"):
        """Model i (or ``"best"``) as a plain module of the original class."""
        i = self.best_model() if i == "best" else int(i)
        if self.batched is None:
            raise InvalidInputError("this history is not attached to a batch (history.batched is None); "
                                    "use mbcompile.export_model(batched, i, path) instead")
        if i in self.active:
            return self.batched.unbatch(self.active.index(i))
        if i in self.retired:
            from .batching import apply_consts
            m = self.batched.unbatch(0)
            m.load_state_dict(self.retired[i])
            apply_consts(m, self.retired_consts.get(i, {}))
            return m
        raise NotFoundError(f"model {i} is neither in the batch nor among the retired models")

    def export(self, path, i: int | str = "best", *, module: bool = False):
        """Save model i (default: the best by the monitor metric) as a plain state_dict file (or the whole
        module with ``module=True``), atomically. Returns the model index saved."""
        from .checkpoint import atomic_save
        i = self.best_model() if i == "best" else int(i)
        m = self.model(i)
        atomic_save(m if module else m.state_dict(), path)
        return i

    # ---- table -------------------------------------------------------------------------------------
    def table(self, metrics=None, sort: bool = True):
        """(header, rows) of the summary table: hyperparameters that differ between models, final and
        best of each metric, status and rank by the monitor metric."""
        names = [m for m in (metrics or self.metrics) if m in self.metrics and m != "lr"]
        hp = {k: v for k, v in self.hparams.items() if len({repr(x) for x in v}) > 1 or self.n == 1}
        ranks = self.rank() if self.metrics else [0] * self.n
        finals = {m: self.final(m).tolist() for m in names}
        bests = {m: self.best(m).tolist() for m in names}
        header = ["model", *hp]
        for m in names:
            header += [f"final {m}", f"best {m}"]
        header += ["status", "rank"]
        rows = []
        for i in range(self.n):
            row = [i, *(v[i] for v in hp.values())]
            for m in names:
                row += [finals[m][i], bests[m][i]]
            rows.append(row + [self.status[i], ranks[i]])
        if sort:
            rows.sort(key=lambda r: r[-1])
        return header, rows

    def summary(self, metrics=None, sort: bool = True) -> str:
        header, rows = self.table(metrics, sort)
        cells = [header] + [[_fmt(c) for c in r] for r in rows]
        widths = [max(len(str(r[k])) for r in cells) for k in range(len(header))]
        line = lambda r: "  ".join(str(c).rjust(w) if k else str(c).ljust(w)  # noqa: E731
                                   for k, (c, w) in enumerate(zip(r, widths)))
        out = [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]]
        if self.metrics:
            m = self.monitor
            out.append(f"best model: {self.best_model()} (by {self.mode(m)} {m})")
        return "\n".join(out)

    def __str__(self):
        return self.summary()

    def __repr__(self):
        return f"History(n={self.n}, epochs={len(self.epochs)}, metrics={sorted(self.metrics)})"

    # ---- files -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain lists, numbers and strings only (loadable with ``torch.load(weights_only=True)``)."""
        return {"n": self.n, "hparams": {k: [_plain(x) for x in v] for k, v in self.hparams.items()},
                "modes": dict(self.modes), "epochs": list(self.epochs),
                "metrics": {k: [list(r) for r in v] for k, v in self.metrics.items()},
                "steps": _copy_steps(self.steps),           # step, loss, and lr (LRLogger)
                "status": list(self.status), "active": list(self.active)}

    def load_state_dict(self, s: dict):
        self.n = int(s["n"])
        self.hparams = {k: list(v) for k, v in s["hparams"].items()}
        self.modes = dict(s["modes"])
        self.epochs = list(s["epochs"])
        self.metrics = {k: [list(r) for r in v] for k, v in s["metrics"].items()}
        self.steps = {"step": [], "loss": [], **_copy_steps(s["steps"])}
        self.status = list(s["status"])
        self.active = list(s["active"])
        return self

    def to_json(self, path=None) -> str:
        """The whole history as strict JSON (nan written as null, infinities as "inf" / "-inf"); also
        written to ``path`` if given."""
        text = json.dumps(_nan_to_none(self.state_dict()), indent=1, allow_nan=False)
        if path is not None:
            _write_text(path, text)
        return text

    @classmethod
    def from_json(cls, path_or_text) -> "History":
        text = path_or_text
        if not str(path_or_text).lstrip().startswith("{"):
            with open(path_or_text) as f:
                text = f.read()
        s = _none_to_nan(json.loads(text))
        return cls(s["n"]).load_state_dict(s)

    def to_csv(self, path=None) -> str:
        """Long-form CSV, one row per (epoch, model): ``epoch, model, <hparams>, <metrics>, status``."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        names = list(self.metrics)
        hp = {k: v for k, v in self.hparams.items() if k not in self.metrics}  # a logged lr beats the initial one
        w.writerow(["epoch", "model", *hp, *names])
        for r, ep in enumerate(self.epochs):
            for i in range(self.n):
                w.writerow([ep, i, *(_plain(v[i]) for v in hp.values()),
                            *("" if math.isnan(self.metrics[m][r][i]) else repr(self.metrics[m][r][i]) for m in names)])
        text = buf.getvalue()
        if path is not None:
            _write_text(path, text)
        return text

    def plot(self, path, metrics=None, *, log_y: bool | None = None):
        """Save a PNG with one panel per metric and one curve per model; the best model is drawn thick.
        Needs matplotlib (``pip install 'mbcompile[plot]'``)."""
        try:
            import matplotlib
            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("History.plot needs matplotlib: pip install 'mbcompile[plot]' "
                              "(or pip install matplotlib); the history itself is in to_csv()/to_json()") from e
        names = [m for m in (metrics or self.metrics) if m in self.metrics]
        if not names:
            raise InvalidInputError("nothing to plot: the history has no metrics yet")
        best = self.best_model() if self.metrics else None
        fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
        cmap = plt.get_cmap("viridis")
        label_hp = next((k for k, v in self.hparams.items() if len({repr(x) for x in v}) > 1), None)
        for ax, m in zip(axes[0], names):
            t = self[m]
            for i in range(self.n):
                lab = f"{i}" + (f" {label_hp}={_fmt(self.hparams[label_hp][i], 3)}" if label_hp else "")
                ax.plot(self.epochs, t[:, i].tolist(), color=cmap(i / max(1, self.n - 1)),
                        lw=2.5 if i == best else 1.0, alpha=1.0 if i == best else 0.75, label=lab)
            ax.set_title(m)
            ax.set_xlabel("epoch")
            finite = t[torch.isfinite(t)]
            if log_y or (log_y is None and m in ("loss", "val_loss", "lr") and finite.numel()
                         and bool((finite > 0).all()) and float(finite.max() / finite.min()) > 100):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        if self.n <= 20:
            axes[0][-1].legend(fontsize=6, ncol=2 if self.n > 10 else 1, loc="best")
        fig.tight_layout()
        tmp = f"{path}.tmp.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, path)
        return path


def _plain(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, tuple):
        return [_plain(v) for v in x]
    return x


def _nan_to_none(x):
    """Strict JSON: nan as null, +-inf as the strings "inf" / "-inf" (read back as floats)."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def _none_to_nan(x, key=None):
    if x is None:
        return math.nan
    if x in ("inf", "-inf"):
        return float(x)
    if isinstance(x, dict):
        return {k: _none_to_nan(v, k) for k, v in x.items()}
    if isinstance(x, list):
        return [_none_to_nan(v) for v in x]
    return x


def _write_text(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _copy_steps(steps: dict) -> dict:
    """{name: per-step rows} with every row its own list."""
    return {k: [list(r) if isinstance(r, (list, tuple)) else r for r in v] for k, v in steps.items()}
