"""Optuna: 8 trials in batches of 4 (architecture groups split a batch), SuccessiveHalving pruning inside
the first batch (pruned models leave the batch), every trial ends in a final state, completed values equal
each trial trained alone; 2 worker processes share a journal file; a crashed worker's trials end FAIL."""
import multiprocessing as mp
import os
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

optuna = pytest.importorskip("optuna")

import mbcompile  # noqa: E402
from mbcompile.integrations import optuna as mbo  # noqa: E402
from mbcompile.optim import optimizer  # noqa: E402

EPOCHS = 4
FINAL = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64))
    return x[:32], y[:32], x[32:], y[32:]


def make_net(hidden, number):
    torch.manual_seed(1000 + number)
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1)).double()


def mse(out, y):
    return F.mse_loss(out.squeeze(-1), y)


def ARCH(params):
    return params["hidden"]                       # the hyperparameter that changes the architecture


def suggest(trial):
    return {"lr": trial.suggest_float("lr", 1e-3, 0.5, log=True), "hidden": trial.suggest_categorical("hidden", [4, 8])}


def objective(batch, sizes=None, crash_at=None):
    assert len({p["hidden"] for p in batch.params}) == 1           # one architecture per batch
    x, y, xv, yv = data()
    batched = mbcompile.batch([make_net(batch.params[0]["hidden"], k) for k in batch.numbers])
    opt = optimizer(batched, torch.optim.SGD, lr=batch.values("lr"))
    for epoch in range(EPOCHS):
        batched.train()
        for i in range(0, 32, 16):
            opt.zero_grad()
            mbcompile.loss(mse, batched(x[i:i + 16]), y[i:i + 16]).sum().backward()
            opt.step()
        batched.eval()
        with torch.no_grad():
            val = mbcompile.loss(mse, batched(xv), yv)
        if sizes is not None:
            sizes.append(batched.n)
        keep = batch.report(val, epoch, batched=batched, optimizer=opt)
        if crash_at == epoch:
            os._exit(1)                                           # a worker dies with trials RUNNING
        if batch.n == 0:
            return None
        val = val[keep]
    return val


def alone(params, number, epochs=EPOCHS):
    x, y, xv, yv = data()
    m = make_net(params["hidden"], number)
    opt = torch.optim.SGD(m.parameters(), lr=params["lr"])
    vals = []
    for _ in range(epochs):
        for i in range(0, 32, 16):
            opt.zero_grad()
            mse(m(x[i:i + 16]), y[i:i + 16]).backward()
            opt.step()
        with torch.no_grad():
            vals.append(mse(m(xv), yv).item())
    return vals


def check_against_alone(trials):
    for t in trials:
        ref = alone(t.params, t.number)
        for step, v in t.intermediate_values.items():
            assert v == pytest.approx(ref[step], rel=1e-9, abs=1e-12), (t.number, step)
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert t.value == pytest.approx(ref[-1], rel=1e-9, abs=1e-12)


def pruner():
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)


def journal(path):
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def test_batches_with_pruning_inside_the_first_batch():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), pruner=pruner())
    sizes, groups = [], []

    def obj(batch):
        groups.append((batch.key, batch.numbers))
        return objective(batch, sizes)

    ran = mbo.optimize(study, obj, suggest, n_trials=8, batch_size=4, group_by=ARCH)
    trials = study.get_trials()
    assert ran == list(range(8)) and len(trials) == 8 and all(t.state in FINAL for t in trials)
    states = [t.state for t in trials]
    assert optuna.trial.TrialState.PRUNED in states and optuna.trial.TrialState.COMPLETE in states
    first_batch_pruned = [t for t in trials[:4] if t.state == optuna.trial.TrialState.PRUNED]
    assert first_batch_pruned, "SuccessiveHalving compares RUNNING trials: it prunes within the first batch"
    assert any(b < a for a, b in zip(sizes, sizes[1:])), "pruned models leave the batch"
    assert all(trials[n].params["hidden"] == k for k, ns in groups for n in ns)
    assert sorted(n for _, ns in groups for n in ns) == list(range(8))
    check_against_alone(trials)


def test_nan_and_exceptions_leave_no_running_trial():
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())

    def obj(batch):
        batch.report(torch.tensor([1.0, float("nan"), 2.0]), 0)  # the nan trial fails alone
        assert batch.n == 2
        return torch.tensor([0.5, 0.25])

    mbo.optimize(study, obj, lambda t: {"x": t.suggest_float("x", 0, 1)}, n_trials=3, batch_size=3)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert [study.trials[0].value, study.trials[2].value] == [0.5, 0.25]

    def boom(batch):
        raise RuntimeError("boom")

    def stolen(batch):                  # trial 0 failed as stale by another worker while this one trains
        study._storage.set_trial_state_values(batch.trials[0]._trial_id, optuna.trial.TrialState.FAIL)
        assert batch.report(torch.tensor([1.0, 2.0]), 0) == [1]
        return torch.tensor([0.75])

    mbo.optimize(study, stolen, lambda t: {"x": t.suggest_float("x", 0, 1)}, n_trials=2, batch_size=2)
    assert [t.state.name for t in study.trials[3:]] == ["FAIL", "COMPLETE"] and study.trials[4].value == 0.75

    with pytest.raises(RuntimeError, match="boom"):
        mbo.optimize(study, boom, lambda t: {"x": t.suggest_float("x", 0, 1)}, n_trials=2, batch_size=2)
    assert all(t.state in FINAL for t in study.trials)


def _worker(path, n_trials, seed):
    study = optuna.load_study(study_name="s", storage=journal(path),
                              sampler=optuna.samplers.RandomSampler(seed=seed), pruner=pruner())
    mbo.optimize(study, objective, suggest, n_trials=n_trials, batch_size=4, group_by=ARCH,
                 heartbeat_interval=5.0)


def _crasher(path):
    study = optuna.load_study(study_name="s", storage=journal(path), pruner=pruner())
    mbo.optimize(study, lambda b: objective(b, crash_at=0), suggest, n_trials=2, batch_size=2,
                 group_by=ARCH, heartbeat_interval=0.2)


def test_two_worker_processes_share_a_journal_file(tmp_path):
    path = tmp_path / "study.log"
    optuna.create_study(study_name="s", storage=journal(path))
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(path, 4, seed)) for seed in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    trials = optuna.load_study(study_name="s", storage=journal(path)).get_trials()
    assert len(trials) == 8 and all(t.state in FINAL for t in trials)
    assert sorted(t.number for t in trials) == list(range(8))
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) >= 1
    check_against_alone([t for t in trials if t.state != optuna.trial.TrialState.FAIL])


def test_trials_of_a_crashed_worker_end_failed(tmp_path):
    path = tmp_path / "study.log"
    optuna.create_study(study_name="s", storage=journal(path))
    p = mp.get_context("spawn").Process(target=_crasher, args=(path,))
    p.start()
    p.join(timeout=120)
    assert p.exitcode == 1
    study = optuna.load_study(study_name="s", storage=journal(path), pruner=pruner())
    assert [t.state.name for t in study.trials] == ["RUNNING", "RUNNING"]
    other = study.ask()                           # RUNNING elsewhere, no mbcompile heartbeat: left alone
    time.sleep(0.6)
    assert mbo.fail_stale_trials(study, grace_period=60.0) == []      # not stale yet
    mbo.optimize(study, objective, suggest, n_trials=2, batch_size=2, group_by=ARCH, heartbeat_interval=0.2,
                 grace_period=0.5)                                     # cleans up first, then runs
    states = [t.state.name for t in study.trials]
    assert states[:2] == ["FAIL", "FAIL"] and states[2] == "RUNNING" and all(s != "RUNNING" for s in states[3:])
    study.tell(other, 1.0)
    assert all(t.state in FINAL for t in study.trials)
