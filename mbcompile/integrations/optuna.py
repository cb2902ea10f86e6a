"""Optuna: run trials as batches. Ask n trials, train them as one ``mbcompile.batch`` with their own
hyperparameters, report per model, prune inside the batch, tell each trial.

    def suggest(trial):                        # the search space, as in any Optuna objective
        return {"lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True),
                "hidden": trial.suggest_categorical("hidden", [32, 64])}

    def objective(batch):                      # one batch of trials with the same architecture
        models = [Net(batch.params[0]["hidden"]) for _ in range(batch.n)]
        batched = mbcompile.batch(models)
        opt = mbcompile.optimizer(batched, torch.optim.Adam, lr=batch.values("lr"))
        for epoch in range(20):
            ...train one epoch...; val = ...            # [batch.n] validation losses
            batch.report(val, epoch, batched=batched, optimizer=opt)  # pruned trials leave the batch
            if batch.n == 0:
                return None
        return val                             # final values of the trials still in the batch

    study = optuna.create_study(storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend("study.log")), study_name="s", load_if_exists=True,
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1))
    mbcompile.integrations.optuna.optimize(study, objective, suggest, n_trials=64, batch_size=16,
                                           group_by=lambda p: p["hidden"])

* ``group_by(params)`` names the hyperparameters that change the architecture: each group of a batch of
  asked trials is trained as its own batch.
* Pruning: every trial of the batch reports first, then each is asked ``should_prune()`` in batch order
  and a pruned one is told ``PRUNED`` at once and leaves the batch (``mbcompile.shrink_`` on what you
  pass to ``report``). ``SuccessiveHalvingPruner`` / ``HyperbandPruner`` compare against trials still
  RUNNING, so they prune inside the first batch; give them ``min_resource`` (``"auto"`` waits for a
  COMPLETE trial). ``MedianPruner`` compares only against COMPLETE trials: it prunes from the second
  batch on. A nan value fails that trial alone.
* Several processes or machines share a study through Optuna's journal (or RDB) storage: each runs
  ``optimize`` (``n_trials`` counts per process, as in ``study.optimize``). Every running trial carries a
  heartbeat (a system attribute refreshed by a thread every ``heartbeat_interval`` s); ``optimize`` first
  fails RUNNING trials whose heartbeat is older than ``grace_period``, so trials of a crashed worker end
  as FAIL instead of staying RUNNING (:func:`fail_stale_trials` does it on demand); a trial failed so
  while its worker was only stalled leaves that batch at its next ``report``. Clocks of machines sharing
  a study must roughly agree (within the grace period).
"""
from __future__ import annotations

import math
import threading
import time

import torch
from ..errors import InvalidInputError

try:
    import optuna
    from optuna.trial import TrialState
except ImportError as e:  # pragma: no cover - depends on the extra
    raise ImportError("mbcompile.integrations.optuna needs Optuna: pip install 'mbcompile[optuna]'") from e

__all__ = ["optimize", "TrialBatch", "fail_stale_trials", "HEARTBEAT_KEY"]

HEARTBEAT_KEY = "mbcompile:heartbeat"


class _Heartbeat:
    """A daemon thread stamping ``HEARTBEAT_KEY = time.time()`` on this worker's running trials."""

    def __init__(self, storage, interval):
        self.storage, self.interval = storage, interval
        self.ids: set = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = None
        if interval:
            self.thread = threading.Thread(target=self._run, daemon=True, name="mbcompile-optuna-heartbeat")
            self.thread.start()

    def add(self, trial_id):
        self._beat(trial_id)
        with self.lock:
            self.ids.add(trial_id)

    def discard(self, trial_id):
        with self.lock:
            self.ids.discard(trial_id)

    def _beat(self, trial_id):
        if not self.interval:
            return
        try:
            self.storage.set_trial_system_attr(trial_id, HEARTBEAT_KEY, time.time())
        except Exception:  # noqa: BLE001 - the trial finished meanwhile (told by us or failed as stale)
            self.discard(trial_id)

    def _run(self):
        while not self.stop.wait(self.interval):
            with self.lock:
                ids = list(self.ids)
            for tid in ids:
                self._beat(tid)

    def close(self):
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


def fail_stale_trials(study, grace_period: float) -> list[int]:
    """Mark FAIL every RUNNING trial whose mbcompile heartbeat is older than ``grace_period`` seconds
    (trials run by other tools carry no heartbeat and are left alone). Returns their numbers."""
    now, failed = time.time(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        hb = t.system_attrs.get(HEARTBEAT_KEY)
        if hb is not None and now - float(hb) > grace_period:
            try:
                if study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                    failed.append(t.number)
            except Exception:  # noqa: BLE001 - another worker finished or failed it first
                pass
    return failed


class TrialBatch:
    """The trials of one batch that are still training, in batch order (index j = slot j of the batch).

    ``trials`` (optuna.Trial), ``params`` (their suggested dicts), ``numbers``, ``n``; ``values(name)`` is
    one hyperparameter as a per-model list, ready for ``mbcompile.optimizer(..., lr=batch.values("lr"))``.
    """

    def __init__(self, study, trials, params, key, heartbeat):
        self.study, self.trials, self.params, self.key = study, list(trials), list(params), key
        self._hb = heartbeat
        self.finished: dict = {}          # trial number -> final TrialState
        self._ids: dict = {}

    @property
    def n(self) -> int:
        return len(self.trials)

    @property
    def numbers(self) -> list[int]:
        return [t.number for t in self.trials]

    def values(self, name):
        return [p[name] for p in self.params]

    def report(self, values, step: int, *, batched=None, optimizer=None, scaler=None, schedulers=()):
        """Report ``values`` (``[n]``, one per trial still in the batch) at ``step``; prune per the study's
        pruner; drop pruned (and nan) trials from the batch and from ``batched``/``optimizer``/``scaler``/
        ``schedulers`` when given (``mbcompile.shrink_``). Returns the kept slot indices."""
        vals = _as_list(values, self.n)
        bad = {j for j, v in enumerate(vals) if not math.isfinite(v)}
        lost = set()                              # failed as stale by another worker meanwhile
        for j, (t, v) in enumerate(zip(self.trials, vals)):
            if j not in bad:
                try:
                    t.report(v, step)
                except optuna.exceptions.UpdateFinishedTrialError:
                    lost.add(j)
        prune = set()
        for j, t in enumerate(self.trials):       # all have reported: each decision sees the others
            if j not in bad | lost and t.should_prune():
                prune.add(j)
        for j in sorted(bad | prune | lost):
            self._tell(self.trials[j], TrialState.FAIL if j in bad | lost else TrialState.PRUNED)
        keep = [j for j in range(self.n) if j not in bad | prune | lost]
        if len(keep) < self.n:
            if keep and batched is not None:
                from ..optim import shrink_
                shrink_(keep, batched, optimizer=optimizer, scaler=scaler, schedulers=schedulers)
            self.trials = [self.trials[j] for j in keep]
            self.params = [self.params[j] for j in keep]
        return keep

    def _tell(self, trial, state, value=None):
        self._hb.discard(trial._trial_id)
        # skip_if_finished: another worker may have failed it as stale (e.g. after a long stall)
        if state == TrialState.COMPLETE:
            frozen = self.study.tell(trial, value, skip_if_finished=True)
        else:
            frozen = self.study.tell(trial, state=state, skip_if_finished=True)
        self.finished[trial.number] = frozen.state
        self._ids[trial.number] = trial._trial_id

    def _finish(self, values):
        if values is None:
            values = []
        vals = _as_list(values, self.n)
        for t, v in zip(self.trials, vals):
            if isinstance(v, (list, tuple)):
                ok = all(math.isfinite(x) for x in v)
            else:
                ok = math.isfinite(v)
            self._tell(t, TrialState.COMPLETE if ok else TrialState.FAIL, list(v) if isinstance(v, tuple) else v)
        self.trials, self.params = [], []

    def _fail_all(self):
        for t in self.trials:
            self._tell(t, TrialState.FAIL)
        self.trials, self.params = [], []


def _as_list(values, n):
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().tolist()
    values = list(values)
    if len(values) != n:
        raise InvalidInputError(f"expected {n} values (one per trial still in the batch), got {len(values)}")
    return [tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else float(v) for v in values]


def optimize(study, objective, suggest, *, n_trials: int, batch_size: int, group_by=None, timeout=None,
             catch=(), heartbeat_interval: float | None = 30.0, grace_period: float | None = None,
             callbacks=()) -> list[int]:
    """Run ``n_trials`` trials of ``study`` in this process, ``batch_size`` at a time (see the module
    docstring). ``objective(batch: TrialBatch)`` trains the batch and returns the final values of the
    trials still in it (``[batch.n]``, or ``None`` when none is left). An exception fails the trials still
    in the batch and is re-raised unless it is an instance of ``catch`` (in ``suggest``: that trial
    fails; re-raised, every trial of this call not yet finished fails with it). ``callbacks``: called as
    ``cb(study, frozen_trial)`` for each finished trial. Returns the numbers of the trials run here."""
    if batch_size < 1 or n_trials < 0:
        raise InvalidInputError(f"batch_size must be >= 1 and n_trials >= 0, got {batch_size}, {n_trials}")
    if grace_period is None:
        grace_period = 4 * heartbeat_interval if heartbeat_interval else None
    hb = _Heartbeat(study._storage, heartbeat_interval)
    start, done, numbers = time.time(), 0, []
    try:
        while done < n_trials and (timeout is None or time.time() - start < timeout):
            if grace_period is not None:
                fail_stale_trials(study, grace_period)
            trials = [study.ask() for _ in range(min(batch_size, n_trials - done))]
            for t in trials:
                hb.add(t._trial_id)
            done += len(trials)
            numbers += [t.number for t in trials]
            groups: dict = {}
            for k, t in enumerate(trials):
                try:
                    p = suggest(t)
                except optuna.TrialPruned:
                    TrialBatch(study, [t], [None], None, hb)._tell(t, TrialState.PRUNED)
                    continue
                except Exception as e:
                    TrialBatch(study, [t], [None], None, hb)._fail_all()
                    if isinstance(e, catch):                   # that trial failed; the others go on
                        continue
                    rest = [u for g in groups.values() for u in g[0]] + trials[k + 1:]
                    if rest:                                   # nothing of this call stays RUNNING
                        TrialBatch(study, rest, [None] * len(rest), None, hb)._fail_all()
                    raise
                key = group_by(p) if group_by is not None else None
                groups.setdefault(key, ([], []))
                groups[key][0].append(t)
                groups[key][1].append(p)
            pending = list(groups.items())
            while pending:
                key, (ts, ps) = pending.pop(0)
                batch = TrialBatch(study, ts, ps, key, hb)
                try:
                    batch._finish(objective(batch))
                except Exception as e:
                    batch._fail_all()
                    if not isinstance(e, catch):
                        for _, (rest, _) in pending:      # nothing of this call stays RUNNING
                            TrialBatch(study, rest, [None] * len(rest), None, hb)._fail_all()
                        raise
                finally:
                    for tid in batch._ids.values():
                        for cb in callbacks:
                            cb(study, study._storage.get_trial(tid))
    finally:
        hb.close()
    return numbers
