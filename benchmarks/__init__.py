"""mbcompile's benchmark suite: ``python -m benchmarks [--quick] [--out DIR] ...`` (see docs/benchmarks.md)."""
from .suite import main, run

__all__ = ["main", "run"]
