"""Model factories for ``squant-rs export`` tests (``export_models:small``)."""

from __future__ import annotations

import torch


class Tiny(torch.nn.Module):
    """Conv + BN + ReLU6, a residual depthwise block, global pool, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = torch.nn.BatchNorm2d(8)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.b2 = torch.nn.BatchNorm2d(8)
        self.pw = torch.nn.Conv2d(8, 8, 1)
        self.b3 = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.relu6(self.b1(self.c1(x)))
        y = torch.nn.functional.relu6(self.b2(self.dw(x)))
        x = x + self.b3(self.pw(y))
        x = torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def small() -> Tiny:
    """Random weights and BN statistics (seed 0), eval mode."""
    torch.manual_seed(0)
    net = Tiny().eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return net


def not_a_module() -> int:
    return 3


def broken() -> Tiny:
    raise ValueError("no weights for this one")


class _Indexing(Tiny):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[:, [99]]


def indexing() -> Tiny:
    """A model whose forward fails with an IndexError (not a RuntimeError)."""
    return _Indexing().eval()


NOT_CALLABLE = 3


def no_layer() -> torch.nn.Module:
    """Nothing to quantize."""
    return torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Flatten())


def half() -> Tiny:
    """A float16 model."""
    return small().half()


class SeqFirst(torch.nn.Module):
    """A Linear and a sequence-first transformer layer (``batch_first=False``):
    its input is ``(L, N, E)``, the batch dimension 1."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.enc = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(self.proj(x))


def seq_first() -> SeqFirst:
    """Random weights (seed 0), eval mode."""
    torch.manual_seed(0)
    return SeqFirst().eval()


def token_lm() -> torch.nn.Module:
    """A model of integer token ids: Embedding, Linear, ReLU, Linear."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Embedding(50, 16),
        torch.nn.Linear(16, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 50),
    ).eval()
