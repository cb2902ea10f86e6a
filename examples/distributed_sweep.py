"""Split a batch of 16 models over processes (and machines): each rank trains its share as one batch,
no gradient is all-reduced, metrics are gathered and the best model comes back on rank 0.

    torchrun --nproc_per_node=2 examples/distributed_sweep.py            # gloo on CPU, NCCL on GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
        examples/distributed_sweep.py                                    # two machines
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import mbcompile
from mbcompile.integrations.distributed import process_group, run

N = 16
LRS = torch.logspace(-3, 0, N).tolist()


def build(ids):
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    models = []
    for i in ids:                                 # model i is the same model whichever rank trains it
        torch.manual_seed(i)
        models.append(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 2)))
    return mbcompile.batch(models, seeds=ids).to(device)


def train(batched, ids):
    device = next(batched.parameters()).device
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 16, generator=g)
    y = (x[:, :8].sum(1) > 0).long()
    x, y = x.to(device), y.to(device)
    opt = mbcompile.optimizer(batched, torch.optim.SGD, lr=[LRS[i] for i in ids], momentum=0.9)
    for _ in range(10):
        batched.train()
        for i in range(0, 768, 64):
            opt.zero_grad()
            mbcompile.loss(F.cross_entropy, batched(x[i:i + 64]), y[i:i + 64]).sum().backward()
            opt.step()
    batched.eval()
    with torch.no_grad():
        return mbcompile.loss(F.cross_entropy, batched(x[768:]), y[768:])


def main():
    with process_group() as (rank, world):
        res = run(N, build, train)
        print(f"rank {rank}/{world} trained models {res.ids}")
        if rank == 0:
            print("val loss per model:", [round(v, 4) for v in res.metrics.tolist()])
            print(f"best: model {res.best_index} (lr={LRS[res.best_index]:.4g})")
            torch.save(res.best_model.state_dict(), "best_model.pt")


if __name__ == "__main__":
    main()
