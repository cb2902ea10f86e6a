"""The eager step over many parameters at once (mbcompile/flatstep.py) against the per-parameter step
and against n torch optimizers: bit for bit, through everything that changes which parameters share a
buffer (a missing gradient, new state, a loaded state dict, frozen models, shrinking, train_step)."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

import mbcompile
from mbcompile import flatstep
from test_optim import CASES, assert_exact, batches, inject_grads, make_models, per_model, ref_backward
from _stacked import make_batched


def _flat_ran(opt) -> bool:
    return bool(getattr(opt, "_flat", None))


@pytest.fixture
def flat_all(monkeypatch):
    monkeypatch.setenv("MBCOMPILE_FLAT_STEP", "1")


def _pair(cls, kwargs, dtype=torch.float64):
    """A batched optimizer and n torch ones over the same models."""
    models = make_models(dtype=dtype)
    refs = copy.deepcopy(models)
    batched = make_batched(models)
    opt = mbcompile.optimizer(batched, cls, **kwargs)
    return batched, opt, refs, [cls(r.parameters(), **per_model(kwargs, i)) for i, r in enumerate(refs)]


def _steps(batched, opt, refs, ref_opts, steps, seed=1, before=None):
    for k, (x, y) in enumerate(batches(steps, batched.get_parameter("fc1.weight").dtype, seed=seed)):
        ref_backward(refs, x, y)
        inject_grads(batched, refs)
        if before is not None:
            before(k)
        opt.step()
        for o in ref_opts:
            o.step()


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_update_for_all_parameters_matches_torch_bit_for_bit(case, flat_all):
    cls, kwargs = CASES[case]
    batched, opt, refs, ref_opts = _pair(cls, kwargs, dtype=torch.float32)
    _steps(batched, opt, refs, ref_opts, 6)
    assert _flat_ran(opt), "the flat step did not run"
    (rec,) = opt._flat.values()                        # every parameter in one chunk
    assert len(rec.pids) == len(list(batched.parameters()))
    assert_exact(batched, refs)


def test_state_entries_are_views_of_one_buffer_and_state_dict_copies_them(flat_all):
    batched, opt, refs, ref_opts = _pair(torch.optim.Adam, dict(lr=[1e-3, 2e-3, 3e-3, 4e-3]))
    _steps(batched, opt, refs, ref_opts, 2)
    (rec,) = opt._flat.values()
    st = opt.state[batched.get_parameter("fc1.weight")]
    assert st["exp_avg"].untyped_storage().data_ptr() == rec.bufs["exp_avg"].untyped_storage().data_ptr()
    sd = opt.state_dict()
    saved = sd["state"][0]["exp_avg"]
    assert torch.equal(saved, st["exp_avg"])
    assert saved.untyped_storage().nbytes() == saved.numel() * saved.element_size()   # not the whole buffer
    saved.add_(1.0)                                     # the copy is the caller's
    assert not torch.equal(saved, st["exp_avg"])


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam], ids=["sgd", "adam"])
def test_a_missing_gradient_new_state_and_a_loaded_state_dict_rebuild_the_buffers(cls, flat_all):
    # momentum switched on at step 3 creates SGD's buffers; a gradient missing at step 4 leaves a
    # parameter out (Adam: its step count falls behind, so its scalars differ from then on); a saved
    # state dict loaded at step 6 replaces every entry
    kw = dict(lr=[1e-2, 2e-2, 3e-2, 4e-2])
    batched, opt, refs, ref_opts = _pair(cls, kw)
    name = "fc2.bias"

    def before(k):
        if k == 3 and cls is torch.optim.SGD:
            for o in [opt] + ref_opts:
                for g in o.param_groups:
                    g["momentum"] = 0.9
        if k == 4:
            batched.get_parameter(name).grad = None
            for r in refs:
                r.get_parameter(name).grad = None
        if k == 6:                                   # a round trip: every entry a new tensor
            opt.load_state_dict(torch.load(_to_bytes(opt.state_dict()), weights_only=True))

    _steps(batched, opt, refs, ref_opts, 9, before=before)
    assert _flat_ran(opt)
    assert_exact(batched, refs)
    params = dict(batched.named_parameters())
    for i, (r, ro) in enumerate(zip(refs, ref_opts)):   # the state entries are the ones that moved on
        for pname, rp in r.named_parameters():
            for key, v in ro.state[rp].items():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    assert torch.equal(opt.state[params[pname]][key][i], v), (i, pname, key)
    pids = [pid for rec in opt._flat.values() for pid in rec.pids]
    assert len(set(pids)) == len(pids), "a parameter belongs to two records"


def _to_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_frozen_models_and_a_skipped_step_keep_their_numbers(flat_all):
    cls, kwargs = CASES["sgd-nesterov"]
    batched, opt, refs, ref_opts = _pair(cls, kwargs)
    _steps(batched, opt, refs, ref_opts, 2)
    opt.freeze(1)
    before = {k: v.detach().clone() for k, v in batched.named_parameters()}
    for x, y in batches(3, seed=5):
        ref_backward(refs, x, y)
        inject_grads(batched, refs)
        opt.step(active=[True, True, False, True])
        for i, o in enumerate(ref_opts):
            if i not in (1, 2):
                o.step()
    for k, v in batched.named_parameters():
        assert torch.equal(v[1], before[k][1]) and torch.equal(v[2], before[k][2])
    assert_exact(batched, refs)                          # models 1 and 2 as their idle optimizers left them


def test_train_step_after_flat_steps_gets_unaliased_state():
    torch.manual_seed(0)
    models = make_models(dtype=torch.float64)
    refs = copy.deepcopy(models)
    batched = mbcompile.batch(models)
    opt = mbcompile.optimizer(batched, torch.optim.Adam, lr=[1e-2, 2e-2, 3e-2, 4e-2])
    ref_opts = [torch.optim.Adam(r.parameters(), lr=1e-2 * (i + 1)) for i, r in enumerate(refs)]
    data = list(batches(4))
    for x, y in data[:2]:
        opt.zero_grad()
        mbcompile.loss(F.cross_entropy, batched(x), y).sum().backward()
        opt.step()
    assert _flat_ran(opt)
    step = mbcompile.train_step(batched, F.cross_entropy, opt)
    for x, y in data[2:]:
        step(x, y)
    assert not getattr(opt, "_flat", None) and opt.__dict__.get("_flat_off")
    storages = [v.untyped_storage().data_ptr() for st in opt.state.values() for k, v in st.items()
                if k in ("exp_avg", "exp_avg_sq")]
    assert len(set(storages)) == len(storages)
    for x, y in data:
        for r, o in zip(refs, ref_opts):
            o.zero_grad()
            F.cross_entropy(r(x), y).backward()
            o.step()
    for i, r in enumerate(refs):
        got = dict(batched.unbatch(i).named_parameters())
        for name, want in r.named_parameters():
            torch.testing.assert_close(got[name], want, rtol=1e-12, atol=1e-12)


def test_plan_groups_by_scalars_dtype_and_size(monkeypatch):
    n = 4
    sc_a, sc_b = {"lr": [0.1, 0.2, 0.3, 0.4]}, {"lr": [0.1, 0.2, 0.3, 0.4]}   # equal values: one group
    sc_z = {"lr": -0.0}                                                        # -0.0 is not 0.0
    sc_0 = {"lr": 0.0}
    p = [torch.zeros(n, 3), torch.zeros(n, 5), torch.zeros(n, 2, dtype=torch.float64), torch.zeros(n, 7),
         torch.zeros(n, 7), torch.zeros(n, 1 << 15)]
    st = [{"exp_avg": torch.zeros_like(t)} for t in p]
    todo = [(p[0], p[0], st[0], sc_a), (p[1], p[1], st[1], sc_b), (p[2], p[2], st[2], sc_a),
            (p[3], p[3], st[3], sc_z), (p[4], p[4], st[4], sc_0), (p[5], p[5], st[5], sc_a)]
    keys = lambda s: tuple(s)                                                  # noqa: E731
    chunks, rest = flatstep.plan(todo, keys)
    assert [[id(it[0]) for it in c] for c in chunks] == [[id(p[0]), id(p[1])]]
    assert {id(it[0]) for it in rest} == {id(t) for t in p[2:]}               # alone, or too large on CPU
    monkeypatch.setenv("MBCOMPILE_FLAT_STEP", "0")
    assert flatstep.plan(todo, keys) == ([], todo)


def test_shrink_drops_the_buffers_and_goes_on_exactly(flat_all):
    batched, opt, refs, ref_opts = _pair(torch.optim.AdamW, dict(lr=[1e-2, 2e-2, 3e-2, 4e-2]))
    _steps(batched, opt, refs, ref_opts, 2)
    mbcompile.shrink_([0, 2], batched, opt)
    assert not getattr(opt, "_flat", None)
    refs, ref_opts = [refs[0], refs[2]], [ref_opts[0], ref_opts[2]]
    _steps(batched, opt, refs, ref_opts, 2, seed=7)
    assert _flat_ran(opt)
    assert_exact(batched, refs)
