"""The ``mbcompile`` command: ``mbcompile demo`` (a real sweep, no download) and ``mbcompile bench``."""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

DESCRIPTION = """\
mbcompile trains N independent copies of a PyTorch model as one program.

commands:
  demo    train a sweep of small MLPs (one learning rate each) on a synthetic dataset, print the
          per-model table and the measured speed-up over training the same models one after another
  bench   run the benchmark suite's quick mode (python -m benchmarks --quick); extra arguments are
          passed on, e.g. `mbcompile bench --out results`
"""


def _parser():
    p = argparse.ArgumentParser(prog="mbcompile", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__
    p.add_argument("--version", action="version", version=f"mbcompile {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{demo,bench}")
    d = sub.add_parser("demo", help="train a learning-rate sweep of MLPs as one batch; print the table and speed-up",
                       description="Train n MLPs (learning rates log-spaced from 1e-3 to 1) on a synthetic "
                                   "4-class dataset made with a fixed torch.Generator: once as one mbcompile "
                                   "batch, once one after another with torch.optim, and compare.")
    d.add_argument("--n", type=int, default=16, help="number of models (default 16)")
    d.add_argument("--epochs", type=int, default=8, help="epochs (default 8)")
    d.add_argument("--out", default="mbcompile-demo",
                   help="folder for history.csv, history.json, curves.png and best_model.pt (default ./mbcompile-demo)")
    d.add_argument("--no-sequential", action="store_true",
                   help="skip the sequential baseline (no speed-up is measured)")
    d.add_argument("--threads", type=int, default=1,
                   help="torch threads for both runs (default 1: these models are too small to gain from more)")
    d.add_argument("--progress", action="store_true", help="show the progress bar")
    b = sub.add_parser("bench", help="run the benchmark suite's quick mode (python -m benchmarks --quick)",
                       description="Runs benchmarks.main(['--quick', *ARGS]) from the benchmarks/ folder of a "
                                   "source checkout; pass --full for the full suite.")
    b.add_argument("--full", action="store_true", help="the full suite instead of --quick")
    b.add_argument("args", nargs="*", metavar="ARGS", help="passed on to the benchmark suite (options too)")
    return p


def main(argv=None) -> int:
    p = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and not {"-h", "--help"} & set(argv):  # everything after `bench`, in order,
        return bench([a for a in argv[1:] if a != "--full"], full="--full" in argv)  # goes to the suite
    args = p.parse_args(argv)
    if args.command == "demo":
        return demo(n=args.n, epochs=args.epochs, out=args.out, sequential=not args.no_sequential,
                    threads=args.threads, progress=args.progress)
    if args.command == "bench":
        return bench(args.args, full=args.full)
    p.print_help()
    return 0


# ---- bench -----------------------------------------------------------------------------------------
def bench(extra=(), full=False) -> int:
    try:
        bm = _import_benchmarks()
    except ImportError as e:
        print(f"mbcompile bench: the benchmark suite is not importable ({e}).\n"
              "It lives in the benchmarks/ folder of the source repository and is not part of the installed "
              "package: clone the repository and run `mbcompile bench` (or `python -m benchmarks --quick`) "
              "from its root.", file=sys.stderr)
        return 2
    argv = ([] if full else ["--quick"]) + [a for a in extra if a != "--"]
    rc = bm.main(argv)
    return int(rc or 0)


def _import_benchmarks():
    try:
        import benchmarks
    except ImportError:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # a source checkout's root
        if not os.path.isfile(os.path.join(root, "benchmarks", "__init__.py")) or root in sys.path:
            raise
        sys.path.insert(0, root)
        import benchmarks
    if not hasattr(benchmarks, "main"):
        from benchmarks import __main__ as benchmarks  # noqa: F811 - main() may live in __main__
    if not hasattr(benchmarks, "main"):
        raise ImportError("the benchmarks package has no main()")
    return benchmarks


# ---- demo ------------------------------------------------------------------------------------------
IN, HIDDEN, CLASSES = 32, 32, 4
N_TRAIN, N_VAL, BATCH = 4096, 1024, 32


def make_dataset(seed=0):
    """A 4-class problem that needs a hidden layer: labels of a random teacher MLP on Gaussian inputs,
    with 10% label noise; fixed by a torch.Generator, so every run sees the same data."""
    import torch
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN + N_VAL, IN, generator=g)
    w1, w2 = torch.randn(IN, 64, generator=g), torch.randn(64, CLASSES, generator=g)
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    flip = torch.rand(len(y), generator=g) < 0.1
    y = torch.where(flip, torch.randint(0, CLASSES, y.shape, generator=g), y)
    return (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


def make_model():
    import torch.nn as nn
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, CLASSES))


def _sequential(models, lrs, train, val, epochs):
    """The baseline: each model alone with torch.optim on the very same batches, one after another."""
    import torch
    import torch.nn.functional as F
    finals = []
    for m, lr in zip(models, lrs):
        opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)
        for e in range(epochs):
            train.set_epoch(e)
            m.train()
            for x, y in train:
                opt.zero_grad()
                F.cross_entropy(m(x), y).backward()
                opt.step()
            m.eval()
            with torch.no_grad():
                tot = sum(F.cross_entropy(m(x), y, reduction="sum").item() for x, y in val)
        finals.append(tot / N_VAL)
    return finals


def demo(n=16, epochs=8, out="mbcompile-demo", sequential=True, threads=1, progress=False, seed=0) -> int:
    """The sweep behind `mbcompile demo`; returns the exit code."""
    import torch

    if n < 1 or epochs < 1:
        print("mbcompile demo: --n and --epochs must be at least 1", file=sys.stderr)
        return 2
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _demo(n, epochs, out, sequential, progress, seed)
    finally:
        torch.set_num_threads(old_threads)


def _demo(n, epochs, out, sequential, progress, seed):
    import warnings

    import torch
    # torch.export's own deprecation notice (pytree LeafSpec), printed at capture: not the user's concern
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    import torch.nn.functional as F

    import mbcompile
    from .data import SharedLoader
    from .fit import fit
    from .optim import optimizer

    torch.manual_seed(seed)
    (xt, yt), (xv, yv) = make_dataset(seed)
    train = SharedLoader(xt, yt, batch_size=BATCH, seed=seed)
    val = SharedLoader(xv, yv, batch_size=512, shuffle=False)
    lrs = [10 ** (-3 + 3 * i / max(1, n - 1)) for i in range(n)] if n > 1 else [0.1]
    models = [make_model() for _ in range(n)]
    params = sum(p.numel() for p in models[0].parameters())
    steps = epochs * len(train)
    print(f"mbcompile demo: {n} MLPs ({IN}-{HIDDEN}-{HIDDEN}-{CLASSES}, {params:,} parameters each), SGD momentum 0.9, "
          f"learning rates log-spaced {lrs[0]:.3g}..{lrs[-1]:.3g}; {epochs} epochs x {len(train)} steps of "
          f"batch {BATCH} on a synthetic {CLASSES}-class dataset ({N_TRAIN} train / {N_VAL} val samples); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    seq_models = copy.deepcopy(models)
    t0 = time.perf_counter()
    batched = mbcompile.batch(models)
    opt = optimizer(batched, torch.optim.SGD, lr=lrs, momentum=0.9)
    hist = fit(batched, train, F.cross_entropy, opt, epochs=epochs, val_data=val, metrics=["accuracy"],
               progress=progress)
    t_batched = time.perf_counter() - t0
    capture = sum(sum(v for k, v in p.times.items() if k.endswith("_s") and k != "export_s")
                  for p in batched._programs.values())
    print()
    print(hist.summary())
    print()
    print(f"batched (mbcompile): {t_batched:.2f} s for {steps} steps of {n} models "
          f"(of which {capture:.2f} s one-time capture of the train and eval graphs)")
    if sequential:
        t0 = time.perf_counter()
        finals = _sequential(seq_models, lrs, train, val, epochs)
        t_seq = time.perf_counter() - t0
        diffs = [abs(a - b) if math.isfinite(a) and math.isfinite(b) else math.inf
                 for a, b in zip(finals, hist.final("val_loss").tolist())]
        worst = max(range(n), key=lambda i: diffs[i])
        train_only = max(t_batched - capture, 1e-9)
        print(f"sequential (torch.optim, one model after another): {t_seq:.2f} s")
        print(f"speed-up: {t_seq / t_batched:.1f}x end to end, {t_seq / train_only:.1f}x excluding the one-time "
              f"capture")
        close = sum(d <= 1e-4 for d in diffs)
        print(f"same models, same result: final val_loss of batched and sequential agree within 1e-4 for {close} of "
              f"{n} models" + ("" if close == n else
                               f" (largest difference {diffs[worst]:.2g}, model {worst}, lr {lrs[worst]:.3g}: at "
                               f"high learning rates float32 rounding differences grow chaotically)"))
    os.makedirs(out, exist_ok=True)
    hist.to_csv(os.path.join(out, "history.csv"))
    hist.to_json(os.path.join(out, "history.json"))
    best = hist.export(os.path.join(out, "best_model.pt"))
    written = ["history.csv", "history.json", f"best_model.pt (model {best}, a plain state_dict)"]
    try:
        hist.plot(os.path.join(out, "curves.png"))
        written.append("curves.png")
    except ImportError:
        written.append("(no curves.png: pip install matplotlib)")
    print(f"wrote {out}/: " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
