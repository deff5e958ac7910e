"""Smoke tests of the offline accuracy harness (benches/_accuracy_data.py):
the metrics and the crop generator, on synthetic images and a tiny model.

No network and no extra packages (scikit-image / scikit-learn are only
imported by ``load_source_images``, which is not called here)."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benches"))
import _accuracy_data as acc  # noqa: E402
import squant_rs  # noqa: E402


def _images(seed: int = 0) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        ("rgb", rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)),
        ("gray", rng.integers(0, 256, (50, 35), dtype=np.uint8)),
        ("small", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)),
    ]


# ---------------------------------------------------------------- metrics


def test_top1_agreement_counts_matching_argmax() -> None:
    ref = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 1.0], [5.0, 4.0, 0.0]])
    q = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [0.0, 0.0, 9.0], [4.0, 5.0, 0.0]])
    assert acc.top1_agreement(ref, ref) == 1.0
    assert acc.top1_agreement(ref, q) == 0.5


def test_metrics_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        acc.top1_agreement(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError):
        acc.mean_kl(torch.zeros(3), torch.zeros(3))


def test_empty_batch_is_nan() -> None:
    e = torch.zeros(0, 10)
    assert math.isnan(acc.top1_agreement(e, e))
    assert math.isnan(acc.mean_kl(e, e))
    v, n = acc.confident_agreement(e, e)
    assert math.isnan(v) and n == 0


def test_confident_agreement_uses_only_confident_reference_rows() -> None:
    big = 10.0
    # rows 0, 1: confident (p ~ 1); rows 2, 3: uniform (p = 1/4)
    ref = torch.tensor(
        [[big, 0, 0, 0], [0, big, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float32
    )
    q = torch.tensor(
        [[big, 0, 0, 0], [big, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.float32
    )
    v, n = acc.confident_agreement(ref, q, threshold=0.5)
    assert n == 2 and v == 0.5
    v, n = acc.confident_agreement(ref, q, threshold=0.2)
    assert n == 4 and v == acc.top1_agreement(ref, q)
    v, n = acc.confident_agreement(ref, q, threshold=1.01)
    assert n == 0 and math.isnan(v)


def test_confident_threshold_is_inclusive() -> None:
    ref = torch.log(torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64))
    _, n = acc.confident_agreement(ref, ref, threshold=0.5)
    assert n == 1


def test_mean_kl_matches_numpy_and_basic_properties() -> None:
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(16, 7, generator=g)
    q = ref + 0.3 * torch.randn(16, 7, generator=g)
    p = np.exp(ref.double().numpy())
    p /= p.sum(1, keepdims=True)
    r = np.exp(q.double().numpy())
    r /= r.sum(1, keepdims=True)
    expected = float(np.mean(np.sum(p * (np.log(p) - np.log(r)), axis=1)))
    assert acc.mean_kl(ref, q) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert acc.mean_kl(ref, ref) == pytest.approx(0.0, abs=1e-12)
    assert acc.mean_kl(ref, q) > 0
    # logits are defined up to a per-row constant
    assert acc.mean_kl(ref + 5.0, q - 3.0) == pytest.approx(expected, rel=1e-6)
    # KL is not symmetric
    assert acc.mean_kl(q, ref) != pytest.approx(expected, rel=1e-6)


def test_normalize() -> None:
    x = torch.full((2, 3, 4, 4), 0.5)
    y = acc.normalize(x, (0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    assert torch.allclose(y[:, 0], torch.zeros(2, 4, 4))
    assert torch.allclose(y[:, 1], torch.ones(2, 4, 4))
    assert torch.allclose(y[:, 2], torch.full((2, 4, 4), 0.25))


# ---------------------------------------------------------------- crops


def test_make_crops_shape_range_and_metadata() -> None:
    ims = _images()
    x, meta = acc.make_crops(ims, size=16, scales=(0.5, 0.2), crops_per_scale=2)
    per_image = (1 + 2 * 2) * 2
    assert x.shape == (len(ims) * per_image, 3, 16, 16)
    assert x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert len(meta) == x.shape[0]
    dims = {name: img.shape[:2] for name, img in ims}
    for c in meta:
        h, w = dims[c.image]
        assert 0 <= c.top and c.top + c.height <= h
        assert 0 <= c.left and c.left + c.width <= w
    assert sum(c.kind == "center" for c in meta) == 2 * len(ims)


def test_make_crops_is_deterministic_and_seeded() -> None:
    ims = _images()
    a, ma = acc.make_crops(ims, size=16, seed=3)
    b, mb = acc.make_crops(ims, size=16, seed=3)
    c, mc = acc.make_crops(ims, size=16, seed=4)
    assert torch.equal(a, b) and ma == mb
    assert ma != mc


def test_make_crops_per_image_streams_are_independent() -> None:
    ims = _images()
    a, _ = acc.make_crops(ims[:1], size=16)
    b, _ = acc.make_crops(ims, size=16)
    assert torch.equal(a, b[: a.shape[0]])


def test_flipped_crop_is_the_mirror_image() -> None:
    x, meta = acc.make_crops(_images(), size=16)
    for i in range(0, len(meta), 2):
        assert not meta[i].flipped and meta[i + 1].flipped
        assert meta[i].top == meta[i + 1].top and meta[i].left == meta[i + 1].left
        assert torch.equal(x[i + 1], torch.flip(x[i], dims=(2,)))


def test_no_flips_and_grayscale_to_rgb() -> None:
    img = np.full((30, 40), 128, dtype=np.uint8)
    x, meta = acc.make_crops([("flat", img)], size=8, flips=False, scales=(0.3,), crops_per_scale=1)
    assert x.shape == (2, 3, 8, 8) and not any(c.flipped for c in meta)
    assert torch.allclose(x, torch.full_like(x, 128 / 255), atol=1e-6)


def test_make_crops_rejects_non_uint8() -> None:
    with pytest.raises(ValueError):
        acc.make_crops([("f", np.zeros((10, 10, 3), dtype=np.float32))], size=8)


# ---------------------------------------------------------------- tiny model


def test_metrics_on_a_tiny_quantized_model() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 10),
    ).eval()
    x, _ = acc.make_crops(_images(), size=16, scales=(0.5,), crops_per_scale=1)
    x = acc.normalize(x, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    with torch.inference_mode():
        ref = model(x)
        kl = {}
        for bits in (8, 2):
            q = squant_rs.quantize_model(model, wbits=bits, backend="rust")(x)
            kl[bits] = acc.mean_kl(ref, q)
            assert 0.0 <= acc.top1_agreement(ref, q) <= 1.0
    assert kl[8] < 1e-3
    assert kl[8] < kl[2]
