"""results.json, results.md (markdown tables) and speedup.png (speedup over sequential vs n)."""
from __future__ import annotations

import json
from pathlib import Path

GOALS = {  # issue 5 (n=16, CPU, x sequential eager) and issue 3 (char LSTM)
    "tiny_mlp": 10.0, "lenet5": 1.2, "mlp784": 1.0, "char_lstm": 3.0,
}


OPTIM_KEYS = ("n", "optimizer", "per_model_lr", "compile", "threads", "mbcompile_ms", "mbcompile_min_ms",
              "torch_foreach_ms", "torch_foreach_min_ms", "speedup")


def write(res, out: Path, plot_png=True):
    out.mkdir(parents=True, exist_ok=True)
    png = plot(res, out / "speedup.png") if plot_png else None  # first: a missing matplotlib adds a note
    paths = [out / "results.json", out / "results.md"]
    paths[0].write_text(json.dumps(res, indent=1, default=str) + "\n")
    paths[1].write_text(markdown(res))
    return paths + ([png] if png else [])


def _x(v, digits=2):
    return "" if v is None else f"{v:.{digits}f}x"


def _mb(b):
    return "" if b is None else f"{b / 2**20:.0f}"


def markdown(res):
    m = res["machine"]
    cfg = res["config"]
    peak = res["peak_matmul"]
    lines = [
        f"## Benchmark results ({res['mode']} mode, {res['created']})",
        "",
        f"- machine: {m['cpu_model']}, {m['cores']} cores ({m['torch_threads']} torch threads), device "
        f"`{m['device']}`{', ' + m['gpu'] if m.get('gpu') else ''}; torch {m['torch_version']}, "
        f"mbcompile {m.get('mbcompile_version')}; load average at start {_load(m.get('load_average'))}, "
        f"at end {_load(m.get('load_average_end'))}",
        *([f"- every method ran with: {m['host_malloc']} (mbcompile/hostmem.py)"] if m.get("host_malloc") else []),
        f"- matmul peak (fp32 {peak['size']}^2): {peak['flops_per_s'] / 1e9:.1f} GFLOP/s at start, "
        f"{res.get('peak_matmul_end', peak)['flops_per_s'] / 1e9:.1f} at end",
        f"- one training step = forward + backward + Adam (lr {cfg['lr']}), float32, one shared batch; median "
        f"of {cfg['steps']} timed steps after {cfg['warmup']} warm-up steps"
        + (f" (fewer where a method's timed steps passed {cfg['budget_s']} s)" if cfg.get("budget_s") else "")
        + (f"; the methods of each (workload, n) timed interleaved, in {cfg['rounds']} rounds"
           if cfg.get("rounds", 1) > 1 else "; one method after another"),
        "- x seq / x vmap: median of sequential eager / median of this method (x vmap: the faster of vmap and "
        "vmap_compiled); %peak: model FLOPs per second over the matmul peak; mem: peak memory above the "
        "process before the method was built (MB); check: after the first step, max |param - sequential's| / max "
        "relative |grad - sequential's|, and where float32 disagrees, the float64 re-check's relative |grad "
        "difference| (FAIL: see docs/benchmarks.md for the criterion); first step s: "
        "wall time of the first step, with mbcompile's (capture/batch/compile) seconds inside it",
        f"- total time {res.get('total_s', 0):.0f} s",
        "",
    ]
    lines += table(res)
    lines += ["", *goals(res)]
    lines += _optim_step(res.get("optim_step"))
    if res.get("notes"):
        lines += ["", "Notes:", *[f"- {n}" for n in res["notes"]]]
    return "\n".join(lines) + "\n"


def table(res):
    """The main table: one row per (workload, n, method)."""
    lines = ["| workload | n | method | median ms (min-max) | models x samples/s | x seq | x vmap | %peak | mem MB "
             "| first step s | check |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['workload']} | {r['n']} | {r['method']} | {r['status']}: "
                         f"{_cell(r.get('reason', ''))} | | | | | | | |")
            continue
        s, c = r["step_s"], r.get("correctness") or {}
        check = "" if not c else (f"{c['param_max_abs_diff']:.0e} / {c['grad_max_rel_diff']:.0e}"
                                  + (f"; float64 {c['float64']['grad_max_rel_diff']:.0e}" if "float64" in c else "")
                                  + ("" if c["passed"] else " FAIL"))
        lines.append(
            f"| {r['workload']} | {r['n']} | {r['method']}{_path(r)} | {s['median'] * 1e3:.2f} ({s['min'] * 1e3:.2f}-"
            f"{s['max'] * 1e3:.2f}) | {r['model_samples_per_s']:.0f} | {_x(r.get('speedup_vs_sequential'))} | "
            f"{_x(r.get('speedup_vs_best_vmap'))} | {100 * r['fraction_of_peak']:.1f} | "
            f"{_mb(r.get('peak_mem_bytes'))} | {r['first_step_s']:.2f}{_phases(r)} | {check} |")
    for k, v in res["workloads"].items():
        if "skipped" in v:
            lines.append(f"| {k} | | | skipped: {v['skipped']} | | | | | | | |")
    return lines


def goals(res):
    """The issue-5 / issue-3 goals at n=16 next to what this run measured for mbcompile."""
    out = ["| goal (n=16, x sequential eager) | target | mbcompile | mbcompile_compiled | mbcompile_step |",
           "|---|---|---|---|---|"]
    by = {(r["workload"], r["n"], r["method"]): r for r in res["results"]}
    for wl, target in GOALS.items():
        cells = []
        for method in ("mbcompile", "mbcompile_compiled", "mbcompile_step"):
            r = by.get((wl, 16, method))
            if r is None:
                cells.append("not run")
            elif r["status"] != "ok":
                cells.append(r["status"])
            else:
                v = r.get("speedup_vs_sequential")
                cells.append(f"{_x(v)} {'met' if v is not None and v >= target else 'MISSED'}")
        out.append(f"| {wl} | {target}x | " + " | ".join(cells) + " |")
    return out


def _optim_step(block):
    if not block:
        return []
    if block.get("status") != "ok":
        return ["", f"optim_step (issue 4): {block.get('status')}: {block.get('reason', '')}"]
    rows = [r for r in block["results"] if isinstance(r, dict)]
    scalar = [k for r in rows for k, v in r.items() if not isinstance(v, (dict, list))]
    keys = [k for k in OPTIM_KEYS if k in scalar] or sorted(set(scalar))
    out = ["", "optim_step (issue 4, the optimizer step alone):", "",
           "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
    return out


def _path(r):
    """The path train_step(path="auto") kept, where it timed both."""
    return f" ({r['train_step_path']})" if r.get("train_step_path") else ""


def _phases(r):
    """mbcompile's own capture / batching / compile seconds, inside the first step."""
    t = r.get("mbcompile_times_s")
    if not t:
        return ""
    return " (" + "/".join("-" if t.get(k) is None else f"{t[k]:.2f}" for k in ("capture_s", "batch_s", "compile_s")) + ")"


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _cell(text):
    return text.replace("|", "/").replace("\n", " ")[:160]


def _load(v):
    return "?" if not v else "/".join(f"{x:.1f}" for x in v)


def plot(res, path: Path):
    """speedup over sequential vs n, one panel per workload; skipped (with a note) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        res["notes"].append("speedup.png not written: matplotlib is not installed (pip install matplotlib)")
        return None
    wls = [w for w in res["workloads"] if any(r["workload"] == w for r in res["results"])]
    if not wls:
        return None
    cols = min(3, len(wls))
    rows = (len(wls) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, wl in zip(axes.flat, wls):
        mine = [r for r in res["results"] if r["workload"] == wl and r["status"] == "ok"]
        for method in dict.fromkeys(r["method"] for r in mine):
            pts = sorted((r["n"], r["speedup_vs_sequential"]) for r in mine
                         if r["method"] == method and r.get("speedup_vs_sequential"))
            if pts:
                style = "-" if method.startswith("mbcompile") else "--"
                ax.plot(*zip(*pts), style, marker="o", label=method)
        ax.axhline(1.0, color="gray", lw=0.8)
        if wl in GOALS:
            ax.axhline(GOALS[wl], color="red", lw=0.8, ls=":", label=f"goal {GOALS[wl]}x (n=16)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ns = sorted({r["n"] for r in mine})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%gx"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(wl)
        ax.set_xlabel("n (models)")
        ax.set_ylabel("speedup over sequential")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(wls):]:
        ax.axis("off")
    m = res["machine"]
    fig.suptitle(f"{m.get('gpu') or m['cpu_model']} ({m['device']}), torch {m['torch_version']}, {res['mode']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
