"""Inputs found by review: broadcast views claiming huge sizes, thread-count
bounds, exotic torch tensors, torch objects that are not tensors, float16
grid end points, corrupt headers."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import as_strided

import squant_rs


def test_broadcast_view_with_huge_channel_is_rejected_not_aborted() -> None:
    w = as_strided(np.zeros(1, np.float32), shape=(2**20,) * 3, strides=(0, 0, 0))
    with pytest.raises(squant_rs.InvalidArgumentError, match="output channel holds"):
        squant_rs.quantize_tensor(w)
    t = torch.zeros(1, 1, 1).expand(2**20, 2**20, 2**20)
    with pytest.raises(squant_rs.InvalidArgumentError, match="output channel holds"):
        squant_rs.quantize_tensor(t, backend="rust")


def test_broadcast_view_too_large_for_memory_is_a_memory_error() -> None:
    # 2^46 elements in channels of 2^20: a valid layout that cannot be copied.
    w = as_strided(np.zeros(1, np.float32), shape=(2**26, 2**20), strides=(0, 0))
    with pytest.raises(MemoryError):
        squant_rs.quantize_tensor(w)


@pytest.mark.parametrize("threads", [0, 1025, 2**64])
def test_thread_count_bounds(threads: int) -> None:
    with pytest.raises(ValueError, match="threads"):
        squant_rs.quantize_tensor(np.ones((2, 2), np.float32), threads=threads)


def test_many_thread_counts_do_not_pile_up_pools() -> None:
    import threading

    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    before = threading.active_count()  # Python threads only; rayon's are native
    for n in range(1, 12):
        squant_rs.quantize_tensor(w, threads=n)
    assert threading.active_count() == before
    import os

    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            native = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
        # At most two cached pools (<= 11 + 10 workers) plus torch's and Python's own.
        assert native < 64, native


def test_exotic_torch_tensors() -> None:
    with pytest.raises(ValueError, match="meta"):
        squant_rs.quantize_tensor(torch.empty(4, 4, device="meta"))
    with pytest.raises(TypeError, match="strided"):
        squant_rs.quantize_tensor(torch.eye(4).to_sparse())
    w = torch.randn(4, 3, 3, 3)
    neg = torch._neg_view(w)
    a = squant_rs.quantize_tensor(neg, backend="rust")
    b = squant_rs.quantize_tensor(-w, backend="rust")
    assert torch.equal(a.codes, b.codes)


class _ArrayLike:
    """A numpy array-like from a user module whose name starts with "torch"."""

    __module__ = "torchless_utils"

    def __init__(self, a: np.ndarray) -> None:
        self.a = a

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        return np.asarray(self.a, dtype=dtype)


def test_array_like_from_a_torch_named_module_quantizes() -> None:
    """Only torch's own modules ("torch", "torch.*") hold torch objects: an
    array-like from "torchless_utils" was refused as "torch is not importable"."""
    w = np.random.default_rng(3).standard_normal((8, 4)).astype(np.float32)
    want = squant_rs.quantize_tensor(w, 4)
    got = squant_rs.quantize_tensor(_ArrayLike(w), 4)
    (batch,) = squant_rs.quantize_tensors([_ArrayLike(w)], 4)
    for q in (got, batch):
        assert np.array_equal(q.codes, want.codes) and np.array_equal(q.scale, want.scale)


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda: torch.nn.Conv2d(3, 8, 3), r"a Conv2d module: pass its \.weight"),
        (
            lambda: torch.nn.Sequential(torch.nn.Linear(4, 8)),
            r"a Sequential module: pass a layer's \.weight, or use quantize_model\(\)",
        ),
        (lambda: torch.Size([8, 4]), r"torch\.Size"),
    ],
    ids=["conv", "sequential", "size"],
)
def test_torch_objects_that_are_not_tensors_are_named(make, what: str) -> None:
    """A module passed instead of its weight (or torch.Size) with torch
    imported: named, not "got a torch object but torch is not importable"."""
    msg = "weight must be a numpy array or torch tensor, got " + what + "$"
    with pytest.raises(squant_rs.UnsupportedDtypeError, match="^" + msg):
        squant_rs.quantize_tensor(make())
    with pytest.raises(squant_rs.UnsupportedDtypeError, match="^weight 1: " + msg):
        squant_rs.quantize_tensors([np.ones((2, 2), np.float32), make()])


def test_float16_grid_end_points_stay_finite() -> None:
    w = np.array([[-65504.0, 65504.0, 0.1]], np.float16)
    d = squant_rs.quantize_tensor(w).dequantize()
    assert d.dtype == np.float16 and np.isfinite(d).all()
    t = torch.from_numpy(w)
    for backend in ("rust", "torch"):
        dt = squant_rs.quantize_tensor(t, backend=backend).dequantize()
        assert dt.dtype == torch.float16 and bool(torch.isfinite(dt).all())


def test_float64_beyond_float32_is_a_range_error() -> None:
    w = np.array([[1e300, 0.0], [1.0, 2.0]])
    with pytest.raises(squant_rs.WeightRangeError, match="float32 range"):
        squant_rs.quantize_tensor(w)
    with pytest.raises(squant_rs.WeightRangeError, match="float32 range"):
        squant_rs.quantize_tensor(torch.from_numpy(w), backend="torch")


def _safetensors_with_header(path, header: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def test_corrupt_headers_are_format_errors(tmp_path) -> None:
    deep = tmp_path / "deep.safetensors"
    _safetensors_with_header(deep, ("[" * 100000 + "]" * 100000).encode())
    with pytest.raises(squant_rs.FormatError):
        squant_rs.load_quantized(deep)
    listy = tmp_path / "listy.safetensors"
    header = {"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}
    _safetensors_with_header(listy, json.dumps(header).encode() + b"\0\0\0\0")
    with pytest.raises(squant_rs.FormatError):
        squant_rs.load_quantized(listy)
