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
