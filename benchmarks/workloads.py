"""The benchmark workloads: a model factory, one fixed batch, a loss, and the FLOPs of one model's step.

Every workload trains n independent copies (model i seeded with ``SEED + i``) on one shared batch, with a
per-model loss ``loss(out, y)`` and Adam. Dropout is 0 everywhere so that every method's first step can be
checked against sequential training exactly.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

SEED = 1000


@dataclass
class Workload:
    name: str
    description: str
    batch: int
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[torch.Generator], tuple]  # -> (x, y) on CPU
    loss: Callable = None  # (out, y) -> scalar; default cross entropy over the last dim
    quick: bool = True  # part of --quick
    requires: tuple = ()  # optional packages
    notes: list = field(default_factory=list)

    def __post_init__(self):
        if self.loss is None:
            self.loss = cross_entropy

    def missing(self):
        """The first optional package this workload needs that is not installed, else None."""
        return next((p for p in self.requires if importlib.util.find_spec(p) is None), None)

    def models(self, n, device):
        out = []
        for i in range(n):
            torch.manual_seed(SEED + i)
            out.append(self.make_model().to(device))
        return out

    def data(self, device):
        g = torch.Generator().manual_seed(0)
        return tuple(t.to(device) for t in self.make_batch(g))


def cross_entropy(out, y):
    # B,...,V and B,... -> scalar (mean over every position)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


# ---- models ----------------------------------------------------------------------------------------
def mlp(*sizes):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class LeNet5(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, classes)

    def forward(self, x):  # B,3,32,32
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # B,6,14,14
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # B,16,5,5
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet8(nn.Module):
    """CIFAR ResNet with one BasicBlock per stage (16, 32, 64 channels): 8 weight layers, 78k parameters."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2))
        self.fc = nn.Linear(64, classes)

    def forward(self, x):  # B,3,32,32
        x = self.layers(self.stem(x))  # B,64,8,8
        return self.fc(x.mean((2, 3)))


class CharLSTM(nn.Module):
    def __init__(self, vocab=65, emb=32, hidden=128):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x):  # B,T -> B,T,V
        return self.head(self.lstm(self.emb(x))[0])


class ModAddTransformer(nn.Module):
    """Two post-norm encoder layers over the tokens "a b =", predicting (a + b) mod p from the last one."""

    def __init__(self, p=97, d=128, heads=4):
        super().__init__()
        self.emb = nn.Embedding(p + 1, d)  # token p is "="
        self.pos = nn.Parameter(torch.randn(3, d) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True) for _ in range(2))
        self.head = nn.Linear(d, p)

    def forward(self, x):  # B,3 -> B,p
        h = self.emb(x) + self.pos
        for layer in self.layers:
            h = layer(h)
        return self.head(h[:, -1])


class TinyBert(nn.Module):
    """transformers' BertForSequenceClassification, 2 layers of width 64, returning the logits."""

    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification
        cfg = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=64, num_labels=2,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        self.bert = BertForSequenceClassification(cfg)

    def forward(self, x):  # B,T -> B,2
        return self.bert(input_ids=x).logits


# ---- batches ---------------------------------------------------------------------------------------
def _classify(shape, classes):
    def make(g):
        return torch.randn(*shape, generator=g), torch.randint(0, classes, shape[:1], generator=g)
    return make


def _chars(g):
    seq = torch.randint(0, 65, (32, 33), generator=g)
    return seq[:, :-1].clone(), seq[:, 1:].clone()  # predict the next character


def _modadd(g, p=97, batch=256):
    a, b = torch.randint(0, p, (2, batch), generator=g)
    x = torch.stack([a, b, torch.full_like(a, p)], 1)
    return x, (a + b) % p


def _tokens(g):
    return torch.randint(0, 1000, (16, 32), generator=g), torch.randint(0, 2, (16,), generator=g)


WORKLOADS = {w.name: w for w in [
    Workload("tiny_mlp", "MLP 32-64-64-10, batch 32", 32, lambda: mlp(32, 64, 64, 10), _classify((32, 32), 10)),
    Workload("mlp784", "MLP 784-256-256-10, batch 64", 64, lambda: mlp(784, 256, 256, 10),
             _classify((64, 784), 10)),
    Workload("lenet5", "LeNet-5 on 3x32x32, batch 64", 64, LeNet5, _classify((64, 3, 32, 32), 10)),
    Workload("char_lstm", "char LSTM: vocab 65, emb 32, hidden 128, seq 32, batch 32", 32, CharLSTM, _chars),
    Workload("resnet8", "ResNet-8 (CIFAR, 16/32/64 channels, BatchNorm) on 3x32x32, batch 32", 32, ResNet8,
             _classify((32, 3, 32, 32), 10), quick=False),
    Workload("transformer", "2-layer transformer, modular addition p=97: d 128, 4 heads, batch 256", 256,
             ModAddTransformer, _modadd, quick=False),
    Workload("tiny_bert", "HF BERT (2 layers, width 64, 2 heads), seq 32, batch 16", 16, TinyBert, _tokens,
             quick=False, requires=("transformers",)),
]}


# ---- FLOPs -----------------------------------------------------------------------------------------
def _lstm_flops(mod, inp, out):
    """nn.LSTM runs through oneDNN on CPU, which FlopCounterMode does not see: count its matmuls here."""
    x = inp[0]
    tokens = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
    h, dirs = mod.hidden_size, 2 if mod.bidirectional else 1
    total, cin = 0, mod.input_size
    for _ in range(mod.num_layers):
        total += dirs * 2 * tokens * 4 * h * (cin + h)
        cin = h * dirs
    return total


def step_flops(workload: Workload, model: nn.Module, x, y) -> int:
    """FLOPs of one model's forward + backward on (x, y), counted by FlopCounterMode (matmuls, convs,
    attention); the optimizer's elementwise work is not counted. nn.LSTM is counted by hand (forward F,
    backward 2F): its oneDNN (CPU) and cuDNN (GPU) kernels are invisible to the counter."""
    extra = []
    lstms = {f"{type(model).__name__}.{p}": m for p, m in model.named_modules() if isinstance(m, nn.LSTM)}
    hooks = [m.register_forward_hook(lambda mod, i, o: extra.append(_lstm_flops(mod, i, o)))
             for m in lstms.values()]
    try:
        with FlopCounterMode(display=False) as counter:
            workload.loss(model(x), y).backward()
    finally:
        for h in hooks:
            h.remove()
    model.zero_grad(set_to_none=True)
    by_module = counter.get_flop_counts()
    seen = sum(sum(by_module.get(k, {}).values()) for k in lstms)  # whatever the counter did see in an LSTM
    return int(counter.get_total_flops() - seen + 3 * sum(extra))
