"""The fallback for what no rule takes, and ops that read storage: each model against itself alone.
(Found by a held-out sweep: a per-model keyword tensor was refused even without strict=True;
as_strided with a storage offset gave another model's numbers; count_nonzero ignored its dim.)"""
import warnings

import pytest
import torch
import torch.nn as nn

import mbcompile


class Fn(nn.Module):
    def __init__(self, fn, width=6):
        super().__init__()
        self.l = nn.Linear(width, 8)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.l(x))


def _check(fn, strict=False, x=None):
    torch.manual_seed(0)
    models = [Fn(fn).double() for _ in range(3)]
    x = torch.randn(5, 6, dtype=torch.float64) if x is None else x
    b = mbcompile.batch(models, strict=strict)
    out = b(x)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x), rtol=1e-12, atol=1e-12)
    return b


@pytest.mark.parametrize("dim", [0, 1, -1, None])
def test_count_nonzero_counts_along_its_one_dim(dim):
    _check(lambda h: torch.count_nonzero(torch.relu(h), dim=dim), strict=True)


def _sorted_search(h):
    w = h[0]                                   # 8 values, per model
    return torch.searchsorted(w, h, sorter=torch.argsort(w))


def test_a_per_model_keyword_tensor_goes_through_the_fallback_with_a_warning():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        b = _check(_sorted_search)
    assert any("keyword argument" in str(r.message) and "fallback" in str(r.message) for r in rec)
    assert "FALLBACK" in str(mbcompile.explain(b))


def test_a_per_model_keyword_tensor_under_strict_names_the_op_and_line():
    with pytest.raises(mbcompile.UnsupportedOpError, match=r"searchsorted.*keyword argument.*test_fallback\.py"):
        _check(_sorted_search, strict=True)


@pytest.mark.parametrize("strict", [False, True])
def test_as_strided_with_a_storage_offset_is_refused_not_wrong(strict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(mbcompile.UnsupportedOpError, match="storage offset 3 addresses the unbatched"):
            _check(lambda h: torch.as_strided(h[1:], (2, 2), (8, 1), 3), strict=strict)


def test_as_strided_without_an_offset_reads_each_models_own_rows():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check(lambda h: torch.as_strided(h[1:], (2, 3), (8, 2)) * 2)


class ConvStrided(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        h = self.c(x)                                       # B,4,4,4 contiguous alone
        return torch.as_strided(h, (2, 4, 3), (64, 1, 16))  # reads h's storage as alone


def test_as_strided_of_a_channels_last_batch_slice_is_laid_out_as_alone():
    """A channels-last conv chain holds model i's activation with other strides than alone: its
    slice is made contiguous, as the input was alone, before as_strided reads it."""
    from mbcompile import lowering
    torch.manual_seed(0)
    models = [ConvStrided().double() for _ in range(3)]
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with warnings.catch_warnings(), lowering.force(conv_shared_input="concat_nhwc"):
        warnings.simplefilter("ignore")
        b = mbcompile.batch(models)
        out = b(x)
    assert "concat_nhwc" in str(mbcompile.explain(b))
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x), rtol=1e-12, atol=1e-12)
