"""Known failures of tests/test_opinfo.py, one line and one reason each. Applied as
xfail(strict=True): an op that starts to pass makes its line stale and the test fails, so delete it.

Key: the OpInfo name (``name.variant``), optionally ``@float32`` / ``@float64`` for one dtype and
``[strict]`` for the fallback-disabled run only (``[grad]``: the gradient check), e.g.
``"index_put@float32[strict]"``.
"""

LEDGER = {
    "as_strided.partial_views": "a storage offset other than the input's own addresses the unbatched storage, "
                                "which a batch lays out differently: refused (UnsupportedOpError) by design",
    "searchsorted[strict]": "a per-model sorter arrives as a keyword tensor: no rule takes it, the fallback does",
    "linalg.eig[grad]": "complex eigenvectors are defined up to a phase: torch refuses a loss that depends on it, "
                        "and a random cotangent does (the op alone raises the same error)",
    "nn.functional.linear_cross_entropy.chunked[grad]": "a harness limit: F.linear_cross_entropy decides which "
        "gradients its op computes in Python, from requires_grad at capture, and the OpInfo sample is captured "
        "without it (a model's capture sees its parameters': tests/test_layers.py checks the gradients)",
}
