"""Lightning: a 2-epoch run of BatchedLightningModule equals a manual mbcompile loop (per-model lrs,
per-model clipping, dropout, an epoch scheduler); per-model logging; early stopping drops only the
model that stopped improving and leaves the others on their exact trajectories."""
import copy
import csv
import glob

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pl = pytest.importorskip("lightning.pytorch")

import mbcompile  # noqa: E402
from mbcompile.clip import clip_grad_norm_  # noqa: E402
from mbcompile.optim import optimizer  # noqa: E402

TOL = dict(rtol=1e-9, atol=1e-12)
SEEDS = [7, 8, 9]


def mse(out, y):
    return F.mse_loss(out.squeeze(-1), y)


def setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1)).double()
    models = [copy.deepcopy(net) for _ in SEEDS]
    for m in models[1:]:
        for p in m.parameters():
            p.data.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 5, generator=g, dtype=torch.float64)
    y = x[:, 0] - 2 * x[:, 1] + 0.1 * torch.randn(32, generator=g, dtype=torch.float64)
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:16], y[:16]), batch_size=16)
    return models, train, val


def trainer(tmp_path, epochs, **kw):
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, default_root_dir=tmp_path,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      num_sanity_val_steps=0, **kw)


def manual_run(batched, train, epochs, lrs, clip, step_size):
    opt = optimizer(batched, torch.optim.SGD, lr=lrs, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=0.5)
    for _ in range(epochs):
        batched.train()
        for x, y in train:
            opt.zero_grad()
            mbcompile.loss(mse, batched(x), y).sum().backward()
            clip_grad_norm_(batched, clip)
            opt.step()
        sched.step()
    return batched


def test_two_epochs_match_manual_loop_with_per_model_logging(tmp_path):
    from lightning.pytorch.loggers import CSVLogger
    from mbcompile.integrations.lightning import BatchedLightningModule
    models, train, val = setup()
    lrs, clip = [0.01, 0.05, 0.2], 0.5
    batched = mbcompile.batch(models, seeds=SEEDS)
    manual = copy.deepcopy(batched)
    module = BatchedLightningModule(
        batched, mse, torch.optim.SGD, lr=lrs, momentum=0.9, max_grad_norm=clip,
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    trainer(tmp_path, 2, logger=CSVLogger(tmp_path), log_every_n_steps=1).fit(module, train, val)
    manual_run(manual, train, 2, lrs, clip, 1)
    for k, v in manual.state_dict().items():
        torch.testing.assert_close(batched.state_dict()[k], v, **TOL, msg=k)
    assert module.last_grad_norms.shape == (3,)
    # the manual loop from fresh weights moves them: the comparison is not vacuous
    assert (manual.get_parameter("0.weight") - torch.stack([m[0].weight for m in models])).abs().max() > 1e-3

    rows = list(csv.DictReader(open(glob.glob(str(tmp_path / "lightning_logs" / "*" / "metrics.csv"))[0])))
    cols = set(rows[0])
    assert {"train_loss_step", "train_loss_0_step", "train_loss_2_epoch", "val_loss", "val_loss_0",
            "val_loss_1", "val_loss_2"} <= cols
    last_val = [r for r in rows if r["val_loss"]][-1]
    manual.eval()
    with torch.no_grad():
        x, y = next(iter(val))
        ref = mbcompile.loss(mse, manual(x), y)
    for i in range(3):
        assert float(last_val[f"val_loss_{i}"]) == pytest.approx(ref[i].item(), rel=1e-6)
    assert float(last_val["val_loss"]) == pytest.approx(ref.mean().item(), rel=1e-6)


def test_per_model_early_stopping_and_checkpoint(tmp_path):
    from mbcompile.integrations.lightning import (BatchedLightningModule, PerModelCheckpoint,
                                                   PerModelEarlyStopping)
    models, train, val = setup()
    lrs, clip = [0.01, 0.0, 0.02], 10.0                        # model 1 never moves: it stops improving
    batched = mbcompile.batch(models, seeds=SEEDS)
    manual = copy.deepcopy(batched)
    init1 = copy.deepcopy(models[1].state_dict())
    module = BatchedLightningModule(
        batched, mse, torch.optim.SGD, lr=lrs, momentum=0.9, max_grad_norm=clip,
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5))
    stopper = PerModelEarlyStopping("val_loss", patience=1)
    ckpt = PerModelCheckpoint(tmp_path / "best", monitor="val_loss")
    trainer(tmp_path, 3, logger=False, callbacks=[stopper, ckpt]).fit(module, train, val)

    assert stopper.stopped == {1: 1} and module.model_ids == [0, 2] and batched.n == 2
    manual_run(manual, train, 3, lrs, clip, 2)                # the full batch, nobody dropped
    for k, v in manual.state_dict().items():
        torch.testing.assert_close(batched.state_dict()[k], v[[0, 2]], **TOL, msg=k)
    assert set(ckpt.best_model_paths) == {0, 1, 2} and ckpt.best_epochs == {0: 2, 1: 0, 2: 2}
    for k, v in torch.load(ckpt.best_model_paths[1]).items():
        torch.testing.assert_close(v, init1[k], **TOL)           # model 1's best is its untouched start
    best2 = torch.load(ckpt.best_model_paths[2])
    torch.testing.assert_close(best2["3.weight"], batched.get_parameter("3.weight")[1].detach(), **TOL)


def ckpt_trainer(tmp_path, epochs, dirpath, callbacks=()):
    """A trainer with Lightning's own ModelCheckpoint (``last.ckpt`` in ``dirpath``)."""
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=[*callbacks, pl.callbacks.ModelCheckpoint(dirpath, save_last=True)])


@pytest.mark.parametrize("early_stop", [False, True], ids=["dropout", "dropout-and-early-stopping"])
def test_resume_from_lightning_checkpoint_is_exact(tmp_path, early_stop):
    """``trainer.fit(..., ckpt_path=last.ckpt)`` from Lightning's ModelCheckpoint continues every model's
    random stream (the same dropout masks) and, if models had left the batch, leaves them out again: the
    resumed run ends on exactly the weights of the uninterrupted one."""
    from mbcompile.integrations.lightning import BatchedLightningModule, PerModelEarlyStopping
    models, train, val = setup()
    lrs = [0.01, 0.0, 0.02] if early_stop else [0.01, 0.05, 0.2]

    def module():
        return BatchedLightningModule(
            mbcompile.batch(copy.deepcopy(models), seeds=SEEDS), mse, torch.optim.SGD, lr=lrs, momentum=0.9,
            max_grad_norm=[0.5, 0.4, 0.3], scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, 0.5))

    def cbs():
        return [PerModelEarlyStopping("val_loss", patience=1)] if early_stop else []

    whole = module()
    ckpt_trainer(tmp_path, 3, tmp_path / "a", cbs()).fit(whole, train, val)
    first = module()
    ckpt_trainer(tmp_path, 2, tmp_path / "b", cbs()).fit(first, train, val)
    resumed = module()
    ckpt_trainer(tmp_path, 3, tmp_path / "c", cbs()).fit(resumed, train, val, ckpt_path=tmp_path / "b" / "last.ckpt")
    assert resumed.model_ids == whole.model_ids == ([0, 2] if early_stop else [0, 1, 2])
    for k, v in whole.batched.state_dict().items():
        torch.testing.assert_close(resumed.batched.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert torch.equal(resumed.batched.get_rng_state()["states"]["cpu"], whole.batched.get_rng_state()["states"]["cpu"])
    # not vacuous: the interrupted run's third epoch moved the weights
    assert max((first.batched.state_dict()[k] - v).abs().max() for k, v in whole.batched.state_dict().items()) > 1e-4
