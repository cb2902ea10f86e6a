import torch
import torch.nn as nn

import mbcompile


def test_mlp_shared_input_matches_each_model():
    models = [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).double() for _ in range(3)]
    b = mbcompile.batch(models)
    x = torch.randn(5, 4, dtype=torch.float64)
    out = b(x)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x), rtol=1e-12, atol=1e-12)


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, scale):
        return self.fc(x) * scale


def test_python_number_arguments_are_baked_per_value():
    """export gives a Python number its own (unused) placeholder and bakes the value into the graph:
    the inputs must line up with it, and another value must capture another program."""
    models = [_Scaled().double() for _ in range(3)]
    x = torch.randn(5, 4, dtype=torch.float64)
    b = mbcompile.batch(models)
    for scale in (2.0, 3.0, 2.0):
        out = b(x, scale)
        for i, m in enumerate(models):
            torch.testing.assert_close(out[i], m(x, scale), rtol=1e-12, atol=1e-12)
    xs = torch.randn(3, 5, 4, dtype=torch.float64)
    bp = mbcompile.batch(models, in_dims=(0, None))
    out = bp(xs, 0.5)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(xs[i], 0.5), rtol=1e-12, atol=1e-12)
