"""The `mbcompile` command: demo (a real sweep in a subprocess), bench (hands over to the benchmark
suite, or says clearly where it is), --help."""
import os
import subprocess
import sys
import types

import pytest

from mbcompile import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, cwd=None, timeout=120):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "mbcompile.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_demo_runs_the_default_sweep_and_prints_the_table(tmp_path):
    proc = run_cli("demo", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    header = next(line for line in out.splitlines() if line.startswith("model "))
    for col in ("lr", "final loss", "best val_loss", "final val_accuracy", "status", "rank"):
        assert col in header
    rows = [line for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert len(rows) == 16 and sorted(int(r.split()[0]) for r in rows) == list(range(16))
    assert "best model:" in out and "speed-up:" in out and "sequential" in out
    files = set(os.listdir(tmp_path / "out"))
    assert {"history.csv", "history.json", "best_model.pt"} <= files
    if "curves.png" not in files:
        assert "pip install matplotlib" in out


def test_demo_options(tmp_path, capsys):
    assert cli.main(["demo", "--n", "3", "--epochs", "1", "--no-sequential", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "3 MLPs" in out and "speed-up" not in out
    assert len((tmp_path / "history.csv").read_text().splitlines()) == 1 + 3


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "demo" in out and "bench" in out and "speed-up" in out
    assert cli.main([]) == 0 and "demo" in capsys.readouterr().out  # no command: the help, not a traceback
    from importlib.metadata import entry_points
    assert [e.value for e in entry_points(group="console_scripts", name="mbcompile")] == ["mbcompile.cli:main"]
    for sub, opt in (("demo", "--epochs"), ("bench", "--full")):
        with pytest.raises(SystemExit):
            cli.main([sub, "--help"])
        assert opt in capsys.readouterr().out


def test_bench_hands_over_to_the_suite_in_quick_mode(monkeypatch):
    seen = []
    monkeypatch.setitem(sys.modules, "benchmarks", types.SimpleNamespace(main=lambda argv: seen.append(argv) or 0))
    assert cli.main(["bench", "--out", "res"]) == 0
    assert cli.main(["bench", "--full"]) == 0
    assert seen == [["--quick", "--out", "res"], []]


def test_bench_without_the_suite_says_where_it_is(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "benchmarks", None)   # import benchmarks -> ImportError
    monkeypatch.setattr(cli.os.path, "isfile", lambda p: False)
    assert cli.main(["bench"]) == 2
    err = capsys.readouterr().err
    assert "benchmarks/" in err and "python -m benchmarks --quick" in err
