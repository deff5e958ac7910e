"""The native helpers of the squant+ recipe: normal_cdf (bit for bit
math.erfc), channel_dots (float64 row dots), scale_channels (BN folding
products, bit for bit numpy's), and the bias-shift dots the quantization
pass computes itself (quantize_into's ``dots``: channel_dots' bits)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from squant_rs._squant_rs import channel_dots, normal_cdf, quantize_into, scale_channels
from squant_rs.errors import InvalidArgumentError


def test_normal_cdf_is_math_erfc_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [rng.standard_normal(20000) * 4, rng.standard_normal(2000) * 40, [0.0, -0.0, 1e-300]]
    )
    want = np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in x])
    got = normal_cdf(x)
    assert got.dtype == np.float64 and got.shape == x.shape
    assert np.array_equal(got.view(np.int64), want.view(np.int64))
    edge = normal_cdf(np.array([np.inf, -np.inf, np.nan]))
    assert edge[0] == 1.0 and edge[1] == 0.0 and np.isnan(edge[2])
    assert normal_cdf(np.zeros(0)).shape == (0,)


def test_channel_dots_are_float64_row_dots() -> None:
    rng = np.random.default_rng(1)
    mats = [
        rng.standard_normal((oc, ic)).astype(np.float32) for oc, ic in [(7, 13), (300, 96), (2, 1)]
    ]
    vecs = [rng.standard_normal(m.shape[1]) for m in mats]
    for threads in (1, 3):
        got = channel_dots(mats, vecs, threads)
        for g, m, v in zip(got, mats, vecs):
            exact = np.array([math.fsum(float(a) * float(b) for a, b in zip(row, v)) for row in m])
            assert g.dtype == np.float64
            np.testing.assert_allclose(g, exact, rtol=1e-12, atol=1e-12)
    # minus: the rows are the float32 differences
    subs = [rng.standard_normal(m.shape).astype(np.float32) for m in mats]
    got = channel_dots(mats, vecs, 2, [subs[0], None, subs[2]])
    want = channel_dots([mats[0] - subs[0], mats[1], mats[2] - subs[2]], vecs, 1)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    with pytest.raises(InvalidArgumentError, match="to subtract"):
        channel_dots(mats, vecs, None, [subs[0]])
    with pytest.raises(InvalidArgumentError, match="shape"):
        channel_dots(mats[:1], vecs[:1], None, [subs[1]])
    assert channel_dots([], []) == []
    with pytest.raises(InvalidArgumentError, match="2 matrices but 1 vectors"):
        channel_dots(mats[:2], vecs[:1])
    with pytest.raises(InvalidArgumentError, match="columns"):
        channel_dots([mats[0]], [vecs[1]])
    with pytest.raises(InvalidArgumentError, match="C-contiguous"):
        channel_dots([np.asfortranarray(mats[1])], [vecs[1]])


@pytest.mark.parametrize(
    "shape", [(16, 6, 3, 3), (10, 33), (12, 1, 5), (7, 5), (13, 3, 3, 3), (1, 9), (6000, 3)]
)
@pytest.mark.parametrize("with_float", [False, True])
def test_quantize_into_dots_are_channel_dots_bit_for_bit(
    shape: tuple[int, ...], with_float: bool
) -> None:
    """The dots computed as each channel is written equal channel_dots over
    the written values: ``w_hat . v_hat - w . v_w``, or ``(w_hat - w) .
    v_hat`` (float32 differences) without ``v_w``; any thread count."""
    rng = np.random.default_rng(sum(shape))
    w = (
        rng.standard_normal(shape)
        * np.logspace(-2, 1, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    ).astype(np.float32)
    g = int(np.prod(shape[1:]))
    v_hat = rng.standard_normal(g)
    v_w = rng.standard_normal(g) if with_float else None
    for threads in (1, 2):
        out = np.empty_like(w)
        (res,) = quantize_into([w], [out], 4, "squant", True, threads, "asymmetric", [(v_hat, v_w)])
        dot = res[7]
        assert dot is not None and dot.dtype == np.float64 and dot.shape == (shape[0],)
        rows, w_rows = out.reshape(shape[0], -1), w.reshape(shape[0], -1)
        if v_w is None:
            want = channel_dots([rows], [v_hat], 1, [w_rows])[0]
        else:
            want = channel_dots([rows], [v_hat])[0] - channel_dots([w_rows], [v_w])[0]
        assert np.array_equal(dot, want)


def test_quantize_into_dots_are_checked() -> None:
    rng = np.random.default_rng(9)
    ws = [rng.standard_normal((6, 4)).astype(np.float32) for _ in range(2)]
    outs = [np.empty_like(w) for w in ws]
    res = quantize_into(ws, outs, 4, "squant", True, None, "asymmetric", [None, (np.ones(4), None)])
    assert res[0][7] is None and res[1][7] is not None
    with pytest.raises(InvalidArgumentError, match="2 weights but 1 dot"):
        quantize_into(ws, outs, 4, "squant", True, None, "asymmetric", [None])
    with pytest.raises(InvalidArgumentError, match="weight 1: dot vector v_hat has 5 elements"):
        quantize_into(ws, outs, 4, "squant", True, None, "asymmetric", [None, (np.ones(5), None)])
    with pytest.raises(InvalidArgumentError, match="weight 0: dot vector v_w"):
        quantize_into(
            ws, outs, 4, "squant", True, None, "asymmetric", [(np.ones(4), np.ones(3)), None]
        )
    with pytest.raises(InvalidArgumentError, match="weight 0: dot vector v_w has 8"):
        quantize_into(
            ws, outs, 4, "squant", True, None, "asymmetric", [(np.ones(4), np.ones(8)), None]
        )
    with pytest.raises(InvalidArgumentError, match="weight 0: dot products need a float32 output"):
        quantize_into(
            ws,
            [np.empty((6, 4)), outs[1]],
            4,
            "squant",
            True,
            None,
            "asymmetric",
            [(np.ones(4), None), None],
        )


def test_channel_dots_sum_order_is_pinned() -> None:
    """Four float64 lanes (element i into lane i % 4, in order), added as
    (s0 + s1) + (s2 + s3), then the len % 4 tail in order: the squant+
    digests depend on these bits, whatever the build vectorizes."""
    rng = np.random.default_rng(5)
    for n in (1, 3, 4, 9, 30, 1027):
        m = (rng.standard_normal((3, n)) * 10.0 ** rng.integers(-6, 6, (3, n))).astype(np.float32)
        v = rng.standard_normal(n) * 10.0 ** rng.integers(-6, 6, n)
        got = channel_dots([m], [v], 2)[0]
        for r in range(3):
            s = [0.0] * 4
            full = n - n % 4
            for i in range(full):
                s[i % 4] += float(m[r, i]) * float(v[i])
            total = (s[0] + s[1]) + (s[2] + s[3])
            for i in range(full, n):
                total += float(m[r, i]) * float(v[i])
            assert got[r] == total


def test_scale_channels_is_numpy_multiply_bit_for_bit() -> None:
    rng = np.random.default_rng(2)
    ws = [rng.standard_normal(s).astype(np.float32) for s in [(8, 3, 3, 3), (40, 1, 3, 3), (5, 7)]]
    ks = [rng.standard_normal(w.shape[0]).astype(np.float32) for w in ws]
    outs = [np.empty_like(w) for w in ws]
    before = [w.copy() for w in ws]
    scale_channels(ws, ks, outs, 2)
    for w, k, o, b in zip(ws, ks, outs, before):
        want = w * k.reshape((-1,) + (1,) * (w.ndim - 1))
        assert np.array_equal(o.view(np.int32), want.view(np.int32))
        assert np.array_equal(w, b)  # the weights are left alone
    with pytest.raises(InvalidArgumentError, match="do not match"):
        scale_channels([ws[0]], [ks[1]], [outs[0]])
    with pytest.raises(InvalidArgumentError, match="1 weights, 2 factor vectors"):
        scale_channels([ws[0]], ks[:2], [outs[0]])
    with pytest.raises(InvalidArgumentError, match="C-contiguous"):
        scale_channels([np.asfortranarray(ws[2])], [ks[2]], [outs[2]])
    with pytest.raises(InvalidArgumentError, match="C-contiguous"):
        scale_channels([ws[2]], [ks[2]], [np.asfortranarray(outs[2])])


def test_scale_channels_refuses_outputs_it_cannot_write() -> None:
    """An output that is a weight, another output, shares their memory or
    is read-only raised a PanicException (AlreadyBorrowed, NotWriteable)."""
    w = np.ones((4, 8), np.float32)
    k = np.full(4, 2.0, np.float32)
    busy = "output must be a writeable array not borrowed elsewhere"
    with pytest.raises(InvalidArgumentError, match=f"weight 0: {busy}"):
        scale_channels([w], [k], [w])
    with pytest.raises(InvalidArgumentError, match=f"weight 0: {busy}"):
        scale_channels([w], [k], [w[::-1]])
    out = np.zeros((4, 8), np.float32)
    with pytest.raises(InvalidArgumentError, match=f"weight 1: {busy}"):
        scale_channels([w, w], [k, k], [out, out])
    frozen = np.zeros((4, 8), np.float32)
    frozen.setflags(write=False)
    with pytest.raises(InvalidArgumentError, match=f"weight 0: {busy}"):
        scale_channels([w], [k], [frozen])
    # Two arrays over one buffer: the borrow checks cannot tell.
    buf = bytearray(2 * w.nbytes)
    a, b = (np.frombuffer(buf, np.float32, 32).reshape(4, 8) for _ in range(2))
    with pytest.raises(
        InvalidArgumentError, match="weight 1: output overlaps the memory of output 0"
    ):
        scale_channels([w, w], [k, k], [a, b])
    wa = np.frombuffer(buf, np.float32, 32).reshape(4, 8)
    with pytest.raises(
        InvalidArgumentError, match="weight 0: output overlaps the memory of weight 0"
    ):
        scale_channels([wa], [k], [np.frombuffer(buf, np.float32, 32).reshape(4, 8)])
    assert not out.any() and not frozen.any() and not any(buf)
    scale_channels([w], [k], [out])
    assert (out == 2.0).all()


def _randomize_bns(model: object) -> None:
    """Running statistics and affine parameters away from their defaults on
    every BatchNorm2d of ``model``, from torch's global generator."""
    from torch import nn

    assert isinstance(model, nn.Module)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 1.0)


@pytest.mark.parametrize("abits", [None, 8])
def test_pipeline_native_dots_match_einsum_path(
    abits: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """quantize_model's bias shifts through the native dots (dense layers of
    any kernel size: each kernel position takes its input channel's value)
    equal the per-layer einsum path's (kernel sums, then float64 dots) to
    rounding; the weights are the same bits."""
    import torch
    from torch import nn

    import squant_rs
    from squant_rs.model import recipe

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        nn.Conv2d(8, 12, 3, padding=1, bias=False),  # dense 3x3: native now
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Conv2d(12, 12, (1, 5), padding=(0, 2), groups=3),  # grouped: einsum
        nn.BatchNorm2d(12),
        nn.ReLU6(),
        nn.Flatten(),
        nn.Linear(12 * 6 * 6, 5),
    ).eval()
    _randomize_bns(model)
    kw = {"recipe": "squant+", "input_shape": (2, 3, 6, 6), "backend": "rust"}
    native = squant_rs.quantize_model(model, 3, abits, **kw).state_dict()
    monkeypatch.setattr(recipe, "_native_rows", lambda module, w: None)
    ref = squant_rs.quantize_model(model, 3, abits, **kw).state_dict()
    assert native.keys() == ref.keys()
    for k, v in native.items():
        if k.endswith("weight"):
            assert torch.equal(v, ref[k]), k
        else:
            torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6, msg=k)
    # the dense 3x3 layer really was corrected (its bias moved off the fold's)
    assert not torch.equal(native["3.bias"], torch.zeros(12))


@pytest.mark.parametrize("abits", [None, 8])
def test_pipeline_fused_shifts_equal_the_separate_pass(
    abits: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """quantize_model's bias shifts computed by the quantization pass itself
    are the separate pass's, bit for bit (with grouped, depthwise and
    Linear layers in the model)."""
    import torch
    from torch import nn

    import squant_rs
    from squant_rs.model import pipeline

    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),  # depthwise
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        nn.Conv2d(8, 12, 1, groups=2),  # grouped 1x1
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 5),
    ).eval()
    _randomize_bns(model)
    kw = {"recipe": "squant+", "input_shape": (2, 3, 6, 6), "backend": "rust"}
    calls: list[object] = []
    real = pipeline.fused_shift_vectors

    def spy(*args: object) -> object:
        got = real(*args)  # type: ignore[arg-type]
        calls.append(got)
        return got

    monkeypatch.setattr(pipeline, "fused_shift_vectors", spy)
    fused, rep = squant_rs.quantize_model(model, 8, abits, return_report=True, **kw)
    # the dense layers but the first (no statistics); grouped and depthwise
    # layers keep the separate pass's einsum
    assert sum(c is not None for c in calls) == 1
    monkeypatch.setattr(pipeline, "fused_shift_vectors", lambda *args: None)
    separate = squant_rs.quantize_model(model, 8, abits, **kw)
    for (k, v), w in zip(fused.state_dict().items(), separate.state_dict().values()):
        assert torch.equal(v, w), k
    assert [r.bias_corrected for r in rep.layers] == [False, True, True, True]


@pytest.mark.parametrize("abits", [None, 8])
def test_pipeline_fused_shifts_use_the_float_weight_not_its_clipped_copy(
    abits: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 4-bit weights the weight range search quantizes a clipped copy of
    a layer's weight; its bias shift still uses the float weight. Here no
    folded layer is clipped (the first layer has no input statistics), so
    the clipped Linear is the only one: its shift must not come from the
    copy the quantization pass read (EfficientNet-Lite0 W4 lost 8 points
    of agreement that way)."""
    import torch
    from torch import nn

    import squant_rs
    from squant_rs.model import pipeline

    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()
    _randomize_bns(model)
    kw = {"recipe": "squant+", "input_shape": (2, 3, 6, 6), "backend": "rust"}
    fused, rep = squant_rs.quantize_model(model, 4, abits, return_report=True, **kw)
    assert rep.layers[-1].clip_ratio < 1.0 and rep.layers[-1].bias_corrected
    monkeypatch.setattr(pipeline, "fused_shift_vectors", lambda *args: None)
    separate = squant_rs.quantize_model(model, 4, abits, **kw)
    for (k, v), w in zip(fused.state_dict().items(), separate.state_dict().values()):
        assert torch.equal(v, w), k
