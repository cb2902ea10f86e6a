"""Program-level chunking (mbcompile/chunking.py): a chunked program computes what each model alone
computes (outputs, gradients, batch-norm buffers, sequential dropout masks), over two steps; the
measurement leaves .grad and the random streams alone; the cases that must not chunk do not."""
import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mbcompile
from mbcompile import chunking, lowering

SEEDS = [5, 6, 7, 8, 9]


class Net(nn.Module):
    def __init__(self, p=0.3):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)  # a bias before bn: Adam on noise
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.drop = nn.Dropout(p)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        h = F.max_pool2d(h + self.c2(h), 2)
        return self.head(self.drop(h.flatten(1)))


def _run(batched, refs, x, per_model, steps=2):
    """Two SGD steps of the batched models and of each model alone (same seeds); compares everything."""
    opt = torch.optim.SGD(batched.parameters(), lr=0.1)
    ropts = [torch.optim.SGD(r.parameters(), lr=0.1) for r in refs]
    gens = [torch.Generator().manual_seed(s) for s in SEEDS[:len(refs)]]
    for _ in range(steps):
        opt.zero_grad()
        out = batched(x)
        out.square().sum().backward()
        for i, (r, ro) in enumerate(zip(refs, ropts)):
            ro.zero_grad()
            with torch.random.fork_rng():
                torch.set_rng_state(gens[i].get_state())
                o = r(x[i] if per_model else x)
                gens[i].set_state(torch.get_rng_state())
            o.square().sum().backward()
            torch.testing.assert_close(out[i], o, rtol=1e-10, atol=1e-10)
            for name, p in r.named_parameters():
                torch.testing.assert_close(dict(batched.named_parameters())[name].grad[i], p.grad,
                                           rtol=1e-9, atol=1e-10)
        opt.step()
        for ro in ropts:
            ro.step()
    for i, r in enumerate(refs):
        torch.testing.assert_close(batched.unbatch(i).b1.running_var, r.b1.running_var, rtol=1e-10, atol=1e-12)


def _notes(batched):
    return mbcompile.explain(batched).notes


@pytest.mark.parametrize("per_model", [False, True])
@pytest.mark.parametrize("k", [2, 3])                 # 5 models: chunks 2,2,1 and 3,2 (uneven last chunk)
def test_forced_chunks_match_each_model_alone(per_model, k):
    models = [Net().double() for _ in SEEDS]
    refs = copy.deepcopy(models)
    x = torch.randn(*((5,) if per_model else ()), 2, 3, 8, 8, dtype=torch.float64)
    with lowering.force(program=f"chunks{k}"):
        b = mbcompile.batch(models, in_dims=0 if per_model else None, seeds=SEEDS)
        _run(b, refs, x, per_model)
    sizes = chunking.chunk_sizes(5, k)
    assert any(s.startswith(f"program: {len(sizes)} chunks of {k}") and "forced" in s for s in _notes(b)), _notes(b)


def test_measured_choice_leaves_grads_and_random_streams_alone(monkeypatch):
    monkeypatch.setattr(chunking, "MIN_BYTES", 0)       # every program is "big": the chooser measures
    monkeypatch.setattr(chunking, "TARGET_BYTES", 1)    # and times chunks of 1
    models = [Net().double() for _ in SEEDS]
    refs = copy.deepcopy(models)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    b = mbcompile.batch(models, seeds=SEEDS)
    _run(b, refs, x, False)                              # the first forward measures, then runs for real
    note = next(s for s in _notes(b) if s.startswith("program:"))
    assert "measured fwd+bwd on cpu" in note and "chunks of 1" in note and "whole" in note, note
    assert "chunk_s" in mbcompile.explain(b).times


def test_two_chunk_sizes_are_timed_against_the_whole_program(monkeypatch):
    monkeypatch.setattr(chunking, "MIN_BYTES", 0)
    monkeypatch.setattr(chunking, "TARGET_BYTES", 1 << 40)   # about the whole batch per chunk: 2 of 2 (n=4)
    monkeypatch.setattr(chunking, "SMALL_BYTES", 1)          # one model per chunk
    models = [Net().double() for _ in SEEDS[:4]]
    refs = copy.deepcopy(models)
    b = mbcompile.batch(models, seeds=SEEDS[:4])
    _run(b, refs, torch.randn(2, 3, 8, 8, dtype=torch.float64), False)
    note = next(s for s in _notes(b) if s.startswith("program:"))
    assert "4 chunks of 1" in note and "2 chunks of 2" in note and "whole" in note, note


@pytest.mark.parametrize("per_model", [False, True])
def test_each_models_own_program_is_timed_and_may_win(monkeypatch, per_model):
    """Where chunks of one model are timed, so are chunks of one with the default lowerings (each
    model's own ops in its own layout); when that wins, each model still computes what it alone does,
    and explain() shows its ops (no channels-last relayouts)."""
    monkeypatch.setattr(chunking, "MIN_BYTES", 0)
    monkeypatch.setattr(chunking, "TARGET_BYTES", 1)
    timed = {}

    def measure(progs, vals, backward):
        timed.update(dict.fromkeys(progs))
        return {k: (0.0 if k == chunking.PLAIN else 1.0) for k in progs}
    monkeypatch.setattr(chunking, "_measure", measure)
    models = [Net().double() for _ in SEEDS]
    refs = copy.deepcopy(models)
    x = torch.randn(*((5,) if per_model else ()), 2, 3, 8, 8, dtype=torch.float64)
    b = mbcompile.batch(models, in_dims=0 if per_model else None, seeds=SEEDS)
    _run(b, refs, x, per_model)
    assert set(timed) == {5, 1, chunking.PLAIN}, timed
    note = next(s for s in _notes(b) if s.startswith("program:"))
    assert note.startswith("program: 5 chunks of 1, default lowerings"), note
    text = str(mbcompile.explain(b))
    assert "MBCOMPILE_LOWERING=default" in text and "nhwc" not in text, text


def test_the_choice_is_timed_after_a_warm_up(monkeypatch):
    """A program's first run (its lazy set-up) is no measure of its steps: the one whose first run
    is slow but whose steps are fast wins."""
    import time
    calls = {"slow_first": 0}

    def slow_first(*xs):
        calls["slow_first"] += 1
        time.sleep(0.3 if calls["slow_first"] == 1 else 0.001)
        return []

    def steady(*xs):
        time.sleep(0.02)
        return []
    progs, vals = {4: steady, 1: slow_first}, [torch.zeros(1), torch.zeros(1)]
    best = chunking._measure(progs, vals, backward=False)
    assert min(best, key=best.get) == 1 and calls["slow_first"] >= 2, best
    calls["slow_first"] = 0
    monkeypatch.setattr(chunking, "WARMUP_ONLY_S", 0.1)       # warm-ups past the cap decide alone
    best = chunking._measure(progs, vals, backward=False)
    assert min(best, key=best.get) == 4 and calls["slow_first"] == 1, best


def test_a_training_program_first_called_without_grad_decides_later(monkeypatch):
    monkeypatch.setattr(chunking, "MIN_BYTES", 0)
    b = mbcompile.batch([Net().double() for _ in range(3)])
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        b(x)
    assert not any(s.startswith("program:") for s in _notes(b))
    b(x).sum().backward()
    assert any(s.startswith("program:") and "fwd+bwd" in s for s in _notes(b))


@pytest.mark.parametrize("case", ["per_model_p", "different", "compiled", "default"])
def test_never_chunked(case, monkeypatch):
    monkeypatch.setattr(chunking, "MIN_BYTES", 0)
    ps = [0.1, 0.2, 0.3] if case == "per_model_p" else [0.3] * 3
    kw = {"randomness": "different"} if case == "different" else {}
    models = [Net(p).double() for p in ps]
    b = mbcompile.batch(models, **kw)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    if case == "compiled":
        prog_call = mbcompile.batch(models, compile=True)
        prog_call(x)
        assert not isinstance(prog_call._last_program.call, chunking.Chooser)
        return
    if case == "default":
        with lowering.force("default"):
            b(x).sum().backward()
        assert not any(s.startswith("program:") for s in _notes(b))
        return
    b(x).sum().backward()
    assert not any(s.startswith("program:") for s in _notes(b))
    assert not isinstance(b._last_program.call, chunking.Chooser)


def test_candidate_prefers_a_divisor_near_the_target():
    mb = 1 << 20
    assert chunking.candidate(64, 128 * mb) == 16        # 32 MB per chunk
    assert chunking.candidate(16, 128 * mb) == 4
    assert chunking.candidate(7, 70 * mb) == 3           # no divisor near 3.2: an uneven last chunk
    assert chunking.chunk_sizes(7, 3) == [3, 3, 1]


def _train_step_against_the_loop(force=None):
    """Two train_step calls (under lowering.force(program=force) if given) and two normal-loop steps of
    the same models, whole: the parameters and batch-norm buffers agree. Returns the step."""
    torch.manual_seed(0)
    models = [Net(0.0).double() for _ in range(4)]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (2,))
    lrs = [1e-2, 2e-2, 3e-2, 4e-2]
    ref = mbcompile.batch(copy.deepcopy(models))
    ropt = mbcompile.optimizer(ref, torch.optim.Adam, lr=lrs)
    with lowering.force(program=force) if force else contextlib.nullcontext():
        b = mbcompile.batch(copy.deepcopy(models))
        step = mbcompile.train_step(b, F.cross_entropy, mbcompile.optimizer(b, torch.optim.Adam, lr=lrs))
        for _ in range(2):
            step(x, y)
    with lowering.force(program="whole"):
        for _ in range(2):
            ropt.zero_grad()
            mbcompile.loss(F.cross_entropy, ref(x), y).sum().backward()
            ropt.step()
    for (name, p), (_, q) in zip(b.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(b.b1.running_mean, ref.b1.running_mean, rtol=1e-10, atol=1e-12)
    return step


def test_train_step_compiles_the_chunked_program_and_trains_as_the_normal_loop():
    assert _train_step_against_the_loop(force="chunks3").times.get("chunks") == 3     # chunks 3,1


@pytest.mark.parametrize("winner", ["whole", 2, "plain"])
def test_train_step_compiles_what_the_eager_chooser_measured(monkeypatch, winner):
    """train_step (no eager call before it) times the eager candidates itself and compiles the winner:
    the whole program (MLP 784's case: a big weight, small activations), chunks of k, or chunks of one
    model with the default lowerings; each trains as the normal loop does."""
    monkeypatch.setattr(chunking, "MIN_BYTES", 0)
    monkeypatch.setattr(chunking, "TARGET_BYTES", 1 << 40)   # candidates: 2 (n=4) and 1
    monkeypatch.setattr(chunking, "SMALL_BYTES", 1)
    key = {"whole": 4, 2: 2, "plain": chunking.PLAIN}[winner]
    timed = {}

    def measure(progs, vals, backward):
        timed.update(dict.fromkeys(progs))
        return {k: (0.0 if k == key else 1.0) for k in progs}
    monkeypatch.setattr(chunking, "_measure", measure)
    step = _train_step_against_the_loop()
    assert set(timed) == {4, 2, 1, chunking.PLAIN}, timed
    assert step.times.get("chunks") == {"whole": None, 2: 2, "plain": 1}[winner]


@pytest.mark.parametrize("gain, want", [(1.05, None), (1.3, 8)])
def test_a_compiled_program_takes_chunks_only_when_eager_chunks_clearly_won(monkeypatch, gain, want):
    """The eager chooser's pick within COMPILED_MARGIN of whole is noise for a compiled program, which
    loses fusion and gains copies in chunks (MLP 784: 9.2 ms whole, 10.3-10.8 in 2 chunks of 8)."""
    from types import SimpleNamespace
    monkeypatch.setattr(chunking, "_plan", lambda n: ("measure", None))
    prog = SimpleNamespace(chunked=object(), chunk=8, chunk_gain=gain, call=None)
    assert chunking.compiled_chunk(prog, 16) == want
