"""Batching rules, one file per op family, and the pass that applies them.

Lookup order for an op (written down, as in lightning-thunder):
  1. a rule registered in RULES (``@rule(aten.op)`` or a family helper);
  2. a decomposition: ops without a rule are decomposed at capture time when torch has one;
  3. the fallback: ``torch.vmap`` of the op (else a loop over models), with a one-time warning;
  4. ``strict=True``: UnsupportedOpError naming the op, the node and the user's source line.
"""
from .registry import RULES, rule  # noqa: F401
from . import (pointwise, reductions, views, indexing, linalg, conv, norms,  # noqa: F401
               embedding, attention, random, pooling, rnn, control)
