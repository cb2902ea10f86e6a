"""Sharding a batch of N models over ``torch.distributed`` ranks (processes, GPUs, machines).

Models are independent, so there is nothing to all-reduce: each rank batches its own share of the N
models and trains it alone; only the final metrics (and the best model) travel. Launch with ``torchrun``
(gloo on CPU, NCCL on GPU)::

    torchrun --nproc_per_node=4 sweep.py          # or --nnodes/--rdzv-endpoint for several machines

    with process_group():                         # init from torchrun's env; barrier + destroy on exit
        res = run(64, build=lambda ids: mbcompile.batch([make(i) for i in ids], seeds=ids),
                  train=lambda batched, ids: train_and_validate(batched, lrs[ids]))   # -> [len(ids)]
        if res.rank == 0:
            torch.save(res.best_model.state_dict(), "best.pt")

Model ``i`` gets the same seed, hyperparameters and therefore the same trajectory whichever rank it lands
on (``seeds=ids`` keeps its random stream its own), so a sharded run equals the single-process one.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from ..errors import InvalidInputError, StateError

__all__ = ["process_group", "shard", "gather_metrics", "gather_best", "run", "ShardedResult"]


@contextlib.contextmanager
def process_group(backend=None, init_method=None, rank=None, world_size=None, **kwargs):
    """Initialise the default process group (from torchrun's ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` env
    unless given) and always leave cleanly: ``barrier()`` then ``destroy_process_group()``.
    ``backend`` defaults to NCCL when CUDA is available, else gloo; with NCCL the current device is set
    to ``LOCAL_RANK``. Yields ``(rank, world_size)``."""
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    owned = not dist.is_initialized()
    if owned:
        kw = dict(kwargs)
        if init_method is not None:
            kw["init_method"] = init_method
        if rank is not None:
            kw["rank"] = rank
        if world_size is not None:
            kw["world_size"] = world_size
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0 if rank is None else rank)))
        dist.init_process_group(backend, **kw)
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        if owned and dist.is_initialized():
            try:
                _barrier()       # without it gloo processes may abort at exit (FACTS.md)
            finally:
                dist.destroy_process_group()


def _barrier():
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def shard(n: int, rank: int | None = None, world_size: int | None = None) -> list[int]:
    """This rank's model indices: a contiguous, balanced split of ``range(n)`` (sizes differ by <= 1)."""
    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    if n < world_size:
        raise InvalidInputError(f"{n} models over {world_size} ranks would leave a rank without a model; use "
                                f"at most {n} processes")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (rank < extra)))


def gather_metrics(local, ids, n: int) -> torch.Tensor:
    """Every rank's ``[len(ids)]`` metrics -> the ``[n]`` float64 tensor of all models, on every rank."""
    vals = local.detach().double().cpu().reshape(-1).tolist() if isinstance(local, torch.Tensor) else \
        [float(v) for v in local]
    if len(vals) != len(ids):
        raise InvalidInputError(f"{len(vals)} metrics for {len(ids)} models on rank {dist.get_rank()}")
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (list(ids), vals))
    out = torch.full((n,), float("nan"), dtype=torch.float64)
    for pids, pvals in parts:
        out[torch.tensor(pids, dtype=torch.long)] = torch.tensor(pvals, dtype=torch.float64)
    return out


def gather_best(batched, ids, metrics: torch.Tensor, mode: str = "min", dst: int = 0):
    """``(best index, model)``: the best model over all ranks (nan never wins), unbatched on the rank that
    trained it and sent to ``dst`` as a CPU module of the original class (``None`` on other ranks)."""
    if mode not in ("min", "max"):
        raise InvalidInputError(f"mode must be 'min' or 'max', got {mode!r}")
    m = metrics.clone()
    m[m.isnan()] = float("inf") if mode == "min" else float("-inf")
    best = int(m.argmin() if mode == "min" else m.argmax())
    mine = batched.unbatch(ids.index(best)).cpu() if best in ids else None
    parts = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(mine, parts, dst=dst)
    model = next((p for p in parts if p is not None), None) if parts is not None else None
    return best, model


@dataclass
class ShardedResult:
    rank: int
    ids: list                      # the models this rank trained
    batched: object                # this rank's BatchedModule
    metrics: torch.Tensor          # [n], every model's metric, on every rank
    best_index: int
    best_model: object = None      # on rank 0 only
    extra: dict = field(default_factory=dict)


def run(n: int, build, train, *, mode: str = "min") -> ShardedResult:
    """Split ``n`` models over the ranks of the initialised default group: ``build(ids)`` returns this
    rank's batch, ``train(batched, ids)`` trains it and returns its ``[len(ids)]`` metrics (lower is
    better with ``mode="min"``). Metrics are gathered to every rank, the best model to rank 0."""
    if not dist.is_initialized():
        raise StateError("mbcompile.integrations.distributed.run needs a process group: wrap it in "
                         "`with process_group():` (launched by torchrun) or call dist.init_process_group")
    ids = shard(n)
    batched = build(ids)
    if getattr(batched, "n", None) != len(ids):
        raise InvalidInputError(f"build(ids) must return a batch of len(ids)={len(ids)} models, got "
                                f"n={getattr(batched, 'n', None)}")
    local = train(batched, ids)
    metrics = gather_metrics(local, ids, n)
    best, model = gather_best(batched, ids, metrics, mode)
    return ShardedResult(dist.get_rank(), ids, batched, metrics, best, model)
