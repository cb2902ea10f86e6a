"""mbcompile.fit against each model trained alone with torch.optim: shared, per-model and masked data,
early stopping that shrinks the batch, the NaN guard, history files and the table."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mbcompile
from mbcompile.callbacks import EarlyStopping, Lambda, LRLogger, NaNGuard
from mbcompile.data import PerModelLoader, SharedLoader, bootstrap_weights, kfold_masks, per_model_indices
from mbcompile.fit import fit
from mbcompile.history import History
from mbcompile.amp import GradScaler
from mbcompile.optim import optimizer

N = 4
TOL = dict(rtol=1e-9, atol=1e-10)


@pytest.fixture(autouse=True)
def _one_thread():  # tiny models: extra threads only add contention
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def dataset(num=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num, 5, generator=g, dtype=torch.float64)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def models(n=N):
    return [MLP().double() for _ in range(n)]


def assert_model(batched, pos, ref, **tol):
    got = dict(batched.unbatch(pos).named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name], p, **(tol or TOL), msg=lambda m: f"model at {pos}, {name}: {m}")


def ref_epochs(model, opt, epochs, batches_of_epoch, val=None, max_norm=None):
    """Train one model alone; returns per-epoch (train loss, val loss) like fit records them."""
    out = []
    for e in range(epochs):
        tot, cnt = 0.0, 0
        for x, y in batches_of_epoch(e):
            if len(y) == 0:
                continue
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if max_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            opt.step()
            tot, cnt = tot + loss.item() * len(y), cnt + len(y)
        vl = None
        if val is not None:
            with torch.no_grad():
                vl = sum(F.cross_entropy(model(x), y, reduction="sum").item() for x, y in val) / sum(len(y) for _, y in val)
        out.append((tot / cnt, vl))
    return out


def test_shared_data_matches_each_model_alone():
    x, y = dataset()
    ms = models()
    refs = copy.deepcopy(ms)
    lrs = [0.3, 0.1, 0.03, 0.01]
    train = SharedLoader(x[:32], y[:32], batch_size=8, seed=3)
    val = [(x[32:], y[32:])]
    batched = mbcompile.batch(ms)
    opt = optimizer(batched, torch.optim.SGD, lr=lrs, momentum=0.9, weight_decay=[0.0, 0.01, 0.0, 0.1])
    seen = []
    hist = fit(batched, train, F.cross_entropy, opt, epochs=3, val_data=val, metrics=["accuracy"],
               max_grad_norm=0.5, progress=False, callbacks=[
                   Lambda(on_epoch_end=lambda run, logs: seen.append({k: v.clone() for k, v in logs.items()}))])
    assert [tuple(v.shape) for v in seen[0].values()] == [(N,)] * 3  # callbacks see [n] per metric
    for i, r in enumerate(refs):
        o = torch.optim.SGD(r.parameters(), lr=lrs[i], momentum=0.9, weight_decay=[0.0, 0.01, 0.0, 0.1][i])

        def batches(e):
            train.set_epoch(e)
            return list(train)
        curves = ref_epochs(r, o, 3, batches, val, max_norm=0.5)
        assert_model(batched, i, r)
        torch.testing.assert_close(hist.curve("loss", i), [c[0] for c in curves], **TOL)
        torch.testing.assert_close(hist.curve("val_loss", i), [c[1] for c in curves], **TOL)
    assert hist["val_accuracy"].shape == (3, N)
    assert hist.hparams["lr"] == lrs and hist.hparams["weight_decay"] == [0.0, 0.01, 0.0, 0.1]
    assert len(hist.steps["loss"]) == 12 and len(hist.steps["loss"][0]) == N


def test_per_model_data_bootstrap_streams_match_each_model_alone():
    x, y = dataset()
    ms = models()
    refs = copy.deepcopy(ms)
    seeds = [11, 12, 13, 14]
    train = PerModelLoader(x, y, batch_size=12, seeds=seeds, bootstrap=True)
    batched = mbcompile.batch(ms, in_dims=0)
    opt = optimizer(batched, torch.optim.Adam, lr=[1e-2, 3e-2, 1e-3, 3e-3])
    hist = fit(batched, train, F.cross_entropy, opt, epochs=2, data="per_model", progress=False,
               val_data=[(x, y)], val_data_mode="shared")
    for i, r in enumerate(refs):
        o = torch.optim.Adam(r.parameters(), lr=[1e-2, 3e-2, 1e-3, 3e-3][i])

        def batches(e, i=i):  # model i's own bootstrap stream, built independently of the loader
            idx = per_model_indices(len(x), [seeds[i]], epoch=e, bootstrap=True)[0]
            return [(x[idx[k:k + 12]], y[idx[k:k + 12]]) for k in range(0, len(x), 12)]
        curves = ref_epochs(r, o, 2, batches, [(x, y)])
        assert_model(batched, i, r)
        torch.testing.assert_close(hist.curve("loss", i), [c[0] for c in curves], **TOL)
        torch.testing.assert_close(hist.curve("val_loss", i), [c[1] for c in curves], **TOL)
    # the streams really differ between models (a bootstrap, not one shared shuffle)
    idx = per_model_indices(len(x), seeds, bootstrap=True)
    assert not torch.equal(idx[0], idx[1]) and idx.shape == (N, len(x))


def test_masked_subsets_have_no_padding_bias_and_empty_models_skip_the_step():
    x, y = dataset(40)
    masks = kfold_masks(40, N, seed=1)             # model i trains on every fold but fold i
    masks[:, :8] = False                            # batch 0 holds no sample of any model: nobody steps
    masks[2, 8:16] = False                          # model 2 also owns nothing of batch 1
    ms = models()
    refs = copy.deepcopy(ms)
    train = SharedLoader(x, y, batch_size=8, shuffle=False, weights=masks)
    val = SharedLoader(x, y, batch_size=20, shuffle=False, weights=~masks)   # each model's own held-out fold
    batched = mbcompile.batch(ms)
    opt = optimizer(batched, torch.optim.Adam, lr=[0.01, 0.02, 0.03, 0.04], weight_decay=0.1)
    hist = fit(batched, train, F.cross_entropy, opt, epochs=2, val_data=val, data="mask", progress=False)
    for i, r in enumerate(refs):
        o = torch.optim.Adam(r.parameters(), lr=0.01 * (i + 1), weight_decay=0.1)
        m = masks[i]

        def batches(e, m=m):  # alone: only its own samples, an empty batch is no step at all
            return [(x[k:k + 8][m[k:k + 8]], y[k:k + 8][m[k:k + 8]]) for k in range(0, 40, 8)]
        curves = ref_epochs(r, o, 2, batches, [(x[~m], y[~m])])
        assert_model(batched, i, r)
        torch.testing.assert_close(hist.curve("loss", i), [c[0] for c in curves], **TOL)
        torch.testing.assert_close(hist.curve("val_loss", i), [c[1] for c in curves], **TOL)
    steps = torch.tensor(hist.steps["loss"])
    assert torch.isnan(steps[0]).all() and torch.isnan(steps[1, 2]) and not torch.isnan(steps[1, :2]).any()
    assert int(opt.state[next(iter(batched.parameters()))]["step"][2]) == 6  # 10 batches, 4 of them without a sample of model 2


def test_bootstrap_weights_equal_training_on_the_resample():
    x, y = dataset(24)
    w = bootstrap_weights(24, seeds=[5, 6])
    ms = models(2)
    refs = copy.deepcopy(ms)
    batched = mbcompile.batch(ms)
    opt = optimizer(batched, torch.optim.SGD, lr=[0.1, 0.2])
    fit(batched, [(x, y, w)], F.cross_entropy, opt, epochs=3, data="weights", progress=False)
    for i, r in enumerate(refs):
        idx = torch.repeat_interleave(torch.arange(24), w[i].long())   # the resample itself
        ref_epochs(r, torch.optim.SGD(r.parameters(), lr=0.1 * (i + 1)), 3, lambda e: [(x[idx], y[idx])])
        assert_model(batched, i, r)


def test_early_stopping_shrinks_the_batch_and_survivors_continue_exactly():
    x, y = dataset()
    lrs = [0.05, 0.0, 0.02, 0.0]  # models 1 and 3 never improve after epoch 1; 0 and 2 always do
    train = SharedLoader(x[:32], y[:32], batch_size=8, seed=1)
    val = [(x[32:], y[32:])]
    ms = models()
    plain = mbcompile.batch(copy.deepcopy(ms))
    opt_p = optimizer(plain, torch.optim.SGD, lr=lrs, momentum=0.9)
    sched_p = torch.optim.lr_scheduler.StepLR(opt_p, step_size=1, gamma=0.7)
    fit(plain, train, F.cross_entropy, opt_p, epochs=4, val_data=val, scheduler=sched_p, progress=False)

    batched = mbcompile.batch(ms)
    opt = optimizer(batched, torch.optim.SGD, lr=lrs, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    sizes = []
    hist = fit(batched, train, F.cross_entropy, opt, epochs=4, val_data=val, scheduler=sched, progress=False,
               callbacks=[EarlyStopping(patience=1), LRLogger(),
                          Lambda(on_epoch_start=lambda run: sizes.append(run.batched.n))])
    assert sizes == [4, 4, 2, 2] and batched.n == 2 and opt.n == 2
    assert all(p.shape[0] == 2 for p in batched.parameters())
    assert hist.active == [0, 2]
    assert hist.status[1] == hist.status[3] == "early stopped (epoch 2)" and hist.status[0] == "active"
    for pos, i in enumerate([0, 2]):  # survivors: the trajectory of the unshrunk run (to rounding: the
        assert_model(batched, pos, plain.unbatch(i), rtol=1e-13, atol=1e-15)  # kernels' blocking depends on n)
    for i in (1, 3):  # stopped models: curves end at epoch 2, weights kept (lr 0: the initial ones)
        assert [math.isnan(v) for v in hist.curve("val_loss", i)] == [False, False, True, True]
        for name, p in hist.model(i).named_parameters():
            torch.testing.assert_close(p, ms[i].get_parameter(name), rtol=0, atol=0)
    lr = hist["lr"]
    torch.testing.assert_close(lr[:, 0], torch.tensor([0.05 * 0.7 ** e for e in range(4)], dtype=torch.float64))
    assert math.isnan(lr[3, 1])


def test_early_stopping_freeze_keeps_the_batch_and_the_weights():
    x, y = dataset()
    ms = models()
    batched = mbcompile.batch(ms)
    opt = optimizer(batched, torch.optim.Adam, lr=[0.01, 0.0, 0.02, 0.03])
    frozen_at = {}

    def snap(run, logs):
        if 1 in run.frozen and not frozen_at:
            frozen_at.update({k: v[1].clone() for k, v in batched.state_dict().items()})
    hist = fit(batched, [(x, y)], F.cross_entropy, opt, epochs=4, progress=False,
               callbacks=[EarlyStopping(monitor="loss", patience=1, action="freeze"), Lambda(on_epoch_end=snap)])
    assert batched.n == N and hist.active == [0, 1, 2, 3] and bool(opt.frozen[1])
    for k, v in batched.state_dict().items():
        assert torch.equal(v[1], frozen_at[k])


@pytest.mark.parametrize("action", ["drop", "freeze"])
def test_nan_guard_stops_the_diverged_model_only(action):
    x, y = dataset()
    lrs = [0.05, float("inf"), 0.1, 0.02]  # model 1 turns inf/nan after its first step
    ms = models()
    refs = copy.deepcopy(ms)
    batched = mbcompile.batch(ms)
    opt = optimizer(batched, torch.optim.SGD, lr=lrs, momentum=0.5)
    train = SharedLoader(x, y, batch_size=16, shuffle=False)
    hist = fit(batched, train, F.cross_entropy, opt, epochs=2, callbacks=[NaNGuard(action)], progress=False)
    assert hist.status[1].startswith("diverged") and hist.status[0] == "active"
    assert (batched.n, hist.active) == ((3, [0, 2, 3]) if action == "drop" else (4, [0, 1, 2, 3]))
    for i in (0, 2, 3):
        r = refs[i]
        ref_epochs(r, torch.optim.SGD(r.parameters(), lr=lrs[i], momentum=0.5), 2, lambda e: list(train))
        assert_model(batched, hist.active.index(i), r)
    assert math.isfinite(hist.final("loss")[0]) and not math.isfinite(hist["loss"][-1, 1])


def test_history_files_table_and_plot(tmp_path, monkeypatch):
    h = History(3, hparams={"lr": [0.1, 0.01, 0.001]})
    h.log_epoch(1, {"loss": [1.0, 2.0, 3.0], "val_loss": torch.tensor([1.5, 1.0, math.nan]),
                    "val_accuracy": [0.5, 0.7, 0.1]})
    h.log_epoch(2, {"loss": [0.5, 1.5, math.nan], "val_loss": torch.tensor([1.2, 1.1, math.nan]),
                    "val_accuracy": [0.6, 0.65, math.nan]})
    h.status[2] = "diverged (step 3)"
    assert h.best_model() == 1 and h.rank() == [2, 1, 3] and h.best_model("val_accuracy") == 1
    assert h.final("loss").tolist()[:2] == [0.5, 1.5] and h.final("loss")[2] == 3.0
    table = h.summary()
    assert "rank" in table and "best val_loss" in table and "diverged" in table and "lr" in table
    assert table.splitlines()[2].startswith("1 ")  # sorted by rank
    h.to_json(tmp_path / "h.json")
    back = History.from_json(tmp_path / "h.json")
    assert back.metrics.keys() == h.metrics.keys() and back.status == h.status
    assert torch.equal(back["val_loss"].nan_to_num(-1), h["val_loss"].nan_to_num(-1))
    csv = h.to_csv(tmp_path / "h.csv").splitlines()
    assert csv[0] == "epoch,model,lr,loss,val_loss,val_accuracy" and len(csv) == 1 + 2 * 3
    assert (tmp_path / "h.csv").read_text().splitlines() == csv
    pytest.importorskip("matplotlib")
    h.plot(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install"):
        h.plot(tmp_path / "again.png")


def test_clear_errors():
    x, y = dataset(8)
    batched = mbcompile.batch(models(2))
    opt = optimizer(batched, torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="in_dims=0"):
        fit(batched, [(x, y)], F.cross_entropy, opt, data="per_model", progress=False)
    with pytest.raises(TypeError, match="one-shot iterator"):
        fit(batched, iter([(x, y)]), F.cross_entropy, opt, progress=False)
    with pytest.raises(ValueError, match="data='weights'"):
        fit(batched, [(x, y)], F.cross_entropy, opt, data="weights", progress=False)
    with pytest.raises(TypeError, match="per-model optimizer"):
        fit(batched, [(x, y)], F.cross_entropy, torch.optim.SGD(batched.parameters(), lr=0.1), progress=False)
    with pytest.raises(TypeError, match="ReduceLROnPlateau"):
        fit(batched, [(x, y)], F.cross_entropy, opt, progress=False,
            scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(opt))


def test_grad_scaler_and_clipping_per_model_like_torch_amp():
    x, y = dataset()
    x = x.float()
    ms = [MLP() for _ in range(3)]
    refs = copy.deepcopy(ms)
    lrs = [0.1, 0.2, 0.05]
    batched = mbcompile.batch(ms)
    opt = optimizer(batched, torch.optim.SGD, lr=lrs, momentum=0.9)
    scaler = GradScaler(batched, init_scale=2.0**8, growth_interval=2)
    train = SharedLoader(x, y, batch_size=16, seed=2)
    fit(batched, train, F.cross_entropy, opt, epochs=2, scaler=scaler, max_grad_norm=0.3, progress=False)
    for i, r in enumerate(refs):
        o = torch.optim.SGD(r.parameters(), lr=lrs[i], momentum=0.9)
        s = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
        for e in range(2):
            train.set_epoch(e)
            for xb, yb in train:
                o.zero_grad()
                s.scale(F.cross_entropy(r(xb), yb)).backward()
                s.unscale_(o)
                torch.nn.utils.clip_grad_norm_(r.parameters(), 0.3)
                s.step(o)
                s.update()
        assert float(scaler.get_scale()[i]) == s.get_scale()
        assert_model(batched, i, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("data", ["shared", "per_model"])
def test_fused_fit_equals_the_default_loop(data):
    """fit(fused=True) runs every step as one mbcompile.train_step program: same weights, losses and
    history as the default loop (float64, up to rounding), with per-step schedules, clipping and an
    early-stopped (frozen) model."""
    x, y = dataset()
    ms = models()
    lrs = [0.3, 0.1, 0.03, 0.01]
    runs = {}
    for fused in (False, True):
        if data == "shared":
            train, batched = SharedLoader(x[:32], y[:32], batch_size=8, seed=3), mbcompile.batch(copy.deepcopy(ms))
        else:
            train = PerModelLoader(x, y, batch_size=12, seeds=[11, 12, 13, 14])
            batched = mbcompile.batch(copy.deepcopy(ms), in_dims=0)
        opt = optimizer(batched, torch.optim.Adam, lr=lrs)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        stop = EarlyStopping(monitor="val_loss", patience=0, action="freeze")
        hist = fit(batched, train, F.cross_entropy, opt, epochs=3, val_data=[(x[32:], y[32:])],
                   val_data_mode="shared", data=data, scheduler=sched, scheduler_interval="step",
                   max_grad_norm=0.5, progress=False, callbacks=[stop], fused=fused)
        runs[fused] = (batched, hist, opt)
    (b0, h0, o0), (b1, h1, o1) = runs[False], runs[True]
    for (name, p), (_, q) in zip(b0.named_parameters(), b1.named_parameters()):
        torch.testing.assert_close(q, p, **TOL, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(h1["loss"], h0["loss"], **TOL, equal_nan=True)
    torch.testing.assert_close(h1["val_loss"], h0["val_loss"], **TOL, equal_nan=True)
    assert [g["lr"] for g in o1.param_groups] == [g["lr"] for g in o0.param_groups]
    assert b1.fc1.weight.grad is None                      # the fused step fills no .grad


def test_fused_fit_refuses_what_train_step_cannot_do():
    batched = mbcompile.batch(models())
    opt = optimizer(batched, torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="fused=False"):
        fit(batched, [dataset()], F.cross_entropy, opt, scaler=GradScaler(batched), fused=True, progress=False)


@pytest.mark.parametrize("fused", [False, True], ids=["loop", "fused"])
def test_a_per_model_max_grad_norm_follows_the_models_left_after_a_drop(fused):
    """Model 1 is dropped after epoch 0; models 0 and 2 go on clipped at their own max norms (0.05 and
    0.3), each as when trained alone with torch's clip_grad_norm_."""
    x, y = dataset()
    ms = models(3)
    refs = copy.deepcopy(ms)
    lrs, norms = [0.3, 0.2, 0.1], [0.05, 1.0, 0.3]
    batched = mbcompile.batch(ms)
    opt = optimizer(batched, torch.optim.SGD, lr=lrs)
    train = SharedLoader(x, y, batch_size=16, seed=4)
    drop = Lambda(on_epoch_end=lambda run, logs: run.stop([1], "drop", "dropped") if run.epoch == 0 else None)
    hist = fit(batched, train, F.cross_entropy, opt, epochs=3, max_grad_norm=norms, progress=False, callbacks=[drop],
               fused=fused)
    assert hist.active == [0, 2] and batched.n == 2
    for pos, i in enumerate([0, 2]):
        r = refs[i]
        ref_epochs(r, torch.optim.SGD(r.parameters(), lr=lrs[i]), 3,
                   lambda e: (train.set_epoch(e), list(train))[1], max_norm=norms[i])
        assert_model(batched, pos, r)


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


@pytest.mark.parametrize("fused", [False, True])
def test_a_frozen_model_keeps_its_batch_norm_statistics(fused):
    """A frozen model's forward still runs with the others: its running statistics are put back, so
    the model it stopped as is the one history.model(i) gives (as for a dropped model)."""
    x, y = dataset()
    batched = mbcompile.batch([BNNet().double() for _ in range(3)])
    opt = optimizer(batched, torch.optim.SGD, lr=0.1)
    at_stop = {}

    def stop(run):
        if run.epoch == 1:
            at_stop.update({k: v.clone() for k, v in run.batched.unbatch(1).state_dict().items()})
            run.stop([1], "freeze", "stopped by the test")
    hist = fit(batched, [(x[:24], y[:24]), (x[24:], y[24:])], F.cross_entropy, opt, epochs=3, progress=False,
               fused=fused, callbacks=[Lambda(after_epoch=stop)])
    final = hist.model(1).state_dict()
    for k, v in at_stop.items():
        assert torch.equal(final[k], v), k
    assert not torch.equal(hist.model(0).bn.running_mean, batched.unbatch(1).bn.running_mean)


def test_masked_batches_without_a_models_samples_leave_its_statistics_alone():
    """Model 2 owns no sample of batch 1: alone it never sees that batch, so neither its weights nor its
    batch-norm statistics move there."""
    x, y = dataset(32)
    masks = torch.ones(3, 32, dtype=torch.bool)
    masks[2, 8:16] = False
    ms = [BNNet().double() for _ in range(3)]
    refs = copy.deepcopy(ms)
    train = SharedLoader(x, y, batch_size=8, shuffle=False, weights=masks)
    batched = mbcompile.batch(ms)
    opt = optimizer(batched, torch.optim.SGD, lr=[0.1, 0.2, 0.3])
    fit(batched, train, F.cross_entropy, opt, epochs=2, data="mask", progress=False)
    for i, r in enumerate(refs):
        o = torch.optim.SGD(r.parameters(), lr=0.1 * (i + 1))
        m = masks[i]
        ref_epochs(r, o, 2, lambda e, m=m: [(x[k:k + 8][m[k:k + 8]], y[k:k + 8][m[k:k + 8]]) for k in range(0, 32, 8)])
        assert_model(batched, i, r)
        torch.testing.assert_close(batched.unbatch(i).bn.running_var, r.bn.running_var, **TOL)
        assert int(batched.unbatch(i).bn.num_batches_tracked) == int(r.bn.num_batches_tracked)


def test_values_callbacks_add_at_step_end_go_into_the_step_history():
    x, y = dataset()
    batched = mbcompile.batch(models(2))
    opt = optimizer(batched, torch.optim.SGD, lr=[0.1, 0.2])

    def add(run, logs):
        logs["loss_x2"] = logs["loss"] * 2
        if run.step >= 2:
            logs["late"] = 7.0
    hist = fit(batched, [(x[:24], y[:24]), (x[24:], y[24:])], F.cross_entropy, opt, epochs=2, progress=False,
               callbacks=[Lambda(on_step_end=add)])
    torch.testing.assert_close(torch.tensor(hist.steps["loss_x2"]), 2 * torch.tensor(hist.steps["loss"]))
    assert hist.steps["late"] == [None, 7.0, 7.0, 7.0]


def test_history_json_is_strict_and_keeps_infinities():
    import json
    h = History(2)
    h.log_epoch(0, {"loss": [math.inf, math.nan]})
    text = h.to_json()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    back = History.from_json(text)["loss"]
    assert back[0, 0] == math.inf and math.isnan(back[0, 1])
