"""``python -m benchmarks``: time one full training step (forward, backward, Adam) of n models trained
by each method, on each workload, and write results.json, results.md and speedup.png."""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib
import inspect
import sys
import time
import warnings
from pathlib import Path

import torch

from . import measure, report
from .methods import LR, METHODS, Sequential
from .workloads import WORKLOADS, step_flops

QUICK = {"ns": [1, 16], "steps": 10, "warmup": 2, "budget_s": 10.0, "rounds": 5}
FULL = {"ns": [1, 4, 16, 64], "steps": 20, "warmup": 3, "budget_s": None}
PARAM_TOL = 1e-5  # max |param after one Adam step (lr 1e-3) - sequential's| where |grad| >= COND_GRAD
COND_GRAD = 1e-6  # Adam's first step is lr * g / (|g| + 1e-8): ill-conditioned for |g| near 1e-8
F64_TOL = 1e-9  # the float64 re-check: max |param - sequential's| and max relative |grad - sequential's|
GRAD_TOL = 1e-3  # max |grad - sequential's| / scale, scale = max(max |sequential's grad| per tensor, 1e-3 * model max)


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="n in {1,16}, 10 timed steps, the four small workloads")
    p.add_argument("--out", default="results", help="output folder (default: results/)")
    p.add_argument("--workloads", help=f"comma list of {','.join(WORKLOADS)},optim_step")
    p.add_argument("--methods", help=f"comma list of {','.join(METHODS)}")
    p.add_argument("--n", help="comma list of model counts (quick: 1,16; full: 1,4,16,64)")
    p.add_argument("--steps", type=int, help="timed steps per method (quick: 10, full: 20)")
    p.add_argument("--warmup", type=int, help="untimed steps first, the capture/compile step included "
                                              "(quick: 2, full: 3)")
    p.add_argument("--budget-s", type=float, help="stop timing a method after this many seconds of timed "
                                                  "steps, keeping at least 3 (quick: 10; full: no limit)")
    p.add_argument("--rounds", type=int, help="time the methods of a (workload, n) interleaved, in this many "
                                               "rounds (all built first); 1: one method after another "
                                               "(quick: 5, full: 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--peak-size", type=int, help="matrix size of the peak-FLOP/s matmul (2048 CPU, 8192 GPU)")
    a = p.parse_args(argv)
    mode = QUICK if a.quick else FULL
    a.ns = [int(v) for v in a.n.split(",")] if a.n else mode["ns"]
    a.steps = a.steps if a.steps is not None else mode["steps"]
    a.warmup = max(1, a.warmup if a.warmup is not None else mode["warmup"])
    a.budget_s = a.budget_s if a.budget_s is not None else mode["budget_s"]
    a.rounds = max(1, a.rounds if a.rounds is not None else mode.get("rounds", 1))
    a.workloads = (a.workloads.split(",") if a.workloads else
                   [w.name for w in WORKLOADS.values() if w.quick or not a.quick] + ["optim_step"])
    a.methods = a.methods.split(",") if a.methods else list(METHODS)
    for name in a.workloads:
        if name not in WORKLOADS and name != "optim_step":
            p.error(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}, optim_step")
    for name in a.methods:
        if name not in METHODS:
            p.error(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return a


def main(argv=None) -> int:
    """Run the suite; returns 0, or 1 when a method's first step disagrees with sequential training."""
    args = parse(sys.argv[1:] if argv is None else [str(v) for v in argv])
    res = run(args)
    out = Path(args.out)
    paths = report.write(res, out)
    print(report.markdown(res))
    print("wrote " + ", ".join(str(p) for p in paths))
    bad = [r for r in res["results"] if r.get("correctness") and not r["correctness"]["passed"]]
    for r in bad:
        print(f"MISMATCH {r['workload']} n={r['n']} {r['method']}: {r['correctness']}", file=sys.stderr)
    return 1 if bad else 0


def run(args) -> dict:
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> dict:
    device = torch.device(args.device)
    t_start = time.perf_counter()
    res = {
        "schema": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "machine": measure.machine(device),
        "config": {"workloads": args.workloads, "methods": args.methods, "ns": args.ns, "steps": args.steps,
                   "warmup": args.warmup, "budget_s": args.budget_s, "rounds": args.rounds, "dtype": "float32",
                   "optimizer": "Adam",
                   "lr": LR, "param_tol": PARAM_TOL, "cond_grad": COND_GRAD,
                   "grad_tol": GRAD_TOL},
        "notes": [],
        "workloads": {},
        "results": [],
    }
    if device.type == "cpu":  # every method runs with the malloc setting a process using mbcompile has
        from mbcompile import hostmem
        res["machine"]["host_malloc"] = hostmem.tune()
    res["peak_matmul"] = measure.matmul_peak(device, args.peak_size)
    for name in args.workloads:
        if name == "optim_step":
            res["optim_step"] = optim_step(args)
            continue
        wl = WORKLOADS[name]
        info = res["workloads"][name] = {"description": wl.description, "batch": wl.batch}
        missing = wl.missing()
        if missing:
            info["skipped"] = f"{missing} is not installed"
            continue
        x, y = wl.data(device)
        model = wl.models(1, device)[0]
        info["params_per_model"] = sum(p.numel() for p in model.parameters())
        info["flops_per_model_step"] = step_flops(wl, model, x, y)
        for n in args.ns:
            rows = run_workload(wl, n, x, y, device, args, info["flops_per_model_step"], res["peak_matmul"])
            res["results"] += rows
            report.write(res, Path(args.out), plot_png=False)  # partial results survive an interrupted run
    res["peak_matmul_end"] = measure.matmul_peak(device, args.peak_size)
    res["machine"]["load_average_end"] = measure.machine(device)["load_average"]
    res["total_s"] = time.perf_counter() - t_start
    res["notes"] += notes(res)
    return res


def run_workload(wl, n, x, y, device, args, flops, peak):
    """Every requested method on n copies of ``wl``; speedups are ratios within this one run."""
    models = wl.models(n, device)
    ref = None
    if "sequential" not in args.methods:  # the correctness reference still comes from sequential training
        seq = Sequential(wl, models)
        seq.step(x, y)
        ref = _snapshot(seq)
        del seq
    order = sorted(args.methods, key=lambda k: k != "sequential")  # sequential first: it is the reference
    if args.quick and n != max(args.ns):  # compiling costs 5-60 s a method: --quick compiles at its largest n only
        order = [k for k in order if not METHODS[k].compiled]
    rows = {}
    if args.rounds > 1:
        rows = _interleaved(order, wl, models, x, y, device, args, ref)
    for name in order:
        if name in rows:
            row = rows[name]
        else:
            row, snap = run_method(METHODS[name], wl, models, x, y, device, args, ref)
            rows[name] = row
            if name == "sequential":
                ref = snap
        if row["status"] == "ok":
            med = row["step_s"]["median"]
            row["flops_per_step"] = flops * n
            row["achieved_flops_per_s"] = flops * n / med
            row["fraction_of_peak"] = flops * n / med / peak["flops_per_s"]
            row["model_samples_per_s"] = n * wl.batch / med
        print(f"  {wl.name:12s} n={n:<3d} {name:20s} {_brief(row)}", file=sys.stderr, flush=True)
    med = {k: r["step_s"]["median"] for k, r in rows.items() if r["status"] == "ok"}
    vmaps = [med[k] for k in ("vmap", "vmap_compiled") if k in med]
    for row in rows.values():
        if row["status"] != "ok":
            continue
        m = row["step_s"]["median"]
        row["speedup_vs_sequential"] = med["sequential"] / m if "sequential" in med else None
        row["speedup_vs_sequential_compiled"] = (med["sequential_compiled"] / m
                                                 if "sequential_compiled" in med else None)
        row["speedup_vs_vmap"] = med["vmap"] / m if "vmap" in med else None
        row["speedup_vs_vmap_compiled"] = med["vmap_compiled"] / m if "vmap_compiled" in med else None
        row["speedup_vs_best_vmap"] = min(vmaps) / m if vmaps else None
    return list(rows.values())


def _interleaved(order, wl, models, x, y, device, args, ref):
    """Every method built, checked and warmed up first (all kept alive), then timed in ``args.rounds``
    rounds, each running a share of every method's steps in turn (after one untimed step that brings
    its data back into cache and its threads awake): a machine that slows down for a while (other
    tenants, frequency) slows every method alike, where timing one method after another would charge it
    to whichever ran then. Dynamo is reset once, before the first method (resetting it again
    would make the compiled methods built earlier recompile in the middle of the timing)."""
    torch._dynamo.reset()
    rows, built = {}, {}
    for name in order:
        row, snap, method, mem = build_method(METHODS[name], wl, models, x, y, device, args, ref, reset=False)
        rows[name] = row
        if name == "sequential":
            ref = snap
        if method is not None:
            try:                                        # its memory in a step of its own: the timing rounds
                time_steps(method, x, y, device, 1)    # below mix every method's steps
                row["peak_mem_bytes"], row["mem_measure"] = mem.peak(), mem.kind
            except Exception as e:  # noqa: BLE001
                row.update(status="error", reason=f"{type(e).__name__}: {_first_line(e)}")
            built[name] = (method, [])
    per = max(1, -(-args.steps // args.rounds))
    try:
        for _ in range(args.rounds):
            for name, (method, times) in built.items():
                if rows[name]["status"] != "ok" or len(times) >= args.steps or (
                        args.budget_s and sum(times) > args.budget_s and len(times) >= 3):
                    continue
                try:                                    # one untimed step first: the method's caches and
                    time_steps(method, x, y, device, 1)  # threads back after the other methods ran
                    times += time_steps(method, x, y, device, min(per, args.steps - len(times)))
                except Exception as e:  # noqa: BLE001
                    rows[name].update(status="error", reason=f"{type(e).__name__}: {_first_line(e)}")
        for name, (_, times) in built.items():
            if rows[name]["status"] == "ok":
                finish_row(rows[name], times, None)
                rows[name]["timing"] = f"interleaved, {args.rounds} rounds"
    finally:
        built.clear()
        gc.collect()
    return rows


def time_steps(method, x, y, device, k):
    times = []
    gc.disable()
    try:
        for _ in range(k):
            times.append(measure.timed(lambda: method.step(x, y), device))
    finally:
        gc.enable()
    return times


def finish_row(row, times, mem):
    row["step_s"] = measure.summary(times)
    row["timed_steps"] = len(times)
    if mem is not None:                                # else measured already (interleaved)
        row["peak_mem_bytes"] = mem.peak()
        row["mem_measure"] = mem.kind
    row["overhead_first_step_s"] = row["first_step_s"] - row["step_s"]["median"]


def run_method(cls, wl, models, x, y, device, args, ref):
    """Build, check, warm up and time one method (the others are not alive meanwhile)."""
    row, snap, method, mem = build_method(cls, wl, models, x, y, device, args, ref)
    try:
        if method is not None:
            times = []
            while len(times) < args.steps:
                times += time_steps(method, x, y, device, 1)
                if args.budget_s and sum(times) > args.budget_s and len(times) >= 3:
                    break
            finish_row(row, times, mem)
    except Exception as e:  # noqa: BLE001 - a method that cannot run is a result, not a crash
        row["status"] = "unsupported" if cls.name.startswith("vmap") else "error"
        row["reason"] = f"{type(e).__name__}: {_first_line(e)}"
    finally:
        del method
        gc.collect()
    return row, snap


def build_method(cls, wl, models, x, y, device, args, ref, reset=True):
    """The method built, its first step checked against ``ref``, warmed up: (row, snapshot, method or
    None when it cannot run, its memory meter, peak reset for the steps to come)."""
    row = {"workload": wl.name, "n": len(models), "method": cls.name, "status": "ok"}
    mem = measure.Memory(device)
    method = snap = None
    try:
        if cls.compiled and reset:
            torch._dynamo.reset()  # every (workload, n) compiles from scratch, as a user's run would
        mem.start()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            method = cls(wl, models)
            row["setup_s"] = time.perf_counter() - t0
            row["first_step_s"] = measure.timed(lambda: method.step(x, y), device)
        row["warnings"] = sorted({str(w.message).splitlines()[0][:200] for w in caught
                                  if not issubclass(w.category, (FutureWarning, DeprecationWarning))})[:5]
        row.update(method.info)
        if hasattr(method, "times"):
            row["mbcompile_times_s"] = method.times()
        snap = _snapshot(method)
        if ref is not None:
            row["correctness"] = compare(snap, ref)
            if not row["correctness"]["passed"]:
                row["correctness"]["float64"] = float64_check(cls, wl, models, x, y)
                row["correctness"]["passed"] = row["correctness"]["float64"]["passed"]
        elif cls is Sequential:
            row["correctness"] = {**compare(snap, snap), "reference": True}
        for _ in range(args.warmup - 1):
            method.step(x, y)
        for _ in range(16):                 # train_step(path="auto") times both paths on its first calls
            if not method.settling():
                break
            method.step(x, y)
        if getattr(getattr(method, "fn", None), "chosen", None):
            row["train_step_path"] = method.fn.chosen
        mem.reset_peak()
    except Exception as e:  # noqa: BLE001 - a method that cannot run is a result, not a crash
        row["status"] = "unsupported" if cls.name.startswith("vmap") else "error"
        row["reason"] = f"{type(e).__name__}: {_first_line(e)}"
        method = None
        gc.collect()
    return row, snap, method, mem


def _snapshot(method):
    return {"params": {k: v.detach().clone() for k, v in method.params().items()},
            "grads": {k: (None if v is None else v.detach().clone()) for k, v in method.grads().items()}}


def compare(snap, ref):
    """How far one step of a method is from one step of sequential training (n torch.optim.Adam).

    float32 sums in another order differ by ~1e-7 relative; Adam's first step, lr * g / (|g| + eps),
    turns that into differences of up to 2 * lr where |g| is near eps (and where a gradient is zero
    up to rounding, e.g. the key bias of attention). So the pass criterion is on the gradients
    (relative, with a floor at 1e-3 of the model's largest gradient) and on the parameters where the
    step is well conditioned (|g| >= COND_GRAD); the raw max |param difference| is reported as well."""
    dp = max(_maxabs(snap["params"][k] - ref["params"][k]) for k in ref["params"])
    gmax = max((_maxabs(g) for g in ref["grads"].values() if g is not None), default=0.0)
    dp_cond, dg = 0.0, 0.0
    for k, g in ref["grads"].items():
        mine = snap["grads"].get(k)
        if g is None or mine is None:
            dg = max(dg, 0.0 if g is None and mine is None else float("inf"))
            continue
        scale = max(_maxabs(g), 1e-3 * gmax, 1e-30)
        dg = max(dg, _maxabs(mine - g) / scale)
        cond = g.abs() >= COND_GRAD
        if cond.any():
            dp_cond = max(dp_cond, _maxabs((snap["params"][k] - ref["params"][k])[cond]))
    ok = dp_cond <= PARAM_TOL and dg <= GRAD_TOL
    return {"param_max_abs_diff": dp, "param_max_abs_diff_where_grad_ge_1e-6": dp_cond,
            "grad_max_rel_diff": dg, "passed": bool(ok)}


def float64_check(cls, wl, models, x, y):
    """Run when a method's float32 step disagrees with sequential float32: the same first step with
    float64 copies of the models and batch, against sequential float64, to 1e-9. If that agrees, the
    float32 difference is rounding made large by a discontinuity (a ReLU unit or a max-pool winner
    within rounding of its threshold, which one float32 summation order flips and another does not;
    TF32 convolutions), not a wrong computation (docs/benchmarks.md, "Correctness")."""
    m64 = [copy.deepcopy(m).double() for m in models]
    x64 = x.double() if x.is_floating_point() else x
    seq = Sequential(wl, m64)
    seq.step(x64, y)
    ref = _snapshot(seq)
    del seq
    if cls.compiled:
        torch._dynamo.reset()
    method = cls(wl, m64)
    method.step(x64, y)
    snap = _snapshot(method)
    del method
    c = compare(snap, ref)
    dp, dg = c["param_max_abs_diff"], c["grad_max_rel_diff"]
    return {"param_max_abs_diff": dp, "grad_max_rel_diff": dg, "passed": bool(dp <= F64_TOL and dg <= F64_TOL)}


def _maxabs(t):
    """max |t|, inf when t holds a NaN (so a NaN can never pass)."""
    return float("inf") if t.isnan().any() else float(t.abs().max()) if t.numel() else 0.0


def optim_step(args):
    """benchmarks/optim_step.py (issue 4): the optimizer step alone, if that file exists."""
    try:
        mod = importlib.import_module("benchmarks.optim_step")
    except ModuleNotFoundError as e:
        if e.name != "benchmarks.optim_step":
            return {"status": "error", "reason": f"ModuleNotFoundError: {e}"}
        return {"status": "skipped", "reason": "benchmarks/optim_step.py does not exist yet"}
    fn = getattr(mod, "run", None)
    if fn is None:
        return {"status": "error", "reason": "benchmarks/optim_step.py has no run() function"}
    sig = inspect.signature(fn)
    rows = []
    for n in args.ns:  # run(n=..., device=...) -> one dict per n (the other arguments keep its defaults)
        offer = {"n": n, "device": args.device, "threads": args.threads}
        kwargs = {k: v for k, v in offer.items() if k in sig.parameters and v is not None}
        try:
            out = fn(**kwargs)
        except Exception as e:  # noqa: BLE001
            return {"status": "error", "reason": f"{type(e).__name__}: {_first_line(e)}", "results": rows}
        rows += out if isinstance(out, list) else [out]
        print(f"  optim_step   n={n:<3d} {_brief_dict(rows[-1])}", file=sys.stderr, flush=True)
    return {"status": "ok", "results": rows}


def notes(res):
    out = []
    m = res["machine"]
    load = max((m.get("load_average") or [0])[0], (m.get("load_average_end") or [0])[0])
    if load > m["cores_available"] and m["device"] == "cpu":
        out.append(f"the machine was busy (load average {load:.1f} on {m['cores_available']} cores): timings are "
                   f"noisy; with more torch threads than free cores, steps can be 100x slower "
                   f"(try --threads 1)")
    rows = [r for r in res["results"] if r["method"].startswith("mbcompile") and r["status"] == "ok"]
    fallback = {r.get("optimizer", "") for r in rows if "fallback" in r.get("optimizer", "")}
    if fallback:
        out.append("mbcompile rows used " + fallback.pop())
    if res["mode"] == "quick" and any(METHODS[k].compiled for k in res["config"]["methods"]):
        out.append(f"--quick runs the compiled methods only at n={max(res['config']['ns'])}")
    if res["config"]["budget_s"]:
        cut = [f"{r['workload']}/n={r['n']}/{r['method']}" for r in res["results"]
               if r["status"] == "ok" and r["timed_steps"] < res["config"]["steps"]]
        if cut:
            out.append(f"timed fewer than {res['config']['steps']} steps (budget {res['config']['budget_s']} s): "
                       + ", ".join(cut))
    return out


def _first_line(e):
    """The first line of an error, and the next one too when the first only introduces it."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    return text[:300]


def _brief_dict(d):
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items()
                    if k in ("optimizer", "mbcompile_ms", "torch_foreach_ms", "speedup"))


def _brief(row):
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('reason', '')[:100]}"
    c = row["correctness"]
    return (f"{row['step_s']['median'] * 1e3:9.2f} ms  first {row['first_step_s']:.2f} s  "
            f"dp={c['param_max_abs_diff']:.1e} {'ok' if c['passed'] else 'MISMATCH'}"
            + (" (float64 re-check)" if "float64" in c else ""))
