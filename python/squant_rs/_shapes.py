"""Built-in weight shapes of well-known architectures, so the main job and
the benchmarks need no download. He-initialised random values stand in for
trained weights (same shapes, same work)."""

from __future__ import annotations

import numpy as np


def resnet_shapes(depth: int = 50) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every Conv2d/Linear weight of torchvision's ResNet-18/34/50/101/152."""
    cfg = {
        18: ("basic", [2, 2, 2, 2]),
        34: ("basic", [3, 4, 6, 3]),
        50: ("bottleneck", [3, 4, 6, 3]),
        101: ("bottleneck", [3, 4, 23, 3]),
        152: ("bottleneck", [3, 8, 36, 3]),
    }
    if depth not in cfg:
        raise ValueError(f"unknown ResNet depth {depth}: expected one of {sorted(cfg)}")
    block, layers = cfg[depth]
    expansion = 4 if block == "bottleneck" else 1
    shapes: list[tuple[str, tuple[int, ...]]] = [("conv1.weight", (64, 3, 7, 7))]
    inplanes = 64
    for li, (planes, n) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for b in range(n):
            p = f"layer{li}.{b}"
            stride = 2 if (b == 0 and li > 1) else 1
            if block == "bottleneck":
                shapes += [
                    (f"{p}.conv1.weight", (planes, inplanes, 1, 1)),
                    (f"{p}.conv2.weight", (planes, planes, 3, 3)),
                    (f"{p}.conv3.weight", (planes * 4, planes, 1, 1)),
                ]
            else:
                shapes += [
                    (f"{p}.conv1.weight", (planes, inplanes, 3, 3)),
                    (f"{p}.conv2.weight", (planes, planes, 3, 3)),
                ]
            if b == 0 and (stride != 1 or inplanes != planes * expansion):
                shapes.append((f"{p}.downsample.0.weight", (planes * expansion, inplanes, 1, 1)))
            inplanes = planes * expansion
    shapes.append(("fc.weight", (1000, 512 * expansion)))
    return shapes


def he_weights(shapes: list[tuple[str, tuple[int, ...]]], seed: int = 0) -> dict[str, np.ndarray]:
    """He-normal float32 weights (std = sqrt(2 / fan_in)) for the given shapes."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in shapes:
        fan_in = int(np.prod(shape[1:]))
        w = rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(np.sqrt(2.0 / fan_in))
        out[name] = w
    return out
