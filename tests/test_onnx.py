"""Quantized ONNX: export_onnx (torch models) and quantize_onnx (ONNX in,
ONNX out, no torch), run in onnxruntime."""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import squant_rs
from squant_rs.formats.onnx import code_container

from mobilenet_v2 import random_mobilenet_v2

CPU = ["CPUExecutionProvider"]


def run(path, x: np.ndarray, **opts) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    # int4 and int8 weights on MatMul / Gemm(transB=0) with a float input
    # become MatMulNBits (ORT 1.32), which by default computes with
    # int8-quantized inputs (accuracy level 4).
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    for k, v in opts.items():
        setattr(so, k, v)
    sess = ort.InferenceSession(str(path), so, providers=CPU)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def optimized_ops(path, tmp_path) -> collections.Counter:
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=CPU)
    return ops(tmp_path / "optimized.onnx")


def float_export(model, x, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", "Constant folding", UserWarning)
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            input_names=["input"],
            dynamic_axes={"input": {0: "batch"}},
        )


class Small(torch.nn.Module):
    """Conv + BN, depthwise + BN + ReLU6, grouped 1x1, Linear."""

    def __init__(self, bn: bool = True) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = torch.nn.BatchNorm2d(16) if bn else torch.nn.Identity()
        self.dw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.b2 = torch.nn.BatchNorm2d(16) if bn else torch.nn.Identity()
        self.g = torch.nn.Conv2d(16, 24, 1, groups=4)
        self.fc = torch.nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.nn.functional.relu6(self.b2(self.dw(x)))
        x = torch.relu(self.g(x))
        return self.fc(x.mean((2, 3)))


def small(bn: bool = True) -> Small:
    torch.manual_seed(0)
    net = Small(bn).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return net


def fake_quant_model(net, x, wbits, abits, quantizer):
    """quantize_model's fake-quant model, as export_onnx makes it."""
    return squant_rs.quantize_model(
        net,
        wbits,
        abits,
        quantizer=quantizer,
        recipe="paper",
        fold_bn=True,
        input_shape=tuple(x.shape),
    )


def fake_quant(net, x, wbits, abits, quantizer):
    qm = fake_quant_model(net, x, wbits, abits, quantizer)
    with torch.no_grad():
        return qm(x).numpy()


# --------------------------------------------------------------------------
# export_onnx against the fake-quant torch model


@pytest.mark.parametrize("quantizer", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("wbits,abits", [(4, None), (8, None), (8, 8), (4, 6)])
def test_export_matches_fake_quant_small(tmp_path, quantizer, wbits, abits):
    net = small()
    x = torch.rand(2, 3, 12, 12)
    path = tmp_path / "m.onnx"
    rep = squant_rs.export_onnx(net, path, x, wbits, abits, quantizer=quantizer, recipe="paper")
    want = fake_quant(net, x, wbits, abits, quantizer)
    got = run(path, x.numpy())
    # With abits the biases are int32, each rounded to a multiple of its step
    # a_scale * w_scale[c] (so ORT never re-quantizes), where the fake-quant
    # model keeps the float bias: a layer's output channel moves by up to
    # half a step, and the next layer's activation quantizer can put a value
    # one level apart. That is the whole difference, and the tolerance
    # (measured: 4e-5 of the output range at W8A8, 4e-4 at W4A6) ...
    tol = {None: 1e-5, 8: 1e-4, 6: 5e-3}[abits]
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())
    if abits is not None:
        # ... for the same graph with the fake-quant model's float biases put
        # back equals the fake-quant model to float rounding.
        got_f = run(_with_float_biases(path, net, x, wbits, abits, quantizer), x.numpy())
        np.testing.assert_allclose(got_f, want, rtol=0, atol=1e-6 * np.abs(want).max())
    assert [r.name for r in rep.layers] == ["c1", "dw", "g", "fc"]
    counts = ops(path)
    n_act = 0 if abits is None else 3  # the first layer's input stays float
    n_bias = n_act  # every quantized input has its bias as int32
    assert counts["DequantizeLinear"] == 4 + n_act + n_bias
    assert counts["QuantizeLinear"] == n_act
    assert counts["BatchNormalization"] == 0
    model = onnx.load(str(path))
    assert model.opset_import[0].version == 21
    kinds = {t.name: t.data_type for t in model.graph.initializer}
    want_type = TensorProto.INT4 if wbits <= 4 else TensorProto.INT8
    assert kinds["c1.weight_quantized"] in (want_type, TensorProto.INT8, TensorProto.INT16)
    if quantizer == "symmetric":
        assert {kinds[f"{n}.weight_quantized"] for n in ("c1", "dw", "g", "fc")} == {want_type}


def _with_float_biases(path, net, x, wbits, abits, quantizer):
    """``path``'s model with each int32 bias DequantizeLinear replaced by
    the float bias of the fake-quant model (:func:`fake_quant`'s)."""
    qm = fake_quant_model(net, x, wbits, abits, quantizer)
    modules = dict(qm.named_modules())
    model = onnx.load(str(path))
    g = model.graph
    dqs = [
        n
        for n in g.node
        if n.op_type == "DequantizeLinear" and n.input[0].endswith(".bias_quantized")
    ]
    assert dqs
    for n in dqs:
        bias = modules[n.input[0][: -len(".bias_quantized")]].bias.detach().numpy()
        g.initializer.append(numpy_helper.from_array(bias, n.output[0]))
        g.node.remove(n)
    used = {i for n in dqs for i in n.input}
    kept = [t for t in g.initializer if t.name not in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    out = path.with_name(path.stem + "-float-bias.onnx")
    onnx.save(model, str(out))
    return out


class ConvBnRelu6(torch.nn.Module):
    """Two Conv + BN + ReLU6 blocks and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = torch.nn.BatchNorm2d(16)
        self.c2 = torch.nn.Conv2d(16, 8, 3, padding=1)
        self.b2 = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.relu6(self.b1(self.c1(x)))
        x = torch.nn.functional.relu6(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def test_export_with_squant_plus_recipe_matches_fake_quant(tmp_path):
    torch.manual_seed(0)
    net = ConvBnRelu6().eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    x = torch.rand(2, 3, 12, 12)
    path = tmp_path / "m.onnx"
    rep = squant_rs.export_onnx(net, path, x, 8, 8, recipe="squant+")
    qm = squant_rs.quantize_model(net, 8, 8, recipe="squant+", input_shape=tuple(x.shape))
    with torch.no_grad():
        want = qm(x).numpy()
    got = run(path, x.numpy())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    assert rep.recipe == "squant+"
    assert [(r.name, r.folded) for r in rep.layers] == [("c1", True), ("c2", True), ("fc", False)]
    assert any(r.bias_corrected for r in rep.layers)
    # The activation ranges (from the BN statistics under squant+) reach the report.
    assert [r.act_range is not None for r in rep.layers] == [False, True, True]
    assert ops(path)["BatchNormalization"] == 0
    assert isinstance(qm.b1, torch.nn.Identity) and isinstance(net.b1, torch.nn.BatchNorm2d)


class TiedAutoencoder(torch.nn.Module):
    """The encoder Conv (followed by its BN) also decodes, transposed:
    ``F.conv_transpose2d(h, self.enc.weight)``."""

    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.mix = torch.nn.Conv2d(8, 8, 1)

    def forward(self, x):
        h = self.mix(torch.relu(self.bn(self.enc(x))))
        return torch.nn.functional.conv_transpose2d(h, self.enc.weight, padding=1)


def test_export_keeps_a_weight_the_forward_also_reads(tmp_path):
    """quantize_model folded the BN into enc.weight, which the decoder also
    reads: the graph decoded with the folded weight (W8 error 5.5). The
    layer is not folded by quantize_model now; torch's exporter folds the
    BN into the encoder's Conv only, the decoder reads the quantized weight."""
    torch.manual_seed(0)
    net = TiedAutoencoder().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.05, 0.2)
        net.bn.weight.uniform_(1, 3)
        net.bn.bias.uniform_(-0.5, 0.5)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        want = net(x).numpy()
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rep = squant_rs.export_onnx(net, path, x, 8)
    got = run(path, x.numpy())
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02  # was 5.5
    assert [(r.name, r.folded) for r in rep.layers] == [("enc", True), ("mix", False)]
    assert any("exporter folded a BatchNorm into 'enc'" in str(w.message) for w in seen)


def test_export_of_a_model_in_training_mode(tmp_path):
    """The graph runs in eval mode (its BNs folded by the exporter): a model
    in training mode exports what its eval mode computes, quantized, and
    keeps its modes."""
    torch.manual_seed(0)
    net = ConvBnRelu6()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    net.train()
    x = torch.rand(2, 3, 12, 12)
    path = tmp_path / "m.onnx"
    rep = squant_rs.export_onnx(net, path, x, 8, recipe="squant+")
    assert net.training and net.b1.training and isinstance(net.b1, torch.nn.BatchNorm2d)
    assert [(r.name, r.folded) for r in rep.layers] == [("c1", True), ("c2", True), ("fc", False)]
    qm = squant_rs.quantize_model(net.eval(), 8, recipe="squant+")
    net.train()
    with torch.no_grad():
        want = qm(x).numpy()
    got = run(path, x.numpy())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_integer_kernel_ranges_of_a_model_in_training_mode(tmp_path):
    """Integer kernels' output ranges come from the (eval-mode) BNs for a
    model in training mode too: the same file as from eval mode."""
    from onnx import numpy_helper

    x = torch.rand(1, 3, 32, 32)
    scales, outs = {}, {}
    for mode in ("train", "eval"):
        net = random_mobilenet_v2(0)
        net.train(mode == "train")
        p = tmp_path / f"{mode}.onnx"
        squant_rs.export_onnx(net, p, x, 4, 8, integer_kernels=True)
        assert net.training is (mode == "train")
        g = onnx.load(str(p)).graph
        scales[mode] = {
            t.name: numpy_helper.to_array(t).tolist()
            for t in g.initializer
            if t.name.endswith("_scale")
        }
        outs[mode] = run(p, x.numpy())
    assert scales["train"] == scales["eval"]
    np.testing.assert_array_equal(outs["train"], outs["eval"])


def _dq_values(model: onnx.ModelProto, tmp_path) -> dict[str, np.ndarray]:
    """Every weight DequantizeLinear of ``model`` evaluated by onnxruntime."""
    g = model.graph
    nodes = [
        n
        for n in g.node
        if n.op_type == "DequantizeLinear" and n.input[0].endswith(".weight_quantized")
    ]
    inits = [t for t in g.initializer if any(t.name in n.input for n in nodes)]
    outs = [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes]
    m = helper.make_model(
        helper.make_graph(nodes, "dq", [], outs, inits), opset_imports=model.opset_import
    )
    path = tmp_path / "dq.onnx"
    onnx.save(m, str(path))
    sess = ort.InferenceSession(str(path), providers=CPU)
    return dict(zip([n.input[0][: -len("_quantized")] for n in nodes], sess.run(None, {})))


@pytest.mark.parametrize(
    "wbits,quantizer", [(4, "asymmetric"), (8, "asymmetric"), (3, "symmetric")]
)
def test_weights_dequantize_within_one_ulp(tmp_path, wbits, quantizer):
    net = random_mobilenet_v2(1, num_classes=16)
    # Shift some depthwise channels away from 0: their zero points do not
    # fit the code type and need the next container.
    with torch.no_grad():
        net.features[2].conv[1][0].weight[:4] += 1.0
    x = torch.rand(1, 3, 32, 32)
    path = tmp_path / "m.onnx"
    rep = squant_rs.export_onnx(net, path, x, wbits, quantizer=quantizer, recipe="paper")
    vals = _dq_values(onnx.load(str(path)), tmp_path)
    assert len(vals) == len(rep.layers)
    for layer in rep.layers:
        want = layer.qtensor.dequantize().numpy()
        got = vals[f"{layer.name}.weight"]
        if got.shape != want.shape:
            got = got.T
        ulps = np.abs(got.view(np.int32).astype(np.int64) - want.view(np.int32))
        assert ulps.max() <= 1, (layer.name, ulps.max())
    kinds = {t.name: t.data_type for t in onnx.load(str(path)).graph.initializer}
    shifted = kinds["features.2.conv.1.0.weight_zero_point"]
    if quantizer == "asymmetric":
        assert shifted == (TensorProto.INT8 if wbits <= 4 else TensorProto.INT16)
    else:
        assert shifted == TensorProto.INT4


def _one_input_net(kind: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A first layer with one weight per output channel (every channel
    constant) and a second one with a channel whose range is tiny against
    its values (1 + 2^-20 steps)."""
    torch.manual_seed(0)
    if kind == "linear":
        net = torch.nn.Sequential(
            torch.nn.Linear(1, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
        ).eval()
        x = torch.rand(2, 1)
    else:
        net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 12, 1), torch.nn.ReLU(), torch.nn.Conv2d(12, 4, 1)
        ).eval()
        x = torch.rand(2, 1, 4, 4)
    with torch.no_grad():
        w = net[2].weight.view(4, -1)
        w[0] = 1.0
        w[0, ::3] += 2.0**-20
        w[0, 1::3] -= 2.0**-19
    return net, x


@pytest.mark.parametrize("path", ["torch", "onnx"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("wbits", range(2, 9))
def test_constant_channels_export_exactly(tmp_path, path, kind, wbits):
    """Asymmetric zero points of constant channels (~ w * (2^b - 1) * 1e8)
    and of channels with a tiny range fit no code type: such channels are
    written as exact integer multiples of a step with zero point 0; the
    weights ORT computes are qt.dequantize() within one ulp."""
    net, x = _one_input_net(kind)
    out = tmp_path / "q.onnx"
    if path == "torch":
        rep = squant_rs.export_onnx(net, out, x, wbits, recipe="paper")
    else:
        src = tmp_path / "m.onnx"
        float_export(net, x, src)
        rep = squant_rs.quantize_onnx(src, out, wbits)
    model = onnx.load(str(out))
    vals = _dq_values(model, tmp_path)
    assert len(vals) == len(rep.layers) == 2
    for layer, name in zip(rep.layers, ("0.weight", "2.weight")):
        want = np.asarray(layer.qtensor.dequantize(), dtype=np.float32)
        got = vals[name]
        if got.shape != want.shape:
            got = got.T
        ulps = np.abs(got.view(np.int32).astype(np.int64) - want.view(np.int32))
        assert ulps.max() <= 1, (name, ulps.max())
    kinds = {t.name: t.data_type for t in model.graph.initializer}
    # constant channels keep the codes' type; the tiny-range channel needs int32
    assert kinds["0.weight_quantized"] == (TensorProto.INT4 if wbits <= 4 else TensorProto.INT8)
    assert kinds["2.weight_quantized"] == TensorProto.INT32
    assert kinds["2.weight_zero_point"] == TensorProto.INT32
    np.testing.assert_allclose(run(out, x.numpy()), net(x).detach().numpy(), rtol=0.5, atol=0.5)


class _Depthwise1x1(torch.nn.Module):
    """A depthwise 1x1 Conv (one weight per channel: every channel constant)
    between two layers with quantized inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.scale = torch.nn.Conv2d(16, 16, 1, groups=16)
        self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c0(x))
        x = torch.relu(self.scale(x))
        x = torch.relu(self.c2(x))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("path", ["torch", "onnx"])
@pytest.mark.parametrize("wbits", [4, 8])
def test_constant_channels_keep_a_fine_bias_step(tmp_path, path, wbits):
    """Constant channels of the asymmetric quantizer written as +-1 times
    their value made their int32 bias step a_scale * |w| ~127x coarser
    than an ordinary channel's (1e-2 of the output range off the fake-quant
    model at W8A8): they are written as the largest codes their type holds
    (at least half its maximum) times an exact smaller scale, the weights
    still exactly qt.dequantize()."""
    torch.manual_seed(0)
    net, x = _Depthwise1x1().eval(), torch.rand(8, 3, 12, 12)
    out = tmp_path / "q.onnx"
    if path == "torch":
        rep = squant_rs.export_onnx(net, out, x, wbits, 8, recipe="paper")
    else:
        src = tmp_path / "m.onnx"
        float_export(net, x, src)
        rep = squant_rs.quantize_onnx(src, out, wbits, 8)
    model = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    hi = 7 if wbits <= 4 else 127
    codes = inits["scale.weight_quantized"].astype(np.int64).ravel()
    assert (inits["scale.weight_zero_point"] == 0).all()
    assert (np.abs(codes) >= (hi + 1) // 2).all() and codes.max() <= hi, codes
    layer = next(r for r in rep.layers if "scale" in r.name)  # scale, /scale/Conv
    want = np.asarray(layer.qtensor.dequantize(), dtype=np.float32)
    np.testing.assert_array_equal(_dq_values(model, tmp_path)["scale.weight"], want)
    # each channel's bias step a_scale * w_scale[c] no coarser than a
    # (2 ** wbits - 1)-level channel of twice its magnitude
    producers = {o: n for n in model.graph.node for o in n.output}
    (conv,) = [n for n in model.graph.node if n.input[1:2] == ["scale.weight_dequantized"]]
    a_scale = inits[producers[conv.input[0]].input[1]]
    step = inits["scale.bias_scale"]
    assert (step <= 2 * a_scale * np.abs(want.ravel()) / ((hi + 1) // 2)).all()
    if path == "torch" and wbits == 8:
        # README: 2e-5 to 4e-5 of the output range at W8A8
        want_y = fake_quant(net, x, 8, 8, "asymmetric")
        got = run(out, x.numpy())
        np.testing.assert_allclose(got, want_y, rtol=0, atol=1e-4 * np.abs(want_y).max())


class _NearDeadChannel(torch.nn.Module):
    """A depthwise Conv (``k`` x ``k``) whose channel 2 has a tiny weight
    and a normal bias (a BatchNorm-folded near-dead channel), then a Linear
    whose row 1 does too, between layers with quantized inputs."""

    def __init__(self, k: int, tiny: float, bias: float = 1.0) -> None:
        super().__init__()
        self.c0 = torch.nn.Conv2d(3, 4, 3)
        self.dw = torch.nn.Conv2d(4, 4, k, groups=4)
        self.c2 = torch.nn.Conv2d(4, 4, 3)
        self.fc = torch.nn.Linear(4, 3)
        with torch.no_grad():
            if k == 1:
                self.dw.weight.copy_(torch.tensor([0.5, -0.8, tiny, 0.3]).view(4, 1, 1, 1))
            else:
                self.dw.weight[2] *= tiny
            self.dw.bias.copy_(torch.tensor([0.1, -0.2, bias, 0.05]))
            self.fc.weight[1] *= tiny
            self.fc.bias.copy_(torch.tensor([0.1, 1.0, -0.1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.dw(torch.relu(self.c0(x))))
        return self.fc(torch.relu(self.c2(x)).mean((2, 3)))


@pytest.mark.parametrize("path", ["torch", "onnx", "onnx-integer"])
@pytest.mark.parametrize("k,tiny", [(1, 1e-7), (1, 3e-6), (3, 1e-7)])
def test_tiny_weight_channels_keep_their_bias(tmp_path, path, k, tiny):
    """A channel whose int32 bias code bias / (a_scale * w_scale[c]) is beyond
    int32 left the whole layer's bias float, which onnxruntime's optimizer
    quantized to int32 itself, saturating (the output off by about its whole
    range): constant channels (k = 1) scale their codes up only as far as
    the bias code fits, and a layer whose bias still does not fit gets it
    as a float Add after the layer (with a note), which ORT leaves alone."""
    torch.manual_seed(0)
    net, x = _NearDeadChannel(k, tiny).eval(), torch.rand(8, 3, 12, 12)
    out = tmp_path / "q.onnx"
    if path == "torch":
        rep = squant_rs.export_onnx(net, out, x, 8, 8, recipe="paper")
        want = fake_quant(net, x, 8, 8, "asymmetric")
    else:
        src = tmp_path / "m.onnx"
        float_export(net, x, src)
        ik = path == "onnx-integer"
        rep = squant_rs.quantize_onnx(src, out, 8, 8, integer_kernels=ik)
        level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        want = run(out, x.numpy(), graph_optimization_level=level)
    got = run(out, x.numpy())
    # README: 2e-5 to 4e-5 of the output range at W8A8
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    model = onnx.load(str(out))
    kinds = {t.name: t.data_type for t in model.graph.initializer}
    float_bias = [n for n in rep.notes if "float Add" in n]
    if k == 1:  # the constant channels' bias stays int32
        assert kinds["dw.bias_quantized"] == TensorProto.INT32
        assert not any(n.startswith(("dw", "/dw")) for n in float_bias)
    else:
        assert "dw.bias_quantized" not in kinds and "dw.bias" not in kinds
        assert any(n.startswith(("dw", "/dw")) for n in float_bias), rep.notes


@pytest.mark.parametrize("path", ["torch", "onnx-integer"])
@pytest.mark.parametrize("tiny,bias", [(0.0, 1.0), (1e-7, -1.0), (1e-7, 1.0)])
def test_near_dead_channels_keep_integer_kernels(tmp_path, path, tiny, bias):
    """Near-dead channels whose int32 bias code is beyond int32 keep the
    layer's int32 bias (and so its integer kernel, which the float-Add
    fallback loses: 28 of EfficientNet-Lite0's 50 layers, then 2, 0.76x
    fp32's latency at batch 1 instead of 0.5x): a channel whose codes are
    all zero takes a step its bias code fits at (its weights are 0 at any
    step), a negative bias read only by a ReLU / Clip at 0 is clamped (the
    output is below 0, so 0, either way), and otherwise the channel's tiny
    weights are re-rounded to a step its bias code fits at (a note)."""
    torch.manual_seed(0)
    net, x = _NearDeadChannel(3, tiny, bias).eval(), torch.rand(8, 3, 12, 12)
    out = tmp_path / "q.onnx"
    if path == "torch":
        rep = squant_rs.export_onnx(
            net, out, x, 8, 8, recipe="paper", quantizer="symmetric", integer_kernels=True
        )
        want = fake_quant(net, x, 8, 8, "symmetric")
        atol = 1e-2  # integer kernels round activations once more (README)
    else:
        src = tmp_path / "m.onnx"
        float_export(net, x, src)
        rep = squant_rs.quantize_onnx(src, out, 8, 8, integer_kernels=True, quantizer="symmetric")
        level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        want = run(out, x.numpy(), graph_optimization_level=level)
        atol = 1e-4
    got = run(out, x.numpy())
    np.testing.assert_allclose(got, want, rtol=0, atol=atol * np.abs(want).max())
    kinds = {t.name: t.data_type for t in onnx.load(str(out)).graph.initializer}
    assert kinds["dw.bias_quantized"] == TensorProto.INT32
    assert not any(n.startswith(("dw", "/dw")) for n in rep.notes if "float Add" in n)


@pytest.mark.parametrize("ik", [False, True])
@pytest.mark.parametrize("case", ["gemm-beta", "conv-also-read"])
def test_negative_bias_clamp_only_where_outputs_clamp(tmp_path, case, ik):
    """A negative bias past int32 is clamped only on a Conv whose output
    every reader (before the rewrite) maps to 0 below 0: a Gemm whose
    negative stored bias is positive through beta = -1 came out 0.015
    instead of 1.0, and a Conv output read by a ReLU and by another Conv
    (whose Q/DQ input the check did not see yet) was 62 % of its range off."""
    rng = np.random.default_rng(0)
    vi = helper.make_tensor_value_info
    if case == "gemm-beta":
        w = rng.standard_normal((2, 16)).astype(np.float32)
        w[0] *= 1e-7
        nodes = [
            helper.make_node("Gemm", ["x", "W", "b"], ["h"], transB=1, beta=-1.0),
            helper.make_node("Relu", ["h"], ["y"]),
        ]
        inits = [
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(np.array([-1.0, 0.1], np.float32), "b"),
        ]
        ins, shape = [vi("x", TensorProto.FLOAT, [1, 16])], (1, 16)
        out_vi = [vi("y", TensorProto.FLOAT, [1, 2])]
    else:
        wb = rng.standard_normal((4, 4, 1, 1)).astype(np.float32)
        wa = rng.standard_normal((4, 4, 1, 1)).astype(np.float32)
        wa[0] = np.abs(wa[0]) * 1e-7
        nodes = [
            helper.make_node("Conv", ["x", "Wb"], ["c"], name="C"),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Conv", ["r", "Wa", "ba"], ["h"], name="A"),
            helper.make_node("Relu", ["h"], ["y1"]),
            helper.make_node("Conv", ["h", "Wb"], ["y2"], name="B"),
        ]
        ba = np.array([-1.0, 0.1, 0.2, -0.1], np.float32)
        inits = [numpy_helper.from_array(t, n) for t, n in ((wb, "Wb"), (wa, "Wa"), (ba, "ba"))]
        ins, shape = [vi("x", TensorProto.FLOAT, [1, 4, 8, 8])], (1, 4, 8, 8)
        out_vi = [vi(n, TensorProto.FLOAT, [1, 4, 8, 8]) for n in ("y1", "y2")]
    g = helper.make_graph(nodes, "g", ins, out_vi, inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    x = rng.uniform(0, 1, shape).astype(np.float32)
    out = tmp_path / "q.onnx"
    squant_rs.quantize_onnx(model, out, 8, 8, integer_kernels=ik, quantize_input=(0.0, 1.0))

    def every_output(path):
        sess = ort.InferenceSession(str(path), providers=CPU)
        return sess.run(None, {"x": x})

    for want, got in zip(every_output(tmp_path / "m.onnx"), every_output(out)):
        np.testing.assert_allclose(got, want, rtol=0, atol=0.1 * np.abs(want).max())


def _depthwise_graph(bias: np.ndarray) -> onnx.ModelProto:
    """Conv -> Relu -> 3x3 depthwise Conv with ``bias`` -> Relu -> Conv."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3
    w = rng.uniform(-0.1, 1.0, (4, 1, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["a"]),
        helper.make_node("Relu", ["a"], ["ar"]),
        helper.make_node("Conv", ["ar", "w", "b"], ["h"], group=4),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
        [numpy_helper.from_array(t, n) for t, n in ((w0, "w0"), (w, "w"), (bias, "b"), (w2, "w2"))],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("ik", [False, True])
def test_bias_codes_leave_room_for_the_integer_sum(tmp_path, ik):
    """A bias code that fits int32 but not with the products ORT's integer
    kernel adds to it (int32, wrapping) put the channel's output at the
    other end of its range: such a channel's weights are re-rounded to a
    coarser step (its bias then dominates them by far), with a note, and
    the bias stays int32."""
    b = np.array([0.1, -0.2, 1.0, 0.05], np.float32)
    opts = {"integer_kernels": ik, "quantizer": "symmetric"}
    squant_rs.quantize_onnx(_depthwise_graph(b), tmp_path / "a.onnx", 8, 8, **opts)
    inits = {
        t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "a.onnx").graph.initializer
    }
    assert inits["w_quantized"].dtype == np.int8  # (an integer kernel)
    # channel 2's bias code 2^31 - 1000 (+-128: float32 rounding of the bias)
    b[2] = np.float32((2**31 - 1000) * np.float64(inits["b_scale"][2]))
    out = tmp_path / "q.onnx"
    rep = squant_rs.quantize_onnx(_depthwise_graph(b), out, 8, 8, **opts)
    x = np.random.default_rng(1).random((1, 3, 10, 10)).astype(np.float32)
    level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = run(out, x, graph_optimization_level=level)
    np.testing.assert_allclose(run(out, x), want, rtol=0, atol=1e-4 * np.abs(want).max())
    assert [n for n in rep.notes if "re-rounded" in n and n.startswith("Conv_2")], rep.notes
    kinds = {t.name: t.data_type for t in onnx.load(str(out)).graph.initializer}
    assert kinds["b_quantized"] == TensorProto.INT32


def test_code_container():
    assert code_container(4, np.array([-8.0, 7.0])) == "INT4"
    assert code_container(2, np.array([9.0])) == "INT8"
    assert code_container(8, np.array([-128.0, 127.0])) == "INT8"
    assert code_container(8, np.array([-300.0])) == "INT16"
    assert code_container(8, np.array([70000.0])) == "INT32"


# --------------------------------------------------------------------------
# MobileNetV2 (random weights): outputs, file sizes, integer kernels


@pytest.fixture(scope="module")
def mnv2(tmp_path_factory):
    d = tmp_path_factory.mktemp("mnv2")
    net = random_mobilenet_v2(0)
    x = torch.rand(1, 3, 64, 64)
    float_export(net, x, d / "fp32.onnx")
    return net, x, d


def test_mobilenet_weight_only_and_sizes(mnv2):
    net, x, d = mnv2
    fp32 = os.path.getsize(d / "fp32.onnx")
    for wbits, limit in ((4, 0.16), (8, 0.3)):
        path = d / f"w{wbits}.onnx"
        rep = squant_rs.export_onnx(net, path, x, wbits, recipe="paper")
        assert len(rep.layers) == 53
        want = fake_quant(net, x, wbits, None, "asymmetric")
        got = run(path, x.numpy())
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
        assert os.path.getsize(path) <= limit * fp32, (wbits, os.path.getsize(path) / fp32)


def test_mobilenet_w8a8_matches_and_fuses(mnv2, tmp_path):
    net, x, d = mnv2
    path = d / "w8a8.onnx"
    rep = squant_rs.export_onnx(net, path, x, 8, 8, quantizer="symmetric", recipe="paper")
    want = fake_quant(net, x, 8, 8, "symmetric")
    got = run(path, x.numpy())
    # onnxruntime and torch sum the convolutions in different orders: a few
    # activations per layer (0.04% at the second) land one 8-bit level apart,
    # and 53 random layers carry that on (1.5% of the output range here; the
    # int32 biases add little: 1.4% with the float biases put back).
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-2 * np.abs(want).max())
    # The integer-kernel form: every tensor between quantized ops gets one
    # Q/DQ pair (layer outputs, residual Add inputs and outputs, the pooling
    # path), so onnxruntime runs every layer with a quantized input as
    # QLinearConv / QGemm and the ten residual Adds as QLinearAdd; only the
    # first layer (float input, the algorithm's rule) stays a float Conv.
    ik = d / "w8a8-int.onnx"
    squant_rs.export_onnx(
        net, ik, x, 8, 8, quantizer="symmetric", integer_kernels=True, recipe="paper"
    )
    counts = optimized_ops(ik, tmp_path)
    fused = counts["QLinearConv"] + counts["QGemm"] + counts["QLinearMatMul"]
    assert fused == len(rep.layers) - 1, counts
    assert counts["QLinearAdd"] == 10 and counts["Add"] == 0, counts
    assert counts["Conv"] + counts["FusedConv"] == 1, counts
    got_ik = run(ik, x.numpy())
    # The fused integer kernels compute what the QDQ graph says ...
    ref_ik = run(ik, x.numpy(), graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    np.testing.assert_allclose(got_ik, ref_ik, rtol=0, atol=1e-4 * np.abs(ref_ik).max())
    # ... which rounds every layer output and Add output once more than the
    # fake-quant torch model (measured: 2.2% of the output range here).
    assert np.abs(got_ik - want).max() < 0.05 * np.abs(want).max()
    # quantize_input=True: the first layer's input too (sigma rule on the
    # calibration batch): all 53 layers fuse.
    iq = d / "w8a8-int-in.onnx"
    rq = squant_rs.export_onnx(
        net,
        iq,
        x,
        8,
        8,
        quantizer="symmetric",
        integer_kernels=True,
        recipe="paper",
        quantize_input=True,
    )
    assert rq.layers[0].act_bits == 8 and rq.layers[0].act_range is not None
    counts = optimized_ops(iq, tmp_path)
    assert counts["QLinearConv"] + counts["QGemm"] == len(rep.layers), counts
    assert counts["Conv"] + counts["FusedConv"] + counts["Add"] == 0, counts


def test_mobilenet_integer_kernels_squant_plus(mnv2, tmp_path):
    """Under squant+ the ranges of the layer outputs that are no layer's
    input (the blocks' last convolutions, read by the residual Adds) come
    from the folded BatchNorms, not from the noise batch."""
    net, x, d = mnv2
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    kw = {"quantizer": "symmetric", "integer_kernels": True}
    squant_rs.export_onnx(net, a, x, 8, 8, recipe="squant+", **kw)
    squant_rs.export_onnx(net, b, x, 8, 8, recipe="paper", **kw)
    counts = optimized_ops(a, tmp_path)
    assert counts["QLinearConv"] + counts["QGemm"] == 52 and counts["QLinearAdd"] == 10, counts
    name = "/features/features.2/conv/conv.2/Conv_output_0_a8_scale"
    scale = {
        p: numpy_helper.to_array(
            next(t for t in onnx.load(str(p)).graph.initializer if t.name == name)
        )
        for p in (a, b)
    }
    bn = net.features[2].conv[3]  # the project conv's BatchNorm
    beta = bn.bias.detach().double().numpy()
    gamma = np.abs(bn.weight.detach().double().numpy())
    lo, hi = min(0.0, (beta - 4 * gamma).min()), max(0.0, (beta + 4 * gamma).max())
    assert scale[a] == pytest.approx((hi - lo) / 255, rel=1e-5)
    assert scale[a] != scale[b]
    got = run(a, x.numpy())
    ref = run(a, x.numpy(), graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    # Every tensor up to the pool is bit-identical; QLinearGlobalAveragePool
    # rounds its int32 sum where the QDQ graph rounds the float mean, and here
    # 0.06% of the pooled values land one level apart (0.4% of the output).
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-2 * np.abs(ref).max())


def test_quantize_onnx_integer_kernels_and_input(mnv2, tmp_path):
    """ONNX in (sigma rule through onnxruntime): the same full fusion; a
    given first-input range quantizes the first layer's input with it."""
    net, x, d = mnv2
    kw = {"quantizer": "symmetric", "integer_kernels": True}
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    ra = squant_rs.quantize_onnx(d / "fp32.onnx", a, 8, 8, input_shape=(4, 3, 64, 64), **kw)
    rb = squant_rs.quantize_onnx(
        d / "fp32.onnx", b, 8, 8, input_shape=(4, 3, 64, 64), quantize_input=(0.0, 1.0), **kw
    )
    assert ra.layers[0].act_bits is None
    assert rb.layers[0].act_bits == 8 and rb.layers[0].act_range == (0.0, 1.0)
    ca, cb = optimized_ops(a, tmp_path), optimized_ops(b, tmp_path)
    assert ca["QLinearConv"] + ca["QGemm"] == 52 and ca["QLinearAdd"] == 10, ca
    assert cb["QLinearConv"] + cb["QGemm"] == 53 and cb["Conv"] == 0, cb
    # The first input's Q/DQ is the one extra pair: scale 1/255, zero point 0.
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(b)).graph.initializer}
    assert inits["input_a8_scale"] == np.float32(1 / 255) and inits["input_a8_zero_point"] == 0
    ya, yb = run(a, x.numpy()), run(b, x.numpy())
    assert np.abs(ya - yb).max() < 0.05 * np.abs(ya).max()


def test_quantize_input_without_integer_kernels(tmp_path):
    """quantize_input alone: one more Q/DQ pair, on the first layer's input;
    the result is the fake-quant model run on the quantized input."""
    net = small()
    x = torch.rand(2, 3, 12, 12)
    path = tmp_path / "m.onnx"
    rep = squant_rs.export_onnx(
        net, path, x, 8, 8, quantizer="symmetric", recipe="paper", quantize_input=(0.0, 1.0)
    )
    assert ops(path)["QuantizeLinear"] == 4 and rep.layers[0].range_source == "given"
    xq = (torch.round(x * 255) / 255).float()
    want = fake_quant(net, xq, 8, 8, "symmetric")
    np.testing.assert_allclose(run(path, x.numpy()), want, rtol=0, atol=1e-4 * np.abs(want).max())
    for bad, err in (
        ((1.0, 2.0), squant_rs.InvalidArgumentError),
        ((0.0, float("nan")), squant_rs.InvalidArgumentError),
        ("yes", TypeError),
    ):
        with pytest.raises(err):
            squant_rs.export_onnx(net, tmp_path / "b.onnx", x, 8, 8, quantize_input=bad)
    with pytest.raises(squant_rs.InvalidArgumentError, match="needs abits"):
        squant_rs.export_onnx(net, tmp_path / "b.onnx", x, 8, quantize_input=True)
    assert not (tmp_path / "b.onnx").exists()


class _FirstInput(torch.nn.Module):
    """A first Conv behind ``reflect`` padding (a Pad node in front), a
    zero / constant ``F.pad``, or input normalization inside ``forward``."""

    def __init__(self, case: str) -> None:
        super().__init__()
        mode = "reflect" if case == "reflect" else "zeros"
        self.c = torch.nn.Conv2d(3, 8, 3, padding=1 if case == "reflect" else 0, padding_mode=mode)
        self.fc = torch.nn.Linear(8, 2)
        self.case = case
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.case == "normalized":
            x = (x - self.mean) / self.std
        elif self.case.startswith("pad"):
            x = torch.nn.functional.pad(x, (1, 1, 1, 1), value=float(self.case[3:]))
        return self.fc(torch.relu(self.c(x)).mean((2, 3)))


def _first_input_export(tmp_path, api, case, **kw):
    torch.manual_seed(0)
    net, x = _FirstInput(case).eval(), torch.rand(2, 3, 8, 8)
    out = tmp_path / f"{api}-{case}.onnx"
    kw = {"quantizer": "symmetric", **kw}
    if api == "torch":
        rep = squant_rs.export_onnx(net, out, x, 8, 8, recipe="paper", **kw)
    else:
        src = tmp_path / f"{case}-fp32.onnx"
        float_export(net, x, src)
        rep = squant_rs.quantize_onnx(src, out, 8, 8, **kw)
    return rep, out


@pytest.mark.parametrize("api", ["torch", "onnx"])
@pytest.mark.parametrize("case", ["reflect", "pad0.5"])
@pytest.mark.parametrize("given", [True, (-2.5, 2.5)])
def test_quantize_input_through_ops_that_keep_its_values(tmp_path, api, case, given):
    """The first layer reads the model's input through a Pad (reflect mode,
    or a constant inside the range): quantize_input quantizes the layer's
    input (it was silently ignored), and with integer kernels the first
    Conv runs as QLinearConv too."""
    rep, out = _first_input_export(tmp_path, api, case, quantize_input=given)
    assert rep.layers[0].act_bits == 8
    if given is not True:
        assert rep.layers[0].act_range == given
    model = onnx.load(str(out))
    producers = {o: n for n in model.graph.node for o in n.output}
    (conv,) = [n for n in model.graph.node if n.op_type == "Conv"]
    dq = producers[conv.input[0]]
    assert dq.op_type == "DequantizeLinear"
    assert producers[producers[dq.input[0]].input[0]].op_type == "Pad"
    rep, out = _first_input_export(tmp_path, api, case, quantize_input=given, integer_kernels=True)
    counts = optimized_ops(out, tmp_path)
    assert counts["QLinearConv"] == 1 and counts["Conv"] == 0, counts


@pytest.mark.parametrize("api", ["torch", "onnx"])
@pytest.mark.parametrize("given", [True, (-2.5, 2.5)])
def test_quantize_input_refused_where_the_first_layer_reads_something_else(
    tmp_path, capsys, api, given
):
    """A first layer reading ``(x - mean) / std`` computed in the graph (or
    a skipped layer's output): its input is not the model's, so
    quantize_input (and a Pad constant outside the range) is refused,
    naming the layer and what it reads; it was silently ignored."""
    from squant_rs.cli import main

    first = "'c' (node '/c/Conv')" if api == "torch" else "'/c/Conv'"
    msg = (
        f"quantize_input: the first layer {first} reads '/Div_output_0' (the output of a "
        "Div node), not the model's input ('input') or a Pad / Reshape / Transpose / ... of it"
    )
    with pytest.raises(squant_rs.InvalidArgumentError, match=re.escape(msg)):
        _first_input_export(tmp_path, api, "normalized", quantize_input=given)
    assert not (tmp_path / f"{api}-normalized.onnx").exists()
    # a skipped first layer: the first quantized one reads its output
    skip = "c" if api == "torch" else "/c/*"
    first_q = "'fc' (node '/fc/Gemm')" if api == "torch" else "'/fc/Gemm'"
    with pytest.raises(
        squant_rs.InvalidArgumentError,
        match=re.escape(f"the first layer {first_q} reads '/ReduceMean_output_0' (the output"),
    ):
        _first_input_export(tmp_path, api, "reflect", quantize_input=given, skip=skip)
    if given is True:
        return
    msg = f"quantize_input: the first layer {first} reads '/Pad_output_0' (a Pad of 'input', "
    msg += "the model's input): its padding 5 is outside the range [-2.5, 2.5]"
    with pytest.raises(squant_rs.InvalidArgumentError, match=re.escape(msg)):
        _first_input_export(tmp_path, api, "pad5", quantize_input=given)
    if api == "onnx":  # the CLI: one error line
        src, out = tmp_path / "normalized-fp32.onnx", tmp_path / "o.onnx"
        args = ["quantize", str(src), str(out), "--wbits", "8", "--abits", "8"]
        assert main([*args, "--quantize-input"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error: --quantize-input: the first layer" in err, err
        assert not out.exists()


class Padded(torch.nn.Module):
    """EfficientNet-style explicit "same" padding (F.pad) before convs."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.dw = torch.nn.Conv2d(8, 8, 3, groups=8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.relu6(self.c1(torch.nn.functional.pad(x, (0, 1, 0, 1))))
        x = torch.nn.functional.relu6(self.dw(torch.nn.functional.pad(x, (1, 1, 1, 1))))
        return self.fc(x.mean((2, 3)))


def test_integer_kernels_fold_zero_pads(tmp_path):
    """A zero Pad before a Conv is folded into the Conv's pads (exactly), so
    that it is no float op between two integer kernels."""
    torch.manual_seed(0)
    net = Padded().eval()
    x = torch.rand(2, 3, 15, 15)
    fp32 = tmp_path / "fp32.onnx"
    float_export(net, x, fp32)
    assert ops(fp32)["Pad"] == 2
    for name, write in (
        ("a", lambda p, **kw: squant_rs.export_onnx(net, p, x, 8, 8, recipe="paper", **kw)),
        (
            "b",
            lambda p, **kw: squant_rs.quantize_onnx(
                fp32, p, 8, 8, input_shape=(2, 3, 15, 15), **kw
            ),
        ),
    ):
        path = tmp_path / f"{name}.onnx"
        write(path, quantizer="symmetric", integer_kernels=True, quantize_input=(0.0, 1.0))
        assert ops(path)["Pad"] == 0
        counts = optimized_ops(path, tmp_path)
        assert counts["QLinearConv"] + counts["QGemm"] == 3 and counts["Pad"] == 0, counts
        ref = run(
            path, x.numpy(), graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        np.testing.assert_allclose(run(path, x.numpy()), ref, rtol=0, atol=1e-4 * np.abs(ref).max())
        with torch.no_grad():
            want = net(x).numpy()
        assert np.abs(ref - want).max() < 0.1 * np.abs(want).max()
    # without integer kernels the graph keeps its Pads
    squant_rs.quantize_onnx(fp32, tmp_path / "c.onnx", 8, 8, input_shape=(2, 3, 15, 15))
    assert ops(tmp_path / "c.onnx")["Pad"] == 2


@pytest.mark.parametrize("body_reads_pad", [False, True])
def test_integer_kernels_keep_a_pad_a_subgraph_reads(tmp_path, body_reads_pad):
    """A zero Pad read by a Conv is not folded into it when an If body
    reads the Pad's output too (it used to be: the body then read a tensor
    no node made, and the calibration run failed with a misleading "pass
    input_shape=" error)."""
    rng = np.random.default_rng(0)
    vi = helper.make_tensor_value_info
    read = "p" if body_reads_pad else "r1"

    def body(name: str, op: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node(op, [read], [name], keepdims=0)],
            name,
            [],
            [vi(name, TensorProto.FLOAT, [])],
        )

    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Pad", ["r1", "pads"], ["p"]),
        helper.make_node("Conv", ["p", "W2"], ["y"], name="c2"),
        helper.make_node(
            "If",
            ["cond"],
            ["s"],
            then_branch=body("t", "ReduceMean"),
            else_branch=body("e", "ReduceMax"),
        ),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [vi("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [vi("y", TensorProto.FLOAT, [1, 4, 6, 6]), vi("s", TensorProto.FLOAT, [])],
        [
            numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "W1"),
            numpy_helper.from_array(rng.normal(size=(4, 4, 3, 3)).astype(np.float32), "W2"),
            numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
            numpy_helper.from_array(np.array(True), "cond"),
        ],
    )
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    rep = squant_rs.quantize_onnx(
        src, out, 8, 8, quantizer="symmetric", integer_kernels=True, quantize_input=(0.0, 1.0)
    )
    assert [r.name for r in rep.layers] == ["c1", "c2"]
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert ops(out)["Pad"] == (1 if body_reads_pad else 0)
    x = rng.random((1, 3, 6, 6), dtype=np.float32)
    sess = ort.InferenceSession(str(out), providers=CPU)
    want = ort.InferenceSession(str(src), providers=CPU).run(None, {"x": x})
    got = sess.run(None, {"x": x})
    for a, b in zip(got, want):
        assert np.abs(a - b).max() < 0.05 * np.abs(b).max()


def test_onnx_in_equals_torch_export(mnv2, tmp_path):
    """quantize_onnx on the float export (BN folded by the exporter) and
    export_onnx (BN folded by squant-rs) agree on the same weights."""
    net, x, d = mnv2
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    ra = squant_rs.quantize_onnx(d / "fp32.onnx", a, 4)
    rb = squant_rs.export_onnx(net, b, x, 4, recipe="paper")
    assert len(ra.layers) == len(rb.layers) == 53
    ya, yb = run(a, x.numpy()), run(b, x.numpy())
    np.testing.assert_allclose(ya, yb, rtol=0, atol=2e-2 * np.abs(yb).max())
    # Without BN the weights are bit-identical, so are the codes and outputs.
    net2 = small(bn=False)
    x2 = torch.rand(2, 3, 12, 12)
    float_export(net2, x2, tmp_path / "s.onnx")
    squant_rs.quantize_onnx(tmp_path / "s.onnx", a, 4, quantizer="symmetric")
    squant_rs.export_onnx(net2, b, x2, 4, quantizer="symmetric", recipe="paper")
    ia = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(a)).graph.initializer}
    ib = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(b)).graph.initializer}
    for name in ("c1", "dw", "g", "fc"):
        assert np.array_equal(ia[f"{name}.weight_quantized"], ib[f"{name}.weight_quantized"])
    np.testing.assert_array_equal(run(a, x2.numpy()), run(b, x2.numpy()))


# --------------------------------------------------------------------------
# quantize_onnx on hand-built graphs


def _gemm_model(opset: int = 21, shared_input: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w0 = rng.normal(0, 0.3, (8, 6)).astype(np.float32)  # Gemm transB=0: (K, N)
    w1 = rng.normal(0, 0.3, (6, 5)).astype(np.float32)  # MatMul: (K, N)
    w2 = rng.normal(0, 0.3, (4, 5)).astype(np.float32)  # Gemm transB=1: (N, K)
    ws = rng.normal(0, 0.3, (4, 4)).astype(np.float32)  # shared by two Gemms
    b2 = rng.normal(0, 0.1, (4,)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w0"], ["h0"], name="g0", transB=0),
        helper.make_node("Relu", ["h0"], ["r0"]),
        helper.make_node("MatMul", ["r0", "w1"], ["h1"], name="mm"),
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["h2"], name="g2", transB=1),
        helper.make_node("Gemm", ["h2", "ws"], ["h3"], name="s1", transB=1),
        helper.make_node("Gemm", ["h3", "ws"], ["y"], name="s2", transB=1),
    ]
    inits = [
        numpy_helper.from_array(a, n)
        for a, n in ((w0, "w0"), (w1, "w1"), (w2, "w2"), (ws, "ws"), (b2, "b2"))
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])]
    if shared_input:
        inputs.append(helper.make_tensor_value_info("ws", TensorProto.FLOAT, [4, 4]))
    g = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _numpy_forward(x, w0, w1, w2, b2, ws):
    h = np.maximum(x @ w0, 0) @ w1
    h = h @ w2.T + b2
    return (h @ ws.T) @ ws.T


@pytest.mark.parametrize("quantizer", ["asymmetric", "symmetric"])
def test_gemm_transb_matmul_and_shared_weight(tmp_path, quantizer):
    model = _gemm_model(shared_input=True)
    before = model.SerializeToString()
    out = tmp_path / "q.onnx"
    rep = squant_rs.quantize_onnx(model, out, 4, quantizer=quantizer)
    assert model.SerializeToString() == before  # the input is not modified
    q = {r.name: r.qtensor for r in rep.layers}
    assert list(q) == ["g0", "mm", "g2", "s1", "s2"] and q["s1"] is q["s2"]
    # Output channels: columns of the (K, N) weights, rows of the transB one.
    assert q["g0"].shape == (6, 8) and q["mm"].shape == (5, 6) and q["g2"].shape == (4, 5)
    deq = {k: v.dequantize() for k, v in q.items()}
    x = np.random.default_rng(1).random((3, 8), dtype=np.float32)
    b2 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b2"))
    want = _numpy_forward(x, deq["g0"].T, deq["mm"].T, deq["g2"], b2, deq["s1"])
    np.testing.assert_allclose(run(out, x), want, rtol=1e-5, atol=1e-5)
    m = onnx.load(str(out))
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 4  # one for the shared weight
    axes = {n.input[0]: n.attribute[0].i for n in dq}
    assert axes == {"w0_quantized": 1, "w1_quantized": 1, "w2_quantized": 0, "ws_quantized": 0}
    assert [i.name for i in m.graph.input] == ["x"]  # the shared weight left graph.input
    assert not {t.name for t in m.graph.initializer} & {"w0", "w1", "w2", "ws"}


def test_opset_conversion_and_activations(tmp_path):
    out = tmp_path / "q.onnx"
    rep = squant_rs.quantize_onnx(_gemm_model(opset=13), out, 8, 8, quantizer="symmetric")
    m = onnx.load(str(out))
    assert m.opset_import[0].version == 21
    assert [r.act_bits for r in rep.layers] == [None, 8, 8, 8, 8]
    counts = ops(out)
    assert counts["QuantizeLinear"] == 4
    # g2's bias became int32 with scale a_scale * w_scale.
    bias = next(t for t in m.graph.initializer if t.name == "b2_quantized")
    assert bias.data_type == TensorProto.INT32
    x = np.random.default_rng(1).random((3, 8), dtype=np.float32)
    y = run(out, x)
    ref = run(
        tmp_path / "q.onnx", x, graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    # integer kernels fuse every Gemm with a quantized input
    ik = tmp_path / "ik.onnx"
    squant_rs.quantize_onnx(_gemm_model(), ik, 8, 8, quantizer="symmetric", integer_kernels=True)
    c = optimized_ops(ik, tmp_path)
    assert c["QGemm"] + c["QLinearMatMul"] + c["MatMulIntegerToFloat"] >= 4, c


@pytest.mark.parametrize("opset", [22, 25, 28])
def test_opset_above_21_is_converted_down(tmp_path, opset):
    """A model above opset 21 is converted to opset 21, as documented: it
    kept its opset, and at 28 onnxruntime 1.32 could not load the output
    (no DequantizeLinear(28) kernel) although quantize_onnx reported
    success."""
    model = _gemm_model(opset)
    model.ir_version = 10
    want, out = tmp_path / "want.onnx", tmp_path / "q.onnx"
    squant_rs.quantize_onnx(_gemm_model(), want, 8, 8, quantizer="symmetric")
    squant_rs.quantize_onnx(model, out, 8, 8, quantizer="symmetric")
    assert [(i.domain, i.version) for i in onnx.load(str(out)).opset_import] == [("", 21)]
    x = np.random.default_rng(1).random((3, 8), dtype=np.float32)
    np.testing.assert_array_equal(run(out, x), run(want, x))


@pytest.mark.parametrize(
    ("opset", "ir", "float4"), [(22, 11, False), (21, 14, False), (13, 7, False), (23, 11, True)]
)
def test_output_has_the_ir_version_of_opset_21(tmp_path, opset, ir, float4):
    """The output (opset 21) has IR version 10, the one onnx pairs with
    opset 21 and which a runtime with opset 21 reads (onnxruntime 1.20:
    'Unsupported model IR version: 11, max supported IR version: 10'): an
    input above opset 21 kept its IR version 11 or 12. A model that stores
    a newer data type (FLOAT4E2M1, IR 11) keeps its IR version."""
    model = _gemm_model(opset)
    model.ir_version = ir
    if float4:  # an initializer no node reads
        model.graph.initializer.append(
            helper.make_tensor("f4", TensorProto.FLOAT4E2M1, [2], [0.5, 1.0])
        )
    out = tmp_path / "q.onnx"
    squant_rs.quantize_onnx(model, out, 8)
    q = onnx.load(str(out))
    assert q.opset_import[0].version == 21
    assert q.ir_version == (ir if float4 else 10)
    onnx.checker.check_model(q, full_check=True)


def test_op_without_an_opset_21_form_is_refused(tmp_path, capsys):
    """An op (or type) opset 21 does not have cannot be converted down: one
    line naming the opsets and the op, nothing written."""
    from squant_rs.cli import main

    g = helper.make_graph(
        [
            helper.make_node("RMSNormalization", ["x", "s"], ["n"]),
            helper.make_node("MatMul", ["n", "w"], ["y"], name="mm"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [
            numpy_helper.from_array(np.ones(4, np.float32), "s"),
            numpy_helper.from_array(np.eye(4, dtype=np.float32), "w"),
        ],
    )
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)]), str(src))
    with pytest.raises(squant_rs.OnnxFormatError) as err:
        squant_rs.quantize_onnx(src, out, 8)
    assert str(err.value) == (
        f"{src}: cannot convert opset 23 to 21 (No Previous Version of RMSNormalization exists)"
    )
    assert main(["quantize", str(src), str(out)]) == 2
    assert capsys.readouterr().err == f"squant-rs: error: {err.value}\n"
    assert not out.exists()


def _function_model(opset: int, recursive: bool = False) -> onnx.ModelProto:
    """MatMul, then the model-local function ``local:Scale`` (a Constant
    times its input, then Relu) twice; ``recursive``: a function that calls
    itself (onnx's checker refuses it)."""
    rng = np.random.default_rng(0)
    vi = helper.make_tensor_value_info
    scale = numpy_helper.from_array(rng.normal(size=16).astype(np.float32), "s")
    body = [
        helper.make_node("Constant", [], ["c"], value=scale),
        helper.make_node("Mul", ["a", "c"], ["p"]),
        helper.make_node("Relu", ["p"], ["b"]),
    ]
    if recursive:
        body = [helper.make_node("Scale", ["a"], ["b"], domain="local")]
    imports = [helper.make_opsetid("", opset), helper.make_opsetid("local", 1)]
    fn = helper.make_function("local", "Scale", ["a"], ["b"], body, imports)
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
            helper.make_node("Scale", ["m"], ["h"], domain="local"),
            helper.make_node("Scale", ["h"], ["y"], domain="local"),
        ],
        "g",
        [vi("x", TensorProto.FLOAT, ["N", 16])],
        [vi("y", TensorProto.FLOAT, ["N", 16])],
        [numpy_helper.from_array(rng.normal(size=(16, 16)).astype(np.float32), "w")],
    )
    model = helper.make_model(g, opset_imports=imports, functions=[fn])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("size", ["small", "over 2 GB"])
@pytest.mark.parametrize("opset", [18, 22])
def test_model_local_functions_survive_opset_conversion(tmp_path, monkeypatch, opset, size):
    """onnx's version converter drops model.functions: a model converted up
    or down to opset 21 called functions it no longer had (onnxruntime:
    'local:Scale(-1) is not a registered function/op'). They are inlined
    first (in the over-2 GB path too, where the Constant of a function
    called twice is detached once and put back in both copies), and the
    output computes what the same model at opset 21 does."""
    from squant_rs.formats.onnx import load

    want = tmp_path / "want.onnx"
    squant_rs.quantize_onnx(_function_model(21), want, 8)
    if size == "over 2 GB":
        monkeypatch.setattr(load, "EXTERNAL_ABOVE", 512)
    out = tmp_path / "q.onnx"
    squant_rs.quantize_onnx(_function_model(opset), out, 8)
    q = onnx.load(str(out))
    assert q.opset_import[0].version == 21 and not q.functions
    onnx.checker.check_model(q)
    x = np.random.default_rng(1).random((3, 16), dtype=np.float32)
    np.testing.assert_array_equal(run(out, x), run(want, x))


def test_functions_that_cannot_be_inlined_are_refused(tmp_path, monkeypatch):
    """A model whose functions onnx's inliner refuses (here a recursive
    one, past the checker, which a model over 2 GB skips) is refused in one
    line instead of being converted without them."""
    from squant_rs.formats.onnx import load

    out = tmp_path / "q.onnx"
    monkeypatch.setattr(load, "EXTERNAL_ABOVE", 512)
    with pytest.raises(squant_rs.OnnxFormatError) as err:
        squant_rs.quantize_onnx(_function_model(22, recursive=True), out, 8)
    msg = str(err.value)
    assert msg.startswith(
        "model: cannot convert opset 22 to 21: its model-local functions ('Scale'), which "
        "onnx's version converter drops, cannot be inlined ("
    ), msg
    assert "\n" not in msg and not out.exists()


def _reshape_model() -> onnx.ModelProto:
    """MatMul by a 64x32 weight (2 KiB at 8 bits, 1 KiB at 4), then a
    Reshape whose shape is an int64 initializer, as other tools (torch's
    dynamo exporter among them) store it."""
    w = np.random.default_rng(0).normal(0, 0.3, (64, 32)).astype(np.float32)
    shape = np.array([0, 4, 8], np.int64)
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Reshape", ["h", "shape"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(shape, "shape")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def _assert_moved_from_1kib(path) -> None:
    """Every initializer of the model at ``path`` (every graph's) is in its
    .data file if it has 1 KiB or more, else in the model itself."""
    from squant_rs.formats.onnx.graph import _graphs

    m = onnx.load(str(path), load_external_data=False)
    inits = [t for g in _graphs(m.graph) for t in g.initializer]
    moved = {t.name for t in inits if t.data_location == TensorProto.EXTERNAL}
    length = {t.name: int(e.value) for t in inits for e in t.external_data if e.key == "length"}
    big = {t.name for t in inits if max(len(t.raw_data), length.get(t.name, 0)) >= 1024}
    assert big and moved == big, (moved, big)


@pytest.mark.parametrize("wbits", [8, 4])
def test_external_data_keeps_small_initializers_in_the_model(tmp_path, monkeypatch, wbits):
    """external_data=True moved every initializer to the .data file, the
    int64 shape a Reshape reads too, which onnxruntime refuses ("Cannot
    parse data from external tensors"): as in onnx.save_model
    (size_threshold=1024) only those of 1 KiB or more move, and the model
    runs from another directory."""
    out, one = tmp_path / "q.onnx", tmp_path / "one.onnx"
    squant_rs.quantize_onnx(_reshape_model(), out, wbits, external_data=True)
    squant_rs.quantize_onnx(_reshape_model(), one, wbits)
    assert sorted(os.listdir(tmp_path)) == ["one.onnx", "q.onnx", "q.onnx.data"]
    _assert_moved_from_1kib(out)
    monkeypatch.chdir(tmp_path.parent)
    x = np.random.default_rng(1).random((2, 64), dtype=np.float32)
    np.testing.assert_array_equal(run(out, x), run(one, x))


def test_external_data_of_a_small_model_is_one_file(tmp_path):
    """external_data=True with no tensor of 1 KiB or more writes the model
    alone, as onnx.save_model does."""
    out = tmp_path / "q.onnx"
    squant_rs.quantize_onnx(_gemm_model(), out, 8, external_data=True)
    assert os.listdir(tmp_path) == ["q.onnx"]
    onnx.checker.check_model(onnx.load(str(out)))


def test_external_data_in_and_out(tmp_path):
    src = tmp_path / "ext.onnx"
    onnx.save(
        _reshape_model(), str(src), save_as_external_data=True, location="ext.bin", size_threshold=0
    )
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    squant_rs.quantize_onnx(src, out, 4, external_data=True)
    assert sorted(os.listdir(out.parent)) == ["q.onnx", "q.onnx.data"]
    _assert_moved_from_1kib(out)
    x = np.random.default_rng(1).random((2, 64), dtype=np.float32)
    one = tmp_path / "one.onnx"
    squant_rs.quantize_onnx(src, one, 4)
    np.testing.assert_array_equal(run(out, x), run(one, x))


class _Viewed(torch.nn.Module):
    """Conv, flatten by view, Linear: torch's exporter makes small Constant
    nodes of the view's shape and an Unsqueeze's axes."""

    def __init__(self) -> None:
        super().__init__()
        self.c = torch.nn.Conv2d(3, 8, 3)
        self.fc = torch.nn.Linear(8 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c(x))
        return self.fc(x.view(x.size(0), -1))


@pytest.mark.parametrize("api", ["export_onnx", "quantize_onnx"])
def test_external_data_keeps_small_constants_in_the_model(tmp_path, monkeypatch, api):
    """external_data=True moved every Constant value of at least one byte
    to the .data file (the shape a Reshape reads, an If's condition), which
    onnxruntime refuses ("Cannot parse data from external tensors"): those
    below 1 KiB stay in the model (as the initializers below 1 KiB do), and
    the model runs from another directory."""
    torch.manual_seed(0)
    net = _Viewed().eval()
    x = torch.rand(2, 3, 8, 8)
    out = tmp_path / "q.onnx"
    if api == "export_onnx":
        squant_rs.export_onnx(net, out, x, wbits=8, external_data=True, batch_dim=0)
    else:
        float_export(net, x, tmp_path / "f.onnx")
        squant_rs.quantize_onnx(tmp_path / "f.onnx", out, 8, external_data=True)
    m = onnx.load(str(out), load_external_data=False)
    constants = [n for n in m.graph.node if n.op_type == "Constant"]
    assert constants, "the export has no Constant node"
    assert all(a.t.data_location == TensorProto.DEFAULT for n in constants for a in n.attribute)
    _assert_moved_from_1kib(out)
    monkeypatch.chdir(tmp_path.parent)
    want = net(x).detach().numpy()
    np.testing.assert_allclose(run(out, x.numpy()), want, atol=0.05)


def test_external_data_keeps_an_if_condition_in_the_model(tmp_path, monkeypatch):
    """An If whose condition is a one-byte Constant: that value stays in
    the model (onnxruntime refused the model from another directory); the
    1 KiB weight goes to the .data file."""
    rng = np.random.default_rng(0)
    vi = helper.make_tensor_value_info
    tc = numpy_helper.from_array(rng.normal(size=16).astype(np.float32), "tc")
    then_g = helper.make_graph(
        [helper.make_node("Add", ["m", "tc"], ["to"])], "then", [], [vi("to", 1, [2, 16])], [tc]
    )
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["m"], ["eo"])], "else", [], [vi("eo", 1, [2, 16])]
    )
    cond = numpy_helper.from_array(np.array(True), "cv")
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Constant", [], ["cond"], value=cond),
            helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
        ],
        "g",
        [vi("x", TensorProto.FLOAT, [2, 64])],
        [vi("y", TensorProto.FLOAT, [2, 16])],
        [numpy_helper.from_array(rng.normal(size=(64, 16)).astype(np.float32), "w")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    out, one = tmp_path / "q.onnx", tmp_path / "one.onnx"
    squant_rs.quantize_onnx(model, out, 8, external_data=True)
    squant_rs.quantize_onnx(model, one, 8)
    assert sorted(os.listdir(tmp_path)) == ["one.onnx", "q.onnx", "q.onnx.data"]
    monkeypatch.chdir(tmp_path.parent)
    x = rng.random((2, 64), dtype=np.float32)
    np.testing.assert_array_equal(run(out, x), run(one, x))


def test_model_over_2gb_converts_without_its_data(tmp_path, monkeypatch):
    """onnx's version converter serializes the model, which protobuf refuses
    at 2 GB: a model whose tensors exceed the 2 GB threshold (here lowered
    to 4 KiB, with a converter that refuses what protobuf would) is
    converted without its tensor data, which goes back afterwards."""
    from squant_rs.formats.onnx import load

    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(64, 32)).astype(np.float32)
    w2 = rng.normal(size=(4, 64)).astype(np.float32)
    g = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1"], ["h"], name="g1", transB=1),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "w2"], ["y"], name="g2", transB=1),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    src = tmp_path / "m.onnx"
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(src), save_as_external_data=True, location="m.data", size_threshold=0)
    want = tmp_path / "want.onnx"
    squant_rs.quantize_onnx(src, want, 4)

    real = onnx.version_converter.convert_version
    limit = 4096
    seen = []

    def convert(m, version):
        seen.append(m.ByteSize())
        if m.ByteSize() >= limit:
            raise RuntimeError("Failed to serialize proto")
        return real(m, version)

    monkeypatch.setattr(load, "EXTERNAL_ABOVE", limit)
    monkeypatch.setattr(onnx.version_converter, "convert_version", convert)
    out = tmp_path / "q.onnx"
    squant_rs.quantize_onnx(src, out, 4)
    assert seen and max(seen) < limit
    assert onnx.load(str(out)).opset_import[0].version == 21
    x = rng.random((3, 32), dtype=np.float32)
    np.testing.assert_array_equal(run(out, x), run(want, x))
    # An in-memory model that large converts the same way.
    full = onnx.load(str(src))
    squant_rs.quantize_onnx(full, out, 4)
    np.testing.assert_array_equal(run(out, x), run(want, x))


def _big_tensor_model(where: str, opset: int) -> onnx.ModelProto:
    """A Gemm layer ``g1`` and a 16 KiB float tensor ``big`` (the model's
    other output, through an Add) that is no initializer of the main graph:
    a Constant node's value, or in an If's then-body a Constant's value or
    an initializer (``where``)."""
    rng = np.random.default_rng(0)
    vi = helper.make_tensor_value_info
    value = numpy_helper.from_array(rng.normal(size=(64, 64)).astype(np.float32), "big")
    w = numpy_helper.from_array(rng.normal(size=(4, 8)).astype(np.float32), "w1")
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["y"], name="g1", transB=1)]
    inputs = [vi("x", TensorProto.FLOAT, ["N", 8])]
    if where == "constant":
        nodes.append(helper.make_node("Constant", [], ["big"], value=value))
    else:
        body = (
            [helper.make_node("Constant", [], ["big"], value=value)]
            if where == "constant in an If body"
            else []
        )
        then_g = helper.make_graph(
            [*body, helper.make_node("Identity", ["big"], ["t"])],
            "then",
            [],
            [vi("t", TensorProto.FLOAT, [64, 64])],
            [] if body else [value],
        )
        else_g = helper.make_graph(
            [helper.make_node("Identity", ["ones"], ["e"])],
            "else",
            [],
            [vi("e", TensorProto.FLOAT, [64, 64])],
        )
        nodes.append(
            helper.make_node("If", ["cond"], ["big"], then_branch=then_g, else_branch=else_g)
        )
        inputs.append(vi("cond", TensorProto.BOOL, []))
    nodes.append(helper.make_node("Add", ["big", "big"], ["z"]))
    g = helper.make_graph(
        nodes,
        "g",
        inputs,
        [vi("y", TensorProto.FLOAT, ["N", 4]), vi("z", TensorProto.FLOAT, [64, 64])],
        [w, numpy_helper.from_array(np.ones((64, 64), np.float32), "ones")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [21, 17])
@pytest.mark.parametrize(
    "where", ["constant", "constant in an If body", "initializer in an If body"]
)
def test_tensors_beside_the_main_initializers_count_toward_2gb(tmp_path, monkeypatch, where, opset):
    """Whether a model is over 2 GB counts every tensor, not only the main
    graph's initializers: a model whose large tensor was a Constant node's
    value (or in an If body) was checked and converted in memory, which
    protobuf refuses at 2 GB ("invalid ONNX model (Failed to serialize
    proto)"), and written as one file. Here the threshold is 8 KiB, with a
    checker and a converter that refuse what protobuf would: the big
    tensor goes to the .data file and the model computes the same."""
    from squant_rs.formats.onnx import load

    model = _big_tensor_model(where, opset)
    feeds = {"x": np.random.default_rng(1).random((3, 8), dtype=np.float32)}
    if where != "constant":
        feeds["cond"] = np.array(True)
    want = tmp_path / "want.onnx"
    squant_rs.quantize_onnx(model, want, 8)
    assert os.listdir(tmp_path) == ["want.onnx"]

    limit = 8192
    real_check, real_convert = onnx.checker.check_model, onnx.version_converter.convert_version

    def refuse_big(real):
        def call(m, *args, **kwargs):
            if isinstance(m, onnx.ModelProto) and m.ByteSize() >= limit:
                raise RuntimeError("Failed to serialize proto")
            return real(m, *args, **kwargs)

        return call

    monkeypatch.setattr(load, "EXTERNAL_ABOVE", limit)
    monkeypatch.setattr(onnx.checker, "check_model", refuse_big(real_check))
    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse_big(real_convert))
    out = tmp_path / "q.onnx"
    squant_rs.quantize_onnx(model, out, 8)
    assert sorted(os.listdir(tmp_path)) == ["q.onnx", "q.onnx.data", "want.onnx"]
    assert os.path.getsize(out) < 4096
    q = onnx.load(str(out))
    assert q.opset_import[0].version == 21
    sess = ort.InferenceSession(str(out), providers=CPU)
    got = sess.run(None, feeds)
    expect = ort.InferenceSession(str(want), providers=CPU).run(None, feeds)
    for a, b in zip(got, expect):
        np.testing.assert_array_equal(a, b)


def test_calibration_model_over_2gb_keeps_no_large_tensor(tmp_path, monkeypatch):
    """The calibration model (abits) of a model over 2 GB is saved with the
    external data write_model uses: its Constant values of 1 KiB or more
    too (they stayed in the .onnx file, which protobuf refuses at 2 GB).
    Here the threshold is 8 KiB and the Constant 16 KiB."""
    from squant_rs.formats.onnx import load

    model = _big_tensor_model("constant", 21)
    feeds = {"x": np.random.default_rng(1).random((3, 8), dtype=np.float32)}
    want = tmp_path / "want.onnx"
    squant_rs.quantize_onnx(model, want, 8, abits=8)
    real = ort.InferenceSession
    probes = []

    def session(path, *args, **kwargs):
        if isinstance(path, str) and path.endswith("probe.onnx"):
            probes.append(os.path.getsize(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(load, "EXTERNAL_ABOVE", 8192)
    monkeypatch.setattr(ort, "InferenceSession", session)
    out = tmp_path / "q.onnx"
    squant_rs.quantize_onnx(model, out, 8, abits=8)
    assert probes and max(probes) < 4096, probes
    monkeypatch.setattr(ort, "InferenceSession", real)
    got = ort.InferenceSession(str(out), providers=CPU).run(None, feeds)
    expect = ort.InferenceSession(str(want), providers=CPU).run(None, feeds)
    for a, b in zip(got, expect):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", ["renamed model", "output is the data file"])
def test_external_output_never_replaces_the_inputs_data(tmp_path, capsys, case):
    """The output (or its .data file) must not be one of the input's external
    data files: a model saved as m.onnx + m.onnx.data and renamed keeps
    reading m.onnx.data."""
    from squant_rs.cli import main

    location = "m.onnx.data" if case == "renamed model" else "weights.onnx"
    onnx.save(
        _gemm_model(),
        str(tmp_path / "m.onnx"),
        save_as_external_data=True,
        location=location,
        size_threshold=0,
    )
    data = tmp_path / location
    if case == "renamed model":
        os.rename(tmp_path / "m.onnx", tmp_path / "m_fp32.onnx")
        src, out = tmp_path / "m_fp32.onnx", tmp_path / "m.onnx"
        kwargs: dict = {"external_data": True}
        cli_args = None  # the CLI writes external data only above 2 GB
    else:
        src, out = tmp_path / "m.onnx", data
        kwargs = {}
        cli_args = []
    before = data.read_bytes()
    x = np.random.default_rng(1).random((2, 8), dtype=np.float32)
    want = run(src, x)
    with pytest.raises(squant_rs.InvalidArgumentError) as err:
        squant_rs.quantize_onnx(src, out, 8, **kwargs)
    msg = str(err.value)
    assert f"external data file {data}" in msg and str(src) in msg, msg
    if cli_args is not None:
        assert main(["quantize", str(src), str(out), *cli_args]) == 2
        assert f"external data file {data}" in capsys.readouterr().err
    assert data.read_bytes() == before
    np.testing.assert_array_equal(run(src, x), want)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_external_output_follows_the_output_rules(tmp_path):
    """With external data the model and its .data file are written like
    every other output: a symlink is followed (the link stays), an existing
    file keeps its permission bits, a new one gets 0o666 minus the umask."""
    import stat

    x = np.random.default_rng(1).random((2, 64), dtype=np.float32)
    one = tmp_path / "one.onnx"
    squant_rs.quantize_onnx(_reshape_model(), one, 4)
    (tmp_path / "real").mkdir()
    target, link = tmp_path / "real" / "q.onnx", tmp_path / "link.onnx"
    target.write_bytes(b"old")
    link.symlink_to("real/q.onnx")
    squant_rs.quantize_onnx(_reshape_model(), link, 4, external_data=True)
    assert link.is_symlink() and target.read_bytes() != b"old"
    np.testing.assert_array_equal(run(link, x), run(one, x))
    old = os.umask(0o022)
    try:
        out = tmp_path / "perm.onnx"
        out.write_bytes(b"x")
        out.chmod(0o640)
        squant_rs.quantize_onnx(_reshape_model(), out, 4, external_data=True)
        assert stat.S_IMODE(out.stat().st_mode) == 0o640
        assert stat.S_IMODE((tmp_path / "perm.onnx.data").stat().st_mode) == 0o644
        np.testing.assert_array_equal(run(out, x), run(one, x))
    finally:
        os.umask(old)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def _externalize(tensor: TensorProto, folder, location: str, write: bool = True) -> None:
    """Move ``tensor``'s data into the file ``folder/location`` (``write``:
    else the data is dropped and the file not made)."""
    if write:
        (folder / location).write_bytes(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location


def _sparse_weight(rng: np.random.Generator) -> onnx.SparseTensorProto:
    """An 8x8 sparse initializer ``Ws`` (indices ``Wi``): the entries of a
    normal draw from ``rng`` that are at least 0.5."""
    ws = rng.normal(size=(8, 8)).astype(np.float32)
    ws[ws < 0.5] = 0
    idx = np.flatnonzero(ws).astype(np.int64)
    return helper.make_sparse_tensor(
        numpy_helper.from_array(ws.ravel()[idx], "Ws"), numpy_helper.from_array(idx, "Wi"), [8, 8]
    )


def _model_with_tensors_beside_initializers() -> onnx.ModelProto:
    """A MatMul layer after an Add of a Constant node's tensor, a MatMul
    reading a sparse initializer and an If whose then-body adds another
    Constant's tensor (opset 21)."""
    rng = np.random.default_rng(3)
    vi = helper.make_tensor_value_info
    sparse = _sparse_weight(rng)
    then_g = helper.make_graph(
        [
            helper.make_node(
                "Constant",
                [],
                ["bc"],
                value=numpy_helper.from_array(rng.normal(size=(2, 8)).astype(np.float32), "bval"),
            ),
            helper.make_node("Add", ["h2", "bc"], ["t"]),
        ],
        "then",
        [],
        [vi("t", TensorProto.FLOAT, [2, 8])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["h2"], ["e"])], "else", [], [vi("e", 1, [2, 8])]
    )
    nodes = [
        helper.make_node(
            "Constant",
            [],
            ["c"],
            value=numpy_helper.from_array(rng.normal(size=(2, 8)).astype(np.float32), "cval"),
        ),
        helper.make_node("Add", ["x", "c"], ["xa"]),
        helper.make_node("MatMul", ["xa", "W"], ["h"], name="mm"),
        helper.make_node("MatMul", ["h", "Ws"], ["h2"], name="mm_sparse"),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [vi("x", TensorProto.FLOAT, [2, 8]), vi("cond", TensorProto.BOOL, [])],
        [vi("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "W")],
        sparse_initializer=[sparse],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def _run_if_model(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=CPU)
    return sess.run(None, {"x": x, "cond": np.array(True)})[0]


@pytest.mark.parametrize(
    "case", ["constant", "constant in an If body", "sparse initializer", "output's .data"]
)
def test_output_never_replaces_a_data_file_of_any_tensor(tmp_path, capsys, case):
    """The external data files of every tensor of the input are protected,
    not only those of its initializers: a Constant node's tensor (main graph
    or If body, as onnx.save_model(..., convert_attribute=True) stores
    them) and a sparse initializer's values; also as the <out>.data file of
    external_data=True. They used to be overwritten. Such a model is read
    whole (the sparse initializer's data too)."""
    from squant_rs.cli import main

    model = _model_with_tensors_beside_initializers()
    whole = tmp_path / "whole.onnx"
    onnx.save(model, str(whole))
    graph = model.graph
    then_g = next(a.g for a in graph.node[4].attribute if a.name == "then_branch")
    tensors = {
        "constant": graph.node[0].attribute[0].t,
        "constant in an If body": then_g.node[0].attribute[0].t,
        "sparse initializer": graph.sparse_initializer[0].values,
    }
    # .onnx names: the CLI takes no other output
    if case == "output's .data":
        data = tmp_path / "q.onnx.data"
        _externalize(tensors["constant"], tmp_path, data.name)
    else:
        data = tmp_path / f"{case.split()[0]}.onnx"
        _externalize(tensors[case], tmp_path, data.name)
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    before = data.read_bytes()
    x = np.random.default_rng(1).random((2, 8), dtype=np.float32)
    if case == "output's .data":
        out, kwargs = tmp_path / "q.onnx", {"external_data": True}
    else:
        out, kwargs = data, {}
    with pytest.raises(squant_rs.InvalidArgumentError) as err:
        squant_rs.quantize_onnx(src, out, 8, **kwargs)
    msg = str(err.value)
    assert f"external data file {data}" in msg and str(src) in msg, msg
    if not kwargs:
        assert main(["quantize", str(src), str(out)]) == 2
        assert f"external data file {data}" in capsys.readouterr().err
    assert data.read_bytes() == before
    assert not (tmp_path / "q.onnx").exists()
    # Elsewhere it quantizes, reading every tensor's data.
    q, want = tmp_path / "q2.onnx", tmp_path / "want.onnx"
    rep = squant_rs.quantize_onnx(src, q, 8)
    squant_rs.quantize_onnx(whole, want, 8)
    assert [r.name for r in rep.layers] == ["mm"]
    np.testing.assert_array_equal(_run_if_model(q, x), _run_if_model(want, x))


@pytest.mark.parametrize("what", ["initializers", "constant"])
def test_in_memory_model_without_its_external_data_is_refused(tmp_path, monkeypatch, what):
    """An onnx.ModelProto loaded with load_external_data=False (its tensors
    still name data files, relative to a model file squant-rs does not
    know) is refused before any work; it used to read the files relative
    to the current directory, write a model pointing at files not next to
    it, and could overwrite the data file it reads."""
    if what == "initializers":
        onnx.save(
            _gemm_model(),
            str(tmp_path / "m.onnx"),
            save_as_external_data=True,
            location="w.bin",
            size_threshold=0,
        )
    else:
        model = _model_with_tensors_beside_initializers()
        _externalize(model.graph.node[0].attribute[0].t, tmp_path, "w.bin")
        (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    data = tmp_path / "w.bin"
    before = data.read_bytes()
    proto = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    monkeypatch.chdir(tmp_path)  # where the old code found w.bin
    for out in (tmp_path / "out.onnx", "w.bin"):
        with pytest.raises(squant_rs.InvalidArgumentError) as err:
            squant_rs.quantize_onnx(proto, out, 8)
        msg = str(err.value)
        assert "references external data that is not loaded" in msg, msg
        assert "'w.bin'" in msg and "load_external_data=True" in msg, msg
    assert data.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "w.bin"]
    # Loaded with its data, or as a path, it quantizes.
    whole = onnx.load(str(tmp_path / "m.onnx"))
    squant_rs.quantize_onnx(whole, tmp_path / "a.onnx", 8)
    squant_rs.quantize_onnx(tmp_path / "m.onnx", tmp_path / "b.onnx", 8)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


@pytest.mark.parametrize("location", ["m.data/x", "a" * 300, "loop"])
def test_unreadable_external_data_path_is_a_format_error(tmp_path, location) -> None:
    """An external data location that cannot be looked up (under a regular
    file, a name too long, a symlink loop) is the model's format error
    naming it, as before the FIFO check (which raised the bare OSError)."""
    (tmp_path / "m.data").write_bytes(b"")
    os.symlink("loop", tmp_path / "loop")
    model = _gemm_model()
    _externalize(model.graph.initializer[0], tmp_path, location, write=False)
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(squant_rs.OnnxFormatError, match="m.onnx: .*external data"):
        squant_rs.quantize_onnx(tmp_path / "m.onnx", tmp_path / "o.onnx", 8)
    assert not (tmp_path / "o.onnx").exists()


class _Tied(torch.nn.Module):
    """Two bias-free Linears sharing one weight Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 8, bias=False)
        self.b = torch.nn.Linear(8, 8, bias=False)
        self.b.weight = self.a.weight
        self.c = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


class _Twice(torch.nn.Module):
    """A bias-free Linear called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 16, bias=False)
        self.c = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.a(torch.relu(self.a(x)))))


class _EqualBlocks(torch.nn.Module):
    """Two layers with equal weights and biases (a deepcopy'd block), as
    attributes ``a`` and ``b``, (``listed``) the ``nn.ModuleList``
    ``blocks`` iterated in ``forward``, as in ``nn.TransformerEncoder``, or
    (``keyed``) the items ``a`` and ``b`` of the ``nn.ModuleDict``
    ``blocks`` (node scopes have no level for the container itself)."""

    def __init__(self, conv: bool, listed: bool = False, keyed: bool = False) -> None:
        super().__init__()
        import copy

        blk = torch.nn.Conv2d(8, 8, 3, padding=1) if conv else torch.nn.Linear(8, 8)
        self.stem = torch.nn.Conv2d(3, 8, 1) if conv else torch.nn.Linear(3, 8)
        if listed:
            self.blocks = torch.nn.ModuleList([blk, copy.deepcopy(blk)])
        elif keyed:
            self.blocks = torch.nn.ModuleDict({"a": blk, "b": copy.deepcopy(blk)})
        else:
            self.a, self.b = blk, copy.deepcopy(blk)
        self.head = torch.nn.Linear(8, 2)
        self.conv = conv
        self.listed = listed
        self.keyed = keyed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        if self.listed:
            blocks = list(self.blocks)
        elif self.keyed:
            blocks = [self.blocks["a"], self.blocks["b"]]
        else:
            blocks = [self.a, self.b]
        for blk in blocks:
            h = torch.relu(blk(h))
        return self.head(h.mean((2, 3)) if self.conv else h)


def _float_weights(model) -> list[str]:
    return [
        t.name
        for t in model.graph.initializer
        if t.data_type == TensorProto.FLOAT and len(t.dims) >= 2
    ]


@pytest.mark.parametrize(
    "case",
    [
        "tied",
        "twice",
        "equal conv",
        "equal linear",
        "equal conv listed",
        "equal linear listed",
        "equal conv keyed",
        "equal linear keyed",
    ],
)
@pytest.mark.parametrize("wbits,abits", [(4, None), (8, 8)])
def test_weights_read_through_identity_are_quantized(tmp_path, case, wbits, abits):
    """torch's exporter merges shared and equal-valued weights into one
    initializer and feeds the other layers through Identity nodes: every
    such layer reads the quantized weight (one DequantizeLinear), gets its
    own activation Q/DQ and int32 bias, and no float weight stays. Each
    node is matched to its own layer by its scope, also where the layers
    are items of an ``nn.ModuleList`` or ``nn.ModuleDict`` (no warning, each
    its own range)."""
    torch.manual_seed(0)
    if case == "tied":
        net, x = _Tied().eval(), torch.rand(64, 8)
    elif case == "twice":
        net, x = _Twice().eval(), torch.rand(64, 16)
    else:
        conv = case.startswith("equal conv")
        net = _EqualBlocks(conv, case.endswith("listed"), case.endswith("keyed")).eval()
        x = torch.rand(16, 3, 6, 6) if conv else torch.rand(16, 3)
    path = tmp_path / "m.onnx"
    kw = {"quantizer": "symmetric", "recipe": "paper"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = squant_rs.export_onnx(net, path, x, wbits, abits, **kw)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert _float_weights(model) == []
    producers = {o: n for n in model.graph.node for o in n.output}
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    # quantize_model keeps the first layer's input float, for every call of it
    first = [n for n in layers if n.input[1] == layers[0].input[1]] if case == "twice" else []
    for n in layers:
        assert producers[n.input[1]].op_type == "DequantizeLinear", n.name
        if abits is not None and n is not layers[0] and n not in first:
            assert producers[n.input[0]].op_type == "DequantizeLinear", n.name
            if len(n.input) > 2:
                assert producers[n.input[2]].op_type == "DequantizeLinear", n.name
    shared = {n.input[1] for n in layers}
    assert len(shared) == len(layers) - 1  # the two users of one weight share its DQ
    if case.startswith("equal"):  # equal weights: equal codes
        names = {"listed": ("blocks.0", "blocks.1"), "keyed": ("blocks.a", "blocks.b")}.get(
            case.rpartition(" ")[2], ("a", "b")
        )
        qa, qb = (next(r.qtensor for r in rep.layers if r.name == k) for k in names)
        assert np.array_equal(qa.codes, qb.codes) and np.array_equal(qa.scale, qb.scale)
    want = fake_quant(net, x, wbits, abits, "symmetric")
    got = run(path, x.numpy())
    tol = 1e-5 if abits is None else 1e-3
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())
    # quantize_onnx on torch's float export: the same, and smaller than fp32
    if case == "twice":
        fp32, q = tmp_path / "fp32.onnx", tmp_path / "q.onnx"
        float_export(net, x, fp32)
        assert ops(fp32)["Identity"] == 1
        rep = squant_rs.quantize_onnx(fp32, q, wbits, abits, quantizer="symmetric")
        assert len(rep.layers) == 3
        model = onnx.load(str(q))
        onnx.checker.check_model(model, full_check=True)
        assert _float_weights(model) == [] and ops(q)["Identity"] == 0
        if abits is None:  # (Q/DQ pairs outweigh a 16x16 weight)
            assert q.stat().st_size < fp32.stat().st_size


class _DirectRead(torch.nn.Module):
    """``fc``'s weight also read directly, outside ``fc``'s forward, on
    another input (``F.linear(h * 10 - 3, fc.weight)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Linear(8, 8)
        self.fc = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(torch.relu(self.stem(x))))
        return self.out(torch.nn.functional.linear(h * 10.0 - 3.0, self.fc.weight))


@pytest.mark.parametrize("quantizer", ["asymmetric", "symmetric"])
def test_weight_read_outside_its_layer_keeps_a_float_input(tmp_path, quantizer):
    """A node reading a quantized layer's weight outside the layer's
    forward (its scope names no report layer) reads the same quantized
    weight, but its other input stays float, as in the fake-quant model
    (whose activation quantizer is a pre-hook on the layer): it got the
    layer's activation Q/DQ, which clipped its input (1.33x the output
    range off)."""
    torch.manual_seed(0)
    net, x = _DirectRead().eval(), torch.rand(16, 8)
    path = tmp_path / "m.onnx"
    rep = squant_rs.export_onnx(net, path, x, 8, 8, quantizer=quantizer, recipe="paper")
    model = onnx.load(str(path))
    producers = {o: n for n in model.graph.node for o in n.output}
    (direct,) = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert producers[direct.input[0]].op_type == "Sub"
    dq = producers[direct.input[1]]
    assert dq.op_type == "DequantizeLinear"
    fc = next(r for r in rep.layers if r.name == "fc")
    assert fc.act_bits == 8  # fc's own call keeps its range
    codes = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == dq.input[0]))
    np.testing.assert_array_equal(codes.T, np.asarray(fc.qtensor.codes))
    assert [n for n in rep.notes if n.startswith("fc: ")] == [
        f"fc: node {direct.name!r} reads its weight outside its forward (e.g. F.linear(x, "
        "fc.weight) in another module): it reads the quantized weight with a float input, "
        "as in quantize_model's fake-quant model, whose activation quantizer is fc's "
        "pre-hook"
    ]
    want = fake_quant(net, x, 8, 8, quantizer)
    # (fc's int32 bias moves h by up to half a step, times 10 in h * 10 - 3)
    got = run(path, x.numpy())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max())
    got_f = run(_with_float_biases(path, net, x, 8, 8, quantizer), x.numpy())
    np.testing.assert_allclose(got_f, want, rtol=0, atol=1e-6 * np.abs(want).max())


def test_shared_activation_qdq_keeps_the_graph_sorted(tmp_path):
    """A weight shared by MatMuls A and C, and B between them reading C's
    input: the Q/DQ pair of that input must come before B."""
    rng = np.random.default_rng(0)
    w1, w2 = (rng.normal(size=(8, 8)).astype(np.float32) for _ in range(2))
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["t"], name="A"),
        helper.make_node("MatMul", ["t", "W2"], ["u"], name="B"),
        helper.make_node("MatMul", ["t", "W1"], ["v"], name="C"),
        helper.make_node("Add", ["u", "v"], ["s"], name="add"),
        helper.make_node("MatMul", ["s", "W2"], ["y"], name="D"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    out = tmp_path / "q.onnx"
    rep = squant_rs.quantize_onnx(m, out, 8, 8)
    assert [r.act_bits for r in rep.layers] == [None, 8, 8, 8]
    q = onnx.load(str(out))
    onnx.checker.check_model(q, full_check=True)
    seen = set(i.name for i in q.graph.input) | {t.name for t in q.graph.initializer}
    for n in q.graph.node:
        assert all(i in seen for i in n.input if i), n.name
        seen.update(n.output)


def test_initializer_read_by_a_subgraph_stays(tmp_path):
    """An If branch reading the quantized weight W from the outer scope
    keeps reading the float W; the top-level MatMul reads its
    DequantizeLinear."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 8)).astype(np.float32)
    vi = helper.make_tensor_value_info
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["ty"])], "then", [], [vi("ty", 1, [2, 8])]
    )
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["ey"])], "else", [], [vi("ey", 1, [2, 8])]
    )
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"], name="top"),
        helper.make_node("If", ["cond"], ["b"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [vi("x", TensorProto.FLOAT, [2, 8]), vi("cond", TensorProto.BOOL, [])],
        [vi("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(w, "W")],
    )
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), str(src))
    rep = squant_rs.quantize_onnx(src, out, 8)
    q = onnx.load(str(out))
    onnx.checker.check_model(q, full_check=True)
    assert "W" in {t.name for t in q.graph.initializer}
    x = rng.random((2, 8), dtype=np.float32)
    sess = ort.InferenceSession(str(out), providers=CPU)
    got = sess.run(None, {"x": x, "cond": np.array(True)})[0]
    deq = rep.layers[0].qtensor.dequantize().T
    np.testing.assert_allclose(got, x @ deq + x @ w, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# Calibration arguments: input_shape, s_sigma, seed


def _sym_model(inputs=(("x", ["N", "K"]),)) -> onnx.ModelProto:
    """Gemm layers on inputs of symbolic shapes (the first input feeds
    ``g1``, each further one is added to ``g1``'s output)."""
    rng = np.random.default_rng(0)
    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("Gemm", [inputs[0][0], "W1"], ["h0"], name="g1", transB=1)]
    for i, (name, _) in enumerate(inputs[1:]):
        nodes.append(helper.make_node("Add", [f"h{i}", name], [f"h{i + 1}"]))
    last = f"h{len(inputs) - 1}"
    nodes.append(helper.make_node("Gemm", [last, "W2"], ["y"], name="g2", transB=1))
    g = helper.make_graph(
        nodes,
        "g",
        [vi(name, TensorProto.FLOAT, dims) for name, dims in inputs],
        [vi("y", TensorProto.FLOAT, ["N", 3])],
        [
            numpy_helper.from_array(rng.normal(size=(6, 8)).astype(np.float32), "W1"),
            numpy_helper.from_array(rng.normal(size=(3, 6)).astype(np.float32), "W2"),
        ],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _no_quantizing(monkeypatch) -> None:
    """Fail if quantize_onnx gets as far as quantizing the weights."""
    from squant_rs.formats.onnx import quantize as quantize_module

    def no_work(*args, **kwargs):
        raise AssertionError("weights quantized before the arguments were checked")

    monkeypatch.setattr(quantize_module, "quantize_tensors", no_work)


@pytest.mark.parametrize(
    "shape,error,msg",
    [
        ((0, 8), squant_rs.InvalidArgumentError, "positive integers"),
        ((2, -1), squant_rs.InvalidArgumentError, "positive integers"),
        ((2, 8.0), squant_rs.InvalidArgumentError, "positive integers"),
        ((2, 3, 7, 7.5), squant_rs.InvalidArgumentError, "positive integers"),
        ((True, 8), squant_rs.InvalidArgumentError, "positive integers"),
        ((), squant_rs.InvalidArgumentError, "non-empty"),
        (5, TypeError, "input_shape must be a sequence"),
        ("2,8", TypeError, "input_shape must be a sequence"),
    ],
)
def test_input_shape_is_checked_first(tmp_path, monkeypatch, shape, error, msg):
    """As in quantize_model: a TypeError or InvalidArgumentError naming
    input_shape before any work (a zero dimension used to calibrate ranges
    of (0, 0) that zeroed the activations)."""
    _no_quantizing(monkeypatch)
    out = tmp_path / "q.onnx"
    with pytest.raises(error, match=msg) as err:
        squant_rs.quantize_onnx(_sym_model(), out, 4, 8, input_shape=shape)
    assert "input_shape" in str(err.value)
    assert not out.exists()


def _example(message: str, sizes: dict[str, int]):
    """The ``input_shape=...`` example of an error message, its ``<K>``
    placeholders replaced by ``sizes``."""
    import ast

    text = message.split("e.g. input_shape=", 1)[1].split(" with ", 1)[0]
    for hole, size in sizes.items():
        text = text.replace(f"<{hole}>", str(size))
    return ast.literal_eval(text)


def test_several_inputs_with_symbolic_dimensions(tmp_path):
    """input_shape with several inputs: one shape is that of every input of
    its rank whose fixed dimensions it matches (the others take their sizes
    by dimension name), a dict gives shapes by name; the error says exactly
    what to pass (input_shape used to be ignored with several inputs and
    the error asked for it anyway)."""
    out = tmp_path / "q.onnx"
    two = _sym_model((("x", ["N", "K"]), ("m", ["N", "J"])))
    with pytest.raises(squant_rs.InvalidArgumentError) as err:
        squant_rs.quantize_onnx(two, out, 4, 8)
    msg = str(err.value)
    assert "inputs 'x' (shape [N, K]) and 'm' (shape [N, J])" in msg, msg
    assert "e.g. input_shape={'x': (8, <K>), 'm': (8, <J>)} with <K>, <J> replaced" in msg, msg
    shapes = _example(msg, {"K": 8, "J": 6})
    assert shapes == {"x": (8, 8), "m": (8, 6)}
    rep = squant_rs.quantize_onnx(two, out, 4, 8, input_shape=shapes)
    assert rep.layers[1].act_bits == 8
    # One shape: the input of that rank and fixed dimensions; N follows it,
    # as it does for an input the dict leaves out.
    fixed = _sym_model((("x", ["N", "K"]), ("m", ["N", 6])))
    squant_rs.quantize_onnx(fixed, out, 4, 8, input_shape={"x": (3, 8)})
    by_dict = squant_rs.quantize_onnx(fixed, out, 4, 8, input_shape={"x": (4, 8), "m": (4, 6)})
    one = squant_rs.quantize_onnx(fixed, tmp_path / "one.onnx", 4, 8, input_shape=(4, 8))
    assert [r.act_range for r in one.layers] == [r.act_range for r in by_dict.layers]
    assert (tmp_path / "one.onnx").read_bytes() == out.read_bytes()
    with pytest.raises(squant_rs.InvalidArgumentError) as err:
        squant_rs.quantize_onnx(fixed, out, 4, 8, input_shape=(4, 8, 2))
    msg = str(err.value)
    assert "input_shape (4, 8, 2) fits none of the inputs" in msg, msg
    assert "input_shape={'x': (8, <K>), 'm': (8, 6)}" in msg, msg
    with pytest.raises(squant_rs.InvalidArgumentError, match="names 'y', which is not an input"):
        squant_rs.quantize_onnx(fixed, out, 4, 8, input_shape={"y": (4, 8)})
    # One input: the example is a plain shape.
    with pytest.raises(squant_rs.InvalidArgumentError) as err:
        squant_rs.quantize_onnx(_sym_model(), out, 4, 8)
    assert _example(str(err.value), {"K": 8}) == (8, 8)


@pytest.mark.parametrize(
    "shape,error,msg",
    [
        ({"x": (0, 8)}, squant_rs.InvalidArgumentError, r"input_shape\['x'\]: .*positive"),
        ({"x": 8}, TypeError, r"input_shape\['x'\]: .*sequence"),
        ({1: (2, 8)}, TypeError, "keys must be input names"),
        ({}, squant_rs.InvalidArgumentError, "at least one input"),
    ],
)
def test_input_shape_dict_is_checked_first(tmp_path, monkeypatch, shape, error, msg):
    _no_quantizing(monkeypatch)
    with pytest.raises(error, match=msg):
        squant_rs.quantize_onnx(_sym_model(), tmp_path / "q.onnx", 4, 8, input_shape=shape)


def test_cli_input_shape(tmp_path, capsys):
    """quantize --input-shape: the calibration shape of ONNX inputs (one,
    or NAME=SHAPE each); the errors name the option, not the API keyword."""
    from safetensors.numpy import save_file

    from squant_rs.cli import main

    src, out, api = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "api.onnx"
    onnx.save(_sym_model(), str(src))
    args = ["quantize", str(src), str(out), "--abits", "8", "-q"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "e.g. --input-shape 8,<K> with <K> replaced by its size" in err, err
    assert "input_shape" not in err and err.count("\n") == 1, err
    assert main([*args, "--input-shape", "4,8"]) == 0
    squant_rs.quantize_onnx(src, api, 4, 8, input_shape=(4, 8))
    assert out.read_bytes() == api.read_bytes()
    assert main([*args, "--input-shape", "x=4,8"]) == 0
    assert out.read_bytes() == api.read_bytes()
    # Several inputs: by name, as the error shows.
    onnx.save(_sym_model((("x", ["N", "K"]), ("m", ["N", "J"]))), str(src))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "e.g. --input-shape x=8,<K> m=8,<J> with <K>, <J> replaced by sizes" in err, err
    assert main([*args, "--input-shape", "x=4,8", "m=4,6"]) == 0
    squant_rs.quantize_onnx(src, api, 4, 8, input_shape={"x": (4, 8), "m": (4, 6)})
    assert out.read_bytes() == api.read_bytes()
    assert main([*args, "--input-shape", "4,8,1"]) == 2
    assert "--input-shape 4,8,1 fits none of the inputs" in capsys.readouterr().err
    # A shape onnxruntime refuses: the error names the option too.
    assert main([*args, "--input-shape", "4,8"]) == 2
    err = capsys.readouterr().err
    assert "'x' (4, 8), 'm' (4, 8)) failed in onnxruntime" in err, err
    assert "pass --input-shape matching the model's inputs" in err, err
    usage = {
        "--input-shape needs --abits": ["quantize", str(src), str(out), "--input-shape", "4,8"],
        "one shape (SHAPE), or one per input": [*args, "--input-shape", "4,8", "x=4,8"],
        "gives input 'x' two shapes": [*args, "--input-shape", "x=4,8", "x=4,8"],
        "expected NAME=SHAPE with an input name": [*args, "--input-shape", "=4,8"],
        "expected positive integers": [*args, "--input-shape", "4,0"],
    }
    st = tmp_path / "w.safetensors"
    save_file({"a.weight": np.ones((4, 4), np.float32)}, str(st))
    usage["apply to ONNX models"] = [
        "quantize",
        str(st),
        str(tmp_path / "o.safetensors"),
        "--input-shape",
        "4,8",
    ]
    for msg, argv in usage.items():
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, (argv, err)
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize(
    "value,error,msg",
    [
        (1e39, squant_rs.InvalidArgumentError, "float32 holds"),
        (1e-50, squant_rs.InvalidArgumentError, "float32 holds"),
        (0.0, squant_rs.InvalidArgumentError, "positive finite"),
        (float("nan"), squant_rs.InvalidArgumentError, "positive finite"),
        ("3", TypeError, "positive number"),
        (True, TypeError, "positive number"),
    ],
)
def test_s_sigma_is_checked_first(tmp_path, monkeypatch, value, error, msg):
    """As in quantize_model: s_sigma must stay positive and finite in
    float32 (1e39 failed with 'cannot convert float NaN to integer' after
    every weight was quantized, 1e-50 gave ranges of zero width)."""
    _no_quantizing(monkeypatch)
    out = tmp_path / "q.onnx"
    with pytest.raises(error, match=msg) as err:
        squant_rs.quantize_onnx(_sym_model(), out, 4, 8, s_sigma=value, input_shape=(2, 8))
    assert "s_sigma" in str(err.value)
    assert not out.exists()


@pytest.mark.parametrize(
    "value,error,msg",
    [
        ("x", TypeError, "seed must be an integer"),
        (1.5, TypeError, "seed must be an integer"),
        (True, TypeError, "seed must be an integer"),
        (2**64, squant_rs.InvalidArgumentError, r"seed must be in \[-2\*\*63, 2\*\*64 - 1\]"),
        (-(2**63) - 1, squant_rs.InvalidArgumentError, "seed must be in"),
    ],
)
def test_seed_is_checked_first(tmp_path, monkeypatch, value, error, msg):
    """As in quantize_model: TypeError for a non-integer (1.5 was taken),
    InvalidArgumentError outside [-2**63, 2**64 - 1], before any work."""
    _no_quantizing(monkeypatch)
    out = tmp_path / "q.onnx"
    with pytest.raises(error, match=msg):
        squant_rs.quantize_onnx(_sym_model(), out, 4, 8, seed=value, input_shape=(2, 8))
    assert not out.exists()


def test_negative_seeds_count_modulo_2_64(tmp_path):
    """quantize_model and export_onnx take seeds down to -2**63
    (torch.Generator counts them modulo 2**64); quantize_onnx (numpy's
    generator refused them) and export_onnx's integer-kernel calibration
    take them the same way."""
    reps = {}
    for seed in (-1, 2**64 - 1, 0):
        reps[seed] = squant_rs.quantize_onnx(
            _sym_model(), tmp_path / "q.onnx", 4, 8, seed=seed, input_shape=(4, 8)
        )
    ranges = {seed: [r.act_range for r in rep.layers] for seed, rep in reps.items()}
    assert ranges[-1] == ranges[2**64 - 1] != ranges[0]
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3), torch.nn.ReLU()
    ).eval()
    x = torch.rand(1, 3, 12, 12)
    for seed in (-1, 2**64 - 1):
        out = tmp_path / f"e{seed}.onnx"
        squant_rs.export_onnx(net, out, x, 8, 8, seed=seed, integer_kernels=True)
    assert (tmp_path / "e-1.onnx").read_bytes() == (tmp_path / f"e{2**64 - 1}.onnx").read_bytes()


def test_input_shape_too_big_for_numpy(tmp_path):
    out = tmp_path / "q.onnx"
    with pytest.raises(squant_rs.InvalidArgumentError, match="calibration batch of shape"):
        squant_rs.quantize_onnx(_sym_model(), out, 4, 8, input_shape=(2**40, 2**40))
    assert not out.exists()


def test_layers_left_float_are_reported(tmp_path):
    """Conv / Gemm / MatMul nodes with a constant operand that is not a
    weight quantize_onnx quantizes (a Constant node's, a computed one, a
    3-D MatMul weight, the first operand, a node in an If body) are listed
    in report.skipped, with the reason in report.notes (they used to stay
    float unreported)."""
    rng = np.random.default_rng(0)

    def w(*shape, dtype=np.float32):
        return rng.normal(size=shape).astype(dtype)

    vi = helper.make_tensor_value_info
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["h0", "W0"], ["t"], name="in_then")],
        "then",
        [],
        [vi("t", TensorProto.FLOAT, [2, 8])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["h0"], ["e"])], "else", [], [vi("e", 1, [2, 8])]
    )
    const = numpy_helper.from_array(w(8, 8), "c")
    nodes = [
        helper.make_node("Gemm", ["x", "W0"], ["h0"], name="g0", transB=1),
        helper.make_node("Constant", [], ["C"], value=const),
        helper.make_node("MatMul", ["h0", "C"], ["h1"], name="from_constant"),
        helper.make_node("Cast", ["W16"], ["W16f"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["h1", "W16f"], ["h2"], name="computed"),
        helper.make_node("MatMul", ["h2", "W3d"], ["h3"], name="three_d"),
        helper.make_node("MatMul", ["Wa", "h3"], ["h4"], name="first_operand"),
        helper.make_node("If", ["cond"], ["h5"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Transpose", ["h0"], ["h0t"]),
        helper.make_node("MatMul", ["h0", "h0t"], ["h6"], name="two_activations"),
        helper.make_node("Gemm", ["h5", "W9"], ["y"], name="last", transB=1),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [vi("x", TensorProto.FLOAT, [2, 8]), vi("cond", TensorProto.BOOL, [])],
        [
            vi("y", TensorProto.FLOAT, [2, 3]),
            vi("h4", TensorProto.FLOAT, [1, 2, 8]),
            vi("h6", TensorProto.FLOAT, [2, 2]),
        ],
        [
            numpy_helper.from_array(w(8, 8), "W0"),
            numpy_helper.from_array(w(8, 8, dtype=np.float16), "W16"),
            numpy_helper.from_array(w(1, 8, 8), "W3d"),
            numpy_helper.from_array(w(2, 2), "Wa"),
            numpy_helper.from_array(w(3, 8), "W9"),
        ],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    out = tmp_path / "q.onnx"
    rep = squant_rs.quantize_onnx(model, out, 8)
    assert [r.name for r in rep.layers] == ["g0", "last"]
    assert rep.skipped == ["from_constant", "computed", "three_d", "first_operand", "in_then"]
    notes = dict(n.split(": ", 1) for n in rep.notes)
    assert list(notes) == rep.skipped
    assert "Constant node ('C')" in notes["from_constant"]
    assert "computed from initializers by a Cast node" in notes["computed"]
    assert "'W3d' has 3 dimensions: MatMul weights are quantized when 2-D" in notes["three_d"]
    assert "constant operand is the first input (A)" in notes["first_operand"]
    assert "inside a subgraph ('then'" in notes["in_then"]
    assert all(n.endswith("; left float") for n in rep.notes)
    text = str(rep)
    assert "left float: from_constant, computed, three_d, first_operand, in_then" in text
    assert "note: three_d: its weight 'W3d' has 3 dimensions" in text
    ort.InferenceSession(str(out), providers=CPU)  # a valid model
    # Nothing quantizable: the error says why the layers stay float.
    only = helper.make_graph(
        [nodes[1], nodes[2]],
        "g",
        [vi("h0", TensorProto.FLOAT, [2, 8])],
        [vi("h1", TensorProto.FLOAT, [2, 8])],
    )
    with pytest.raises(squant_rs.OnnxFormatError) as err:
        squant_rs.quantize_onnx(
            helper.make_model(only, opset_imports=[helper.make_opsetid("", 21)]), out, 8
        )
    assert "no quantizable layer" in str(err.value)
    assert "from_constant: its weight comes from a Constant node" in str(err.value)


def _conv_chain_with_computed_weight(weight: str) -> onnx.ModelProto:
    """Conv c1 -> Relu -> Conv c2 -> Relu -> Conv c3, c2's weight a
    ``Cast`` of a float16 initializer, a ``Reshape`` of a flat one, a
    sparse initializer or a Constant node's value (``weight``)."""
    rng = np.random.default_rng(0)

    def f32(*shape):
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    w2 = f32(8, 8, 3, 3)
    pre: list = []
    inits = [numpy_helper.from_array(f32(8, 3, 3, 3), "W1")]
    sparse = []
    if weight == "cast":
        pre = [helper.make_node("Cast", ["W2h"], ["W2"], to=TensorProto.FLOAT)]
        inits.append(numpy_helper.from_array(w2.astype(np.float16), "W2h"))
    elif weight == "reshape":
        pre = [helper.make_node("Reshape", ["W2flat", "shape"], ["W2"])]
        inits += [
            numpy_helper.from_array(w2.ravel(), "W2flat"),
            numpy_helper.from_array(np.array(w2.shape, np.int64), "shape"),
        ]
    elif weight == "sparse":
        idx = np.arange(w2.size, dtype=np.int64)
        sparse = [
            helper.make_sparse_tensor(
                numpy_helper.from_array(w2.ravel(), "W2"),
                numpy_helper.from_array(idx, "W2_idx"),
                list(w2.shape),
            )
        ]
    else:
        pre = [helper.make_node("Constant", [], ["W2"], value=numpy_helper.from_array(w2, "v"))]
    inits += [
        numpy_helper.from_array(f32(8), "b1"),
        numpy_helper.from_array(f32(8), "b2"),
        numpy_helper.from_array(f32(4, 8, 1, 1), "W3"),
        numpy_helper.from_array(f32(4), "b3"),
    ]
    nodes = pre + [
        helper.make_node("Conv", ["x", "W1", "b1"], ["y1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["y1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2", "b2"], ["y2"], name="c2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["y2"], ["r2"]),
        helper.make_node("Conv", ["r2", "W3", "b3"], ["y"], name="c3"),
    ]
    vi = helper.make_tensor_value_info
    g = helper.make_graph(
        nodes,
        "g",
        [vi("x", TensorProto.FLOAT, [2, 3, 8, 8])],
        [vi("y", TensorProto.FLOAT, [2, 4, 8, 8])],
        inits,
        sparse_initializer=sparse,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("weight", ["cast", "reshape", "sparse", "constant"])
def test_integer_kernels_leave_a_computed_weight_float(tmp_path, weight):
    """With integer_kernels, a layer whose weight is computed from
    initializers (a Cast of a float16 one, a Reshape), a sparse initializer
    or a Constant node's value is left float, and really is: it keeps
    reading the float tensor. Between a DequantizeLinear and a
    QuantizeLinear onnxruntime folded the computed weight, quantized it
    itself and ran the layer as QLinearConv, 2 % of the output range away
    from what the QDQ graph says (ORT with optimizations off)."""
    out = tmp_path / "q.onnx"
    rep = squant_rs.quantize_onnx(
        _conv_chain_with_computed_weight(weight),
        out,
        8,
        8,
        quantizer="symmetric",
        integer_kernels=True,
    )
    assert [r.name for r in rep.layers] == ["c1", "c3"] and rep.skipped == ["c2"]
    model = onnx.load(str(out))
    producers = {o: n for n in model.graph.node for o in n.output}
    (c2,) = [n for n in model.graph.node if n.name == "c2"]
    assert producers[c2.input[0]].op_type == "Relu"  # the float tensor
    x = np.random.default_rng(1).random((2, 3, 8, 8), dtype=np.float32)
    want = run(out, x, graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    np.testing.assert_allclose(run(out, x), want, rtol=0, atol=1e-5 * np.abs(want).max())


def _sparse_weight_model(opset: int, in_body: bool = False) -> onnx.ModelProto:
    """MatMul ``mm_sparse`` reads the sparse initializer ``Ws`` (in an If
    body with ``in_body``), MatMul ``mm`` the dense ``W``."""
    rng = np.random.default_rng(1)
    vi = helper.make_tensor_value_info
    sparse = _sparse_weight(rng)
    w = numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "W")
    mm_sparse = helper.make_node("MatMul", ["x", "Ws"], ["h"], name="mm_sparse")
    mm = helper.make_node("MatMul", ["h", "W"], ["y"], name="mm")
    if not in_body:
        g = helper.make_graph(
            [mm_sparse, mm],
            "g",
            [vi("x", TensorProto.FLOAT, ["N", 8])],
            [vi("y", TensorProto.FLOAT, ["N", 4])],
            [w],
            sparse_initializer=[sparse],
        )
    else:
        then_g = helper.make_graph(
            [mm_sparse],
            "then",
            [],
            [vi("h", TensorProto.FLOAT, ["N", 8])],
            sparse_initializer=[sparse],
        )
        else_g = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["e"])], "else", [], [vi("e", 1, ["N", 8])]
        )
        g = helper.make_graph(
            [helper.make_node("If", ["cond"], ["h"], then_branch=then_g, else_branch=else_g), mm],
            "g",
            [vi("x", TensorProto.FLOAT, ["N", 8]), vi("cond", TensorProto.BOOL, [])],
            [vi("y", TensorProto.FLOAT, ["N", 4])],
            [w],
        )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [21, 17])
def test_sparse_initializer_weights_are_listed_float(tmp_path, opset):
    """A MatMul whose weight is a sparse initializer stays float and is
    listed in report.skipped with a note (it used to be left out of both);
    below opset 21 such a model converts (onnx's version converter used to
    fail with "Input Ws is undefined!") and keeps its sparse initializer."""
    model = _sparse_weight_model(opset)
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(model, str(src))
    rep = squant_rs.quantize_onnx(src, out, 8, 8)
    assert [r.name for r in rep.layers] == ["mm"]
    assert rep.skipped == ["mm_sparse"]
    assert rep.notes == [
        "mm_sparse: its weight 'Ws' is a sparse initializer: only dense initializers are "
        "quantized; left float"
    ]
    q = onnx.load(str(out))
    assert q.opset_import[0].version == 21
    assert [sp.values.name for sp in q.graph.sparse_initializer] == ["Ws"]
    assert [i.name for i in q.graph.input] == ["x"]
    x = np.random.default_rng(2).random((3, 8), dtype=np.float32)
    want = run(src, x)
    assert np.abs(run(out, x) - want).max() < 0.02 * np.abs(want).max()


def test_sparse_initializer_in_a_body_below_opset_21_is_named(tmp_path):
    """onnx's version converter drops the sparse initializers of If / Loop /
    Scan bodies (the output was an invalid model): such a model below
    opset 21 is refused, naming them; at opset 21 its layer is listed."""
    out = tmp_path / "q.onnx"
    rep = squant_rs.quantize_onnx(_sparse_weight_model(21, in_body=True), out, 8)
    assert rep.skipped == ["mm_sparse"] and "inside a subgraph ('then'" in rep.notes[0]
    ort.InferenceSession(str(out), providers=CPU)  # a valid model
    with pytest.raises(squant_rs.OnnxFormatError) as err:
        squant_rs.quantize_onnx(_sparse_weight_model(17, in_body=True), out, 8)
    msg = str(err.value)
    assert "cannot convert opset 17 to 21" in msg and "sparse initializers" in msg, msg
    assert "'Ws'" in msg, msg


def test_conv_transpose_is_listed_float(tmp_path):
    """A ConvTranspose stays float and is listed in report.skipped, with a
    note, as quantize_model lists it (quantize_onnx used to leave it out of
    both)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.ConvTranspose2d(4, 4, 3)
    ).eval()
    _, want = squant_rs.quantize_model(net, 8, return_report=True)
    assert want.skipped == ["2"]
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    float_export(net, torch.rand(1, 3, 8, 8), src)
    rep = squant_rs.quantize_onnx(src, out, 8)
    assert len(rep.layers) == 1 and rep.layers[0].kind == "Conv"
    (name,) = rep.skipped
    assert [n.op_type for n in onnx.load(str(src)).graph.node if n.name == name] == [
        "ConvTranspose"
    ]
    assert rep.notes == [
        f"{name}: a ConvTranspose (another weight layout): only Conv / Gemm / MatMul weights "
        "are quantized; left float"
    ]
    assert ops(out)["ConvTranspose"] == 1


# --------------------------------------------------------------------------
# Bad input: a SquantError, one line, no output


def _bad_inputs(tmp_path):
    good = tmp_path / "good.onnx"
    onnx.save(_gemm_model(), str(good))
    data = good.read_bytes()
    (tmp_path / "text.onnx").write_text("hello, not a model\n")
    (tmp_path / "trunc.onnx").write_bytes(data[: len(data) // 2])
    onnx.save(_gemm_model(opset=5), str(tmp_path / "old.onnx"))
    nolayer = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        ),
        opset_imports=[helper.make_opsetid("", 21)],
    )
    onnx.save(nolayer, str(tmp_path / "nolayer.onnx"))
    squant_rs.quantize_onnx(good, tmp_path / "quant.onnx", 8)
    return {
        "text": ("text.onnx", "not an ONNX model"),
        "truncated": ("trunc.onnx", "ONNX"),
        "opset": ("old.onnx", "unsupported opset 5"),
        "no layer": ("nolayer.onnx", "no quantizable layer"),
        "quantized": ("quant.onnx", "already quantized"),
        "missing": ("missing.onnx", "not found"),
    }


def test_skip_excluding_every_layer_says_so(tmp_path, capsys):
    """skip patterns that exclude every layer: the error says so (it said
    "no quantizable layer (Conv/Gemm/MatMul with a float32 initializer
    weight)" of a model that has five)."""
    from squant_rs.cli import main

    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(_gemm_model(), str(src))
    with pytest.raises(squant_rs.InvalidArgumentError) as err:
        squant_rs.quantize_onnx(src, out, 8, skip=("g*", "mm", "s*"))
    assert str(err.value) == (
        f"{src}: the skip patterns 'g*', 'mm', 's*' exclude every quantizable layer (5: 'g0', "
        "'mm', 'g2', 's1', 's2'): nothing is left to quantize"
    )
    assert main(["quantize", str(src), str(out), "--skip", "*"]) == 2
    assert capsys.readouterr().err == (
        f"squant-rs: error: {src}: the --skip pattern '*' excludes every quantizable layer (5: "
        "'g0', 'mm', 'g2', 's1', 's2'): nothing is left to quantize\n"
    )
    assert not out.exists()


def test_upper_case_onnx_extension(tmp_path, capsys):
    """The CLI takes .ONNX as .onnx, as it takes the output's other
    extensions in any case: it said '.onnx' is not one squant-rs writes
    (use .safetensors), or that an ONNX input needs an .onnx output."""
    from squant_rs.cli import main

    src = tmp_path / "m.ONNX"
    onnx.save(_gemm_model(), str(src))
    x = np.random.default_rng(1).random((3, 8), dtype=np.float32)
    want = tmp_path / "want.onnx"
    squant_rs.quantize_onnx(src, want, 8)
    for name in ("q.ONNX", "q.onnx"):
        argv = ["quantize", "-q", str(src), str(tmp_path / name), "--wbits", "8"]
        assert main(argv) == 0, capsys.readouterr()
        np.testing.assert_array_equal(run(tmp_path / name, x), run(want, x))
    assert main(["quantize", str(src), str(tmp_path / "q.safetensors")]) == 2
    err = capsys.readouterr().err
    want = f"ONNX input needs an .onnx output (got {tmp_path / 'q.safetensors'})"
    assert err == f"squant-rs: error: {want}\n"


def test_a_file_named_dot_onnx_is_onnx(tmp_path, capsys, monkeypatch):
    """A file named '.onnx' (a hidden file: os.path.splitext finds no
    extension) is an ONNX model to the CLI, as its name ends in .onnx: it
    was refused with 'ONNX input needs an .onnx output (and the other way
    round)'."""
    from squant_rs.cli import main

    (tmp_path / "sub").mkdir()
    onnx.save(_gemm_model(), str(tmp_path / "m.onnx"))
    onnx.save(_gemm_model(), str(tmp_path / "sub" / ".onnx"))
    monkeypatch.chdir(tmp_path)
    for src, dst in (("m.onnx", ".onnx"), ("sub/.onnx", "sub/.ONNX")):
        assert main(["quantize", "-q", src, dst, "--wbits", "8"]) == 0, capsys.readouterr()
    x = np.random.default_rng(1).random((3, 8), dtype=np.float32)
    np.testing.assert_array_equal(run("sub/.ONNX", x), run(".onnx", x))


def test_output_path_ending_with_a_slash_is_refused(tmp_path):
    """An output path ending with '/' names a directory: refused (a file
    without the slash was written, and a second run failed with
    NotADirectoryError)."""
    for out in (tmp_path / "outdir", tmp_path):
        for tail in ("/", "/.", "/.."):
            with pytest.raises(squant_rs.InvalidArgumentError, match="directory"):
                squant_rs.quantize_onnx(_gemm_model(), f"{out}{tail}", 8)
    assert os.listdir(tmp_path) == []


def test_bad_weights_are_named(tmp_path, capsys):
    """A NaN or an empty weight: the error names the initializer and its
    node (not an internal index), with the shape as stored."""
    from squant_rs.cli import main

    rng = np.random.default_rng(0)
    ws = [rng.normal(size=(8, 8)).astype(np.float32) for _ in range(4)]
    ws[3][5, 2] = np.nan
    nodes = [
        helper.make_node(
            "MatMul", ["x" if i == 0 else f"h{i - 1}", f"w{i}"], [f"h{i}"], name=f"mm{i}"
        )
        for i in range(4)
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("h3", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)],
    )
    src, out = tmp_path / "nan.onnx", tmp_path / "q.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), str(src))
    msg = "initializer 'w3' (weight of node 'mm3'): weight contains NaN"
    with pytest.raises(squant_rs.SquantError, match=re.escape(msg)):
        squant_rs.quantize_onnx(src, out, 4)
    assert main(["quantize", str(src), str(out)]) == 2
    assert msg in capsys.readouterr().err
    ws[3] = np.zeros((8, 0), np.float32)
    g.initializer[3].CopyFrom(numpy_helper.from_array(ws[3], "w3"))
    g.output[0].CopyFrom(helper.make_tensor_value_info("h3", TensorProto.FLOAT, [2, 0]))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    msg = "initializer 'w3' (weight of node 'mm3'): weight tensor is empty (shape (8, 0))"
    with pytest.raises(squant_rs.InvalidArgumentError, match=re.escape(msg)):
        squant_rs.quantize_onnx(m, out, 4)
    assert not out.exists()


class _TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x) + y))


def test_export_bad_models_say_why(tmp_path):
    """Nothing to quantize, float16 / float64 models and activations of a
    multi-input model: clear errors, no output file."""
    out = tmp_path / "m.onnx"
    x = torch.rand(2, 3, 12, 12)
    with pytest.warns(UserWarning, match="nothing to quantize"):
        with pytest.raises(squant_rs.InvalidArgumentError, match="no layer to quantize"):
            squant_rs.export_onnx(torch.nn.Sequential(torch.nn.ReLU()), out, x, 4)
    for dtype in (torch.float16, torch.float64):
        with pytest.raises(squant_rs.InvalidArgumentError, match=f"c1.weight is {dtype}"):
            squant_rs.export_onnx(small().to(dtype), out, x.to(dtype), 8)
    with pytest.raises(squant_rs.InvalidArgumentError, match="input 0 is torch.float64"):
        squant_rs.export_onnx(small(), out, x.double(), 8)
    two = _TwoInputs().eval()
    xy = (torch.rand(2, 4), torch.rand(2, 4))
    with pytest.raises(squant_rs.InvalidArgumentError, match="takes 2.*abits=None") as err:
        squant_rs.export_onnx(two, out, xy, 8, 8)
    assert "input_shape" not in str(err.value)
    assert "use quantize_onnx (it calibrates every input on U[0,1) noise; they must all be " in (
        str(err.value)
    )
    # quantize_onnx refuses a model with a non-float input: not recommended then
    with pytest.raises(squant_rs.InvalidArgumentError, match="takes 2.*abits=None") as err:
        squant_rs.export_onnx(two, out, (xy[0], torch.ones(2, 4, dtype=torch.int64)), 8, 8)
    assert str(err.value).endswith(
        "abits=None): quantize_onnx, which calibrates several inputs, takes float32 inputs "
        "only (input 1 is torch.int64)"
    )
    assert not out.exists()
    squant_rs.export_onnx(two, out, xy, 8)  # weight-only works


class _Untraceable(torch.nn.Module):
    """Conv -> BN outside an nn.Sequential with data-dependent control
    flow: quantize_model cannot fold the BN, torch's exporter does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        if h.mean() > -1:
            h = h * 1.0
        return self.fc(h.mean((2, 3)))


class _Conv2dSame(torch.nn.Conv2d):
    """timm-style: pads for 'same' output, then the stock convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.pad(x, [1, 1, 1, 1])
        return torch.nn.functional.conv2d(
            x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups
        )


class _BnAct(torch.nn.BatchNorm2d):
    """timm-style BatchNormAct2d: the activation inside the BN's forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class _SharedConvTwoBns(torch.nn.Module):
    """One conv run on two inputs, each call followed by its own BN
    (EfficientDet-style shared heads): quantize_model cannot fold either,
    torch's exporter folds both."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn_a = torch.nn.BatchNorm2d(8)
        self.bn_b = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn_a(self.conv(x)))
        b = torch.relu(self.bn_b(self.conv(x[:, :, ::2, ::2])))
        return self.head(a).mean((2, 3)) + self.head(b).mean((2, 3))


def _exporter_folds(case: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if case == "called-twice":
        twice = _SharedConvTwoBns()
        with torch.no_grad():
            for bn in (twice.bn_a, twice.bn_b):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(-1.5, 1.5)
        return twice.eval()
    if case == "untraceable":
        net: torch.nn.Module = _Untraceable()
        conv, bn = net.conv, net.bn
    else:
        conv = (
            _Conv2dSame(3, 8, 3) if case == "conv-subclass" else torch.nn.Conv2d(3, 8, 3, padding=1)
        )
        bn = _BnAct(8) if case == "bn-subclass" else torch.nn.BatchNorm2d(8)
        net = torch.nn.Sequential(conv, bn, torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2)
        if case == "negative-gamma":
            bn.weight.uniform_(-1.5, -0.5)
        if case == "zero-gamma":
            bn.weight[::3] = 0.0
    seen: list[object] = []
    if case in ("conv-hook", "negative-gamma", "zero-gamma"):
        conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))  # reads only
    if case == "bn-hook":
        bn.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    return net.eval()


@pytest.mark.parametrize(
    "case",
    [
        "untraceable",
        "conv-hook",
        "bn-hook",
        "conv-subclass",
        "bn-subclass",
        "negative-gamma",
        "zero-gamma",
        "called-twice",
    ],
)
@pytest.mark.parametrize("wbits", [4, 8])
def test_export_layers_only_the_exporter_folds(tmp_path, case, wbits):
    """torch's exporter folds Conv+BN pairs that quantize_model leaves
    unfolded (hooks, modules with a forward of their own, untraceable
    models): the graph runs the layer's SQuant codes with each channel's
    scale times the BN factor, i.e. the fake-quant model."""
    net = _exporter_folds(case)
    x = torch.rand(2, 3, 8, 8)
    out = tmp_path / "m.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = squant_rs.export_onnx(net, out, x, wbits, recipe="paper")
        qm = squant_rs.quantize_model(net, wbits, recipe="paper", input_shape=tuple(x.shape))
    assert any("folded a BatchNorm into" in str(w.message) for w in caught)
    first = rep.layers[0]
    assert first.folded
    with torch.no_grad():
        want = qm(x).numpy()
    got = run(out, x.numpy())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert ops(out)["BatchNormalization"] == 0
    assert not _float_weights(onnx.load(str(out))), "a Conv runs a float weight"
    # The graph's weight dequantizes to the reported quantized weight.
    dq = _dq_values(onnx.load(str(out)), tmp_path)
    graph_w = next(v for k, v in dq.items() if v.shape == tuple(first.shape))
    np.testing.assert_allclose(graph_w, np.asarray(first.qtensor.dequantize()), rtol=2e-7, atol=0)


def test_bad_inputs_api_and_cli(tmp_path, capsys):
    from squant_rs.cli import main

    cases = _bad_inputs(tmp_path)
    for src, msg in cases.values():
        out = tmp_path / "out.onnx"
        with pytest.raises(squant_rs.OnnxFormatError, match=msg):
            squant_rs.quantize_onnx(tmp_path / src, out, 4)
        assert main(["quantize", str(tmp_path / src), str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, err
        assert not out.exists()
    good = tmp_path / "good.onnx"
    with pytest.raises(squant_rs.InvalidArgumentError, match="equals the input"):
        squant_rs.quantize_onnx(good, good, 4)
    assert main(["quantize", str(good), str(good)]) == 2
    assert "equals the input" in capsys.readouterr().err
    leftovers = [f for f in os.listdir(tmp_path) if f.startswith(".squant-onnx")]
    assert not leftovers


def test_cli_quantize_onnx(tmp_path, capsys):
    from squant_rs.cli import main

    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(_gemm_model(), str(src))
    args = ["quantize", str(src), str(out), "--wbits", "8", "--abits", "8"]
    assert main([*args, "--quantizer", "symmetric", "--skip", "s*"]) == 0
    assert "3 layers" in capsys.readouterr().out
    assert ops(out)["DequantizeLinear"] >= 3
    # --quantize-input: one more Q/DQ pair (the first layer's input)
    assert main([*args, "-q"]) == 0
    n_q = ops(out)["QuantizeLinear"]
    assert main([*args, "--quantize-input", "-q"]) == 0
    assert ops(out)["QuantizeLinear"] == n_q + 1
    assert main([*args, "--quantize-input=0,1", "-q"]) == 0
    assert main([*args, "--quantize-input=1,0", "-q"]) == 2
    assert "LO <= 0 <= HI" in capsys.readouterr().err
    assert main(["quantize", str(src), str(tmp_path / "q.safetensors")]) == 2
    from safetensors.numpy import save_file

    st = tmp_path / "w.safetensors"
    save_file({"a.weight": np.ones((4, 4), np.float32)}, str(st))
    assert main(["quantize", str(st), str(tmp_path / "o.safetensors"), "--abits", "8"]) == 2
    assert main(["quantize", str(st), str(tmp_path / "o.safetensors"), "--quantize-input"]) == 2
    capsys.readouterr()


def test_quantize_onnx_without_torch(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_gemm_model(), str(src))
    code = f"""
import sys
sys.modules["torch"] = None
import squant_rs
rep = squant_rs.quantize_onnx({str(src)!r}, {str(tmp_path / "q.onnx")!r}, 4, 8,
                              quantizer="symmetric")
assert len(rep.layers) == 5
from squant_rs.cli import main
assert main(["quantize", {str(src)!r}, {str(tmp_path / "c.onnx")!r}, "-q"]) == 0
assert sys.modules["torch"] is None
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.parametrize(
    "missing,wbits,abits",
    [("onnx", 8, None), ("ml_dtypes", 4, None), ("onnxruntime", 8, 8)],
)
def test_missing_packages_are_named_before_any_work(
    tmp_path, capsys, monkeypatch, missing, wbits, abits
):
    """A missing onnx, ml_dtypes (int4 codes) or onnxruntime (abits) is
    found before any weight is quantized: an ImportError naming the package
    and how to install it; the CLI prints one error line, exits 2 and
    writes nothing."""
    from squant_rs.cli import main
    from squant_rs.formats.onnx import quantize as quantize_module

    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(_gemm_model(), str(src))

    def no_work(*args, **kwargs):
        raise AssertionError("weights quantized before the packages were checked")

    monkeypatch.setattr(quantize_module, "quantize_tensors", no_work)
    monkeypatch.setitem(sys.modules, missing, None)
    hint = f"needs {missing}: pip install 'squant-rs[onnx]'"
    with pytest.raises(ImportError, match=re.escape(hint)):
        squant_rs.quantize_onnx(src, out, wbits, abits)
    opts = ["--wbits", str(wbits)] + ([] if abits is None else ["--abits", str(abits)])
    assert main(["quantize", str(src), str(out), *opts]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("squant-rs: error: ") and hint in err, err
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_missing_ml_dtypes_is_not_called_a_missing_onnx(tmp_path):
    """onnx itself imports ml_dtypes: without it, the error names ml_dtypes."""
    src = tmp_path / "m.onnx"
    onnx.save(_gemm_model(), str(src))
    code = f"""
import sys
sys.modules["ml_dtypes"] = None
from squant_rs.cli import main
sys.exit(main(["quantize", {str(src)!r}, {str(tmp_path / "q.onnx")!r}, "--wbits", "8"]))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert res.stderr == (
        "squant-rs: error: ONNX support needs ml_dtypes: pip install 'squant-rs[onnx]'\n"
    )
    assert not (tmp_path / "q.onnx").exists()


class _PoolBranch(torch.nn.Module):
    """A conv output read by a MaxPool (into the next conv) and by another
    op: the pool's narrower output range must not clip the other reader."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        z = self.c2(torch.nn.functional.max_pool2d(y, 4))
        return self.fc(torch.cat([z.mean((2, 3)), y.amin((2, 3))], 1))


def test_maxpool_input_read_elsewhere_keeps_its_own_range(tmp_path):
    torch.manual_seed(0)
    net = _PoolBranch().eval()
    x = torch.rand(4, 3, 16, 16)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        squant_rs.export_onnx(
            net, path, x, 8, 8, recipe="paper", quantizer="symmetric", integer_kernels=True
        )
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    pool = next(n for n in model.graph.node if n.op_type == "MaxPool")
    dq_in = next(n for n in model.graph.node if n.output[0] == pool.input[0])
    q_out = next(n for n in model.graph.node if pool.output[0] in n.input)
    assert dq_in.op_type == "DequantizeLinear" and q_out.op_type == "QuantizeLinear"
    conv_out_scale = float(inits[dq_in.input[1]])
    pool_out_scale = float(inits[q_out.input[1]])
    assert conv_out_scale > pool_out_scale  # the conv output's own, wider range
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
    want = net(x).detach().numpy()
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()


class _Attentions(torch.nn.Module):
    """Self-attention (``self_attn``: one MatMul on the packed
    ``in_proj_weight``) and attention whose query is not its key and value
    (``cross``: torch's exporter slices its ``in_proj_weight`` at run
    time)."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.mem = torch.nn.Linear(16, 16)
        self.cross = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.self_attn(x, x, x, need_weights=False)[0]
        m = self.mem(x)
        return self.head(self.cross(h, m, m, need_weights=False)[0])


def _export_attentions(tmp_path, wbits, abits=None, **kw):
    """export_onnx of ``Sequential(_Attentions())`` on a (2, 5, 16) input:
    ``(net, x, path, report)``."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(_Attentions()).eval()
    x = torch.rand(2, 5, 16)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        # nn.MultiheadAttention's shape checks convert traced tensors to bools
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        rep = squant_rs.export_onnx(net, path, x, wbits, abits, recipe="paper", **kw)
    return net, x, path, rep


def _dequantize_linear_of(model, weight: str):
    """The DequantizeLinear node of initializer ``weight``'s codes."""
    return next(
        n
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] == f"{weight}_quantized"
    )


@pytest.mark.parametrize("wbits,abits", [(4, None), (8, 8)])
def test_attention_projections_in_the_export(tmp_path, wbits, abits):
    """An attention's packed input projection is one MatMul initializer
    where query, key and value are one tensor: it gets its
    DequantizeLinear like any layer (axis 1). Where they differ, torch's
    exporter (dynamic batch) slices the weight at run time (Slice nodes
    with computed ends, then Transpose): the whole initializer becomes one
    DequantizeLinear of its rows (axis 0) that the Slices read, so that
    projection is quantized too (it was left float, with a note) and the
    graph equals quantize_model's fake-quant model, at another batch size
    too; with abits the cross-attention's query and key / value (it runs
    after the first layer) read their Q/DQ pair, as there."""
    net, x, path, rep = _export_attentions(tmp_path, wbits, abits)
    names = [r.name for r in rep.layers]
    assert "0.self_attn.in_proj" in names and "0.cross.in_proj" in names
    assert rep.skipped == []
    assert not any("no initializer to quantize" in n for n in rep.notes), rep.notes
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert _float_weights(model) == []
    dq = _dequantize_linear_of(model, "0.cross.in_proj_weight")
    assert [a.i for a in dq.attribute if a.name == "axis"] == [0]
    slices = [n for n in model.graph.node if dq.output[0] in n.input]
    assert [n.op_type for n in slices] == ["Slice", "Slice"]
    # with abits, the attention's query and key / value are quantized
    producers = {o: n for n in model.graph.node for o in n.output}
    readers = {i: n for n in model.graph.node for i in n.input}
    for sl in slices:
        matmul = readers[readers[sl.output[0]].output[0]]
        assert matmul.op_type == "MatMul"
        quantized = producers[matmul.input[0]].op_type == "DequantizeLinear"
        assert quantized == (abits is not None)
    want = squant_rs.quantize_model(net, wbits, abits, recipe="paper", input_shape=tuple(x.shape))
    for batch in (2, 3):
        xb = torch.rand(batch, 5, 16)
        with torch.no_grad():
            ref = want(xb).numpy()
        np.testing.assert_allclose(run(path, xb.numpy()), ref, rtol=0, atol=1e-5)


class _SelfAndCross(torch.nn.Module):
    """A Linear (the first layer), a self-attention and a cross-attention
    whose key and value are one tensor, then a head."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.pre = torch.nn.Linear(16, 16)
        self.a = torch.nn.MultiheadAttention(16, 2, batch_first=batch_first)
        self.c = torch.nn.MultiheadAttention(16, 2, batch_first=batch_first)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        h = self.a(h, h, h, need_weights=False)[0]
        m = x + 1
        return self.head(self.c(h, m, m, need_weights=False)[0])


def _projection_matmuls(model, scope: str) -> list:
    """The MatMul nodes of module ``scope`` whose weight is a
    DequantizeLinear's output (directly or through Slice / Transpose /
    Identity nodes): an attention's input projections."""
    producers = {o: n for n in model.graph.node for o in n.output}

    def dequantized(t: str) -> bool:
        p = producers.get(t)
        while p is not None and p.op_type in ("Slice", "Transpose", "Identity"):
            p = producers.get(p.input[0])
        return p is not None and p.op_type == "DequantizeLinear"

    return [
        n
        for n in model.graph.node
        if n.op_type == "MatMul" and n.name.startswith(f"/{scope}/") and dequantized(n.input[1])
    ]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("quantizer", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("recipe", ["paper", "squant+"])
def test_attention_inputs_in_the_export(tmp_path, recipe, quantizer, batch_first):
    """W8A8: the MatMuls of an attention's packed input projection (the
    self-attention's one on the packed weight, the cross-attention's on
    its run-time slices) read a Q/DQ pair of in_proj's range, as the
    fake-quant model quantizes query, key and value (they read float
    inputs); ORT gives the fake-quant model's output at another batch
    size too."""
    torch.manual_seed(0)
    net = _SelfAndCross(batch_first).eval()
    shape = (2, 5, 16) if batch_first else (5, 2, 16)
    x = torch.rand(shape)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        rep = squant_rs.export_onnx(
            net,
            path,
            x,
            8,
            8,
            recipe=recipe,
            quantizer=quantizer,
            batch_dim=0 if batch_first else 1,
        )
    rows = {r.name: r for r in rep.layers}
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert _float_weights(model) == []
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, count in (("a.in_proj", 1), ("c.in_proj", 2)):
        assert rows[name].act_bits == 8
        lo, hi = rows[name].act_range
        matmuls = _projection_matmuls(model, name.split(".")[0])
        assert len(matmuls) == count
        for mm in matmuls:
            dq = producers[mm.input[0]]
            assert dq.op_type == "DequantizeLinear"
            np.testing.assert_allclose(float(inits[dq.input[1]]), (hi - lo) / 255, rtol=1e-6)
    want = squant_rs.quantize_model(
        net, 8, 8, recipe=recipe, quantizer=quantizer, input_shape=tuple(x.shape)
    )
    for batch in (2, 3):
        xb = torch.rand(batch, 5, 16) if batch_first else torch.rand(5, batch, 16)
        with torch.no_grad():
            ref = want(xb).numpy()
        np.testing.assert_allclose(run(path, xb.numpy()), ref, rtol=0, atol=1e-5)


def test_attention_projection_no_layer_reads_is_left_float(tmp_path, monkeypatch):
    """Where no layer of the exported graph reads an attention's projection
    weight as an initializer (here: its Slice / Transpose views not
    followed), export_onnx quantizes again with that projection left float
    (noted, in skipped), and the graph equals quantize_model's fake-quant
    model with it skipped."""
    from squant_rs.formats.onnx import graph

    monkeypatch.setattr(graph, "_VIEW_OPS", frozenset())
    net, x, path, rep = _export_attentions(tmp_path, 4)
    names = [r.name for r in rep.layers]
    assert "0.self_attn.in_proj" in names and "0.cross.in_proj" not in names
    assert rep.skipped == ["0.cross.in_proj"]
    assert any(
        n.startswith("0.cross.in_proj: no Conv / Gemm / MatMul") and "left float" in n
        for n in rep.notes
    )
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert _float_weights(model) == ["0.cross.in_proj_weight"]
    want = squant_rs.quantize_model(net, 4, recipe="paper", skip=rep.skipped)(x)
    got = run(path, x.numpy())
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("perm", [[1, 0, 2, 3], [3, 2, 0, 1], None])
def test_conv_weight_through_a_transpose_stays_float(tmp_path, perm):
    """A Conv weight stored in another layout and read through a Transpose
    was quantized along the wrong axis (40 % of the output range off at W8)
    or written with a per-axis scale of the wrong length (ORT refused the
    model): such a Conv is left float, with a note, the others quantized."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    stored = w1.transpose(np.argsort(perm)) if perm else w1.transpose()
    w2 = rng.standard_normal((5, 4, 3, 3)).astype(np.float32)
    attrs = {} if perm is None else {"perm": perm}
    nodes = [
        helper.make_node("Transpose", ["W1s"], ["W1"], **attrs),
        helper.make_node("Conv", ["x", "W1"], ["h"], name="c1"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Conv", ["r", "W2"], ["y"], name="c2"),
    ]
    vi = helper.make_tensor_value_info
    g = helper.make_graph(
        nodes,
        "g",
        [vi("x", TensorProto.FLOAT, [1, 3, 9, 9])],
        [vi("y", TensorProto.FLOAT, [1, 5, 5, 5])],
        [numpy_helper.from_array(stored, "W1s"), numpy_helper.from_array(w2, "W2")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    out = tmp_path / "q.onnx"
    rep = squant_rs.quantize_onnx(model, out, 8)
    assert [r.name for r in rep.layers] == ["c2"]
    assert "c1" in rep.skipped
    assert any(n.startswith("c1: ") and "Transpose" in n for n in rep.notes), rep.notes
    x = rng.random((1, 3, 9, 9), dtype=np.float32)
    onnx.save(model, str(tmp_path / "m.onnx"))
    ref = run(tmp_path / "m.onnx", x)
    got = run(out, x)
    np.testing.assert_allclose(got, ref, rtol=0, atol=0.05 * np.abs(ref).max())


def test_weights_read_through_slice_and_transpose(tmp_path):
    """quantize_onnx: a weight read through Slice / Transpose nodes (with
    constant or computed starts and ends, on any axis) is the whole
    initializer, quantized along the axis the Transposes make the layer's
    output-channel axis; the Slice reads its DequantizeLinear (they were
    left float: a weight computed from initializers by a Slice node, or no
    note at all where the ends were computed)."""
    rng = np.random.default_rng(0)
    vi = helper.make_tensor_value_info
    i64 = [
        numpy_helper.from_array(np.array([v], dtype=np.int64), n)
        for n, v in [("two", 2), ("six", 6), ("zero", 0), ("one", 1)]
    ]
    nodes = [
        # columns 2:6 of W (8, 6): output channels of a MatMul weight
        helper.make_node("Slice", ["W", "two", "six", "one"], ["Ws"]),
        helper.make_node("MatMul", ["x", "Ws"], ["h"], name="cols"),
        # rows 0:(3 from the input's shape) of V (5, 4), transposed
        helper.make_node("Shape", ["x"], ["xs"], start=1, end=2),
        helper.make_node("Div", ["xs", "two"], ["n4"]),
        helper.make_node("Sub", ["n4", "one"], ["n3"]),
        helper.make_node("Slice", ["V", "zero", "n3", "zero"], ["Vs"]),
        helper.make_node("Transpose", ["Vs"], ["Vt"]),  # the default perm: reversed
        helper.make_node("MatMul", ["h", "Vt"], ["y"], name="rows"),
    ]
    W = rng.normal(size=(8, 6)).astype(np.float32)
    V = rng.normal(size=(5, 4)).astype(np.float32)
    g = helper.make_graph(
        nodes,
        "g",
        [vi("x", TensorProto.FLOAT, ["N", 8])],
        [vi("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(V, "V"), *i64],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    out = tmp_path / "q.onnx"
    rep = squant_rs.quantize_onnx(model, out, 8)
    assert [r.name for r in rep.layers] == ["cols", "rows"]
    assert rep.skipped == [] and rep.notes == []
    q = onnx.load(str(out))
    assert _float_weights(q) == []
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    deq = {}
    for name, axis, per_channel in [("W", 1, W.T), ("V", 0, V)]:
        dq = _dequantize_linear_of(q, name)
        assert [a.i for a in dq.attribute if a.name == "axis"] == [axis]
        assert [n.op_type for n in q.graph.node if dq.output[0] in n.input] == ["Slice"]
        qt = squant_rs.quantize_tensor(per_channel, 8)
        codes = inits[dq.input[0]]
        np.testing.assert_array_equal(codes.T if axis else codes, qt.codes)
        deq[name] = np.asarray(qt.dequantize())
    x = rng.random((3, 8), dtype=np.float32)
    want = x @ deq["W"].T[:, 2:6] @ deq["V"][:3].T
    np.testing.assert_allclose(run(out, x), want, rtol=0, atol=1e-5)


class _CrossAttention(torch.nn.Module):
    """A cross-attention on two inputs (query, and key = value), then a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.o = torch.nn.Linear(16, 4)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return self.o(self.a(q, kv, kv)[0])


def _run2(path, q: torch.Tensor, kv: torch.Tensor) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")  # as run()
    sess = ort.InferenceSession(str(path), so, providers=CPU)
    return sess.run(None, {"input": q.numpy(), "input1": kv.numpy()})[0]


def test_sliced_attention_projection_export_and_quantize_onnx(tmp_path):
    """A cross-attention whose query and key / value are two inputs of
    dynamic batch: export_onnx quantizes its run-time sliced in_proj_weight
    (one DequantizeLinear, axis 0, read by the Slices), and quantize_onnx
    on torch's float export of the model finds the same weight through
    the Slice / Transpose nodes and writes the same codes; both run as
    quantize_model's fake-quant model at another batch size."""
    torch.manual_seed(0)
    net = _CrossAttention().eval()
    q, kv = torch.rand(2, 5, 16), torch.rand(2, 7, 16)
    path, float_path, q_path = tmp_path / "e.onnx", tmp_path / "f.onnx", tmp_path / "q.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = squant_rs.export_onnx(net, path, (q, kv), 4, recipe="paper")
        torch.onnx.export(
            net,
            (q, kv),
            str(float_path),
            dynamo=False,
            opset_version=17,
            input_names=["input", "input1"],
            dynamic_axes={"input": {0: "batch"}, "input1": {0: "batch"}},
        )
    assert [r.name for r in rep.layers] == ["a.in_proj", "a.out_proj", "o"]
    assert rep.skipped == [] and rep.notes == []
    rep2 = squant_rs.quantize_onnx(float_path, q_path, 4)
    assert rep2.skipped == [] and [r.name for r in rep2.layers][:2] == ["/a/MatMul", "/a/MatMul_1"]
    codes = []
    for p in (path, q_path):
        model = onnx.load(str(p))
        assert _float_weights(model) == []
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        dq = _dequantize_linear_of(model, "a.in_proj_weight")
        assert [a.i for a in dq.attribute if a.name == "axis"] == [0]
        assert [n.op_type for n in model.graph.node if dq.output[0] in n.input] == ["Slice"] * 2
        codes.append([inits[t].astype(np.float32) for t in dq.input])
    for a, b in zip(*codes):
        np.testing.assert_array_equal(a, b)
    want = squant_rs.quantize_model(net, 4, recipe="paper")
    q3, kv3 = torch.rand(3, 5, 16), torch.rand(3, 7, 16)
    with torch.no_grad():
        ref = want(q3, kv3).numpy()
    for p in (path, q_path):
        np.testing.assert_allclose(_run2(p, q3, kv3), ref, rtol=0, atol=1e-5)


class _TwinAttentions(torch.nn.Module):
    """Two attentions with equal weights (b a deepcopy of a) whose query,
    key and value all differ: torch's exporter folds each projection into
    constant blocks of output channels and merges b's equal blocks into
    a's (Identity)."""

    def __init__(self) -> None:
        super().__init__()
        import copy

        self.a = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.b = copy.deepcopy(self.a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x, x + 1, x + 2, need_weights=False)[0]
        return self.b(h, x + 1, x + 2, need_weights=False)[0]


def test_equal_attention_blocks_are_all_quantized(tmp_path):
    """a's blocks were matched first and claimed b's merged blocks too, so
    b.in_proj found none, was called sliced at run time and left float."""
    torch.manual_seed(0)
    net, x = _TwinAttentions().eval(), torch.rand(2, 5, 16)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        rep = squant_rs.export_onnx(net, path, x, 4, recipe="paper")
    assert rep.skipped == [] and rep.notes == []
    assert [r.name for r in rep.layers] == ["a.in_proj", "a.out_proj", "b.in_proj", "b.out_proj"]
    assert _float_weights(onnx.load(str(path))) == []
    want = squant_rs.quantize_model(net, 4, recipe="paper")(x).detach().numpy()
    np.testing.assert_allclose(run(path, x.numpy()), want, rtol=0, atol=1e-5)


def _input_shapes(path) -> list[list[int | str]]:
    return [i.shape for i in ort.InferenceSession(str(path), providers=CPU).get_inputs()]


def _scales(path) -> list[float]:
    """The activation Q/DQ scales of an export, sorted."""
    return sorted(
        float(numpy_helper.to_array(t))
        for t in onnx.load(str(path)).graph.initializer
        if t.name.endswith("_scale") and not t.dims and "_a" in t.name
    )


def test_export_batch_dim_of_every_input(tmp_path):
    """batch_dim (default 0): that dimension of every input is the dynamic
    'batch' (only the first input's was: a two-input model ran at its
    example's batch alone). A scalar input has none and stays a scalar."""
    two = _TwoInputs().eval()
    path = tmp_path / "two.onnx"
    squant_rs.export_onnx(two, path, (torch.rand(2, 4), torch.rand(2, 4)), 8)
    assert _input_shapes(path) == [["batch", 4], ["batch", 4]]
    x, y = torch.rand(3, 4), torch.rand(3, 4)
    sess = ort.InferenceSession(str(path), providers=CPU)
    got = sess.run(None, {"input": x.numpy(), "input1": y.numpy()})[0]
    want = squant_rs.quantize_model(two, 8)(x, y).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    # per input: a sequence-first input (L, N, E) and an (N, L) weighting
    net = _SeqFirstWeighted().eval()
    squant_rs.export_onnx(net, path, (torch.rand(7, 2, 16), torch.rand(2, 7)), 8, batch_dim=(1, 0))
    assert _input_shapes(path) == [[7, "batch", 16], ["batch", 7]]
    squant_rs.export_onnx(net, path, (torch.rand(7, 2, 16), torch.rand(2, 7)), 8, batch_dim=None)
    assert _input_shapes(path) == [[7, 2, 16], [2, 7]]
    scaled = _Scaled().eval()
    squant_rs.export_onnx(scaled, path, (torch.rand(2, 4), torch.tensor(2.0)), 8)
    assert _input_shapes(path) == [["batch", 4], []]


class _SeqFirstWeighted(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * w.t().unsqueeze(-1)


class _Scaled(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * t


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_export_batch_dim_of_a_sequence_first_model(tmp_path):
    """A sequence-first transformer (L, N, E): batch_dim=1 exports N as the
    dynamic batch (batch_dim=0 named the sequence 'batch' and fixed N), and
    None fully static shapes; the calibration batch (quantize_model's, and
    the onnxruntime run's for integer_kernels) is the example's shape
    whichever dimension is symbolic: the same activation ranges."""
    from export_models import seq_first

    net = seq_first()
    x = torch.rand(7, 2, 16)
    want = squant_rs.quantize_model(net, 8, 8, recipe="paper", input_shape=tuple(x.shape))
    x3 = torch.rand(7, 3, 16)
    scales = {}
    shapes = {0: ["batch", 2, 16], 1: [7, "batch", 16], -2: [7, "batch", 16]}
    for batch_dim, shape in shapes.items():
        path = tmp_path / f"m{batch_dim}.onnx"
        squant_rs.export_onnx(net, path, x, 8, 8, recipe="paper", batch_dim=batch_dim)
        assert _input_shapes(path) == [shape]
        if batch_dim:
            got = run(path, x3.numpy())
            with torch.no_grad():
                ref = want(x3).numpy()
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    path = tmp_path / "static.onnx"
    squant_rs.export_onnx(net, path, x, 8, 8, recipe="paper", batch_dim=None)
    assert _input_shapes(path) == [[7, 2, 16]]
    with torch.no_grad():
        ref = want(x).numpy()
    np.testing.assert_allclose(run(path, x.numpy()), ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    kw = {"quantizer": "symmetric", "integer_kernels": True, "quantize_input": True}
    for batch_dim in (0, 1, None):
        path = tmp_path / f"ik{batch_dim}.onnx"
        squant_rs.export_onnx(net, path, x, 8, 8, recipe="paper", batch_dim=batch_dim, **kw)
        scales[batch_dim] = _scales(path)
        if batch_dim == 1:
            assert run(path, x3.numpy()).shape == (7, 3, 16)
    assert len(scales[0]) > 5 and scales[1] == scales[0] and scales[None] == scales[0]


def test_export_batch_dim_is_checked_first(tmp_path):
    """A batch_dim an input does not have, or of the wrong type: an error
    before any work, no output."""
    out = tmp_path / "m.onnx"
    x, t = torch.rand(2, 4), torch.tensor(2.0)
    cases = [
        (_Scaled(), (x, t), 2, squant_rs.InvalidArgumentError,
         "batch_dim 2: input 0 has 2 dimensions (shape (2, 4)), no dimension 2 to export as the "
         "batch; pass the batch dimension of each input (None for one without), e.g. "
         "batch_dim=(0, None), or batch_dim=None for static shapes"),
        (_Scaled(), (x, t), (0, 0), squant_rs.InvalidArgumentError,
         "batch_dim 0: input 1 has 0 dimensions (shape ())"),
        (_Scaled(), (x, t), (0,), squant_rs.InvalidArgumentError,
         "batch_dim gives 1 dimension for 2 inputs"),
        (torch.nn.Linear(4, 2), x, -3, squant_rs.InvalidArgumentError,
         "pass a dimension it has (e.g. batch_dim=0), or batch_dim=None for static shapes"),
        (torch.nn.Linear(4, 2), x, "1", TypeError, "batch_dim must be an integer"),
        (torch.nn.Linear(4, 2), x, True, TypeError, "got True"),
        (torch.nn.Linear(4, 2), x, 1.0, TypeError, "got 1.0"),
        (_Scaled(), (x, t), (0, "x"), TypeError, "a sequence of one integer or None per input"),
    ]  # fmt: skip
    for model, inputs, batch_dim, error, msg in cases:
        with pytest.raises(error, match=re.escape(msg)):
            squant_rs.export_onnx(model, out, inputs, 8, batch_dim=batch_dim)
        assert not out.exists()


@pytest.mark.parametrize("wbits,abits", [(4, None), (8, 8)])
def test_static_export_quantizes_a_cross_attentions_blocks(tmp_path, wbits, abits):
    """batch_dim=None: with static shapes torch's exporter folds a
    cross-attention's sliced in_proj_weight into constant blocks of output
    channels (query | key and value); each block gets its own
    DequantizeLinear of its rows of the quantized weight, nothing stays
    float, and the graph equals quantize_model's fake-quant model."""
    net, x, path, rep = _export_attentions(tmp_path, wbits, abits, batch_dim=None)
    assert rep.skipped == [] and "0.cross.in_proj" in [r.name for r in rep.layers]
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert _float_weights(model) == []
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    weights = [
        inits[n.input[0]]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and len(inits.get(n.input[0], ())) == 2
    ]
    # six layers, the cross-attention's projection in two blocks (16 + 32 rows)
    assert len(weights) == 7 and (16, 32) in weights, weights
    want = squant_rs.quantize_model(net, wbits, abits, recipe="paper", input_shape=tuple(x.shape))
    got = run(path, x.numpy())
    with torch.no_grad():
        ref = want(x).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


class _TableLookup(torch.nn.Module):
    """Integer ids indexing a parameter table (no nn.Embedding), two Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(50, 16))
        self.a = torch.nn.Linear(16, 16)
        self.b = torch.nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(self.table[ids])))


def test_calibration_errors_say_what_to_pass(tmp_path, monkeypatch):
    """A failed calibration run names what the caller can pass, in its own
    words: export_onnx's example_input (not quantize_model's input_shape=,
    which export_onnx has no way to take); for integer ids (an
    nn.Embedding, an integer example_input) that no shape helps, as U[0,1)
    noise is float: weight-only instead. One line each."""
    from export_models import token_lm

    out = tmp_path / "m.onnx"
    ids = torch.randint(0, 50, (2, 9))

    def error(call, *args, **kwargs) -> str:
        with pytest.raises(squant_rs.InvalidArgumentError) as err:
            call(*args, **kwargs)
        assert not out.exists()
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("calibration "), msg
        return msg

    msg = error(squant_rs.export_onnx, token_lm(), out, ids, 8, 8)
    assert "batch of shape (2, 9) (example_input's) failed: nn.Embedding '0' takes integer " in msg
    assert msg.endswith("which no example_input shape changes; export it weight-only (abits=None)")
    assert "input_shape" not in msg
    msg = error(squant_rs.quantize_model, token_lm(), 8, 8, input_shape=(2, 9))
    assert msg.endswith("which no input_shape= changes; quantize it weight-only (abits=None)")
    msg = error(squant_rs.export_onnx, _TableLookup(), out, ids, 8, 8, recipe="paper")
    assert "failed (IndexError: " in msg, msg
    assert "): the model (example_input is torch.int64) takes integer ids" in msg, msg
    assert "input_shape" not in msg
    # a float model the example's shape does not fit
    msg = error(squant_rs.export_onnx, _TwoLinears(), out, torch.rand(2, 9), 8, 8)
    assert msg.endswith("; pass an example_input of the shape the model takes (its input)"), msg
    msg = error(squant_rs.quantize_model, _TwoLinears(), 8, 8, input_shape=(2, 9))
    assert msg.endswith("; pass input_shape= matching the model's input"), msg

    # export_onnx(integer_kernels=True): onnxruntime's calibration run
    class Failing:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def run(self, *args, **kwargs):
            raise RuntimeError("no such kernel")

    monkeypatch.setattr(ort, "InferenceSession", Failing)
    msg = error(
        squant_rs.export_onnx,
        small(),
        out,
        torch.rand(2, 3, 12, 12),
        8,
        8,
        quantizer="symmetric",
        integer_kernels=True,
    )
    assert msg.endswith(
        "failed in onnxruntime: pass an example_input of the shape the model takes (its "
        "input) (no such kernel)"
    ), msg


class _TwoLinears(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 16)
        self.b = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("path_kind", ["export_onnx", "quantize_onnx"])
def test_integer_kernels_keep_skipped_layers_float(tmp_path, path_kind):
    """A skipped layer between quantized ones read the DequantizeLinear of
    its input and fed a QuantizeLinear: onnxruntime quantized its float
    weight itself (int8, nearest) and ran it as a QLinearConv, so the fused
    graph differed from its own QDQ graph (0.9 % of the output). It now
    reads the float tensor and stays a float Conv."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10),
    ).eval()  # fmt: skip
    x = torch.rand(4, 3, 16, 16)
    path = tmp_path / "m.onnx"
    kw = {"quantizer": "symmetric", "integer_kernels": True}
    if path_kind == "export_onnx":
        squant_rs.export_onnx(net, path, x, 8, 8, skip=["2"], **kw)
    else:
        float_export(net, x, tmp_path / "f.onnx")
        squant_rs.quantize_onnx(tmp_path / "f.onnx", path, 8, 8, skip=["/2/*"], **kw)
    fused = ort.SessionOptions()
    fused.optimized_model_filepath = str(tmp_path / "opt.onnx")
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got, want = (
        ort.InferenceSession(str(path), so, providers=CPU).run(None, {"input": x.numpy()})[0]
        for so in (fused, plain)
    )
    opt = onnx.load(str(tmp_path / "opt.onnx"))
    kinds = collections.Counter(n.op_type for n in opt.graph.node)
    # the first layer (float input) and the skipped one float, the third integer
    assert kinds["Conv"] + kinds["FusedConv"] == 2 and kinds["QLinearConv"] == 1
    assert not any(t.name.endswith("_weight_q") for t in opt.graph.initializer)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


class _AuxHead(torch.nn.Module):
    """An auxiliary head that runs in training mode only (torchvision's
    GoogLeNet / Inception v3 with their default aux_logits=True)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = torch.nn.Conv2d(3, 8, 3)
        self.bn = torch.nn.BatchNorm2d(8)
        self.aux = torch.nn.Sequential(torch.nn.Conv2d(8, 4, 1), torch.nn.BatchNorm2d(4))
        self.head = torch.nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(torch.relu(self.bn(self.c(x))))
        return y + self.aux(x.new_zeros(1, 8, 1, 1)).sum() if self.training else y


@pytest.mark.parametrize("abits", [None, 8])
def test_layers_the_exported_forward_never_runs(tmp_path, abits):
    """A layer the eval-mode forward never runs is not in the graph: the
    export failed, blaming a BatchNorm torch's exporter had folded. It is
    now left out of the report with a note, and the rest is exported."""
    torch.manual_seed(0)
    net, x = _AuxHead().eval(), torch.rand(2, 3, 12, 12)
    path = tmp_path / "m.onnx"
    rep = squant_rs.export_onnx(net, path, x, 8, abits, quantizer="symmetric", recipe="paper")
    assert [r.name for r in rep.layers] == ["c", "head"]
    assert rep.notes == [
        "aux.0: not run by the exported (eval-mode) forward (e.g. an auxiliary head used in "
        "training only), so not in the ONNX model"
    ]
    want = fake_quant(net, x, 8, abits, "symmetric")
    tol = 1e-5 if abits is None else 2e-2
    np.testing.assert_allclose(run(path, x.numpy()), want, rtol=0, atol=tol * np.abs(want).max())


class _FunctionalConv(torch.nn.Module):
    """A conv whose weight the forward reads directly (F.conv2d), with a
    BatchNorm after it that torch's exporter folds into it."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)
        with torch.no_grad():
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c0(x))
        x = torch.nn.functional.conv2d(x, self.conv.weight, self.conv.bias, padding=1)
        return self.fc(torch.relu(self.bn(x)).mean((2, 3)))


def test_a_used_layer_whose_forward_never_runs_is_not_dropped(tmp_path):
    """A layer whose forward is never called but whose weight the model
    reads (here with a BN the exporter folds in) is in the graph: it was
    dropped as 'not run' and left float silently; it is refused with the
    BN-folding explanation, as before that change."""
    torch.manual_seed(0)
    with pytest.raises(squant_rs.InvalidArgumentError, match="layer 'conv'.*folded a BatchNorm"):
        squant_rs.export_onnx(
            _FunctionalConv().eval(), tmp_path / "m.onnx", torch.rand(1, 3, 8, 8), 4
        )
    assert not (tmp_path / "m.onnx").exists()


class _SharedByCopy(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    def __deepcopy__(self, memo):  # deepcopy keeps this very module
        return self


def test_export_leaves_no_hook_when_torch_fails(tmp_path):
    """The hooks that record which layers the export runs stayed on a
    module the copy shares with the caller's model when torch's exporter
    raised."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = torch.nn.Conv2d(3, 4, 1)
            self.sh = _SharedByCopy()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.sh(self.c(x))
            if y.sum() > 0:  # data-dependent control flow: the trace goes on
                raise RuntimeError("the exporter failed")
            return y

    net = Net().eval()
    with torch.no_grad():
        net.c.bias.fill_(1.0)
    with pytest.raises(Exception, match="the exporter failed"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            squant_rs.export_onnx(net, tmp_path / "m.onnx", torch.rand(1, 3, 4, 4), 4)
    assert dict(net.sh._forward_pre_hooks) == {}


def test_integer_kernels_keep_a_skipped_identity_weight_float(tmp_path):
    """A skipped layer whose weight torch's exporter reads through an
    Identity (equal weights merged) still read the DequantizeLinear, and
    onnxruntime quantized it itself."""
    import copy

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 8, 1)
            self.a = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.b = copy.deepcopy(self.a)
            self.c = torch.nn.Conv2d(8, 8, 1)
            self.head = torch.nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.b(torch.relu(self.a(torch.relu(self.stem(x))))))
            return self.head(torch.relu(self.c(h)).mean((2, 3)))

    torch.manual_seed(0)
    path = tmp_path / "m.onnx"
    squant_rs.export_onnx(
        Net().eval(), path, torch.rand(2, 3, 8, 8), 8, 8, skip=("a", "b"),
        quantizer="symmetric", integer_kernels=True,
    )  # fmt: skip
    assert ops(path)["Identity"] == 2  # b's weight and bias
    kinds = optimized_ops(path, tmp_path)
    # stem (float input), a and b float; c and head integer
    assert kinds["QLinearConv"] == 1 and kinds["Conv"] + kinds["FusedConv"] == 3


class _AuxAndAttention(torch.nn.Module):
    """A training-only auxiliary head beside an attention, whose out_proj
    Linear is never called either (the attention reads its weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.aux = torch.nn.Linear(8, 3)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn(x, x, x, need_weights=False)[0]
        return self.aux(h) if self.training else self.head(h)


def test_unused_layer_beside_a_weight_read_directly(tmp_path):
    """Only layers missing from the graph are tested for use, one at a
    time: the attention's out_proj (not called, but read) made the whole
    group look used, and the auxiliary head was refused."""
    torch.manual_seed(0)
    net, x = _AuxAndAttention().eval(), torch.rand(2, 5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        rep = squant_rs.export_onnx(net, tmp_path / "m.onnx", x, 8, recipe="paper")
    assert [r.name for r in rep.layers] == ["attn.in_proj", "attn.out_proj", "head"]
    assert [n.split(":")[0] for n in rep.notes] == ["aux"]
    want = squant_rs.quantize_model(net, 8, recipe="paper")(x).detach().numpy()
    np.testing.assert_allclose(run(tmp_path / "m.onnx", x.numpy()), want, rtol=0, atol=1e-5)
