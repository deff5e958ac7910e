"""A compact MobileNetV2 with torchvision's module layout (so torchvision's
checkpoint ``mobilenet_v2-b0353104.pth`` loads into it with
``load_state_dict``), for tests and benches that must not depend on a
torchvision build matching the installed torch."""

from __future__ import annotations

import torch
from torch import nn

# (expand ratio t, channels c, repeats n, first stride s), as torchvision.
SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def conv_bn_relu6(
    inp: int, out: int, k: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, out, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, t: int) -> None:
        super().__init__()
        hidden = inp * t
        self.use_res_connect = stride == 1 and inp == out
        layers: list[nn.Module] = []
        if t != 1:
            layers.append(conv_bn_relu6(inp, hidden, k=1))
        layers += [
            conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.conv(x)
        return x + y if self.use_res_connect else y


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width: float = 1.0) -> None:
        super().__init__()

        def ch(c: float) -> int:  # torchvision's _make_divisible(c, 8)
            v = max(8, int(c + 4) // 8 * 8)
            return v + 8 if v < 0.9 * c else v

        inp = ch(32 * width)
        last = ch(1280 * max(1.0, width))
        feats: list[nn.Module] = [conv_bn_relu6(3, inp, stride=2)]
        for t, c, n, s in SETTINGS:
            out = ch(c * width)
            for i in range(n):
                feats.append(InvertedResidual(inp, out, s if i == 0 else 1, t))
                inp = out
        feats.append(conv_bn_relu6(inp, last, k=1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        y: torch.Tensor = self.classifier(x)
        return y


def random_mobilenet_v2(seed: int = 0, num_classes: int = 1000) -> MobileNetV2:
    """MobileNetV2 with random weights and BatchNorm statistics (eval mode)."""
    torch.manual_seed(seed)
    model = MobileNetV2(num_classes)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.0)
            m.bias.data.uniform_(-0.1, 0.1)
    return model.eval()
