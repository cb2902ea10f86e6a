"""Checkpoints of a whole run: resuming (also after a SIGKILL-like exit mid-epoch in a subprocess) gives
exactly the uninterrupted result; files are atomic, weights_only-loadable, and damage is a clear error."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mbcompile
from mbcompile import checkpoint as ckpt
from mbcompile.callbacks import Checkpoint, EarlyStopping, Lambda, LRLogger, NaNGuard
from mbcompile.checkpoint import CheckpointError
from mbcompile.fit import fit
from mbcompile.optim import optimizer

HERE = os.path.dirname(os.path.abspath(__file__))
N, EPOCHS = 4, 3   # 6 batches per epoch: 18 steps


class Interrupted(Exception):
    pass


@pytest.fixture(autouse=True, scope="module")
def _fixed_lowering():
    """Lowerings chosen by timing may differ between processes (and round differently), so the runs
    compared here, in this process and in the child, all use the fixed default lowering. (Within one
    process, and after a resume, the checkpoint carries the choices: see the last test.)"""
    old = os.environ.get("MBCOMPILE_LOWERING")
    os.environ["MBCOMPILE_LOWERING"] = "default"
    yield
    if old is None:
        del os.environ["MBCOMPILE_LOWERING"]
    else:
        os.environ["MBCOMPILE_LOWERING"] = old


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(6, 12), nn.Dropout(0.3), nn.Linear(12, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def build(path, stop_at=None, exit_at=None, loader_generator=False, fused=False, dtype=torch.float64):
    """The same run every time: dropout with per-model streams, a DataLoader shuffled by torch's global
    generator, Adam + StepLR, model 1 dropped at step 4, early stopping and a checkpoint every 3 steps."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 6, generator=g, dtype=dtype)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:48], y[:48]), batch_size=8, shuffle=True,
                                        generator=torch.Generator().manual_seed(5) if loader_generator else None)
    batched = mbcompile.batch([Net().to(dtype) for _ in range(N)], seeds=[10, 11, 12, 13])
    opt = optimizer(batched, torch.optim.Adam, lr=[0.01, 0.02, 0.05, 0.03], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def hooks(run, logs):
        if run.step == 4:
            run.stop([1], "drop", "pruned at step 4")
        if run.step == exit_at:
            os._exit(17)                  # dies like a killed job: no cleanup, no final save
        if run.step == stop_at:
            raise Interrupted
    cbs = [EarlyStopping(patience=2), NaNGuard(), LRLogger(), Lambda(on_step_end=hooks),
           Checkpoint(path, every_steps=3)]
    return batched, opt, dict(train_data=train, loss_fn=F.cross_entropy, optimizer=opt, epochs=EPOCHS,
                              val_data=[(x[48:], y[48:])], metrics=["accuracy"], callbacks=cbs,
                              scheduler=sched, max_grad_norm=1.0, progress=False, fused=fused)


def child(path, exit_at):  # run in a subprocess by the kill test
    batched, _, kw = build(path, exit_at=exit_at)
    fit(batched, **kw)


def final_state(batched, opt, hist):
    return {"model": batched.state_dict(), "opt": opt.state_dict(), "rng": batched.get_rng_state(),
            "hist": hist.state_dict(), "active": list(hist.active), "torch_rng": torch.get_rng_state()}


def assert_same(a, b, where="run"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, where
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for k, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{where}[{k}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = tmp_path_factory.mktemp("full") / "run.pt"
    batched, opt, kw = build(path)
    hist = fit(batched, **kw)
    assert hist.active == [0, 2] and hist.status[1] == "pruned at step 4"
    assert hist.status[3] == "early stopped (epoch 3)" and len(hist) == EPOCHS
    return final_state(batched, opt, hist), hist


def resume(path, **flags):
    batched, opt, kw = build(path, **flags)
    hist = fit(batched, resume=True, **kw)
    return final_state(batched, opt, hist), hist


def test_killed_mid_epoch_in_a_subprocess_resumes_bit_exactly(tmp_path, uninterrupted):
    path = tmp_path / "run.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r}); import test_checkpoint as t; "
                           f"t.child({str(path)!r}, exit_at=10)"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr[-3000:]
    saved = torch.load(path, weights_only=True)   # the last save: step 9, mid-way through epoch 2
    assert (saved["step"], saved["epoch"], saved["step_in_epoch"]) == (9, 1, 3)
    assert saved["active"] == [0, 2, 3] and 1 in saved["retired"]
    assert not [f for f in os.listdir(tmp_path) if f != "run.pt"]  # no temp file left behind
    got, hist = resume(path)
    assert_same(got, uninterrupted[0])
    assert str(hist) == str(uninterrupted[1])


def test_interrupted_at_an_epoch_boundary_resumes_bit_exactly(tmp_path, uninterrupted):
    path = tmp_path / "run.pt"
    batched, _, kw = build(path, stop_at=13)
    with pytest.raises(Interrupted):
        fit(batched, **kw)
    saved = torch.load(path, weights_only=True)
    assert (saved["step"], saved["epoch"], saved["step_in_epoch"]) == (12, 2, 0)
    got, _ = resume(path)
    assert_same(got, uninterrupted[0])


def test_loader_with_its_own_generator_resumes_mid_epoch_bit_exactly(tmp_path):
    batched, opt, kw = build(tmp_path / "full.pt", loader_generator=True)
    want = final_state(batched, opt, fit(batched, **kw))
    batched, _, kw = build(tmp_path / "run.pt", stop_at=11, loader_generator=True)
    with pytest.raises(Interrupted):
        fit(batched, **kw)
    saved = torch.load(tmp_path / "run.pt", weights_only=True)
    assert (saved["step"], saved["step_in_epoch"]) == (9, 3)
    got, _ = resume(tmp_path / "run.pt", loader_generator=True)
    assert_same(got, want)


def test_damaged_checkpoints_are_clear_errors(tmp_path, uninterrupted):
    good = tmp_path / "run.pt"
    batched, _, kw = build(good, stop_at=4)
    with pytest.raises(Interrupted):
        fit(batched, **kw)
    data = good.read_bytes()
    cases = {"truncated.pt": data[: len(data) // 2], "garbage.pt": b"\x00not a checkpoint" * 50, "empty.pt": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=r"(?s)cannot read checkpoint .*" + name + ".*truncated or corrupt"):
            ckpt.load(tmp_path / name)
    # one bit flipped inside a stored tensor: torch.load reads it without a word (it never checks the
    # zip's CRC-32), so the run would resume from other weights
    import zipfile
    info = next(i for i in zipfile.ZipFile(good).infolist() if "/data/" in i.filename and i.file_size >= 8)
    head = info.header_offset
    start = head + 30 + int.from_bytes(data[head + 26:head + 28], "little") + int.from_bytes(data[head + 28:head + 30], "little")
    flipped = bytearray(data)
    flipped[start + 3] ^= 1
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    torch.load(tmp_path / "flipped.pt", weights_only=True)        # what torch alone makes of it
    with pytest.raises(CheckpointError, match=r"(?s)flipped.pt.* is damaged: the bytes of .*archive/data/"):
        ckpt.load(tmp_path / "flipped.pt")
    torch.save({"fc1.weight": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not an mbcompile run checkpoint"):
        ckpt.load(tmp_path / "plain.pt")
    batched, _, kw = build(tmp_path / "truncated.pt")
    with pytest.raises(mbcompile.MBCompileError, match="truncated.pt"):   # through fit, too
        fit(batched, resume=tmp_path / "truncated.pt", **kw)
    small = mbcompile.batch([Net().double() for _ in range(3)])
    with pytest.raises(CheckpointError, match="holds a run of 4 models but this batch has 3"):
        fit(small, [(torch.zeros(2, 6, dtype=torch.float64), torch.zeros(2, dtype=torch.long))], F.cross_entropy,
            optimizer(small, torch.optim.SGD, lr=0.1), resume=good, progress=False)


@pytest.mark.parametrize("entry", ["n", "history", "epoch", "torch_rng", "model"])
def test_a_checkpoint_missing_an_entry_is_refused_before_anything_changes(tmp_path, uninterrupted, entry):
    """A file with the run tag but without one of the entries fit writes (edited, another tool): a
    CheckpointError naming the entry, raised before the batch's weights are touched (a bare KeyError
    used to come from fit's restore after the weights and optimizer were already loaded)."""
    batched, _, kw = build(tmp_path / "full.pt")
    fit(batched, **kw)
    state = torch.load(tmp_path / "full.pt", weights_only=True)
    del state[entry]
    torch.save(state, tmp_path / "cut.pt")
    batched, _, kw = build(tmp_path / "cut.pt")
    before = {k: v.clone() for k, v in batched.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"cut.pt' lacks '{entry}'"):
        fit(batched, resume=tmp_path / "cut.pt", **kw)
    assert_same(batched.state_dict(), before)


def test_a_pickled_module_is_not_called_corrupt(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match=r"holds a pickled Python object \(torch.nn.modules.linear.Linear") as err:
        ckpt.load(tmp_path / "module.pt")
    assert "corrupt" not in str(err.value) and "\x1b" not in str(err.value)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "a.pt"
    ckpt.atomic_save({"x": torch.ones(3)}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_save({"x": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(3))
    assert os.listdir(tmp_path) == ["a.pt"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_atomic_save_gives_the_mode_of_a_plain_open(tmp_path):
    """Not mkstemp's 0600: a new file gets 0666 & ~umask (as open() would), an existing file keeps its mode."""
    old = os.umask(0o027)
    try:
        ckpt.atomic_save({"x": torch.ones(3)}, tmp_path / "a.pt")
        with open(tmp_path / "plain.pt", "wb"):
            pass
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "a.pt").st_mode & 0o777) == oct(os.stat(tmp_path / "plain.pt").st_mode & 0o777) \
        == oct(0o640)
    os.chmod(tmp_path / "a.pt", 0o604)
    ckpt.atomic_save({"x": torch.zeros(3)}, tmp_path / "a.pt")
    assert os.stat(tmp_path / "a.pt").st_mode & 0o777 == 0o604
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["x"], torch.zeros(3))


def test_export_best_and_retired_models(tmp_path, uninterrupted):
    hist = uninterrupted[1]
    path = tmp_path / "best.pt"
    i = hist.export(path)
    assert i == hist.best_model()
    sd = torch.load(path, weights_only=True)   # a plain state_dict
    net = Net().double()
    net.load_state_dict(sd)
    for k, v in hist.model(i).state_dict().items():
        assert torch.equal(sd[k], v)
    # a model dropped from the batch at step 4 is still exportable, as a plain module too
    ckpt.export_model(hist, 1, tmp_path / "m1.pt", module=True)
    m1 = torch.load(tmp_path / "m1.pt", weights_only=False)
    assert type(m1) is Net
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), hist.retired[1].values()))


def test_lowering_choices_travel_with_the_checkpoint(tmp_path, monkeypatch):
    lowering = pytest.importorskip("mbcompile.lowering")
    if not hasattr(lowering, "_CACHE") or not hasattr(lowering, "Choice"):
        pytest.skip("this lowering module keeps no cache of measured choices")
    monkeypatch.delenv("MBCOMPILE_LOWERING")   # measure
    monkeypatch.setattr(lowering, "_CACHE", {})
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))

    def run(**kw):
        batched = mbcompile.batch([Net().double() for _ in range(2)])
        opt = optimizer(batched, torch.optim.SGD, lr=0.1)
        return fit(batched, [(x, y)], F.cross_entropy, opt, epochs=2, progress=False,
                   callbacks=[Checkpoint(tmp_path / "run.pt")], **kw)
    run()
    measured = {k: v.name for k, v in lowering._CACHE.items()}
    if not measured:
        pytest.skip("no op of this model has a measured lowering")
    saved = dict(torch.load(tmp_path / "run.pt", weights_only=True)["lowering"]["lowering"])
    assert saved == measured
    monkeypatch.setattr(lowering, "_CACHE", {k: lowering.Choice("something else", "test") for k in measured})
    run(resume=True)   # a new process would have measured anew: the checkpoint's choices win
    assert {k: v.name for k, v in lowering._CACHE.items() if k in measured} == measured


def test_fused_fit_resumes_on_the_path_train_step_chose(tmp_path, monkeypatch):
    """fit(fused=True) with train_step's path="auto" and measured lowerings: the step times the compiled
    program and the eager loop on its first calls, then keeps one (they round differently). The
    checkpoint carries that choice, so a run resumed after it continues on the same path, bit for bit
    (before, the resumed step timed both again and mixed them: float32 differences from the first step)."""
    from mbcompile import backend
    monkeypatch.delenv("MBCOMPILE_LOWERING")
    monkeypatch.setattr(backend, "DEFAULT_PATH", "auto")
    b0, o0, kw = build(tmp_path / "full.pt", fused=True, dtype=torch.float32)
    full = final_state(b0, o0, fit(b0, **kw))
    path = tmp_path / "cut.pt"
    batched, _, kw = build(path, stop_at=12, fused=True, dtype=torch.float32)
    with pytest.raises(Interrupted):
        fit(batched, **kw)
    state = torch.load(path, weights_only=True)
    assert [p["chosen"] for _, p in state["fused_paths"]] in (["compiled"], ["eager"]), state["fused_paths"]
    got, _ = resume(path, fused=True, dtype=torch.float32)
    assert_same(got, full)


def test_default_lowering_pins_train_steps_path(monkeypatch):
    """MBCOMPILE_LOWERING=default (no timing anywhere) makes path="auto" the compiled program at once;
    train_step=eager picks the loop."""
    from mbcompile import backend
    batched = mbcompile.batch([Net() for _ in range(2)])
    opt = optimizer(batched, torch.optim.SGD, lr=0.1)
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    for env, want in (("default", "compiled"), ("train_step=eager", "eager")):
        monkeypatch.setenv("MBCOMPILE_LOWERING", env)
        step = backend.train_step(batched, F.cross_entropy, opt, path="auto")
        step(x, y)
        assert step.chosen == want and not step._trials["compiled"] and not step._trials["eager"]
