"""The rule contract and the registry.

A rule batches one aten op. It receives the op's arguments with the model dim already in them and,
mirroring ``args``, where each tensor's model dim is (``None``: shared by all models)::

    @rule(aten.relu.default)
    def relu(ctx, args, dims, kwargs):      # args = (x,), dims = (1,) for x: B,n,C
        return aten.relu(args[0]), dims[0]  # -> (out, out_dim)

It returns the output and where the model dim of the output ended up (a tuple of dims for ops with
several outputs). A rule may leave the model dim wherever it is cheapest; the helpers in ``axes``
move it only when an op needs it. ``ctx`` gives ``n``, the original node (its ``meta['val']`` holds
the unbatched result), per-model constants and ``ctx.note(...)`` for explain().
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

aten = torch.ops.aten
RULES: dict[Any, Callable] = {}
RANDOM_OPS: set = set()  # rules that must run even when every input is shared


def rule(*ops, random: bool = False):
    """Register ``fn`` as the batching rule of every op (OpOverload or OpOverloadPacket) given."""
    def deco(fn):
        for op in ops:
            for ov in _overloads(op):
                RULES[ov] = fn
                if random:
                    RANDOM_OPS.add(ov)
        return fn
    return deco


def _overloads(op):
    if isinstance(op, torch._ops.OpOverloadPacket):
        return [getattr(op, name) for name in op.overloads()]
    return [op]


@dataclass
class RuleCtx:
    """What a rule may know besides its arguments."""
    n: int
    op: Any = None                      # the aten op being batched
    node: Any = None                    # the original (unbatched) FX node
    consts: Any = None                  # PerModelConsts or None
    rng: Any = None                     # the program's randomness state (passes/random.py)
    notes: list = field(default_factory=list)
    own_dtype: bool = False             # the rule's result dtype stands (not the captured graph's)
    strict: bool = False                # no fallback (for rules that batch subgraphs: passes/control.py)

    def note(self, text: str):
        """Say how the op was lowered; shown by explain()."""
        self.notes.append(text)

    @property
    def val(self):
        """The unbatched example result of this node (a FakeTensor or a tuple of them)."""
        return self.node.meta.get("val") if self.node is not None else None

    def per_model(self, attr: str):
        """Per-model values of a scalar attribute of the module this node came from, or None."""
        return per_model_const(self.node, self.consts, attr)


def module_path(node) -> str:
    """Path of the innermost nn.Module a node came from ("" when unknown)."""
    stack = (node.meta.get("nn_module_stack") or {}) if node is not None else {}
    return list(stack.values())[-1][0] if stack else ""


def per_model_const(node, consts, attr):
    """consts[module path][attr] for the module a node came from: per-model values, or None."""
    return consts.get(module_path(node), {}).get(attr) if consts else None


def logical_ndim(x, d):
    """Rank of the unbatched value."""
    return x.dim() - (d is not None)
