"""Offline evaluation data and metrics for ``benches/accuracy.py``.

Everything here needs only numpy and torch at import time; the image
sources (scikit-image, scikit-learn) are imported inside
:func:`load_source_images`, so the metric functions and the crop generator
can be tested anywhere (``tests/test_accuracy_harness.py``).

The evaluation set is a fixed, seeded set of random-resized crops and
horizontal flips of the sample images that ship inside the scikit-image and
scikit-learn wheels -- no download, no ImageNet. The quantized model is
compared with the float model on it (top-1 agreement, agreement where the
float model is confident, KL divergence), which measures how much the
quantization changes the network's predictions, not its ImageNet accuracy.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "SKIMAGE_FILES",
    "SKLEARN_FILES",
    "Crop",
    "confident_agreement",
    "make_crops",
    "mean_kl",
    "normalize",
    "load_source_images",
    "top1_agreement",
]

# skimage.data loader -> the file it reads from skimage/data/ (only images
# that ship inside the scikit-image wheel; anything else would need pooch).
SKIMAGE_FILES: dict[str, str] = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "retina": "retina.jpg",
    "stereo_motorcycle": "motorcycle_left.png",  # the left image of the pair
    # grayscale, converted to RGB
    "camera": "camera.png",
    "coins": "coins.png",
    "moon": "moon.png",
    "brick": "brick.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "clock": "clock_motion.png",
}
SKLEARN_FILES: tuple[str, ...] = ("china.jpg", "flower.jpg")


def _to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {a.dtype}")
    if a.ndim == 2:
        a = np.stack([a, a, a], axis=-1)
    elif a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an HxW or HxWx3 image, got shape {a.shape}")
    return np.ascontiguousarray(a)


def load_source_images() -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """The sample images shipped in the scikit-image and scikit-learn wheels,
    as ``(name, HxWx3 uint8)`` in a fixed order, plus a list of
    ``"name: reason"`` for the ones that were skipped (missing from the wheel,
    i.e. they would need a download)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    data_dir = os.path.dirname(os.path.abspath(skimage.data.__file__))
    images: list[tuple[str, np.ndarray]] = []
    skipped: list[str] = []
    for name, fname in SKIMAGE_FILES.items():
        if not os.path.exists(os.path.join(data_dir, fname)):
            skipped.append(f"skimage.data.{name}: {fname} not in the wheel (needs a download)")
            continue
        img = getattr(skimage.data, name)()
        if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
            img = img[0]
        images.append((name, _to_rgb_uint8(img)))
    bunch = load_sample_images()
    by_file = {os.path.basename(f): im for f, im in zip(bunch.filenames, bunch.images)}
    for fname in SKLEARN_FILES:
        if fname not in by_file:
            skipped.append(f"sklearn sample {fname}: not shipped")
            continue
        images.append((os.path.splitext(fname)[0], _to_rgb_uint8(by_file[fname])))
    return images, skipped


@dataclass(frozen=True)
class Crop:
    """Where one evaluation crop came from (pixel box in the source image)."""

    image: str
    kind: str  # "center" or "rrc@<area fraction>"
    top: int
    left: int
    height: int
    width: int
    flipped: bool


def _crop_box(
    rng: np.random.Generator, h: int, w: int, area_frac: float, ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """A random-resized-crop box: area ``area_frac * h * w``, log-uniform
    aspect ratio, uniform position (clipped to the image)."""
    log_r = rng.uniform(math.log(ratio[0]), math.log(ratio[1]))
    r = math.exp(log_r)
    area = area_frac * h * w
    cw = min(w, max(1, int(round(math.sqrt(area * r)))))
    ch = min(h, max(1, int(round(math.sqrt(area / r)))))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    return top, left, ch, cw


def _resize(patch: np.ndarray, size: int) -> torch.Tensor:
    """HxWx3 uint8 -> 3 x size x size float32 in [0, 1] (bilinear, antialiased)."""
    t = torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1)[None].float() / 255.0
    out = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].clamp_(0.0, 1.0)


def make_crops(
    images: Sequence[tuple[str, np.ndarray]],
    *,
    size: int = 224,
    scales: Sequence[float] = (0.6, 0.3, 0.12),
    crops_per_scale: int = 2,
    center: bool = True,
    flips: bool = True,
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    seed: int = 0,
) -> tuple[torch.Tensor, list[Crop]]:
    """A deterministic evaluation set: for every image, the central square
    crop (if ``center``) and ``crops_per_scale`` random-resized crops for
    each area fraction in ``scales``, each resized to ``size`` x ``size`` and
    (if ``flips``) also mirrored horizontally.

    Image ``i`` uses its own generator seeded with ``(seed, i)``, so the
    crops of one image do not depend on the others. Returns an
    ``(N, 3, size, size)`` float32 tensor in [0, 1] and one :class:`Crop`
    per row.
    """
    tensors: list[torch.Tensor] = []
    meta: list[Crop] = []
    for i, (name, img) in enumerate(images):
        img = _to_rgb_uint8(img)
        h, w = img.shape[:2]
        rng = np.random.default_rng([seed, i])
        boxes: list[tuple[str, tuple[int, int, int, int]]] = []
        if center:
            side = min(h, w)
            boxes.append(("center", ((h - side) // 2, (w - side) // 2, side, side)))
        for a in scales:
            for _ in range(crops_per_scale):
                boxes.append((f"rrc@{a:g}", _crop_box(rng, h, w, float(a), ratio)))
        for kind, (top, left, ch, cw) in boxes:
            t = _resize(img[top : top + ch, left : left + cw], size)
            tensors.append(t)
            meta.append(Crop(name, kind, top, left, ch, cw, False))
            if flips:
                tensors.append(torch.flip(t, dims=(2,)))
                meta.append(Crop(name, kind, top, left, ch, cw, True))
    if not tensors:
        return torch.empty((0, 3, size, size)), meta
    return torch.stack(tensors), meta


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel for an ``(N, 3, H, W)`` batch."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def _check_pair(ref: torch.Tensor, q: torch.Tensor) -> None:
    if ref.shape != q.shape or ref.dim() != 2:
        raise ValueError(f"expected two (N, classes) logit tensors, got {ref.shape}, {q.shape}")


def top1_agreement(ref_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Fraction of rows whose arg-max class is the same in both."""
    _check_pair(ref_logits, q_logits)
    if ref_logits.shape[0] == 0:
        return float("nan")
    same = ref_logits.argmax(dim=1) == q_logits.argmax(dim=1)
    return float(same.double().mean())


def confident_agreement(
    ref_logits: torch.Tensor, q_logits: torch.Tensor, threshold: float = 0.5
) -> tuple[float, int]:
    """Top-1 agreement restricted to rows where the reference (float) model's
    top softmax probability is ``>= threshold``; returns ``(agreement,
    number of such rows)`` (agreement is NaN when there are none)."""
    _check_pair(ref_logits, q_logits)
    conf = torch.softmax(ref_logits.double(), dim=1).amax(dim=1) >= threshold
    n = int(conf.sum())
    if n == 0:
        return float("nan"), 0
    return top1_agreement(ref_logits[conf], q_logits[conf]), n


def mean_kl(ref_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(ref) || softmax(q)) in nats (float64)."""
    _check_pair(ref_logits, q_logits)
    if ref_logits.shape[0] == 0:
        return float("nan")
    lp = torch.log_softmax(ref_logits.double(), dim=1)
    lq = torch.log_softmax(q_logits.double(), dim=1)
    kl = (lp.exp() * (lp - lq)).sum(dim=1)
    return float(kl.mean())
