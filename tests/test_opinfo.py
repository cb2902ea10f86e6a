"""Every batching rule against a loop over models, driven by PyTorch's OpInfo database (as functorch's
test_vmap.py does for vmap).

For each OpInfo (CPU, float64 and float32) and its first samples: the op is captured like a model
(tests/_opinfo_util.py), its graph is batched over N=3 models whose inputs are all mapped (model dim
first, or last to exercise rules that keep it in place), or the first mapped and the rest shared, or
the first shared and the rest mapped; each model's output must equal the op run on that model alone.

  mode "fallback": the pass may use its vmap/loop fallback for ops without a rule.
  mode "strict":   the fallback is off (strict=True), for every op whose graph only holds ops that
                   RULES claims; an op whose rule declined and silently fell back fails here.
  mode "grad":     (float64, ops with autograd) the batched graph traced as a batched module runs it,
                   then differentiated: each model's vector-Jacobian product (a fixed random cotangent)
                   equals the op's own autograd formula on that model alone; a shared input's gradient
                   is the sum over models.

Known failures: tests/opinfo_ledger.py. Coverage figure (docs/coverage.md):
    python tests/test_opinfo.py            # prints it;  --write  also rewrites docs/coverage.md
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _opinfo_util as U  # noqa: E402
from opinfo_ledger import LEDGER  # noqa: E402

from mbcompile.passes import RULES  # noqa: E402

from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")   # deprecations of the ops themselves
DTYPES = (torch.float64, torch.float32)
OPS = {U.op_id(op): op for op in op_db}
_CACHE: dict = {}


def _dname(dtype):
    return str(dtype).split(".")[-1]


def ledger_reason(name, dtype, mode):
    d = _dname(dtype)
    for key in (f"{name}@{d}[{mode}]", f"{name}[{mode}]", f"{name}@{d}", name):
        if key in LEDGER:
            return LEDGER[key]
    return None


def _params():
    out = []
    for name, op in OPS.items():
        supported = op.supported_dtypes("cpu")
        for dtype in DTYPES:
            if dtype not in supported:
                continue
            modes = ("fallback", "strict") + (("grad",) if dtype == torch.float64 and op.supports_autograd else ())
            for mode in modes:
                marks = []
                reason = ledger_reason(name, dtype, mode)
                if reason:
                    marks.append(pytest.mark.xfail(reason=reason, strict=True))
                out.append(pytest.param(name, dtype, mode, marks=marks, id=f"{name}-{_dname(dtype)}-{mode}"))
    return out


@pytest.fixture(scope="module", autouse=True)
def _capture_mode():
    with U.capture_mode():
        yield


def prepared(name, dtype):
    """The op's traced samples (cached: both modes of an op usually run on the same worker)."""
    key = (name, dtype)
    if key not in _CACHE:
        try:
            _CACHE[key] = U.samples(OPS[name], dtype)
        except U.Skip as e:
            _CACHE[key] = e
    return _CACHE[key]


def missing_rules(smps):
    return sorted({str(op) for s in smps for op in U.graph_ops(s.gm) if op not in RULES})


def run_op(name, dtype, strict):
    """Check every sample and case; returns True when some node ran through the fallback."""
    smps = prepared(name, dtype)
    if isinstance(smps, U.Skip):
        raise smps
    fell_back = False
    for k, s in enumerate(smps):
        for case, mapped, where in U.cases(len(s.per_model[0])):
            try:
                records = U.check(s, mapped, where, dtype, strict=strict, name=name)
            except Exception as e:
                shapes = [tuple(t.shape) for t in s.per_model[0]]
                raise AssertionError(
                    f"{name} {_dname(dtype)} sample {k} {shapes} case {case} (strict={strict}): "
                    f"{type(e).__name__}: {e}\nrerun: python -m pytest tests/test_opinfo.py -k "
                    f"'{name}-{_dname(dtype)}'") from e
            fell_back |= any(r.how.startswith("FALLBACK") for r in records)
    return fell_back


def run_grad(name, dtype):
    """check_grad for every sample and case; returns how many had something to differentiate."""
    checked = 0
    for k, s in enumerate(prepared(name, dtype)):
        for case, mapped, where in U.cases(len(s.per_model[0])):
            try:
                checked += U.check_grad(s, mapped, where, dtype, name=name)
            except Exception as e:
                raise AssertionError(f"{name} {_dname(dtype)} sample {k} case {case} (gradients): {type(e).__name__}: "
                                     f"{e}\nrerun: python -m pytest tests/test_opinfo.py -k '{name}-{_dname(dtype)}-grad'") from e
    return checked


@pytest.mark.parametrize("name,dtype,mode", _params())
def test_opinfo(name, dtype, mode):
    smps = prepared(name, dtype)
    if isinstance(smps, U.Skip):
        pytest.skip(str(smps))
    if mode == "grad":
        if not run_grad(name, dtype):
            pytest.skip("nothing to differentiate (no float input the op differentiates, or no float output)")
        return
    if mode == "strict":
        missing = missing_rules(smps)
        if missing:
            pytest.skip(f"no rule claimed for {', '.join(missing)} (runs through the fallback)")
    run_op(name, dtype, strict=(mode == "strict"))


def test_ledger_names_real_ops():
    """A ledger line must name an OpInfo of op_db (a typo would silently test nothing)."""
    for key in LEDGER:
        base = key.split("[")[0].split("@")[0]
        assert base in OPS, f"ledger entry {key!r} names no OpInfo"


# ---- coverage figure ----------------------------------------------------------------------------

def coverage():
    """Status per OpInfo over both dtypes: 'rule' (passes with the fallback off), 'fallback' (passes
    only through the fallback), 'fail', or 'skip: reason'."""
    status = {}
    with U.capture_mode():
        for name, op in OPS.items():
            per = []
            for dtype in DTYPES:
                if dtype not in op.supported_dtypes("cpu"):
                    continue
                smps = prepared(name, dtype)
                if isinstance(smps, U.Skip):
                    per.append(f"skip: {smps}")
                    continue
                try:
                    fell_back = run_op(name, dtype, strict=False)
                except AssertionError:
                    per.append("fail")
                    continue
                if fell_back or missing_rules(smps):
                    per.append("fallback")
                    continue
                try:
                    run_op(name, dtype, strict=True)
                    per.append("rule")
                except AssertionError:
                    per.append("fallback")
            if not per:
                continue
            for s in ("fail", "fallback", "rule"):
                if s in per:
                    status[name] = s
                    break
            else:
                status[name] = per[0]
    return status


def _report(status, seconds):
    tried = {k: v for k, v in status.items() if not v.startswith("skip")}
    rule = sorted(k for k, v in tried.items() if v == "rule")
    fb = sorted(k for k, v in tried.items() if v == "fallback")
    fail = sorted(k for k, v in tried.items() if v == "fail")
    skipped = sorted((k, v[6:]) for k, v in status.items() if v.startswith("skip"))
    lines = [
        "# OpInfo coverage of the batching rules",
        "",
        "Measured by `tests/test_opinfo.py` over PyTorch's OpInfo database (`op_db`, CPU, float64 and",
        "float32, the first samples of each op, n=3 models, mapped and shared inputs, model dim first",
        "or last). An op counts as *with a rule* when every case passes with the fallback disabled",
        "(`strict=True`), in both dtypes.",
        "",
        f"**{len(rule)} / {len(tried)} ops tried pass with a rule** "
        f"({100 * len(rule) / max(len(tried), 1):.1f}%); {len(fb)} more pass only through the "
        f"vmap/loop fallback; {len(fail)} fail (listed in `tests/opinfo_ledger.py`); {len(skipped)} "
        f"OpInfos were not tried (reasons below).",
        "",
        "Each model's output must match the op run on that model's inputs alone to 1e-9 (float64) or",
        "torch's float32 defaults (rtol 1.3e-6, atol 1e-5). Known failures are the xfail ledger",
        "`tests/opinfo_ledger.py` (strict: a fixed op whose line stays fails the test).",
        "",
        "Rerun (a minute or two on one core):",
        "",
        "    python tests/test_opinfo.py           # prints this summary",
        "    python tests/test_opinfo.py --write   # and rewrites docs/coverage.md",
        "    python -m pytest tests/test_opinfo.py -n 2 -q   # the tests, with the xfail ledger",
        "",
        f"torch {torch.__version__}; took {seconds:.0f} s.",
        "",
        "## Pass only through the fallback",
        "",
        ", ".join(f"`{k}`" for k in fb) or "none",
        "",
        "## Fail",
        "",
        ", ".join(f"`{k}`" for k in fail) or "none",
        "",
        "## Not tried",
        "",
    ]
    by_reason: dict = {}
    for k, why in skipped:
        by_reason.setdefault(why, []).append(k)
    for why, ks in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"- {why}: {', '.join(f'`{k}`' for k in ks)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import warnings
    warnings.simplefilter("ignore")
    t0 = time.time()
    text = _report(coverage(), time.time() - t0)
    print(text)
    if "--write" in sys.argv:
        (Path(__file__).parent.parent / "docs" / "coverage.md").write_text(text)
