"""End-to-end workflows a held-out sweep found wrong, each against the uninterrupted run or torch alone:
fit with the per-model ReduceLROnPlateau, a scheduler of another optimizer, resuming at an epoch
boundary with a DataLoader's own generator, subsets whose targets hold ignore_index, LRLogger's
curves through a checkpoint and JSON, Optuna trials when suggest raises, and ``python -m mbcompile``."""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import mbcompile
from mbcompile.callbacks import Checkpoint, LRLogger
from mbcompile.data import SharedLoader
from mbcompile.history import History
from mbcompile.optim import ReduceLROnPlateau

LRS = [0.1, 0.05]


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _models():
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double() for _ in LRS]


def _data(num=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num, 5, generator=g, dtype=torch.float64)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def test_fit_takes_the_per_model_plateau_scheduler_and_lowers_each_models_lr_on_its_own():
    x, y = _data()
    b = mbcompile.batch(_models())
    opt = mbcompile.optimizer(b, torch.optim.SGD, lr=LRS)
    sched = ReduceLROnPlateau(opt, patience=1, factor=0.5, threshold=0.05)
    h = mbcompile.fit(b, [(x, y)], F.cross_entropy, opt, epochs=6, scheduler=sched, progress=False)
    for i, lr in enumerate(LRS):                            # torch's scheduler fed model i's own losses
        ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        ref = torch.optim.lr_scheduler.ReduceLROnPlateau(ref_opt, patience=1, factor=0.5, threshold=0.05)
        for v in h["loss"][:, i].tolist():
            ref.step(v)
        assert opt.param_groups[i]["lr"] == ref_opt.param_groups[0]["lr"]
    assert any(g["lr"] < lr for g, lr in zip(opt.param_groups, LRS))       # it did act


def test_fit_refuses_a_scheduler_of_another_optimizer():
    b = mbcompile.batch(_models())
    opt = mbcompile.optimizer(b, torch.optim.SGD, lr=LRS)
    other = mbcompile.optimizer(mbcompile.batch(_models()), torch.optim.SGD, lr=LRS)
    with pytest.raises(ValueError, match="another optimizer"):
        mbcompile.fit(b, [_data()], F.cross_entropy, opt, scheduler=torch.optim.lr_scheduler.StepLR(other, 1),
                      progress=False)


def _loader():
    x, y = _data(32)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(5))


def _run(epochs, ckpt=None, resume=None):
    b = mbcompile.batch(_models(), seeds=[1, 2])
    opt = mbcompile.optimizer(b, torch.optim.Adam, lr=LRS)
    cbs = [LRLogger(every_step=True)] + ([Checkpoint(ckpt)] if ckpt else [])
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    h = mbcompile.fit(b, _loader(), F.cross_entropy, opt, epochs=epochs, callbacks=cbs, scheduler=sched,
                      progress=False, resume=resume)
    return b, h


def test_resuming_at_an_epoch_boundary_restores_the_loaders_own_generator(tmp_path):
    path = tmp_path / "run.pt"
    whole, hw = _run(3)
    _run(1, ckpt=path)                                      # a first script: one epoch, then it ends
    resumed, hr = _run(3, ckpt=path, resume=path)           # a second one continues from the file
    for (k, p), (_, q) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), k
    assert hr.steps["lr"] == hw.steps["lr"] and len(hw.steps["lr"]) == 12      # LRLogger's curve, all of it
    assert hr["lr"].tolist() == hw["lr"].tolist() == [LRS, [v / 2 for v in LRS], [v / 4 for v in LRS]]


def test_lr_logger_steps_survive_json():
    _, h = _run(1)
    back = History.from_json(h.to_json())
    assert back.steps["lr"] == h.steps["lr"] and len(back.steps["lr"]) == 4


def test_subsets_with_ignored_targets_train_as_torch_on_each_subset():
    x, y = _data(12)
    y[1], y[4] = -100, -100                                 # ignore_index inside model 0's and 1's samples
    w = torch.tensor([[True, True, False] * 4, [False, True, True] * 4])
    ms = _models()
    refs = copy.deepcopy(ms)
    b = mbcompile.batch(ms)
    opt = mbcompile.optimizer(b, torch.optim.SGD, lr=LRS)
    h = mbcompile.fit(b, SharedLoader(x, y, batch_size=12, shuffle=False, weights=w), F.cross_entropy, opt,
                      data="mask", progress=False)
    for i, (r, lr) in enumerate(zip(refs, LRS)):
        loss = F.cross_entropy(r(x[w[i]]), y[w[i]])
        assert h["loss"][0, i].item() == pytest.approx(loss.item(), rel=1e-12)
        loss.backward()
        with torch.no_grad():
            for p in r.parameters():
                p -= lr * p.grad
        for (k, p), (_, q) in zip(r.named_parameters(), b.named_parameters()):
            torch.testing.assert_close(q[i], p, rtol=1e-12, atol=1e-13, msg=k)


def test_python_dash_m_runs_the_command():
    out = subprocess.run([sys.executable, "-m", "mbcompile", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "demo" in out.stdout


def test_an_error_in_suggest_leaves_no_trial_running_and_catch_is_honoured():
    optuna = pytest.importorskip("optuna")
    from mbcompile.integrations import optuna as mbo
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def suggest(t):
        if t.number == 2:
            raise RuntimeError("boom in suggest")
        return {"lr": t.suggest_float("lr", 1e-3, 1e-1)}

    def objective(batch):
        return torch.tensor([float(p["lr"]) for p in batch.params])

    S = optuna.trial.TrialState
    study = optuna.create_study()
    with pytest.raises(RuntimeError, match="boom"):
        mbo.optimize(study, objective, suggest, n_trials=4, batch_size=4, heartbeat_interval=None)
    assert [t.state for t in study.trials] == [S.FAIL] * 4
    study = optuna.create_study()
    mbo.optimize(study, objective, suggest, n_trials=4, batch_size=4, heartbeat_interval=None, catch=(RuntimeError,))
    assert [t.state for t in study.trials] == [S.COMPLETE, S.COMPLETE, S.FAIL, S.COMPLETE]
