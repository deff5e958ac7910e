"""The per-layer quantization report (:class:`QuantReport`) and its table formatting."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..tensor.quantized import QuantizedTensor


@dataclass
class LayerReport:
    """One quantized weight: what it was and what quantizing it did."""

    name: str
    shape: tuple[int, ...]
    params: int
    time_ms: float
    #: ``||w_hat - w|| / ||w||`` (L2, computed in float64).
    rel_error: float
    k_flips: int
    c_flips: int
    bits: int
    kind: str = ""
    #: Activation bits of the layer's input (``None``: float input).
    act_bits: int | None = None
    #: Activation range ``(x_min, x_max)`` fixed by calibration.
    act_range: tuple[float, float] | None = None
    #: A BatchNorm was folded into this layer (recipe step ``fold_bn``).
    folded: bool = False
    #: The bias was corrected analytically (recipe step ``bias_correction``).
    bias_corrected: bool = False
    #: Where ``act_range`` came from: ``"sigma"`` (noise) or the BN
    #: statistics' path, e.g. ``"bn+relu6"``, ``"add"`` (``None``: float input).
    range_source: str | None = None
    #: Mean per-channel clipping of ``[min, max]`` (1.0: the plain range).
    clip_ratio: float = 1.0
    #: For a layer sharing its weight with an earlier layer (tied
    #: parameters): that layer's name. The weight was quantized once, there;
    #: this row repeats its result and the totals count it once.
    tied_to: str | None = None
    #: The layer's quantized weight (codes, scale, zero point), as used by
    #: the ONNX export; not part of the printed report or of comparisons.
    qtensor: QuantizedTensor | None = field(default=None, repr=False, compare=False)


@dataclass
class QuantReport:
    """Per-layer report of :func:`quantize_model` or :func:`save_quantized`.

    ``print(report)`` shows a table. ``total_ms`` is the sum of the per-layer
    quantization times, ``wall_ms`` the wall time of the whole call (copy,
    calibration, file writing included)."""

    layers: list[LayerReport]
    wbits: int
    mode: str
    abits: int | None = None
    wall_ms: float = 0.0
    #: Conv/Linear layers (or tensors) left float, by name.
    skipped: list[str] = field(default_factory=list)
    #: Bytes of the input tensors (as stored) and of the written file, for exports.
    size_before: int | None = None
    size_after: int | None = None
    #: ``"asymmetric"`` (the paper's) or ``"symmetric"``.
    quantizer: str = "asymmetric"
    #: The ``quantize_model`` recipe (``"paper"`` or ``"squant+"``).
    recipe: str = "paper"
    #: Notes on layers left float for a reason other than a skip pattern
    #: (shared weights, empty weights; in ONNX models, constant operands
    #: that are no quantizable weight).
    notes: list[str] = field(default_factory=list)

    def _distinct(self) -> list[LayerReport]:
        """One row per quantized weight (rows of tied layers left out)."""
        return [layer for layer in self.layers if layer.tied_to is None]

    @property
    def total_ms(self) -> float:
        return sum(layer.time_ms for layer in self._distinct())

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self._distinct())

    @property
    def mean_rel_error(self) -> float:
        rows = self._distinct()
        if not rows:
            return 0.0
        return sum(layer.rel_error for layer in rows) / len(rows)

    @property
    def k_flips(self) -> int:
        return sum(layer.k_flips for layer in self._distinct())

    @property
    def c_flips(self) -> int:
        return sum(layer.c_flips for layer in self._distinct())

    def summary(self) -> str:
        """One line: layers, parameters, time, mean error (and sizes)."""
        text = (
            f"{len(self._distinct())} layers, {self.params:,} parameters, W{self.wbits}"
            + (f"A{self.abits}" if self.abits is not None else "")
            + f" {self.mode}"
            + (f" {self.quantizer}" if self.quantizer != "asymmetric" else "")
            + (f" (recipe {self.recipe})" if self.recipe != "paper" else "")
            + f": {self.total_ms:.1f} ms (wall {self.wall_ms:.1f} ms), "
            f"mean relative error {self.mean_rel_error:.4f}"
        )
        if self.size_before is not None and self.size_after is not None:
            ratio = self.size_after / self.size_before if self.size_before else float("nan")
            text += (
                f", size {format_bytes(self.size_before)} -> "
                f"{format_bytes(self.size_after)} ({ratio:.3f}x)"
            )
        return text

    def __str__(self) -> str:
        headers = ["layer", "shape", "params", "time ms", "rel err", "K flips", "C flips"]
        with_act = self.abits is not None
        if with_act:
            headers += ["act", "act range"]
        with_recipe = any(
            r.folded
            or r.bias_corrected
            or r.clip_ratio != 1.0
            or r.range_source not in (None, "sigma")
            for r in self.layers
        )
        if with_recipe:
            headers += ["folded", "bias corr", "range src", "clip"]
        rows: list[list[str]] = []
        for r in self.layers:
            row = [
                (r.name or "(model)")
                + (f" (tied to {r.tied_to})" if r.tied_to is not None else ""),
                "x".join(str(d) for d in r.shape),
                f"{r.params:,}",
                f"{r.time_ms:.2f}",
                f"{r.rel_error:.4f}",
                f"{r.k_flips:,}",
                f"{r.c_flips:,}",
            ]
            if with_act:
                row.append("float" if r.act_bits is None else f"{r.act_bits} bit")
                row.append(
                    "-" if r.act_range is None else f"[{r.act_range[0]:.4g}, {r.act_range[1]:.4g}]"
                )
            if with_recipe:
                row += [
                    "yes" if r.folded else "-",
                    "yes" if r.bias_corrected else "-",
                    r.range_source or "-",
                    f"{r.clip_ratio:.3f}",
                ]
            rows.append(row)
        lines = format_table(headers, rows, right=set(range(2, 7)))
        lines.append(f"total: {self.summary()}")
        if self.skipped:
            lines.append(f"left float: {', '.join(self.skipped)}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]
) -> list[str]:
    """Plain-text table lines (columns in ``right`` right-aligned)."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def fmt(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    out = [fmt(headers), "  ".join("-" * w for w in widths)]
    out += [fmt(row) for row in rows]
    return out


def format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover
