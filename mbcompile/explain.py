"""explain(): how each op of the captured graph was lowered."""
from __future__ import annotations

from collections import Counter


class Explanation:
    def __init__(self, records, times, gm=None, n=None, notes=()):
        self.records, self.times, self.gm, self.n, self.notes = records, times, gm, n, list(notes)

    @property
    def fallbacks(self):
        return [r for r in self.records if r.how.startswith("FALLBACK")]

    @property
    def copies(self):
        """Data movements in the batched graph: clone/copy, views that may materialise, and layout
        switches (mbcompile::relayout)."""
        if self.gm is None:
            return 0
        names = {"clone", "_to_copy", "copy", "contiguous", "relayout"}
        return sum(1 for nd in self.gm.graph.nodes if nd.op == "call_function"
                   and getattr(getattr(nd.target, "overloadpacket", None), "__name__", "") in names)

    def __str__(self):
        lines = [f"mbcompile: n={self.n}, {len(self.records)} batched ops, {len(self.fallbacks)} fallbacks, "
                 f"{self.copies} copies in the batched graph"]
        if self.times:
            lines.append("times: " + ", ".join(f"{k}={v * 1e3:.0f} ms" for k, v in self.times.items()))
        lines += self.notes
        w = max([len(r.op) for r in self.records] + [4])
        for r in self.records:
            extra = ("; " + "; ".join(r.notes)) if r.notes else ""
            mod = f"  [{r.module}]" if r.module else ""
            lines.append(f"  {r.node:<24} {r.op:<{w}}  {r.how}{extra}{mod}")
        counts = Counter(r.how for r in self.records)
        lines.append("summary: " + ", ".join(f"{k} x{v}" for k, v in counts.most_common()))
        return "\n".join(lines)

    __repr__ = __str__


def explain(batched):
    """Show, op by op, how the last captured forward of ``batched`` was lowered."""
    from .batching import BatchedModule
    if not isinstance(batched, BatchedModule):
        from .errors import InvalidTypeError
        raise InvalidTypeError(f"mbcompile.explain takes a batched module (from mbcompile.batch), got "
                               f"{type(batched).__name__}")
    prog = getattr(batched, "_last_program", None)
    if prog is None:
        return Explanation([], {}, None, batched.n, ["nothing captured yet: call the batched module once"])
    return Explanation(list(prog.records), dict(prog.times), prog.gm, batched.n, prog.notes)
