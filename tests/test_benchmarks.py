"""The benchmark suite keeps working: one tiny run end to end, and its correctness check can fail.
No timing assertions."""
import importlib.util
import json

import pytest
import torch

import benchmarks
from benchmarks import suite

HAS_MPL = importlib.util.find_spec("matplotlib") is not None


@pytest.mark.parametrize("rounds", [1, 2], ids=["one_after_another", "interleaved"])
def test_suite_runs_one_tiny_workload(tmp_path, rounds):
    rc = benchmarks.main(["--workloads", "tiny_mlp", "--n", "2", "--steps", "2", "--warmup", "1", "--rounds", rounds,
                          "--methods", "sequential,vmap,mbcompile", "--peak-size", "256", "--out", tmp_path])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    md = (tmp_path / "results.md").read_text()
    if HAS_MPL:
        assert (tmp_path / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert any("matplotlib" in note for note in res["notes"])
    for key in ("cpu_model", "cores", "torch_version", "device"):
        assert res["machine"][key]
    assert res["peak_matmul"]["flops_per_s"] > 0
    assert res["workloads"]["tiny_mlp"]["flops_per_model_step"] > 0
    rows = {r["method"]: r for r in res["results"]}
    assert set(rows) == {"sequential", "vmap", "mbcompile"}
    for name, r in rows.items():
        assert r["workload"] == "tiny_mlp" and r["n"] == 2
        assert r["status"] == "ok", r.get("reason")
        assert r["timed_steps"] == 2
        s = r["step_s"]
        assert 0 < s["min"] <= s["median"] <= s["max"]
        for key in ("model_samples_per_s", "speedup_vs_sequential", "speedup_vs_vmap", "fraction_of_peak",
                    "peak_mem_bytes", "first_step_s", "setup_s"):
            assert r[key] is not None, (name, key)
        c = r["correctness"]
        assert c["passed"], (name, c)
        assert c["param_max_abs_diff"] < 1e-5
    assert rows["sequential"]["speedup_vs_sequential"] == 1.0
    assert rows["vmap"]["speedup_vs_vmap"] == 1.0
    assert "mbcompile_times_s" in rows["mbcompile"]
    assert "| tiny_mlp | 2 | mbcompile |" in md
    assert all(("timing" in r) == (rounds > 1) for r in rows.values())
    assert ("interleaved, in 2 rounds" in md) == (rounds > 1)


def test_correctness_check_catches_a_wrong_gradient():
    g = {"w": torch.tensor([0.5, -0.25, 1e-9]), "b": torch.tensor([0.1])}
    p = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.0])}
    ref = {"params": p, "grads": g}
    assert suite.compare(ref, ref)["passed"]
    # a noise-level gradient flips Adam's first step (|dp| = 2 lr): reported, but not a failure
    noisy = {"params": {**p, "w": p["w"] + torch.tensor([0, 0, 2e-3])}, "grads": {**g, "w": g["w"] + 3e-9}}
    c = suite.compare(noisy, ref)
    assert c["passed"] and c["param_max_abs_diff"] > 1e-3
    wrong = {"params": p, "grads": {**g, "b": torch.tensor([0.11])}}  # 10% off
    assert not suite.compare(wrong, ref)["passed"]
    moved = {"params": {**p, "w": p["w"] + torch.tensor([1e-3, 0, 0])}, "grads": g}
    assert not suite.compare(moved, ref)["passed"]
    nan = {"params": p, "grads": {**g, "b": torch.tensor([float("nan")])}}
    assert not suite.compare(nan, ref)["passed"]


def test_quick_mode_defaults():
    a = suite.parse(["--quick"])
    assert a.ns == [1, 16] and a.steps < 20
    assert {"tiny_mlp", "mlp784", "lenet5", "char_lstm"} <= set(a.workloads)
    full = suite.parse([])
    assert full.ns == [1, 4, 16, 64] and full.steps >= 20
    assert a.rounds > 1 and full.rounds == 1          # quick: interleaved; full (n=64): one at a time


class _Skewed(suite.Sequential):
    """Sequential training whose reported gradient is 10% off: in float32 only, or in every dtype."""
    name, only_float32 = "skewed", True

    def grads(self):
        gs = super().grads()
        return {k: g * 1.1 if (g.dtype == torch.float32 or not self.only_float32) else g for k, g in gs.items()}


class _Wrong(_Skewed):
    name, only_float32 = "wrong", False


def test_float64_recheck_tells_rounding_from_a_wrong_computation():
    import argparse
    from benchmarks.workloads import WORKLOADS
    wl = WORKLOADS["tiny_mlp"]
    x, y = wl.data("cpu")
    models = wl.models(2, "cpu")
    args = argparse.Namespace(warmup=1, steps=1, budget_s=None)
    _, ref = suite.run_method(suite.Sequential, wl, models, x, y, "cpu", args, None)
    rows = {cls.name: suite.run_method(cls, wl, models, x, y, "cpu", args, ref)[0] for cls in (_Skewed, _Wrong)}
    for name, r in rows.items():
        c = r["correctness"]
        assert c["grad_max_rel_diff"] > 0.05, (name, c)       # float32 disagrees in both cases
        assert "float64" in c
    assert rows["skewed"]["correctness"]["passed"]           # float64 agrees: rounding, not a bug
    assert rows["skewed"]["correctness"]["float64"]["grad_max_rel_diff"] < 1e-12
    assert not rows["wrong"]["correctness"]["passed"]        # float64 disagrees too: a wrong computation
    assert rows["wrong"]["correctness"]["float64"]["grad_max_rel_diff"] > 0.05


@pytest.mark.parametrize("name", sorted(__import__("benchmarks.zoo", fromlist=["ZOO"]).ZOO))
def test_zoo_models_batch_and_match_each_model_alone(name):
    """Every model of the zoo benchmark (benchmarks/zoo.py) batches, and in eval mode each model's output
    equals that model alone, in float64 (the VAE's sampling on each model's own stream)."""
    import copy

    import mbcompile
    from _streams import Streams
    from benchmarks.zoo import ZOO
    cls, mx, _, _ = ZOO[name]
    torch.manual_seed(0)
    seeds = [3, 4]
    models = [cls().double().eval() for _ in seeds]
    refs = copy.deepcopy(models)
    x = mx(torch.Generator().manual_seed(1))
    x = x.double() if x.is_floating_point() else x
    b = mbcompile.batch(models, seeds=seeds).eval()
    streams = Streams(seeds)
    with torch.no_grad():
        out = b(x)
        for i, r in enumerate(refs):
            torch.testing.assert_close(out[i], streams.run(i, r, x), rtol=1e-10, atol=1e-10)


def test_zoo_times_one_model():
    from benchmarks.zoo import run
    s, m, first = run("siamese", n=2, rounds=1, steps=1)
    assert s > 0 and m > 0 and first > 0
