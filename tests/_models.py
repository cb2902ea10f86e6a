"""Small models used across the tests (each built in float64 unless asked otherwise)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self, i=10, h=32, o=3):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(i, h), nn.Linear(h, h), nn.Linear(h, o)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(F.relu(self.fc1(x)))))


class BNCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 2 * 2, 4)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.adaptive_avg_pool2d(x, 2)
        return self.head(torch.flatten(x, 1))


class Block(nn.Module):
    def __init__(self, c, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, 2 * c if stride == 2 else c, 3, stride, 1, bias=False), None
        out = 2 * c if stride == 2 else c
        self.b1 = nn.BatchNorm2d(out)
        self.c2, self.b2 = nn.Conv2d(out, out, 3, 1, 1, bias=False), nn.BatchNorm2d(out)
        self.short = (nn.Sequential(nn.Conv2d(c, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                      if stride == 2 else nn.Identity())

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(h)) + self.short(x))


class ResNetTiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.layer1, self.layer2 = Block(4, 1), Block(4, 2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Encoder(nn.Module):
    def __init__(self, vocab=30, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(12, d) * 0.1)
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(d, vocab)

    def forward(self, tokens):
        h = self.emb(tokens) + self.pos[: tokens.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], dtype=h.dtype)
        return self.out(self.enc(h, mask=mask, is_causal=True))


class EmbBag(nn.Module):
    """Embedding model with tied output weights and a LayerNorm."""

    def __init__(self, vocab=25, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, vocab, bias=False)
        self.proj.weight = self.emb.weight

    def forward(self, tokens):
        return self.proj(self.norm(self.emb(tokens).mean(1)))


def inputs_for(cls, b, gen=None):
    if cls is MLP:
        return (torch.randn(b, 10, dtype=torch.float64, generator=gen),)
    if cls in (BNCNN, ResNetTiny):
        return (torch.randn(b, 3, 8, 8, dtype=torch.float64, generator=gen),)
    if cls is Encoder:
        return (torch.randint(0, 30, (b, 7), generator=gen),)
    if cls is EmbBag:
        return (torch.randint(0, 25, (b, 5), generator=gen),)
    raise KeyError(cls)


class BNDropNet(nn.Module):
    """linear -> batch norm -> relu -> dropout -> linear (the compiled-step tests' model)."""

    def __init__(self, hidden=16, p=0.4):
        super().__init__()
        # no bias before batch norm: its gradient is zero up to rounding, which Adam would amplify
        self.fc1, self.bn = nn.Linear(6, hidden, bias=False), nn.BatchNorm1d(hidden)
        self.drop, self.fc2 = nn.Dropout(p), nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc2(self.drop(F.relu(self.bn(self.fc1(x)))))
