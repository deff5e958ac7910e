"""export_onnx (and ``squant-rs export``) on models it must copy, unwrap
or refuse: a train-mode model torch cannot deep-copy, models in
``nn.DataParallel`` / ``torch.compile`` wrappers, a parametrized bias."""

from __future__ import annotations

import logging
import re
import warnings

import numpy as np
import pytest

import squant_rs
from squant_rs.cli import main

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
nn = torch.nn


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()


def test_old_weight_norm_train_mode_export_is_a_clear_error(tmp_path) -> None:
    """A train-mode model is quantized from an eval-mode copy: a model torch
    cannot deep-copy (the old torch.nn.utils.weight_norm) raised torch's
    bare RuntimeError there; now quantize_model's clear error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old API is deprecated
        model = nn.Sequential(nn.utils.weight_norm(nn.Conv2d(3, 4, 3)), nn.Conv2d(4, 4, 1))
    assert model.training
    with pytest.raises(
        squant_rs.InvalidArgumentError, match="export_onnx .*cannot be deep-copied.*weight_norm"
    ):
        squant_rs.export_onnx(model, tmp_path / "m.onnx", torch.rand(1, 3, 8, 8))
    assert not (tmp_path / "m.onnx").exists()


class _Kept(nn.Sequential):
    """A module that ``deepcopy`` shares between copies."""

    def __deepcopy__(self, memo: dict) -> _Kept:
        return self


def test_train_mode_export_refuses_a_module_its_copy_shares(tmp_path) -> None:
    """The eval-mode copy of a train-mode model shared a module whose
    __deepcopy__ returns itself: .eval() switched the caller's module to
    eval mode (and quantize_model then overwrote its weights); now a clear
    error first, the model's modes and weights unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _Kept(nn.ReLU(), nn.Conv2d(4, 4, 1)))
    assert model.training
    w = model[1][1].weight.detach().clone()
    with pytest.raises(
        squant_rs.InvalidArgumentError,
        match="module '1' is shared between the model and its deep copy",
    ):
        squant_rs.export_onnx(model, tmp_path / "m.onnx", torch.rand(1, 3, 8, 8))
    assert all(m.training for m in model.modules())
    assert torch.equal(model[1][1].weight, w)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        # export_onnx takes recipe=None (quantize_model's default): its message says so
        ({"recipe": b"paper"}, TypeError, r"^recipe must be a string or None, got b'paper'$"),
        ({"recipe": 1}, TypeError, r"^recipe must be a string or None, got 1$"),
        ({"recipe": "Paper"}, squant_rs.InvalidArgumentError, "unknown recipe 'Paper'"),
        pytest.param(
            {"s_sigma": 10**400},
            squant_rs.InvalidArgumentError,
            "s_sigma .* too large",
            id="s_sigma=10**400",
        ),
        pytest.param(
            {"quantize_input": (-(10**400), 1.0)},
            squant_rs.InvalidArgumentError,
            "quantize_input range .* too large",
            id="quantize_input=(-10**400, 1)",
        ),
    ],
)
def test_export_argument_messages(tmp_path, kwargs, exc, match) -> None:
    with pytest.raises(exc, match=match):
        squant_rs.export_onnx(_net(), tmp_path / "m.onnx", torch.rand(1, 3, 8, 8), 8, 8, **kwargs)
    assert not (tmp_path / "m.onnx").exists()


def _compiled(model: nn.Module) -> nn.Module:
    torch._logging.set_logs(dynamo=logging.ERROR)
    return torch.compile(model)  # type: ignore[return-value]


def _compiled_inside(model: nn.Module) -> nn.Module:
    model[2] = _compiled(model[2])
    return model


WRAPPERS = {
    "dataparallel": (nn.DataParallel, "DataParallel.*model\\.module"),
    "compiled": (_compiled, "torch\\.compile.*model\\._orig_mod"),
    "compiled submodule": (
        _compiled_inside,
        "submodule '2' is wrapped in torch\\.compile.*2\\._orig_mod",
    ),
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_wrapped_model_is_refused_before_any_work(tmp_path, monkeypatch, wrapper: str) -> None:
    """nn.DataParallel and torch.compile's OptimizedModule: the whole
    quantization ran, then torch's exporter failed with its own error.
    Now refused first, naming the wrapper and what to pass instead."""
    wrap, message = WRAPPERS[wrapper]
    model = wrap(_net())
    from squant_rs.model import pipeline

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("quantize_model ran")

    monkeypatch.setattr(pipeline, "quantize_model", no_work)
    with pytest.raises(squant_rs.InvalidArgumentError, match=message):
        squant_rs.export_onnx(model, tmp_path / "m.onnx", torch.rand(1, 3, 8, 8))
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("wrapper", ["dataparallel", "compiled"])
def test_cli_export_of_a_wrapped_model_is_one_line(tmp_path, capsys, monkeypatch, wrapper) -> None:
    build = {
        "dataparallel": "torch.nn.DataParallel(net)",
        "compiled": "torch.compile(net)",
    }[wrapper]
    mod = f"wrapped_{wrapper}_mod"  # (a module name per case: imports are cached)
    (tmp_path / f"{mod}.py").write_text(
        "import torch\n"
        "def build():\n"
        "    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),\n"
        "                              torch.nn.Conv2d(4, 4, 1)).eval()\n"
        f"    return {build}\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["export", f"{mod}:build", "o.onnx", "--input-shape", "1,3,8,8"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("squant-rs: error: "), err
    assert re.search(WRAPPERS[wrapper][1], err), err
    assert not (tmp_path / "o.onnx").exists()


class _Times1(nn.Module):
    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return b * 1.0


def test_export_of_a_conv_with_a_parametrized_bias(tmp_path) -> None:
    """The BN after a conv whose bias is parametrized was 'folded' into the
    parametrization's temporary output: the exported model lost the BN's
    shift. Now that BN is not folded and the export computes the model."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)
    ).eval()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    parametrize.register_parametrization(model[0], "bias", _Times1())
    x = torch.rand(2, 3, 10, 10)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = squant_rs.export_onnx(model, path, x, wbits=8)
    assert not any(r.folded for r in report.layers)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(y - ref).max() < 0.01 * np.abs(ref).max()
