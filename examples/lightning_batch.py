"""Train 6 MLPs with different learning rates as one LightningModule: automatic optimization,
per-model clipping, one logged column per model, per-model early stopping (stopped models leave the
batch) and per-model best checkpoints.

    pip install 'mbcompile[lightning]'
    python examples/lightning_batch.py [--out DIR]
"""
import argparse
import tempfile

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F

import mbcompile
from mbcompile.integrations.lightning import BatchedLightningModule, PerModelCheckpoint, PerModelEarlyStopping


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--epochs", type=int, default=20)
    a = ap.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="mbcompile-lightning-")

    torch.manual_seed(0)
    x = torch.randn(512, 8)
    y = (x[:, :4].sum(1) > 0).long()
    data = torch.utils.data.TensorDataset(x, y)
    train = torch.utils.data.DataLoader(torch.utils.data.Subset(data, range(384)), batch_size=64, shuffle=True)
    val = torch.utils.data.DataLoader(torch.utils.data.Subset(data, range(384, 512)), batch_size=128)

    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 2))
    lrs = [0.001 * 3 ** i for i in range(6)]
    module = BatchedLightningModule(
        mbcompile.batch(net, n=6), F.cross_entropy, torch.optim.SGD, lr=lrs, momentum=0.9, max_grad_norm=1.0,
        scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=a.epochs))
    ckpt = PerModelCheckpoint(f"{out}/best", monitor="val_loss")
    stop = PerModelEarlyStopping("val_loss", patience=3)
    trainer = pl.Trainer(max_epochs=a.epochs, accelerator="cpu", default_root_dir=out, callbacks=[stop, ckpt],
                         enable_checkpointing=False, enable_progress_bar=False, log_every_n_steps=2)
    trainer.fit(module, train, val)
    print("stopped early (model: epoch):", stop.stopped)
    print("best val_loss per model:", {k: round(v, 4) for k, v in sorted(ckpt.best_scores.items())})
    print(f"checkpoints and logs (one column per model, e.g. val_loss_3) under {out}")


if __name__ == "__main__":
    main()
