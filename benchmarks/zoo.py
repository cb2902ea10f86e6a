"""A zoo of held-out-style models, each trained as 16 sequential torch models (torch.optim.Adam each)
and as one mbcompile normal loop (``mbcompile.optimizer``, ``batched(x)``, ``mbcompile.loss``, backward,
step), one step timed after two warm-up steps, rounds interleaved:

    python -m benchmarks.zoo [--models se,unet] [--n 16] [--threads 2] [--rounds 3] [--steps 6]
                             [--device cuda] [--check 4]

Prints one line per model: sequential ms, mbcompile ms, the ratio, and the first step's seconds
(capture, batching, lowering measurement). Written to find where batching loses on a CPU (layouts,
cache, kernels): docs/performance.md lists what it found. The models are small and written in plain
torch as a user would; none of them is tuned for mbcompile."""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---- models ----------------------------------------------------------------------------------------
class GRUCls(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.rnn = nn.GRU(32, 64, batch_first=True)
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        return self.fc(self.rnn(self.emb(x))[0][:, -1])


class LSTM2(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(16, 64, num_layers=2, batch_first=True, dropout=0.1)
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


class TCN(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv1d(32, 32, 3, padding=2, dilation=2), nn.ReLU(),
                              nn.Conv1d(32, 32, 3, padding=4, dilation=4), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 5))

    def forward(self, x):
        return self.net(x)


class SmallVGG(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.f(x)


class DWNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU6(),
                            nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU6(),
                            nn.Conv2d(32, 64, 1), nn.BatchNorm2d(64), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.f(x)


class Enc(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(200, 64)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, dropout=0.1, batch_first=True), 2)
        self.fc = nn.Linear(64, 2)

    def forward(self, x):
        return self.fc(self.enc(self.emb(x)).mean(1))


class AE(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 16))
        self.d = nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 784))

    def forward(self, x):
        return torch.sigmoid(self.d(self.e(x)))


class Rec(nn.Module):
    def __init__(self):
        super().__init__()
        self.u = nn.Embedding(1000, 32)
        self.i = nn.Embedding(2000, 32)
        self.mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x):
        return self.mlp(torch.cat([self.u(x[:, 0]), self.i(x[:, 1])], 1)).squeeze(1)


class DropMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Dropout(0.2), nn.LayerNorm(256), nn.Linear(256, 256), nn.GELU(), nn.Dropout(0.2), nn.Linear(256, 10))

    def forward(self, x):
        return self.f(x)


class UNetMini(nn.Module):
    def __init__(self):
        super().__init__()
        blk = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())
        self.e1, self.e2, self.mid = blk(3, 16), blk(16, 32), blk(32, 32)
        self.d2, self.d1 = blk(64, 16), blk(32, 16)
        self.out = nn.Conv2d(16, 1, 1)

    def forward(self, x):
        a = self.e1(x)
        b = self.e2(F.max_pool2d(a, 2))
        m = self.mid(F.max_pool2d(b, 2))
        u = self.d2(torch.cat([F.interpolate(m, scale_factor=2, mode="nearest"), b], 1))
        u = self.d1(torch.cat([F.interpolate(u, scale_factor=2, mode="bilinear", align_corners=False), a], 1))
        return self.out(u)


class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc1, self.fc2 = nn.Linear(32, 8), nn.Linear(8, 32)
        self.c2, self.b2 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean((2, 3))))))
        h = h * w[:, :, None, None]
        h = F.relu(self.b2(self.c2(h))) + h
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class ConvNeXtish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 4, stride=4)
        self.dw = nn.Conv2d(32, 32, 7, padding=3, groups=32)
        self.ln = nn.LayerNorm(32)
        self.pw1 = nn.Linear(32, 128)
        self.pw2 = nn.Linear(128, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = self.stem(x)
        r = self.dw(h).permute(0, 2, 3, 1)
        r = self.pw2(F.gelu(self.pw1(self.ln(r)))).permute(0, 3, 1, 2)
        h = h + r
        return self.head(h.mean((-2, -1)))


class GNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(), nn.AvgPool2d(2),
                            nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.SiLU(), nn.Dropout2d(0.1),
                            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.f(x)


class Gen(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 64 * 4 * 4)
        self.net = nn.Sequential(nn.BatchNorm2d(64), nn.ReLU(), nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
                              nn.ConvTranspose2d(32, 3, 4, 2, 1), nn.Tanh())

    def forward(self, z):
        return self.net(self.fc(z).view(-1, 64, 4, 4))


class BN1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv1d(12, 64, 5, padding=2), nn.BatchNorm1d(64), nn.ReLU(), nn.MaxPool1d(2),
                            nn.Conv1d(64, 64, 5, padding=2), nn.BatchNorm1d(64), nn.ReLU())
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        return self.head(self.f(x).mean(-1))


class GPTMini(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 64)
        self.pos = nn.Parameter(torch.zeros(64, 64))
        self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(64, 4, 256, dropout=0.1, batch_first=True, norm_first=True) for _ in range(2)])
        self.ln = nn.LayerNorm(64)
        self.head = nn.Linear(64, 100)

    def forward(self, x):
        h = self.emb(x) + self.pos[: x.shape[1]]
        m = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        for b in self.blocks: h = b(h, src_mask=m, is_causal=True)
        return self.head(self.ln(h))


class BiGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(200, 32)
        self.rnn = nn.GRU(32, 48, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(96, 9)

    def forward(self, x):
        return self.fc(self.rnn(self.emb(x))[0])


class Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 64, 4, 4)
        self.ln1, self.tok1, self.tok2 = nn.LayerNorm(64), nn.Linear(64, 128), nn.Linear(128, 64)
        self.ln2, self.ch1, self.ch2 = nn.LayerNorm(64), nn.Linear(64, 256), nn.Linear(256, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)          # B,64 tokens,64
        h = h + self.tok2(F.gelu(self.tok1(self.ln1(h).transpose(1, 2)))).transpose(1, 2)
        h = h + self.ch2(F.gelu(self.ch1(self.ln2(h))))
        return self.head(h.mean(1))


class CRNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv1d(40, 64, 3, padding=1), nn.BatchNorm1d(64), nn.ReLU(), nn.MaxPool1d(2),
                            nn.Conv1d(64, 64, 3, padding=1), nn.BatchNorm1d(64), nn.ReLU(), nn.MaxPool1d(2))
        self.rnn = nn.GRU(64, 64, batch_first=True)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.rnn(self.f(x).transpose(1, 2))[0][:, -1])


class VAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(784, 256)
        self.mu = nn.Linear(256, 20)
        self.lv = nn.Linear(256, 20)
        self.dec = nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 784))

    def forward(self, x):
        h = F.relu(self.enc(x))
        mu, lv = self.mu(h), self.lv(h)
        z = mu + torch.randn_like(mu) * (0.5 * lv).exp()
        rec = torch.sigmoid(self.dec(z))
        return F.binary_cross_entropy(rec, x, reduction="none").sum(1) - 0.5 * (1 + lv - mu ** 2 - lv.exp()).sum(1)


class StyleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(3, 32, 3), nn.InstanceNorm2d(32, affine=True), nn.ReLU(),
                            nn.ReflectionPad2d(1), nn.Conv2d(32, 32, 3), nn.InstanceNorm2d(32, affine=True), nn.ReLU(),
                            nn.ReflectionPad2d(1), nn.Conv2d(32, 3, 3))

    def forward(self, x):
        return self.f(x)


class Siamese(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))

    def forward(self, x):
        return F.cosine_similarity(self.enc(x[:, 0]), self.enc(x[:, 1]))


def _vae_loss(out, y):
    return out.mean()


def _tokens(v, b, t):
    return lambda g: torch.randint(0, v, (b, t), generator=g)


def _classes(k, b):
    return lambda g: torch.randint(0, k, (b,), generator=g)


def _randn(*shape):
    return lambda g: torch.randn(*shape, generator=g)


def _seq_ce(v):
    return lambda o, t: F.cross_entropy(o.reshape(-1, v), t.reshape(-1))


# name: (model class, input(g), target(g) or None (the input), loss)
ZOO = {
    "gru": (GRUCls, _tokens(100, 32, 20), _classes(5, 32), F.cross_entropy),
    "lstm2": (LSTM2, _randn(32, 20, 16), _classes(5, 32), F.cross_entropy),
    "tcn": (TCN, _randn(32, 8, 64), _classes(5, 32), F.cross_entropy),
    "vgg": (SmallVGG, _randn(32, 3, 32, 32), _classes(10, 32), F.cross_entropy),
    "dwnet": (DWNet, _randn(32, 3, 32, 32), _classes(10, 32), F.cross_entropy),
    "enc": (Enc, _tokens(200, 32, 24), _classes(2, 32), F.cross_entropy),
    "ae": (AE, lambda g: torch.rand(64, 784, generator=g), None, F.mse_loss),
    "rec": (Rec, lambda g: torch.stack([torch.randint(0, 1000, (256,), generator=g),
                                        torch.randint(0, 2000, (256,), generator=g)], 1),
            lambda g: torch.rand(256, generator=g), F.mse_loss),
    "dropmlp": (DropMLP, _randn(64, 128), _classes(10, 64), F.cross_entropy),
    "unet": (UNetMini, _randn(16, 3, 32, 32), _randn(16, 1, 32, 32), F.mse_loss),
    "se": (SE, _randn(32, 3, 32, 32), _classes(10, 32), F.cross_entropy),
    "convnext": (ConvNeXtish, _randn(32, 3, 32, 32), _classes(10, 32), F.cross_entropy),
    "gn": (GNNet, _randn(32, 3, 32, 32), _classes(10, 32), F.cross_entropy),
    "gen": (Gen, _randn(64, 16), lambda g: torch.rand(64, 3, 16, 16, generator=g) * 2 - 1, F.mse_loss),
    "bn1d": (BN1d, _randn(64, 12, 128), _classes(4, 64), F.cross_entropy),
    "gpt": (GPTMini, _tokens(100, 16, 64), _tokens(100, 16, 64), _seq_ce(100)),
    "bigru": (BiGRU, _tokens(200, 32, 24), _tokens(9, 32, 24), _seq_ce(9)),
    "mixer": (Mixer, _randn(32, 3, 32, 32), _classes(10, 32), F.cross_entropy),
    "crnn": (CRNN, _randn(32, 40, 100), _classes(10, 32), F.cross_entropy),
    "vae": (VAE, lambda g: torch.rand(64, 784, generator=g), lambda g: torch.zeros(64), _vae_loss),
    "style": (StyleNet, _randn(8, 3, 64, 64), _randn(8, 3, 64, 64), F.mse_loss),
    "siamese": (Siamese, _randn(128, 2, 64), lambda g: torch.rand(128, generator=g), F.mse_loss),
}


def _data(name, device, dtype=None):
    _, mx, my, _ = ZOO[name]
    g = torch.Generator().manual_seed(0)
    x = mx(g)
    y = x if my is None else my(g)
    cast = (lambda t: t.to(device, dtype) if dtype and t.is_floating_point() else t.to(device))
    return cast(x), cast(y)


def check(name, n=4, device="cpu", steps=2):
    """Largest |difference| between each model trained alone (torch.optim.Adam, its own lr, eager
    dropout after ``torch.manual_seed(i)``) and model i of the batch, float64, after ``steps`` steps,
    relative to the largest |weight|."""
    import mbcompile
    cls, _, _, lossf = ZOO[name]
    torch.manual_seed(0)
    models = [cls().to(device, torch.float64) for _ in range(n)]
    x, y = _data(name, device, torch.float64)
    lrs = [1e-3 * (1 + i) for i in range(n)]
    b = mbcompile.batch(models, seeds=range(n))
    opt = mbcompile.optimizer(b, torch.optim.Adam, lr=lrs)
    for _ in range(steps):
        opt.zero_grad()
        mbcompile.loss(lossf, b(x), y, target_in_dim=None).sum().backward()
        opt.step()
    worst = 0.0
    for i, m in enumerate(models):
        torch.manual_seed(i)
        o = torch.optim.Adam(m.parameters(), lr=lrs[i])
        for _ in range(steps):
            o.zero_grad()
            lossf(m(x), y).backward()
            o.step()
        mine = b.unbatch(i).state_dict()
        for k, v in m.state_dict().items():
            if v.is_floating_point():
                scale = max(v.abs().max().item(), 1e-12)
                worst = max(worst, (mine[k].to(v) - v).abs().max().item() / scale)
    return worst


def run(name, n=16, rounds=3, steps=6, device="cpu"):
    """(sequential s, mbcompile s, first-step s): medians over ``rounds`` interleaved rounds."""
    import mbcompile
    cls, _, _, lossf = ZOO[name]
    torch.manual_seed(0)
    models = [cls().to(device) for _ in range(n)]
    x, y = _data(name, device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    seq = [copy.deepcopy(m) for m in models]
    sopt = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in seq]

    def s_step():
        for m, o in zip(seq, sopt):
            o.zero_grad()
            lossf(m(x), y).backward()
            o.step()

    t0 = time.perf_counter()
    b = mbcompile.batch(models)
    opt = mbcompile.optimizer(b, torch.optim.Adam, lr=[1e-3] * n)

    def b_step():
        opt.zero_grad()
        mbcompile.loss(lossf, b(x), y, target_in_dim=None).sum().backward()
        opt.step()

    b_step()
    sync()
    first = time.perf_counter() - t0
    s_step()
    b_step()
    ts, tb = [], []
    for _ in range(rounds):
        for f, acc in ((s_step, ts), (b_step, tb)):
            sync()
            t = time.perf_counter()
            for _ in range(steps):
                f()
            sync()
            acc.append((time.perf_counter() - t) / steps)
    return sorted(ts)[len(ts) // 2], sorted(tb)[len(tb) // 2], first


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(ZOO))
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--check", type=int, default=0, metavar="N",
                    help="also train N models alone and batched in float64 and print the largest difference")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from mbcompile import hostmem
    hostmem.tune()                     # as the suite: every method with the same malloc settings
    print(f"n={a.n}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name in a.models.split(","):
        try:
            s, m, first = run(name, a.n, a.rounds, a.steps, a.device)
            err = f"  float64 vs alone {check(name, a.check, a.device):.1e}" if a.check else ""
            print(f"{name:9s} sequential {1e3 * s:8.2f} ms  mbcompile {1e3 * m:8.2f} ms  {s / m:5.2f}x  "
                  f"first step {first:.1f} s{err}", flush=True)
        except Exception as e:   # noqa: BLE001 - report and go on with the other models
            print(f"{name:9s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
