"""Known failures of tests/test_opinfo.py, one line and one reason each. Applied as
xfail(strict=True): an op that starts to pass makes its line stale and the test fails, so delete it.

Key: the OpInfo name (``name.variant``), optionally ``@float32`` / ``@float64`` for one dtype and
``[strict]`` for the fallback-disabled run only, e.g. ``"index_put@float32[strict]"``.
"""

LEDGER = {
    "as_strided_scatter": "reads the unbatched input's storage layout; no rule, and the vmap fallback differs",
    "_segment_reduce.lengths": "per-model lengths arrive as a keyword tensor, which batch_pass refuses",
    "_segment_reduce.offsets": "per-model offsets arrive as a keyword tensor, which batch_pass refuses",
    "searchsorted": "a per-model sorter arrives as a keyword tensor, which batch_pass refuses",
}
