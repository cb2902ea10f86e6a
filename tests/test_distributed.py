"""Sharding over torch.distributed: 5 models over 2 gloo processes (3 + 2) give the same metrics, the
same best model and the same weights as all 5 in one process (per-model lrs, dropout with per-model seeds)."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp_mp
import torch.nn as nn
import torch.nn.functional as F

import mbcompile
from mbcompile.integrations.distributed import gather_metrics, process_group, run, shard
from mbcompile.optim import optimizer

N = 5
LRS = [0.02, 0.05, 0.1, 0.2, 0.4]
SEEDS = [101, 102, 103, 104, 105]

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)


def make(i):
    torch.manual_seed(1000 + i)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 1)).double()


def build(ids):
    return mbcompile.batch([make(i) for i in ids], seeds=[SEEDS[i] for i in ids])


def train(batched, ids):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = x.sum(1, keepdim=True).sin()
    opt = optimizer(batched, torch.optim.SGD, lr=[LRS[i] for i in ids], momentum=0.9)
    for _ in range(3):
        for k in range(0, 32, 8):
            opt.zero_grad()
            mbcompile.loss(F.mse_loss, batched(x[k:k + 8]), y[k:k + 8]).sum().backward()
            opt.step()
    batched.eval()
    with torch.no_grad():
        return mbcompile.loss(F.mse_loss, batched(x[32:]), y[32:])


def _rank_main(rank, world, init, out):
    with process_group("gloo", init_method=init, rank=rank, world_size=world) as (r, w):
        assert (r, w) == (rank, world)
        res = run(N, build, train)
        states = [None] * w
        dist.all_gather_object(states, (res.ids, {k: v.clone() for k, v in res.batched.state_dict().items()}))
        if r == 0:
            torch.save({"metrics": res.metrics, "best": res.best_index, "model": res.best_model.state_dict(),
                        "states": states}, out)
        else:
            assert res.best_model is None


def test_shard_is_balanced_and_contiguous():
    assert [shard(5, r, 2) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [shard(7, r, 3) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert sum((shard(64, r, 6) for r in range(6)), []) == list(range(64))
    with pytest.raises(ValueError, match="at most 2"):
        shard(2, 0, 3)


def test_two_gloo_processes_match_single_process(tmp_path):
    out = tmp_path / "result.pt"
    tmp_mp.spawn(_rank_main, args=(2, f"file://{tmp_path / 'pg'}", str(out)), nprocs=2, join=True)
    res = torch.load(out, weights_only=False)

    single = build(list(range(N)))
    metrics = train(single, list(range(N)))
    torch.testing.assert_close(res["metrics"], metrics.double(), rtol=1e-9, atol=1e-12)
    assert res["best"] == int(metrics.argmin())
    best = single.unbatch(res["best"]).state_dict()
    assert res["model"].keys() == best.keys()
    for k, v in best.items():
        torch.testing.assert_close(res["model"][k], v, rtol=1e-9, atol=1e-12)
    for ids, state in res["states"]:                    # every model's weights, not only the best
        for k, v in single.state_dict().items():
            torch.testing.assert_close(state[k], v[ids], rtol=1e-9, atol=1e-12)
    assert len(set(metrics.tolist())) == N              # models really differ


def test_gather_metrics_single_process(tmp_path):
    with process_group("gloo", init_method=f"file://{tmp_path / 'pg1'}", rank=0, world_size=1):
        m = gather_metrics(torch.tensor([3.0, 1.0]), [0, 1], 2)
        assert m.tolist() == [3.0, 1.0]
    assert not dist.is_initialized()
