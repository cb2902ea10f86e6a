"""An Optuna sweep whose trials train as batches: lr / weight decay per model, hidden width chosen per
batch (it changes the architecture), SuccessiveHalving pruning inside each batch. Run it in several
shells at once: they share the study through the journal file.

    pip install 'mbcompile[optuna]'
    python examples/optuna_sweep.py --journal sweep.log --trials 32 --batch 8
"""
import argparse

import optuna
import torch
import torch.nn as nn
import torch.nn.functional as F

import mbcompile
from mbcompile.integrations import optuna as mbo

torch.manual_seed(0)
X = torch.randn(1024, 16)
Y = (X[:, :8].sum(1) > 0).long()


def suggest(trial):
    return {"lr": trial.suggest_float("lr", 1e-3, 1.0, log=True),
            "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
            "hidden": trial.suggest_categorical("hidden", [32, 64])}


def objective(batch):
    hidden = batch.params[0]["hidden"]                     # the same for the whole batch (group_by)
    batched = mbcompile.batch([nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 2))
                               for _ in range(batch.n)], seeds=batch.numbers)
    opt = mbcompile.optimizer(batched, torch.optim.SGD, lr=batch.values("lr"), momentum=0.9,
                              weight_decay=batch.values("weight_decay"))
    for epoch in range(12):
        batched.train()
        for i in range(0, 768, 64):
            opt.zero_grad()
            mbcompile.loss(F.cross_entropy, batched(X[i:i + 64]), Y[i:i + 64]).sum().backward()
            opt.step()
        batched.eval()
        with torch.no_grad():
            val = mbcompile.loss(F.cross_entropy, batched(X[768:]), Y[768:])
        keep = batch.report(val, epoch, batched=batched, optimizer=opt)   # pruned trials leave the batch
        if batch.n == 0:
            return None
        val = val[keep]
    return val


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--journal", default=None, help="journal file shared by worker processes")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    storage = None
    if a.journal:
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(a.journal))
    study = optuna.create_study(study_name="mbcompile-example", storage=storage, load_if_exists=True,
                                pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3))
    mbo.optimize(study, objective, suggest, n_trials=a.trials, batch_size=a.batch,
                 group_by=lambda p: p["hidden"], heartbeat_interval=10.0)
    states = [t.state.name for t in study.trials]
    print({s: states.count(s) for s in sorted(set(states))})
    print("best:", study.best_trial.number, study.best_value, study.best_params)


if __name__ == "__main__":
    main()
