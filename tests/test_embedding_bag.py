"""nn.EmbeddingBag batched by its rule (passes/embedding.py, strict=True: no fallback): every mode, with
padding_idx, per_sample_weights and include_last_offset, shared or per-model bags, against each model
alone (outputs and the table's gradient)."""
import copy
import itertools

import pytest
import torch
import torch.nn as nn

import mbcompile


class Bag(nn.Module):
    def __init__(self, mode, padding_idx, include_last):
        super().__init__()
        self.e = nn.EmbeddingBag(10, 4, mode=mode, padding_idx=padding_idx, include_last_offset=include_last)
        self.fc = nn.Linear(4, 2)

    def forward(self, x, off, w=None):
        return self.fc(self.e(x, off, per_sample_weights=w))


CASES = [c for c in itertools.product(["sum", "mean", "max"], [None, 2], [False, True], [False, True], [False, True])
         if not (c[2] and c[0] != "sum")]                   # per_sample_weights: mode "sum" only (torch)


@pytest.mark.parametrize("mode,padding_idx,psw,include_last,per_model", CASES,
                         ids=lambda v: str(v))
def test_embedding_bag_matches_each_model(mode, padding_idx, psw, include_last, per_model):
    n = 3
    models = [Bag(mode, padding_idx, include_last).double() for _ in range(n)]
    refs = copy.deepcopy(models)
    g = torch.Generator().manual_seed(1)

    def sample():
        x = torch.randint(0, 10, (9,), generator=g)
        x[3] = 2                                             # the padding index where there is one
        off = torch.tensor([0, 3, 3, 7] + ([9] if include_last else []))   # an empty bag
        return [x, off] + ([torch.rand(9, generator=g, dtype=torch.float64)] if psw else [])

    samples = [sample() for _ in range(n)] if per_model else [sample()] * n
    args = [torch.stack(t) for t in zip(*samples)] if per_model else samples[0]
    batched = mbcompile.batch(models, strict=True, in_dims=(0,) * len(args) if per_model else None)
    out = batched(*args)
    out.square().sum().backward()
    assert any(r.how.endswith("embedding_bag") for r in mbcompile.explain(batched).records)   # its own rule
    for i, r in enumerate(refs):
        ref = r(*samples[i])
        ref.square().sum().backward()
        torch.testing.assert_close(out[i], ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(batched.get_parameter("e.weight").grad[i], r.e.weight.grad, rtol=1e-10, atol=1e-12)


def test_scale_grad_by_freq_is_declined_with_its_reason():
    models = [nn.EmbeddingBag(10, 4, scale_grad_by_freq=True) for _ in range(2)]
    with pytest.raises(mbcompile.UnsupportedOpError, match="scale_grad_by_freq"):
        mbcompile.batch(models, strict=True)(torch.tensor([1, 2, 3]), torch.tensor([0, 1]))


class ComputedTable(nn.Module):
    """F.embedding_bag over a table computed in forward: capture records the forward-only op."""
    def __init__(self, mode):
        super().__init__()
        self.l, self.mode = nn.Linear(6, 6), mode

    def forward(self, x):
        idx, off = torch.tensor([0, 2, 4, 1, 3]), torch.tensor([0, 2])
        return torch.nn.functional.embedding_bag(idx, self.l(x), off, mode=self.mode)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_a_table_computed_in_forward_trains(mode):
    torch.manual_seed(0)
    models = [ComputedTable(mode).double() for _ in range(3)]
    x = torch.randn(5, 6, dtype=torch.float64)
    b = mbcompile.batch(copy.deepcopy(models), strict=True)
    out = b(x)
    out.square().sum().backward()
    for i, m in enumerate(models):
        ref = m(x)
        ref.square().sum().backward()
        torch.testing.assert_close(out[i], ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b.l.weight.grad[i], m.l.weight.grad, rtol=1e-12, atol=1e-12)
