"""The data-free ``squant+`` recipe on top of SQuant (see ``docs/recipe.md``).

Every step uses only what is already in the model (no images, no
back-propagation):

1. **BatchNorm folding** (:mod:`.fold`) before weight quantization.
2. **Analytic bias correction**: the expected input ``E[x]`` of each
   quantized layer is read from the BatchNorm in front of it (its output is
   taken as ``N(beta, gamma^2)`` per channel), pushed through the
   activation (clipped-normal mean for ReLU/ReLU6/Hardtanh), summed over
   residual adds, passed through pooling/flatten/dropout; then
   ``b -= (W_q - W) . E[x]`` per output channel (padding ignored).
3. **BN-statistics activation ranges**: per-tensor
   ``[min(0, min_c lo_c), max(0, max_c hi_c)]`` with ``lo, hi`` the clipped
   ``mu -+ n sigma`` of the same per-channel statistics. Layers whose input
   has no statistics fall back to the paper's sigma rule on noise.
4. **Weight range** (``weight_range="bn-mse"``; ``"auto"`` at 4 bits and
   below with float or 8-bit activations): per output channel, the clipping
   ``r [min, max]`` of a small grid of ``r`` that minimizes the weight error
   weighted by each input channel's variance from the same statistics
   (:func:`clip_ratios`); elsewhere the ``[min, max]`` of docs/algorithm.md.

The graph is read as ``torch.fx`` traces it (:mod:`.capture`); where
tracing fails, only folding over ``nn.Sequential`` runs and every layer
falls back to the paper's steps.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .._squant_rs import InvalidArgumentError, channel_dots, normal_cdf
from .._squant_rs import clip_ratios as _clip_ratios
from .._squant_rs import clip_rows as _clip_rows
from .activations import ActivationQuantizer, check_activation_range, check_positive_f32
from .fold import is_parametrized, is_stock

if TYPE_CHECKING:
    import torch
    import torch.fx
    from torch import nn

    from .capture import Graph as CapturedGraph
    from .capture import Node as CapturedNode

RECIPES: tuple[str, ...] = ("paper", "squant+")
ACT_RANGES: tuple[str, ...] = ("sigma", "bn")
#: ``"minmax"``: the per-channel min/max of docs/algorithm.md; ``"bn-mse"``:
#: the per-channel clipping that minimizes the weight error weighted by the
#: input channels' variances (:func:`clip_ratios`, docs/recipe.md step 4);
#: ``"auto"``: ``"bn-mse"`` where it was measured to help
#: (:func:`weight_range_for`), ``"minmax"`` elsewhere.
WEIGHT_RANGES: tuple[str, ...] = ("minmax", "bn-mse", "auto")


def default_bn_sigmas(abits: int) -> float:
    """The prototype's ``n`` for ``abits``-bit activations (4 from 6 bits up,
    3 at 5 bits, 2 below); ``bn_sigmas=None`` uses it at 8 bits."""
    if abits >= 6:
        return 4.0
    if abits == 5:
        return 3.0
    return 2.0


#: Quadrature of the standard normal used by :func:`mse_range`.
_Z = np.linspace(-6.0, 6.0, 97)
_ZW = np.exp(-0.5 * _Z * _Z) / np.exp(-0.5 * _Z * _Z).sum()
#: Widest range :func:`mse_range` considers, in sigmas, and its grid.
MSE_MAX_SIGMAS = 8.0
_FRACTIONS = np.linspace(1.0 / 40, 1.0, 40)
_BINS = 2048


def mse_range(stats: ChannelStats, bits: int) -> tuple[float, float]:
    """Per-tensor range minimizing the expected squared error of ``bits``-bit
    uniform quantization of the channels' mixture (each channel
    ``clip(N(mu_c, sigma_c^2), lo, hi)`` with equal weight), data-free.

    Candidates are ``f * [lo8, hi8]`` for 40 fractions ``f`` of the
    8-sigma range ``[lo8, hi8]`` (:meth:`ChannelStats.tensor_range`); the
    mixture is a 97-point normal quadrature per channel, binned into 2048
    bins; the error counts clipping and rounding at the bin centres (the
    mass at exactly 0, which the grid represents exactly, counts none).

    Returns:
        ``(x_min, x_max)``.
    """
    lo0, hi0 = stats.tensor_range(MSE_MAX_SIGMAS)
    if not hi0 - lo0 > 0:
        return lo0, hi0
    c = stats.mu.shape[0]
    x = np.clip(stats.mu[:, None] + stats.sigma[:, None] * _Z[None, :], stats.lo, stats.hi)
    w = np.broadcast_to(_ZW / c, x.shape)
    nonzero = x != 0
    xs, ws = x[nonzero], w[nonzero]
    idx = np.clip(((xs - lo0) * (_BINS / (hi0 - lo0))).astype(np.int64), 0, _BINS - 1)
    hist = np.bincount(idx, weights=ws, minlength=_BINS)
    centers = lo0 + (np.arange(_BINS) + 0.5) * ((hi0 - lo0) / _BINS)
    los, his = lo0 * _FRACTIONS[:, None], hi0 * _FRACTIONS[:, None]
    step = (his - los) / (2**bits - 1)
    q = np.clip(np.rint((centers[None, :] - los) / step), 0, 2**bits - 1) * step + los
    err = (np.square(q - centers[None, :]) * hist[None, :]).sum(axis=1)
    best = int(np.argmin(err))
    return float(los[best, 0]), float(his[best, 0])


@dataclass(frozen=True)
class RecipeConfig:
    """The resolved steps of one :func:`quantize_model` call."""

    name: str = "paper"
    fold_bn: bool = False
    bias_correction: bool = False
    act_ranges: str = "sigma"
    weight_range: str = "minmax"
    #: ``n`` of the BN ranges ``mu -+ n sigma``; ``None``: ``n = 4`` at 8
    #: bits, below that the range that minimizes the expected quantization
    #: error (:func:`mse_range`).
    bn_sigmas: float | None = None

    @property
    def is_paper(self) -> bool:
        return (
            not self.fold_bn
            and not self.bias_correction
            and self.act_ranges == "sigma"
            and self.weight_range == "minmax"
        )

    @property
    def needs_graph(self) -> bool:
        return self.bias_correction or self.act_ranges == "bn" or self.weight_range != "minmax"


#: What each named recipe turns on.
_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "fold_bn": False,
        "bias_correction": False,
        "act_ranges": "sigma",
        "weight_range": "minmax",
    },
    "squant+": {
        "fold_bn": True,
        "bias_correction": True,
        "act_ranges": "bn",
        "weight_range": "auto",
    },
}


def _check_bool(value: object, name: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise TypeError(f"{name} must be a bool or None, got {value!r}")


def _check_choice(
    value: object, name: str, choices: Sequence[str], optional: bool = True
) -> str | None:
    """``value``, one of ``choices``, or ``None`` where ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        kind = "a string or None" if optional else "a string"
        raise TypeError(f"{name} must be {kind}, got {value!r}")
    if value not in choices:
        raise InvalidArgumentError(f"unknown {name} {value!r}: expected one of {tuple(choices)}")
    return value


def resolve_recipe(
    recipe: object,
    *,
    fold_bn: object = None,
    bias_correction: object = None,
    act_ranges: object = None,
    weight_range: object = None,
    bn_sigmas: object = None,
) -> RecipeConfig:
    """The steps of ``recipe`` with the explicitly given switches overriding it.

    Returns:
        the resolved :class:`RecipeConfig`.

    Raises:
        TypeError: a switch of the wrong type.
        InvalidArgumentError: an unknown recipe or choice, or ``bn_sigmas``
            not a positive finite number.
    """
    name = _check_choice(recipe, "recipe", RECIPES, optional=False)
    assert name is not None  # (not optional)
    preset = dict(_PRESETS[name])
    overrides: dict[str, Any] = {
        "fold_bn": _check_bool(fold_bn, "fold_bn"),
        "bias_correction": _check_bool(bias_correction, "bias_correction"),
        "act_ranges": _check_choice(act_ranges, "act_ranges", ACT_RANGES),
        "weight_range": _check_choice(weight_range, "weight_range", WEIGHT_RANGES),
    }
    preset.update({k: v for k, v in overrides.items() if v is not None})
    n: float | None = None
    if bn_sigmas is not None:
        if isinstance(bn_sigmas, bool) or not isinstance(bn_sigmas, numbers.Real):
            raise TypeError(f"bn_sigmas must be a positive number or None, got {bn_sigmas!r}")
        n = check_positive_f32(bn_sigmas, "bn_sigmas")
    return RecipeConfig(name=name, bn_sigmas=n, **preset)


# --------------------------------------------------------------------------
# Per-channel statistics of activations (data-free)


@dataclass(frozen=True, eq=False)
class ChannelStats:
    """Per-channel model of an activation: ``clip(N(mu, sigma^2), lo, hi)``
    (``lo``/``hi`` may be infinite), as float64 arrays."""

    mu: np.ndarray
    sigma: np.ndarray
    lo: float = -math.inf
    hi: float = math.inf
    #: Where the statistics come from, e.g. ``"bn+relu6"``, ``"add"``.
    source: str = "bn"
    #: Whether a BatchNorm1d contributed: its channels are dimension 1,
    #: which a ``Linear`` reading the value takes as its features only for
    #: 2-D input (unknown to the graph), so a Linear never uses these.
    bn1d: bool = False
    #: What each dimension of the value holds, where the graph walk can
    #: tell (``None``: unknown): ``"N"`` the batch, ``"C"`` the channels,
    #: ``"S"`` a spatial dimension, ``"1"`` a dimension of size 1, ``"X"``
    #: anything else (e.g. dimensions merged). A BatchNorm2d's output is
    #: ``("N", "C", "S", "S")``. A ``Linear`` takes its input's last
    #: dimension as its features: it reads these statistics only where that
    #: is ``"C"`` (:attr:`features_last`); a Conv reads dimension 1 whatever
    #: this says. After a reshape, a last ``"C"`` holds the channels in
    #: order where its size is the channel count (the reader's feature
    #: count is checked against that: :meth:`RecipePlan.input_stats`).
    #: ``"C*"``: the channels merged with spatial dimensions of unknown
    #: size (a flatten after a fixed-kernel pool), which hold the channels
    #: in order where the size is the channel count (the spatial sizes are
    #: then 1), as for a last ``"C"``.
    layout: tuple[str, ...] | None = None

    def clipped(self, lo: float, hi: float, name: str) -> ChannelStats:
        return ChannelStats(
            self.mu,
            self.sigma,
            max(self.lo, lo),
            min(self.hi, hi),
            f"{self.source}+{name}",
            self.bn1d,
            self.layout,
        )

    @property
    def features_last(self) -> bool:
        """Whether the channels are the last dimension (what a ``Linear``
        reads as its features): :attr:`layout` ends in its one ``"C"`` or
        ``"C*"``."""
        lay = self.layout
        return lay is not None and lay[-1] in _CHANNELS and sum(t in _CHANNELS for t in lay) == 1

    def with_layout(self, layout: tuple[str, ...] | None) -> ChannelStats:
        """The same statistics with :attr:`layout` replaced (moments kept)."""
        if layout == self.layout:
            return self
        out = replace(self, layout=layout)
        if "_moments" in self.__dict__:
            object.__setattr__(out, "_moments", self.__dict__["_moments"])
        return out

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of the clipped normal, per channel
        (computed once: a residual add and the bias correction both ask)."""
        cached: tuple[np.ndarray, np.ndarray] | None = self.__dict__.get("_moments")
        if cached is None:
            if self.lo == -math.inf and self.hi == math.inf:
                cached = _unclipped_moments(self.mu, self.sigma)
            if cached is None:
                cached = clipped_normal_moments(self.mu, self.sigma, self.lo, self.hi)
            object.__setattr__(self, "_moments", cached)
        return cached

    def mean(self) -> np.ndarray:
        return self.moments()[0]

    def channel_range(self, n: float) -> tuple[np.ndarray, np.ndarray]:
        """``clip(mu - n sigma)``, ``clip(mu + n sigma)`` per channel."""
        low = np.clip(self.mu - n * self.sigma, self.lo, self.hi)
        high = np.clip(self.mu + n * self.sigma, self.lo, self.hi)
        return low, high

    def tensor_range(self, n: float) -> tuple[float, float]:
        """The per-tensor range ``[min(0, min_c lo_c), max(0, max_c hi_c)]``."""
        low, high = self.channel_range(n)
        return min(0.0, float(low.min())), max(0.0, float(high.max()))


def _ndtr(x: np.ndarray) -> np.ndarray:
    """Standard normal CDF (infinities allowed): ``0.5 * erfc(-x / sqrt(2))``
    with the C library's ``erfc`` over the whole array in the native module
    (bit for bit ``math.erfc`` per element, which it replaced; no torch op,
    whose thread pool costs milliseconds a call on a busy machine)."""
    x = np.asarray(x, dtype=np.float64)
    out: np.ndarray = normal_cdf(np.ascontiguousarray(x).reshape(-1)).reshape(x.shape)
    return out


def _phi(x: np.ndarray) -> np.ndarray:
    """Standard normal density (0 at infinities)."""
    with np.errstate(over="ignore"):
        out: np.ndarray = np.exp(-0.5 * np.square(x)) / math.sqrt(2 * math.pi)
    return out


def clipped_normal_moments(
    mu: np.ndarray, sigma: np.ndarray, lo: float | np.ndarray, hi: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of ``clip(X, lo, hi)``, ``X ~ N(mu, sigma^2)``
    per channel. With ``a = (lo - mu) / sigma``, ``b = (hi - mu) / sigma``::

        E = lo Phi(a) + mu (Phi(b) - Phi(a)) + sigma (phi(a) - phi(b)) + hi (1 - Phi(b))

    (after BN + ReLU6: ``lo = 0``, ``hi = 6``, ``mu = beta``, ``sigma = |gamma|``).
    A channel with ``sigma = 0`` is the constant ``clip(mu)``. ``lo`` and
    ``hi`` are numbers or per-channel arrays (infinities allowed), so that
    many layers' channels go through in one call; each channel's result is
    the same either way.

    Returns:
        ``(mean, std)`` as float64 arrays.
    """
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    lo_a = np.broadcast_to(np.asarray(lo, dtype=np.float64), mu.shape)
    hi_a = np.broadcast_to(np.asarray(hi, dtype=np.float64), mu.shape)
    lo_fin, hi_fin = np.isfinite(lo_a), np.isfinite(hi_a)
    flat = sigma <= 0
    s = np.where(flat, 1.0, sigma)
    with np.errstate(invalid="ignore", over="ignore"):
        a = (lo_a - mu) / s
        b = (hi_a - mu) / s
        cdf_a, cdf_b = _ndtr(a), _ndtr(b)
        pdf_a, pdf_b = _phi(a), _phi(b)
        # (each product computed once; the same operations in the same order)
        inside = cdf_b - cdf_a
        above = 1 - cdf_b
        d_pdf = pdf_a - pdf_b
        ss = s * s
        lo_term = np.where(lo_fin, lo_a * cdf_a, 0.0)
        hi_term = np.where(hi_fin, hi_a * above, 0.0)
        mean = lo_term + mu * inside + s * d_pdf + hi_term
        # E[X^2] over the three pieces (a * phi(a) is 0 at infinite a)
        a_pdf = np.where(np.isfinite(a), a * pdf_a, 0.0)
        b_pdf = np.where(np.isfinite(b), b * pdf_b, 0.0)
        second = (mu * mu + ss) * inside + 2 * mu * s * d_pdf + ss * (a_pdf - b_pdf)
        second = second + np.where(lo_fin, lo_a * lo_a * cdf_a, 0.0)
        second = second + np.where(hi_fin, hi_a * hi_a * above, 0.0)
        var = np.maximum(second - mean * mean, 0.0)
        const = np.clip(mu, lo_a, hi_a)
    return np.where(flat, const, mean), np.where(flat, 0.0, np.sqrt(var))


def _unclipped_moments(mu: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`clipped_normal_moments` with ``lo = -inf``, ``hi = inf``, bit
    for bit, without the normal CDF: there ``Phi(a) = 0``, ``Phi(b) = 1``
    and the densities are 0, so the formulas reduce to
    ``mean = 0.0 + mu`` and ``E[X^2] = mu^2 + sigma^2`` (the zero terms
    they add change no bit). ``None`` where a ``mu`` or ``sigma`` is not
    finite (the general formulas decide there)."""
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        return None
    flat = sigma <= 0
    s = np.where(flat, 1.0, sigma)
    mean = 0.0 + mu
    with np.errstate(over="ignore", invalid="ignore"):
        var = np.maximum((mu * mu + s * s) - mean * mean, 0.0)
    return np.where(flat, mu, mean), np.where(flat, 0.0, np.sqrt(var))


def compute_moments(stats: Sequence[ChannelStats]) -> None:
    """Compute (and cache) :meth:`ChannelStats.moments` of all ``stats`` in
    one vectorized call (the same values as one call each)."""
    todo = [st for st in dict.fromkeys(stats) if "_moments" not in st.__dict__]
    plain = [st for st in todo if st.lo == -math.inf and st.hi == math.inf]
    if plain:  # no clipping: the closed form (no normal CDF), all at once
        moments = _unclipped_moments(
            np.concatenate([st.mu for st in plain]), np.concatenate([st.sigma for st in plain])
        )
        if moments is not None:
            _store_moments(plain, *moments)
            todo = [st for st in todo if "_moments" not in st.__dict__]
    if not todo:
        return
    mu = np.concatenate([st.mu for st in todo])
    sigma = np.concatenate([st.sigma for st in todo])
    sizes = [st.mu.shape[0] for st in todo]
    lo = np.repeat([st.lo for st in todo], sizes)
    hi = np.repeat([st.hi for st in todo], sizes)
    _store_moments(todo, *clipped_normal_moments(mu, sigma, lo, hi))


def _pieces(a: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """``a`` cut into consecutive views of ``sizes`` (``np.split`` without
    its per-piece overhead)."""
    out: list[np.ndarray] = []
    start = 0
    for n in sizes:
        out.append(a[start : start + n])
        start += n
    return out


def _store_moments(stats: list[ChannelStats], mean: np.ndarray, std: np.ndarray) -> None:
    """Cache each of ``stats``' slice of ``mean``, ``std`` as its moments."""
    sizes = [st.mu.shape[0] for st in stats]
    for st, m, d in zip(stats, _pieces(mean, sizes), _pieces(std, sizes)):
        object.__setattr__(st, "_moments", (m, d))


def _add(a: ChannelStats, b: ChannelStats) -> ChannelStats | None:
    """Sum of two independent channel models (as a normal with the summed
    moments); ``None`` when the channel counts differ."""
    if a.mu.shape != b.mu.shape:
        return None
    ma, sa = a.moments()
    mb, sb = b.moments()
    return ChannelStats(
        ma + mb,
        np.sqrt(sa * sa + sb * sb),
        source="add",
        bn1d=a.bn1d or b.bn1d,
        layout=a.layout if a.layout == b.layout else None,
    )


# --------------------------------------------------------------------------
# Graph walk


@functools.cache
def _graph_tables() -> dict[str, Any]:
    """The module types and call targets the graph walk recognizes (built
    once: torch is imported lazily)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from .fold import _bn_types, _producer_types

    return {
        "relu": (F.relu, torch.relu, "relu", "relu_"),
        "pass_modules": (
            nn.Identity,
            nn.Dropout,
            nn.Dropout1d,
            nn.Dropout2d,
            nn.Dropout3d,
            nn.AdaptiveAvgPool1d,
            nn.AdaptiveAvgPool2d,
            nn.AdaptiveAvgPool3d,
            nn.AvgPool1d,
            nn.AvgPool2d,
            nn.AvgPool3d,
            nn.Flatten,
        ),
        "pass_targets": (
            torch.flatten,
            F.dropout,
            F.adaptive_avg_pool1d,
            F.adaptive_avg_pool2d,
            F.adaptive_avg_pool3d,
            F.avg_pool1d,
            F.avg_pool2d,
            F.avg_pool3d,
            "flatten",
            "view",
            "reshape",
            "contiguous",
            "mean",
            "squeeze",
        ),
        # passthrough ops that change the dimensions (:func:`_layout_after`)
        "flatten": (torch.flatten, "flatten"),
        "flatten_module": nn.Flatten,
        "reshape": ("view", "reshape"),
        "adaptive_pools": {
            nn.AdaptiveAvgPool1d: 1,
            nn.AdaptiveAvgPool2d: 2,
            nn.AdaptiveAvgPool3d: 3,
            F.adaptive_avg_pool1d: 1,
            F.adaptive_avg_pool2d: 2,
            F.adaptive_avg_pool3d: 3,
        },
        "pools": {
            nn.AvgPool1d: 1,
            nn.AvgPool2d: 2,
            nn.AvgPool3d: 3,
            F.avg_pool1d: 1,
            F.avg_pool2d: 2,
            F.avg_pool3d: 3,
        },
        "clamps": (nn.ReLU6, nn.ReLU, nn.Hardtanh, F.relu6, F.hardtanh),
        "dropout": F.dropout,
        # modules whose output is a new tensor (:func:`_fresh`)
        "fresh_modules": (*_producer_types(), *_bn_types()),
        # ``operator``'s in-place functions: each writes into its first argument
        "inplace_operators": (
            operator.iadd,
            operator.isub,
            operator.imul,
            operator.itruediv,
            operator.ifloordiv,
            operator.imod,
            operator.ipow,
            operator.imatmul,
            operator.iand,
            operator.ior,
            operator.ixor,
            operator.ilshift,
            operator.irshift,
            operator.setitem,
        ),
    }


def _activation_bounds(
    target: Any, node: torch.fx.Node | CapturedNode, module: Any
) -> tuple[float, float] | None:
    """Clamp bounds of an elementwise clamp-like activation, else ``None``."""
    tables = _graph_tables()
    relu6, relu, hardtanh, f_relu6, f_hardtanh = tables["clamps"]
    if module is not None:
        if not is_stock(module, (relu6, relu, hardtanh)):
            return None  # not one, or a subclass computing something else
        if isinstance(module, relu6):
            return 0.0, 6.0
        if isinstance(module, relu):
            return 0.0, math.inf
        if isinstance(module, hardtanh):
            return float(module.min_val), float(module.max_val)
        return None
    if target in tables["relu"]:
        return 0.0, math.inf
    if target is f_relu6:
        return 0.0, 6.0
    if target is f_hardtanh:
        lo = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
        hi = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
            return float(lo), float(hi)
    return None


def _is_passthrough(node: Any, target: Any, module: Any) -> bool:
    """Ops that keep each channel's values' distribution range and mean
    (dropout in eval, identity, average pooling, flatten/view/reshape),
    with arguments that do: an average pool that divides by the number of
    values it sums (no ``divisor_override``, no zero padding counted in
    the average: ``count_include_pad`` with padding), a functional dropout
    with ``training=False`` (its default ``True`` drops and rescales)."""
    tables = _graph_tables()
    if module is not None:
        if not is_stock(module, tables["pass_modules"]):
            return False
    elif target not in tables["pass_targets"]:
        return False
    adaptive, k = _pool_dims(target, module)
    if k and not adaptive:
        if module is not None:
            padding, count = module.padding, module.count_include_pad
            divisor = getattr(module, "divisor_override", None)  # AvgPool1d has none
        else:
            padding = _arg(node, 3, "padding", 0)
            count = _arg(node, 5, "count_include_pad", True)
            divisor = _arg(node, 6, "divisor_override", None)
        pads = padding if isinstance(padding, (tuple, list)) else [padding]
        no_padding = all(type(p) is int and p == 0 for p in pads)
        return divisor is None and (no_padding or (type(count) is bool and not count))
    if module is None and target is tables["dropout"]:
        p, training = _arg(node, 1, "p", 0.5), _arg(node, 2, "training", True)
        return (type(training) is bool and not training) or (type(p) in (int, float) and p == 0)
    return True


@functools.cache
def _inplace_position(target: Any) -> int | None:
    """The position of ``target``'s ``inplace`` parameter where it can be
    passed positionally (``F.relu(x, True)``), else ``None``."""
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):  # no signature (a builtin such as torch.relu_)
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for i, p in enumerate(params):
        if p.name == "inplace":
            return i if p.kind in positional else None
    return None


def _written(node: Any, module: Any) -> list[Any]:
    """The graph values ``node``'s op writes into: its first argument for
    an in-place op (a Tensor method or function named with a trailing
    ``_`` (``y.mul_(10)``, ``torch.relu_``), ``operator.iadd`` and the
    like, a true ``inplace`` argument (``F.relu(x, inplace=True)``) or
    module attribute (``nn.ReLU(inplace=True)``)), and its ``out=``
    argument(s). An argument that is itself a graph value counts as true."""

    def true(v: Any) -> bool:
        return hasattr(v, "op") or (type(v) in (bool, int) and v != 0)

    into: list[Any] = []
    if "out" in node.kwargs:
        out = node.kwargs["out"]
        into = [v for v in (out if isinstance(out, (tuple, list)) else [out]) if hasattr(v, "op")]
    first = node.args[0] if node.args else None
    if not hasattr(first, "op"):
        return into
    if node.op == "call_module":
        inplace = true(module.__dict__.get("inplace", False))  # nn.ReLU(inplace=True)
    else:
        target = node.target
        name = target if node.op == "call_method" else getattr(target, "__name__", None)
        inplace = (isinstance(name, str) and name.endswith("_") and not name.endswith("__")) or (
            node.op == "call_function" and target in _graph_tables()["inplace_operators"]
        )
        if not inplace and "inplace" in node.kwargs:
            inplace = true(node.kwargs["inplace"])
        elif not inplace and node.op == "call_function":
            try:
                i = _inplace_position(target)
            except TypeError:  # an unhashable target
                i = None
            inplace = i is not None and len(node.args) > i and true(node.args[i])
    return [first, *into] if inplace else into


def _fresh(node: Any, module: Any) -> bool:
    """Whether ``node``'s op, writing into none of its arguments, returns
    a new tensor among those :func:`analyze` models: a Conv, Linear or
    BatchNorm module, a clamp, an add, an average pool, a mean (views such
    as ``view`` or ``flatten``, identity and dropout may return their
    input's memory)."""
    target = node.target
    if module is not None:
        if is_stock(module, _graph_tables()["fresh_modules"]):
            return True
    elif (node.op == "call_method" and target in ("add", "mean")) or (
        node.op == "call_function" and target is operator.add
    ):
        return True
    if _activation_bounds(target, node, module) is not None:
        return True
    if not _pool_dims(target, module)[1]:
        return False
    return module is None or is_stock(module, _graph_tables()["pass_modules"])


def _storage(
    nodes: Any, modules: dict[str, nn.Module]
) -> tuple[dict[Any, int], dict[Any, Any], dict[Any, list[int]]]:
    """Which node's memory each graph value may be (part of), and where the
    ops that write into memory run, for :func:`analyze` to tell a value
    that an in-place op changed after it was computed. Returns
    ``(position, root, writes)``: each node's position in ``nodes``; the
    node whose output's memory it may share (itself for a new tensor
    (:func:`_fresh`, a placeholder, an attribute); an in-place op's output
    is what it wrote into; anything else may be a view of its first
    argument: the assumption that errs on the safe side); per such root,
    the positions of the ops that write into it (:func:`_written`)."""
    position: dict[Any, int] = {}
    root: dict[Any, Any] = {}
    writes: dict[Any, list[int]] = {}
    for i, node in enumerate(nodes):
        position[node] = i
        root[node] = node
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        module = modules[str(node.target)] if node.op == "call_module" else None
        into = _written(node, module)
        for v in into:
            writes.setdefault(root[v], []).append(i)
        first = node.args[0] if node.args else None
        if into:
            root[node] = root[into[-1]]
        elif hasattr(first, "op") and not _fresh(node, module):
            root[node] = root[first]
    return position, root, writes


#: The layout tokens that hold the channels (:attr:`ChannelStats.layout`).
_CHANNELS = ("C", "C*")

#: :func:`_layout_after`'s answer where the op averages the channels
#: together (their statistics no longer describe any dimension).
_GONE = ("gone",)


def _dims(value: Any, rank: int) -> list[int] | None:
    """``value`` (an int or a sequence of ints, negative ones counted from
    the end) as dimensions of a ``rank``-dimensional value, or ``None``
    where one is not a plain int or is out of range."""
    items = list(value) if isinstance(value, (tuple, list)) else [value]
    out: list[int] = []
    for d in items:
        if type(d) is not int or not -rank <= d < rank:
            return None
        out.append(d % rank)
    return out


def _arg(node: Any, i: int, name: str, default: Any) -> Any:
    """Argument ``i`` (positional, the input at 0) or ``name`` of a call."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _merged(tokens: Sequence[str]) -> str:
    """The token of dimensions merged into one: ``"1"`` if all are, the one
    other token if only one is not, ``"C*"`` for the channels and spatial
    dimensions, else ``"X"``."""
    rest = [t for t in tokens if t != "1"]
    if not rest:
        return "1"
    if len(rest) == 1:
        return rest[0]
    if sum(t in _CHANNELS for t in rest) == 1 and all(t in (*_CHANNELS, "S") for t in rest):
        return "C*"
    return "X"


def _layout_after(
    node: Any,
    target: Any,
    module: Any,
    layout: tuple[str, ...] | None,
    stats: dict[Any, ChannelStats | None] | None = None,
) -> tuple[str, ...] | None:
    """:attr:`ChannelStats.layout` after a passthrough op (``module`` or
    call ``target``): ``None`` where it cannot be shown (a ``Linear`` then
    reads no statistics), :data:`_GONE` where the op averages over the
    channels. Flatten, view / reshape, squeeze, mean and the pools are
    followed (dimensions as plain ints only); identity, dropout and
    ``contiguous`` keep the layout. ``stats``: the walk's statistics so
    far, by node (:func:`_reshaped` reads their layouts)."""
    if layout is None:
        return None
    tables = _graph_tables()
    rank = len(layout)
    adaptive, k = _pool_dims(target, module)
    if k:
        if rank < k + 1 or any(t in ("N", *_CHANNELS) for t in layout[-k:]):
            return None
        if not adaptive:
            return layout[:-k] + ("S",) * k
        size = module.output_size if module is not None else _arg(node, 1, "output_size", 0)
        sizes = list(size) if isinstance(size, (tuple, list)) else [size] * k
        if len(sizes) != k:
            return None
        kept = [
            old if n is None else ("1" if type(n) is int and n == 1 else "S")
            for old, n in zip(layout[-k:], sizes)
        ]
        return layout[:-k] + tuple(kept)
    if module is not None:
        if isinstance(module, tables["flatten_module"]):
            start, end = module.start_dim, module.end_dim
        else:
            return layout  # identity, dropout
    elif target in tables["flatten"]:
        start, end = _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
    elif target in tables["reshape"]:
        return _reshaped(node, layout, stats or {})
    elif target == "mean":
        dim = _arg(node, 1, "dim", None)
        if dim is None:
            return _GONE  # every element averaged together
        keep = _arg(node, 2, "keepdim", False)
        dims = _dims(dim, rank)
        if dims is None or type(keep) is not bool:
            return None
        if any(layout[d] in _CHANNELS for d in dims):
            return _GONE
        if keep:
            return tuple("1" if d in dims else t for d, t in enumerate(layout))
        return tuple(t for d, t in enumerate(layout) if d not in dims)
    elif target == "squeeze":
        dim = _arg(node, 1, "dim", None)
        if dim is None:  # every size-1 dimension: more than the "1"s where a size is 1
            rest = tuple(t for t in layout if t != "1")
            return rest if rest in (("N", "C"), ("C",), ("N", "C*"), ("C*",)) else None
        dims = _dims(dim, rank)
        if dims is None or any(layout[d] != "1" for d in dims):
            return None  # a dimension that may or may not be removed
        return tuple(t for d, t in enumerate(layout) if d not in dims)
    else:
        return layout  # contiguous, dropout
    dims = _dims([start, end], rank)
    if dims is None or dims[0] > dims[1]:
        return None
    a, b = dims
    return layout[:a] + (_merged(layout[a : b + 1]),) + layout[b + 1 :]


def _pool_dims(target: Any, module: Any) -> tuple[bool, int]:
    """``(adaptive, k)`` of a ``k``-d average pool (module or function),
    ``k = 0`` for anything else."""
    tables = _graph_tables()
    for adaptive in (True, False):
        for key, k in tables["adaptive_pools" if adaptive else "pools"].items():
            if module is None and target is key:
                return adaptive, k
            if module is not None and isinstance(key, type) and isinstance(module, key):
                return adaptive, k
    return False, 0


def _reshaped(
    node: Any, layout: tuple[str, ...], stats: dict[Any, ChannelStats | None]
) -> tuple[str, ...] | None:
    """The layout after ``view`` / ``reshape``: known only for a value that
    holds its samples' channels one after the other (every dimension but
    the batch and the channels of size 1): its last dimension then holds
    the channels in order wherever its size is the channel count (a
    ``Linear`` reading it has that many features, which
    :meth:`RecipePlan.input_stats` checks), e.g. ``x.view(x.size(0), -1)``
    after a global pool. A value that also has spatial dimensions of
    unknown size (after a fixed-kernel pool) only as ``(batch size, -1)``
    (``x.view(x.size(0), -1)``, ``x.reshape(x.shape[0], -1)``, ``x`` the
    value or one it was computed from with the batch as dimension 0
    throughout: :func:`_batch_size_of`): each sample's channels and
    positions, channel-major (``"C*"``)."""
    rest = tuple(t for t in layout if t != "1")
    shape: tuple[Any, ...] = node.args[1:] or (node.kwargs.get("shape", node.kwargs.get("size")),)
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    if rest not in (("N", "C"), ("C",)):
        spatial = rest[:1] == ("N",) and _merged(rest[1:]) == "C*"
        per_sample = len(shape) == 2 and shape[1] == -1 and _batch_size_of(shape[0], node, stats)
        if spatial and per_sample:
            return ("N", "C*")
        return None
    if len(shape) == 1 and type(shape[0]) is not int:
        return None  # e.g. a shape computed in the graph: its length is unknown
    if not shape or any(d is None or isinstance(d, (tuple, list)) for d in shape):
        return None
    return ("X",) * (len(shape) - 1) + ("C",)


def _batch_size_of(d: Any, node: Any, stats: dict[Any, ChannelStats | None]) -> bool:
    """Whether graph value ``d`` is the batch size of ``node``'s input:
    dimension 0 (``x.size(0)``, ``x.shape[0]``, ``x.size()[0]``) of that
    input or of a value it was computed from (through first arguments)
    where every value on the way has statistics with the batch as
    dimension 0 (a BatchNorm's output, pooled, clamped, ...)."""
    tensor = None
    if getattr(d, "op", None) == "call_method" and d.target == "size":
        if tuple(d.args[1:]) == (0,) or (len(d.args) == 1 and d.kwargs.get("dim") == 0):
            tensor = d.args[0]
    elif getattr(d, "op", None) == "call_function" and d.target is operator.getitem:
        src, index = d.args[0], d.args[1]
        if type(index) is int and index == 0:
            whole_size = getattr(src, "op", None) == "call_method" and src.target == "size"
            shape = (
                getattr(src, "op", None) == "call_function"
                and src.target is getattr
                and src.args[1:] == ("shape",)
            )
            if (whole_size and len(src.args) == 1 and not src.kwargs) or shape:
                tensor = src.args[0]
    if tensor is None:
        return False
    value = node.args[0]
    while True:
        st = stats.get(value)
        if st is None or st.layout is None or st.layout[:1] != ("N",):
            return False
        if value is tensor:
            return True
        value = value.args[0] if value.args and hasattr(value.args[0], "op") else None


def analyze(
    model: nn.Module,
    graph: torch.fx.Graph | CapturedGraph,
    modules: dict[str, nn.Module] | None = None,
) -> dict[str, ChannelStats | None]:
    """Per call_module node name of a Conv/Linear layer: the statistics of
    its (first) input, or ``None`` where they are not known. Read from the
    model's BatchNorms (call before folding): those that run torch's own
    BatchNorm (:func:`~squant_rs.model.fold.is_stock`) and whose channel
    axis is the reader's (a BatchNorm1d fed by a Linear is no source, and
    a Linear never reads a BatchNorm1d's statistics: see
    :attr:`ChannelStats.bn1d`). A value that an op wrote into after it was
    computed (an in-place op on it or on a value that may share its
    memory, :func:`_storage`) has none for the nodes that read it after
    that write, nor has any value computed from it."""
    from torch import nn

    from .fold import _bn_types, _producer_types

    layers = _producer_types()
    bns = _bn_types()
    linear = nn.Linear
    if modules is None:
        modules = dict(model.named_modules())
    stats: dict[Any, ChannelStats | None] = {}
    out: dict[str, ChannelStats | None] = {}
    counts: dict[str, int] = {}
    position, root, writes = _storage(graph.nodes, modules)

    def read(a: Any, node: Any) -> ChannelStats | None:
        """The statistics of value ``a`` as ``node`` reads it: none where
        an op wrote into its memory since it was computed."""
        st = stats.get(a) if hasattr(a, "op") else None
        if st is None:
            return None
        at = position[node]
        return None if any(position[a] < w < at for w in writes.get(root[a], ())) else st

    def arg_stats(node: Any) -> ChannelStats | None:
        return read(node.args[0], node) if node.args else None

    called = [modules[str(n.target)] for n in graph.nodes if n.op == "call_module"]
    bn_stats = _bn_stats_many([m for m in called if isinstance(m, bns)])
    for node in graph.nodes:
        module: Any = None
        if node.op == "call_module":
            module = modules[str(node.target)]
            if isinstance(module, layers):
                name = str(node.target)
                counts[name] = counts.get(name, 0) + 1
                st = arg_stats(node)
                # A Linear takes its input's last dimension as its features:
                # never a BatchNorm1d's channels, nor those of a value whose
                # last dimension is not shown to be the channels.
                out[name] = (
                    None
                    if st is not None
                    and (st.bn1d or not st.features_last)
                    and isinstance(module, linear)
                    else st
                )
                stats[node] = None
                continue
            if isinstance(module, bns):
                st = bn_stats[id(module)]
                if st is not None and st.bn1d:
                    src: Any = node.args[0] if node.args else None
                    if getattr(src, "op", None) == "call_module" and isinstance(
                        modules[str(src.target)], linear
                    ):
                        st = None  # which axis it normalizes is unknown
                stats[node] = st if is_stock(module, bns) else None
                continue
        elif node.op not in ("call_function", "call_method"):
            stats[node] = None
            continue
        target = node.target
        src = arg_stats(node)
        if (
            node.op == "call_function"
            and target in (operator.add, operator.iadd)
            or (node.op == "call_method" and target in ("add", "add_"))
        ):
            a, b = (node.args + (None, None))[:2]
            alpha = node.kwargs.get("alpha", 1)  # a.add(b, alpha=k) is a + k b
            plain = len(node.args) == 2 and type(alpha) in (int, float) and alpha == 1
            known = plain and set(node.kwargs) <= {"alpha"}
            sa, sb = (read(a, node), read(b, node)) if known else (None, None)
            stats[node] = _add(sa, sb) if sa is not None and sb is not None else None
            continue
        bounds = _activation_bounds(target, node, module)
        if bounds is not None:
            label = type(module).__name__.lower() if module is not None else str(target)
            label = getattr(target, "__name__", label) if module is None else label
            stats[node] = src.clipped(bounds[0], bounds[1], label) if src is not None else None
            continue
        if isinstance(module, nn.Module) and not _is_passthrough(node, target, module):
            stats[node] = None
            continue
        if src is None or not _is_passthrough(node, target, module):
            stats[node] = None
            continue
        layout = _layout_after(node, target, module, src.layout, stats)
        stats[node] = None if layout is _GONE else src.with_layout(layout)
    # a layer called more than once has no single input
    return {k: (v if counts[k] == 1 else None) for k, v in out.items()}


def _bn_layout(bn: Any) -> tuple[str, ...] | None:
    """A BatchNorm2d/3d's output: batch, channels, 2 or 3 spatial
    dimensions (BatchNorm1d's input is 2-D or 3-D: unknown)."""
    from torch import nn

    if isinstance(bn, nn.BatchNorm2d):
        return ("N", "C", "S", "S")
    if isinstance(bn, nn.BatchNorm3d):
        return ("N", "C", "S", "S", "S")
    return None


def _bn_stats(bn: Any) -> ChannelStats | None:
    from .fold import _vector

    if bn.running_mean is None:
        return None
    from torch import nn

    n = bn.num_features
    gamma = _vector(bn.weight, n, 1.0)
    beta = _vector(bn.bias, n, 0.0)
    bn1d = isinstance(bn, nn.BatchNorm1d)
    return ChannelStats(beta, np.abs(gamma), source="bn", bn1d=bn1d, layout=_bn_layout(bn))


def _bn_stats_many(bns: Sequence[Any]) -> dict[int, ChannelStats | None]:
    """:func:`_bn_stats` of every BN by ``id`` (the vectors of all of them
    joined by one ``torch.cat``: the same values)."""
    from .fold import _vectors

    out: dict[int, ChannelStats | None] = {id(bn): None for bn in bns}
    todo = list({id(bn): bn for bn in bns if bn.running_mean is not None}.values())
    if not todo:
        return out
    sizes = [int(bn.num_features) for bn in todo]
    both = _vectors(
        [bn.weight for bn in todo] + [bn.bias for bn in todo],
        sizes * 2,
        [1.0] * len(todo) + [0.0] * len(todo),
    )
    c = sum(sizes)
    beta_all, sigma_all = both[c:], np.abs(both[:c])
    # Their moments too (no clipping: the closed form; residual adds read them)
    moments = _unclipped_moments(beta_all, sigma_all)
    betas, sigmas = _pieces(beta_all, sizes), _pieces(sigma_all, sizes)
    means, stds = (_pieces(moments[0], sizes), _pieces(moments[1], sizes)) if moments else ([], [])
    from torch import nn

    for i, bn in enumerate(todo):
        bn1d = isinstance(bn, nn.BatchNorm1d)
        st = ChannelStats(betas[i], sigmas[i], source="bn", bn1d=bn1d, layout=_bn_layout(bn))
        if moments is not None:
            object.__setattr__(st, "_moments", (means[i], stds[i]))
        out[id(bn)] = st
    return out


def execution_order(graph: torch.fx.Graph | CapturedGraph, names: Sequence[str]) -> list[str]:
    """``names`` in the order the graph first calls them (missing ones dropped)."""
    wanted = set(names)
    order: list[str] = []
    for node in graph.nodes:
        if node.op == "call_module" and str(node.target) in wanted and node.target not in order:
            order.append(str(node.target))
    return order


# --------------------------------------------------------------------------
# The steps on one layer


@functools.cache
def _linear() -> type[Any]:
    from torch import nn

    return nn.Linear


def input_channels(module: Any) -> int:
    return int(module.in_features if isinstance(module, _linear()) else module.in_channels)


def _kernel_sums(w: torch.Tensor | np.ndarray) -> np.ndarray:
    """``w`` summed over its kernel positions in its own dtype, as an
    ``(OC, IC/groups)`` numpy array. A 1x1 kernel or Linear weight on the
    CPU is returned as it is (a view: no torch op, whose thread pool costs
    milliseconds a call on a busy machine); larger kernels are summed by
    torch (a few thousand additions for a depthwise layer)."""
    import torch

    t = torch.from_numpy(w) if isinstance(w, np.ndarray) else w.detach()
    oc, icg = int(t.shape[0]), int(t.shape[1])
    k = t.numel() // max(1, oc * icg)
    if k == 1 and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        return np.asarray(t.numpy()).reshape(oc, icg)
    out: np.ndarray = t.reshape(oc, icg, -1).sum(dim=2).cpu().double().numpy()
    return out


def channel_dot(module: Any, w: torch.Tensor | np.ndarray, vec: np.ndarray) -> np.ndarray:
    """``W . vec`` per output channel (float64): summed over kernel positions
    (padding ignored); grouped/depthwise convs use their group's input
    channels of ``vec``. The kernel sums are in the weight's dtype, the
    products and the sum over input channels in float64 (one single-threaded
    ``einsum``: no BLAS thread pool)."""
    per_in = _kernel_sums(w)
    oc, icg = per_in.shape
    e = np.asarray(vec, dtype=np.float64)
    groups = 1 if isinstance(module, _linear()) else int(module.groups)
    if groups == 1:
        out: np.ndarray = np.einsum("oi,i->o", per_in, e, dtype=np.float64)
        return out
    if icg == 1:
        # depthwise: one product per output channel; "+ 0.0" as einsum's
        # sum into its zeroed output (a -0.0 product gives 0.0): the same bits
        g1 = per_in.reshape(groups, oc // groups).astype(np.float64, copy=False)
        out = (g1 * e.reshape(groups, 1) + 0.0).reshape(oc)
        return out
    # (groups, OC/groups, IC/groups) against (groups, IC/groups)
    g = per_in.reshape(groups, oc // groups, icg)
    out = np.einsum("goi,gi->go", g, e.reshape(groups, icg), dtype=np.float64).reshape(oc)
    return out


def bias_shift(module: Any, delta_w: torch.Tensor | np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``(W_q - W) . E[x]`` per output channel (float64), ``delta_w = W_q - W``."""
    return channel_dot(module, delta_w, mean)


def expected_quantized(stats: ChannelStats, q: ActivationQuantizer) -> np.ndarray:
    """``E[Q(x)]`` per channel for ``x`` of the model ``stats`` and the
    activation quantizer ``q`` (grid ``(k + z) / s``, ``k`` in ``[qmin, qmax]``).

    A channel whose ``sigma`` is at least two grid steps has a rounding
    error of mean ~0, so its ``E[Q(x)]`` is the clipped-normal mean with the
    grid's end points as extra clip bounds. For the narrower channels each
    level within 17 steps of the channel's mean takes the probability mass
    that rounds to it (normal CDF differences at the level midpoints).
    """
    return expected_quantized_many([(stats, q)])[0]


def expected_quantized_many(
    pairs: Sequence[tuple[ChannelStats, ActivationQuantizer]],
) -> list[np.ndarray]:
    """:func:`expected_quantized` of every ``(stats, quantizer)`` pair, in
    one vectorized pass over all their channels (each channel's value is the
    same as alone)."""
    if not pairs:
        return []
    sizes = [st.mu.shape[0] for st, _ in pairs]

    def per_channel(values: Sequence[float]) -> np.ndarray:
        return np.repeat(np.asarray(values, dtype=np.float64), sizes)

    for _, q in pairs:
        assert q.scale is not None and q.zero_point is not None
    s_l = [float(q.scale) for _, q in pairs]  # type: ignore[arg-type]
    z_l = [float(q.zero_point) for _, q in pairs]  # type: ignore[arg-type]
    g_lo = [(q.qmin + z) / s for (_, q), s, z in zip(pairs, s_l, z_l)]
    g_hi = [(q.qmax + z) / s for (_, q), s, z in zip(pairs, s_l, z_l)]
    lo_l = [max(st.lo, a) for (st, _), a in zip(pairs, g_lo)]
    hi_l = [min(st.hi, b) for (st, _), b in zip(pairs, g_hi)]
    mu = np.concatenate([st.mu for st, _ in pairs])
    sigma = np.concatenate([st.sigma for st, _ in pairs])
    s, z = per_channel(s_l), per_channel(z_l)
    qmin, qmax = per_channel([q.qmin for _, q in pairs]), per_channel([q.qmax for _, q in pairs])
    slo, shi = per_channel([st.lo for st, _ in pairs]), per_channel([st.hi for st, _ in pairs])
    lo, hi = per_channel(lo_l), per_channel(hi_l)
    ok = lo < hi
    mean, _ = clipped_normal_moments(mu, sigma, np.where(ok, lo, 0.0), np.where(ok, hi, 1.0))
    out = np.where(ok, mean, lo)
    narrow = sigma < 2.0 / s
    if narrow.any():
        m, sg = mu[narrow][:, None], np.maximum(sigma[narrow], 1e-30)[:, None]
        sn, zn = s[narrow][:, None], z[narrow][:, None]
        qmn, qmx = qmin[narrow][:, None], qmax[narrow][:, None]
        lo_n, hi_n = slo[narrow][:, None], shi[narrow][:, None]
        center = np.clip(np.rint(np.clip(m, lo_n, hi_n) * sn - zn), qmn, qmx)
        ks = center + np.arange(-17, 18)[None, :]
        valid = (ks >= qmn) & (ks <= qmx)
        upper = np.where(ks >= qmx, np.inf, (ks + 0.5 + zn) / sn)
        lower = np.where(ks <= qmn, -np.inf, (ks - 0.5 + zn) / sn)

        def cdf(e: np.ndarray) -> np.ndarray:
            c = _ndtr((e - m) / sg)
            return np.where(e < lo_n, 0.0, np.where(e >= hi_n, 1.0, c))

        p = np.where(valid, cdf(upper) - cdf(lower), 0.0)
        out[narrow] = (p * ((ks + zn) / sn)).sum(axis=1)
    return _pieces(out, sizes)


def _difference(w_hat: torch.Tensor, w_float: torch.Tensor) -> torch.Tensor | np.ndarray:
    """``w_hat - w_float`` in the weights' dtype (numpy for CPU float32/64:
    the same correctly rounded differences, without torch's thread pool)."""
    import torch

    a, b = w_hat.detach(), w_float.detach()
    if (
        a.device.type == "cpu"
        and b.device.type == "cpu"
        and a.dtype == b.dtype
        and a.dtype in (torch.float32, torch.float64)
    ):
        out: np.ndarray = np.subtract(a.numpy(), b.numpy())
        return out
    return a - b


def correct_bias(module: Any, w_float: torch.Tensor, w_hat: torch.Tensor, mean: np.ndarray) -> None:
    """``b -= (W_q - W) . E[x]`` in place (a zero bias is added where the
    layer has none)."""
    shift_bias(module, bias_shift(module, _difference(w_hat, w_float), mean), w_hat)


def shift_bias(module: Any, shift: np.ndarray, like: torch.Tensor) -> None:
    """``b -= shift`` in place (a bias is added where the layer has none)."""
    import torch
    from torch import nn

    with torch.no_grad():
        if module.bias is None:
            t = torch.from_numpy(-shift).to(device=like.device, dtype=like.dtype)
            module.bias = nn.Parameter(t, requires_grad=module.weight.requires_grad)
            return
        b = module.bias
        d = b.detach()
        if d.device.type == "cpu" and d.dtype in (torch.float32, torch.float64):
            host = d.numpy()  # float64 difference, rounded once to the bias dtype
            host[...] = (host.astype(np.float64) - shift).astype(host.dtype)
        else:
            new = d.cpu().double().numpy() - shift
            b.copy_(torch.from_numpy(new).to(b.dtype))


def fix_range(
    q: ActivationQuantizer,
    x_min: float,
    x_max: float,
    bits: int,
    cause: str = "the BatchNorm statistics",
) -> None:
    """Give ``q`` the range ``[x_min, x_max]`` at ``bits`` (the affine
    scheme of docs/algorithm.md section 5).

    Raises:
        InvalidArgumentError: the range or its scale does not fit float32
            (the message names the layer and ``cause``); ``q`` is unchanged.
    """
    qparams = check_activation_range(q.name, float(x_min), float(x_max), bits, cause)
    q.bits = bits
    q.signed = x_min < 0
    q.x_min, q.x_max = float(x_min), float(x_max)
    q.scale, q.zero_point, q.qmin, q.qmax = qparams


@dataclass
class RecipePlan:
    """What the graph analysis found for one model (before quantization)."""

    config: RecipeConfig
    #: Input statistics per layer name (``None``: not known).
    stats: dict[str, ChannelStats | None] = field(default_factory=dict)
    #: Layer names that absorbed a BatchNorm.
    folded: set[str] = field(default_factory=set)
    #: ``id`` of each module that absorbed a BatchNorm.
    folded_modules: set[int] = field(default_factory=set)
    #: Layer names in execution order (empty where tracing failed), the
    #: ``nn.MultiheadAttention`` modules' names among them (``quantize_model``
    #: renames one whose ``in_proj`` input quantizer it hooks on the
    #: attention to that layer's name, ``<attention>.in_proj``).
    order: list[str] = field(default_factory=list)
    #: Names of the attentions whose separate input projections
    #: (``q_proj``...) are quantized: they count as layers for the first /
    #: last layer rules (their inputs stay float; set by ``quantize_model``).
    markers: set[str] = field(default_factory=set)
    traced: bool = False
    #: Every module the traced graph calls as one node (``call_module``
    #: targets): a layer inside one of them runs at a time the graph does
    #: not show (:meth:`order_covers`).
    called: set[str] = field(default_factory=set)
    #: Where each layer's activation range came from (``"bn+relu6"``, ...;
    #: layers absent here use the sigma rule on noise).
    range_sources: dict[str, str] = field(default_factory=dict)
    #: ``E[Q(x)]`` per layer name (:func:`prepare_bias_correction`).
    expected_q: dict[str, np.ndarray] = field(default_factory=dict)
    #: The bias shift per layer name (:func:`compute_bias_shifts`), taken
    #: by :func:`apply_bias_correction`.
    shifts: dict[str, np.ndarray] = field(default_factory=dict)

    #: ``id`` of every parameter more than one module holds, or that the
    #: traced forward also reads directly (found where bias correction
    #: runs): a bias among them is not corrected, since the shift would
    #: change the other modules or reads too.
    shared: set[int] = field(default_factory=set)

    def order_covers(self, names: Sequence[str]) -> bool:
        """Whether :attr:`order` says when each of ``names`` first runs:
        not where the trace failed, nor where one of them runs inside a
        module the graph calls as one node (e.g. a ``torch.nn``
        container such as ``nn.TransformerEncoderLayer``, whose inner
        Linears the graph never shows). A layer the graph calls neither
        itself nor through such a module does not run in the traced
        forward."""
        if not self.traced:
            return False
        known = set(self.order)
        for name in names:
            if name in known:
                continue
            parts = name.split(".")
            if any(".".join(parts[:i]) in self.called for i in range(1, len(parts))):
                return False
        return True

    def input_stats(self, name: str, module: Any) -> ChannelStats | None:
        s = self.stats.get(name)
        if s is None or s.mu.shape != (input_channels(module),):
            return None
        return s

    def expected_input(
        self, name: str, stats: ChannelStats, quantizer: ActivationQuantizer | None
    ) -> np.ndarray | None:
        """``E[Q(x)]`` of layer ``name``'s input (``stats``) where
        ``quantizer`` quantizes it (:func:`prepare_bias_correction`'s value,
        else computed), ``None`` where the input stays float."""
        if not _quantizes(quantizer):
            return None
        assert quantizer is not None
        eq = self.expected_q.get(name)
        return expected_quantized(stats, quantizer) if eq is None else eq

    def correction_stats(self, name: str, module: Any) -> ChannelStats | None:
        """:meth:`input_stats` where ``module``'s bias may be corrected
        (it has none, or no other module holds it, and it is not
        parametrized: a parametrized bias is computed on every read, so a
        shift written into it would be lost), else ``None``."""
        stats = self.input_stats(name, module)
        if stats is None:
            return None
        bias = module._parameters.get("bias")
        if bias is not None and id(bias) in self.shared:
            return None
        if bias is None and is_parametrized(module, "bias"):
            return None
        return stats


def prepare(
    model: nn.Module,
    config: RecipeConfig,
    sources: dict[int, Any] | None = None,
    threads: int | None = None,
    shared: set[int] | None = None,
) -> RecipePlan:
    """Analyze ``model`` (statistics, execution order) and fold its BNs in
    place as ``config`` says. ``sources``, ``shared``: see
    :func:`~squant_rs.model.fold.fold_batchnorm_graph` (the folded layers
    whose weights are not set yet are written from them; ``threads``: for
    their products). Returns the :class:`RecipePlan`."""
    from .fold import _graph_reads, _shared_weights, fold_batchnorm_graph, trace

    plan = RecipePlan(config)
    if not (config.needs_graph or config.fold_bn):
        return plan  # the paper's steps: nothing to analyze or fold
    modules = dict(model.named_modules())
    _check_bn_values(modules)
    if config.bias_correction:
        plan.shared = _shared_weights(modules.values())
    graph = trace(model, modules)
    if graph is not None:
        plan.traced = True
        if config.bias_correction:
            # A bias the forward also reads outside its layer (``h +
            # self.fc.bias``) is not corrected; where a read does not
            # resolve, no existing bias is.
            reads = _graph_reads(model, graph)
            if reads is None:
                reads = {
                    id(m._parameters["bias"])
                    for m in modules.values()
                    if m._parameters.get("bias") is not None
                }
            plan.shared |= reads
        if config.needs_graph:
            plan.stats = analyze(model, graph, modules)
        from torch import nn

        attentions = [n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)]
        plan.order = execution_order(graph, [*plan.stats, *attentions])
        plan.called = {str(n.target) for n in graph.nodes if n.op == "call_module"}
    if config.fold_bn:
        folds = fold_batchnorm_graph(model, graph, sources, modules, threads, shared)
        plan.folded = {f.layer for f in folds}
        plan.folded_modules = {id(modules[f.layer]) for f in folds}
    return plan


def _check_bn_values(modules: dict[str, nn.Module]) -> None:
    """Raise for a BatchNorm whose statistics or affine parameters are meta
    tensors (no values to fold or read statistics from; torch's own error
    would be a ``NotImplementedError`` from the first copy).

    Raises:
        InvalidArgumentError: naming the BatchNorm and the tensor.
    """
    from .fold import _bn_types

    bns = _bn_types()
    for name, module in modules.items():
        if not isinstance(module, bns):
            continue
        for attr, t in (*module._buffers.items(), *module._parameters.items()):
            if t is not None and t.is_meta:
                raise InvalidArgumentError(
                    f"{name or '(model)'}: BatchNorm {attr} is a meta tensor: it has no "
                    "values to read"
                )


def _quantizes(quantizer: ActivationQuantizer | None) -> bool:
    return quantizer is not None and quantizer.enabled and quantizer.calibrated


def prepare_bias_correction(
    plan: RecipePlan,
    layers: Sequence[tuple[str, nn.Module]],
    quantizers: dict[str, ActivationQuantizer | None],
) -> None:
    """Compute the ``E[x]`` and ``E[Q(x)]`` that :func:`apply_bias_correction`
    will need for ``layers``, all layers in one vectorized pass (the same
    values it would compute one layer at a time)."""
    known = [(name, plan.correction_stats(name, module)) for name, module in layers]
    compute_moments([st for _, st in known if st is not None])
    pairs: list[tuple[str, ChannelStats, ActivationQuantizer]] = []
    for name, st in known:
        q = quantizers.get(name)
        if st is not None and q is not None and _quantizes(q):
            pairs.append((name, st, q))
    values = expected_quantized_many([(st, q) for _, st, q in pairs])
    plan.expected_q.update({name: v for (name, _, _), v in zip(pairs, values)})


def _native_rows(module: Any, w: torch.Tensor | np.ndarray) -> np.ndarray | None:
    """``w`` as the C-contiguous float32 ``(OC, IC * K)`` matrix (a view),
    ``K`` the kernel positions (1 for a 1x1 kernel or Linear), where the
    layer has one group and the weight is CPU float32; else ``None``
    (grouped and depthwise layers keep :func:`channel_dot`'s float32 kernel
    sums: their bits are the published tables' ones, which move by a point
    or so at W/A under an ulp-level change of these biases)."""
    import torch

    if not isinstance(module, _linear()) and int(module.groups) != 1:
        return None
    if isinstance(w, np.ndarray):
        a = w
    else:
        t = w.detach()
        if t.device.type != "cpu" or t.dtype != torch.float32:
            return None
        a = t.numpy()
    if a.dtype != np.float32 or a.ndim < 2 or not a.flags.c_contiguous:
        return None
    return a.reshape(int(a.shape[0]), -1)


def _row_vector(rows: np.ndarray, vec: np.ndarray) -> np.ndarray:
    """``vec`` (one value per input channel) as the float64 vector of a row
    of ``rows``: each of a kernel's positions takes its input channel's value."""
    v = np.ascontiguousarray(vec, dtype=np.float64)
    if rows.shape[1] != v.shape[0]:  # K kernel positions per input channel
        v = np.repeat(v, rows.shape[1] // v.shape[0])
    return v


def fused_shift_vectors(
    plan: RecipePlan,
    name: str,
    module: Any,
    w_float: torch.Tensor,
    dst: torch.Tensor,
    quantizer: ActivationQuantizer | None,
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The vectors with which the quantization pass itself computes the
    layer's bias shift as it writes ``dst`` (``dots`` of
    :func:`~squant_rs.model.layers.quantize_into`), the same bits as
    :func:`compute_bias_shifts`' native pass: ``(E[Q(x)], E[x])`` for a
    quantized input, ``(E[x], None)`` otherwise. ``None`` where the layer
    is not corrected, or that pass would not take it (grouped, not CPU
    float32, not contiguous): :func:`compute_bias_shifts` decides there."""
    import torch

    stats = plan.correction_stats(name, module)
    if stats is None:
        return None
    rows = _native_rows(module, w_float)
    if (
        rows is None
        or dst.device.type != "cpu"
        or dst.dtype != torch.float32
        or not dst.is_contiguous()
    ):
        return None
    mean = stats.mean()
    eq = plan.expected_input(name, stats, quantizer)
    if eq is not None:
        return _row_vector(rows, eq), _row_vector(rows, mean)
    return _row_vector(rows, mean), None


def compute_bias_shifts(
    plan: RecipePlan,
    items: Sequence[tuple[str, Any, torch.Tensor, torch.Tensor, ActivationQuantizer | None]],
    threads: int | None = None,
    fused: dict[str, np.ndarray] | None = None,
) -> None:
    """The shifts :func:`apply_bias_correction` will subtract, for every
    ``(name, module, w_float, w_hat, quantizer)`` (after quantization), in
    ``plan.shifts``: the dot products of all CPU float32 layers with one
    group in one native pass on ``threads`` threads (float64 products and
    sums; a larger kernel's positions each take their input channel's value
    of the vector, so its float32 kernel sums are never rounded), and
    :func:`channel_dot`'s ``einsum`` for the others (grouped, depthwise,
    other dtypes or devices).
    ``fused``: the shifts the quantization pass computed already
    (:func:`fused_shift_vectors`), by layer name."""
    fused = fused or {}
    mats: list[np.ndarray] = []
    vecs: list[np.ndarray] = []
    minus: list[np.ndarray | None] = []
    terms: dict[str, list[int | np.ndarray]] = {}

    def native(rows: np.ndarray, vec: np.ndarray, sub: np.ndarray | None = None) -> int:
        mats.append(rows)
        vecs.append(_row_vector(rows, vec))
        minus.append(sub)
        return len(mats) - 1

    for name, module, w_float, w_hat, quantizer in items:
        if name in fused:
            plan.shifts[name] = fused[name]
            continue
        stats = plan.correction_stats(name, module)
        if stats is None:
            continue
        mean = stats.mean()
        values: list[int | np.ndarray] = []
        eq = plan.expected_input(name, stats, quantizer)
        if eq is not None:
            # shift = W_q . E[Q(x)] - W . E[x]
            for w, vec in ((w_hat, eq), (w_float, mean)):
                rows = _native_rows(module, w)
                values.append(channel_dot(module, w, vec) if rows is None else native(rows, vec))
        else:
            # shift = (W_q - W) . E[x], the differences rounded to the weights' dtype
            hat, flt = _native_rows(module, w_hat), _native_rows(module, w_float)
            if hat is not None and flt is not None:
                values.append(native(hat, mean, flt))
            else:
                delta = _difference(w_hat, w_float)
                rows = _native_rows(module, delta)
                values.append(
                    channel_dot(module, delta, mean) if rows is None else native(rows, mean)
                )
        terms[name] = values
    dots = channel_dots(mats, vecs, threads, minus) if mats else []
    for name, values in terms.items():
        v = [dots[x] if isinstance(x, int) else x for x in values]
        plan.shifts[name] = v[0] - v[1] if len(v) == 2 else v[0]


def apply_bias_correction(
    plan: RecipePlan,
    name: str,
    module: Any,
    w_float: torch.Tensor,
    w_hat: torch.Tensor,
    quantizer: ActivationQuantizer | None = None,
) -> bool:
    """Correct ``module``'s bias where its input statistics are known:
    ``b -= W_q . E[Q(x)] - W . E[x]``, with ``E[Q(x)] = E[x]`` where the
    input is not quantized (``quantizer`` ``None``, disabled or without a
    range), i.e. ``b -= (W_q - W) . E[x]``. ``E[Q(x)]`` comes from
    :func:`prepare_bias_correction` where it ran, the shift from
    :func:`compute_bias_shifts` where it ran.

    Returns:
        whether the layer was corrected (not where its input statistics are
        unknown or another module holds its bias).
    """
    stats = plan.correction_stats(name, module)
    if stats is None:
        return False
    shift = plan.shifts.pop(name, None)
    if shift is not None:  # computed by compute_bias_shifts
        shift_bias(module, shift, w_hat)
        return True
    mean = stats.mean()
    eq = plan.expected_input(name, stats, quantizer)
    if eq is not None:
        shift = channel_dot(module, w_hat, eq) - channel_dot(module, w_float, mean)
        shift_bias(module, shift, w_hat)
    else:
        correct_bias(module, w_float, w_hat, mean)
    return True


#: Activation bits from which ``bn_sigmas=None`` uses ``n = 4`` instead of
#: :func:`mse_range` (the normal model's light tails make the MSE optimum
#: clip too much once rounding noise is small: MobileNetV2 W8A8 90.8 %
#: agreement with it, 94.1 % with ``n = 4``; docs/recipe.md).
SIGMA_RULE_FROM_BITS = 8


def _bn_cause(n: float | None) -> str:
    return "the BatchNorm statistics" if n is None else f"bn_sigmas={n:g}"


def bn_range(stats: ChannelStats, bits: int, n: float | None) -> tuple[float, float]:
    """The per-tensor range of a BN-covered input: ``mu -+ n sigma``
    (:meth:`ChannelStats.tensor_range`); with ``n=None``, ``n = 4`` from
    :data:`SIGMA_RULE_FROM_BITS` bits up and :func:`mse_range` below."""
    if n is None:
        if bits >= SIGMA_RULE_FROM_BITS:
            return stats.tensor_range(default_bn_sigmas(bits))
        return mse_range(stats, bits)
    return stats.tensor_range(n)


def bn_activation_ranges(
    plan: RecipePlan,
    layers: Sequence[tuple[str, nn.Module]],
    quantizers: dict[str, ActivationQuantizer],
    abits: int,
) -> list[tuple[str, nn.Module]]:
    """Fix the ranges of the layers whose input statistics are known (but
    the first layer to run, where :meth:`RecipePlan.order_covers` knows it:
    its input stays float).

    Returns:
        the other layers: they get the sigma rule on noise.
    """
    n = plan.config.bn_sigmas
    names = [name for name, _ in layers]
    chosen = set(names)
    first = (
        next((name for name in plan.order if name in chosen or name in plan.markers), None)
        if plan.order_covers(names)
        else None
    )
    rest: list[tuple[str, nn.Module]] = []
    known: list[tuple[str, ChannelStats]] = []
    for name, module in layers:
        stats = plan.input_stats(name, module)
        if name == first:
            continue  # float input: needs no range
        if stats is None:
            rest.append((name, module))
            continue
        known.append((name, stats))
    ranges = bn_ranges([stats for _, stats in known], abits, n)
    for (name, stats), (x_min, x_max) in zip(known, ranges):
        fix_range(quantizers[name], x_min, x_max, abits, _bn_cause(n))
        plan.range_sources[name] = stats.source
    return rest


def bn_ranges(
    stats: Sequence[ChannelStats], bits: int, n: float | None
) -> list[tuple[float, float]]:
    """:func:`bn_range` of every ``stats``; the ``n``-sigma ranges of all
    of them in one vectorized pass (the same values: per-channel
    operations, then exact minima and maxima per tensor)."""
    if n is None and bits < SIGMA_RULE_FROM_BITS:
        return [mse_range(st, bits) for st in stats]
    sigmas = default_bn_sigmas(bits) if n is None else n
    sizes = [st.mu.shape[0] for st in stats]
    if not stats or min(sizes) == 0:
        return [st.tensor_range(sigmas) for st in stats]
    mu = np.concatenate([st.mu for st in stats])
    sigma = np.concatenate([st.sigma for st in stats])
    lo = np.repeat(np.array([st.lo for st in stats], dtype=np.float64), sizes)
    hi = np.repeat(np.array([st.hi for st in stats], dtype=np.float64), sizes)
    starts = np.cumsum([0, *sizes[:-1]])
    low = np.minimum.reduceat(np.clip(mu - sigmas * sigma, lo, hi), starts)
    high = np.maximum.reduceat(np.clip(mu + sigmas * sigma, lo, hi), starts)
    return [(min(0.0, float(a)), max(0.0, float(b))) for a, b in zip(low, high)]


def finish_activation_order(
    plan: RecipePlan,
    layers: Sequence[tuple[str, nn.Module]],
    quantizers: dict[str, ActivationQuantizer],
    abits: int,
    run_order: Sequence[str] = (),
) -> None:
    """First layer to run: float input; last: 8 bits; the others ``abits``
    (in the traced execution order where it knows every layer,
    :meth:`RecipePlan.order_covers`; else in ``run_order``, the order in
    which the noise pass ran the layers)."""
    n = plan.config.bn_sigmas
    known = plan.order_covers([name for name, _ in layers])
    order = [
        name
        for name in (plan.order if known else run_order)
        if name in quantizers or name in plan.markers
    ]
    if not order:
        return
    # (an attention with separate projections running first or last: its
    # inputs stay float anyway)
    first, last = order[0], order[-1]
    modules = dict(layers)
    for name, q in quantizers.items():
        q.enabled = name != first
        bits = 8 if name == last else abits
        if name in plan.range_sources and q.bits != bits:
            stats = plan.input_stats(name, modules[name])
            assert stats is not None
            x_min, x_max = bn_range(stats, bits, n)
            fix_range(q, x_min, x_max, bits, _bn_cause(n))
        elif q.bits != bits:
            q.set_bits(bits)


# --------------------------------------------------------------------------
# Weight range search weighted by the input channels' variances (step 4)

#: Clip ratios ``r`` tried by :func:`clip_ratios` (``1.0`` first: ties keep
#: the full range).
CLIP_RATIOS: tuple[float, ...] = tuple(float(r) for r in np.linspace(1.0, 0.5, 11))
#: ``weight_range="auto"`` uses ``"bn-mse"`` up to this many weight bits
#: (measured: it helps at 4 bits and hurts at 6, docs/recipe.md step 4) ...
BN_MSE_MAX_WBITS = 4
#: ... and only with float inputs or inputs of at least this many bits
#: (MobileNetV2 W4A4 fell below its goal with it).
BN_MSE_MIN_ABITS = 8


def weight_range_for(config: RecipeConfig, wbits: int, abits: int | None, quantizer: str) -> str:
    """The weight range a call uses: ``config.weight_range``, with
    ``"auto"`` resolved to ``"bn-mse"`` for an asymmetric quantizer at
    ``wbits <= BN_MSE_MAX_WBITS`` with ``abits`` ``None`` or
    ``>= BN_MSE_MIN_ABITS``, and to ``"minmax"`` otherwise.

    Raises:
        InvalidArgumentError: ``"bn-mse"`` with a non-asymmetric quantizer
            (its ``[r min, r max]`` range is an asymmetric one).
    """
    wr = config.weight_range
    if wr == "auto":
        ok = quantizer == "asymmetric" and wbits <= BN_MSE_MAX_WBITS
        ok = ok and (abits is None or abits >= BN_MSE_MIN_ABITS)
        return "bn-mse" if ok else "minmax"
    if wr == "bn-mse" and quantizer != "asymmetric":
        raise InvalidArgumentError(
            f'weight_range="bn-mse" needs quantizer="asymmetric", got {quantizer!r}'
        )
    return wr


def clip_ratios(
    w: np.ndarray,
    importance: np.ndarray,
    bits: int,
    ratios: Sequence[float] = CLIP_RATIOS,
    threads: int | None = None,
) -> np.ndarray:
    """Per row ``o`` of ``w`` (``(OC, N)``), the ratio ``r`` of ``ratios``
    whose grid on ``[r min_o, r max_o]`` (``2^bits`` levels, nearest
    rounding, clipped) gives the least ``sum_n importance[o, n] (Q(w) - w)^2``
    (``importance`` broadcast to ``w``'s shape). Ties keep the earlier ratio.

    The rounding runs in float32 in units of the full range's step (one
    fused pass per ratio; the grid of ``r`` in those units is
    ``k r + (1 - r) min / step_1``), the error sums in float64. Rows run
    on ``threads`` threads (``None``: the package's default; the results do
    not depend on the count).

    Returns:
        ``(OC,)`` float64 ratios.
    """
    x = np.asarray(w)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    x = np.ascontiguousarray(x)
    imp = np.asarray(importance, dtype=np.float32)
    if x.ndim == 2 and imp.shape != x.shape:  # one row for every channel
        imp = np.broadcast_to(imp, (1, x.shape[1]))
    imp = np.ascontiguousarray(imp)
    return _clip_ratios(x, imp, bits, [float(r) for r in ratios], threads)


def clip_rows(w: np.ndarray, ratios: np.ndarray, threads: int | None = None) -> np.ndarray:
    """``np.clip(w, lo, hi)`` of a float32 or float64 ``w`` (``(OC, N)``)
    with ``lo = (ratios[:, None] * w.min(axis=1, keepdims=True))
    .astype(w.dtype)`` and ``hi`` likewise with the max, bit for bit: the
    native copy on ``threads`` threads, numpy's where its ``min``/``max``
    of some row depends on the reduction order (zeros of both signs, NaNs
    of different bits)."""
    r = np.ascontiguousarray(ratios, dtype=np.float64)
    out = _clip_rows(w, r, threads)
    if out is not None:
        return out
    lo = (r[:, None] * w.min(axis=1, keepdims=True)).astype(w.dtype)
    hi = (r[:, None] * w.max(axis=1, keepdims=True)).astype(w.dtype)
    clipped: np.ndarray = np.clip(w, lo, hi)
    return clipped


def input_variance(plan: RecipePlan, name: str, module: Any) -> np.ndarray | None:
    """``Var[x_i]`` of each input channel of ``module`` from its input
    statistics (clipped-normal variance), ``None`` where they are unknown."""
    stats = plan.input_stats(name, module)
    if stats is None:
        return None
    std = stats.moments()[1]
    out: np.ndarray = std * std
    return out


def weight_importance(module: Any, shape: Sequence[int], var: np.ndarray | None) -> np.ndarray:
    """``(OC, IC/groups * K)`` weights of the error of each weight element:
    the variance of the input channel it multiplies (its group's channel in
    a grouped/depthwise conv), 1 everywhere where ``var`` is ``None``. One
    row (``(1, IC * K)``, the same for every output channel) where the
    layer has one group or ``var`` is ``None``."""
    from torch import nn

    oc, icg = int(shape[0]), int(shape[1])
    k = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    if var is None:
        return np.ones((1, icg * k))
    groups = 1 if isinstance(module, nn.Linear) else int(module.groups)
    if groups == 1:  # the same for every output channel
        return np.repeat(np.asarray(var, dtype=np.float64), k)[None, :]
    v = np.asarray(var, dtype=np.float64).reshape(groups, 1, icg, 1)
    v = np.broadcast_to(v, (groups, oc // groups, icg, k))
    return v.reshape(oc, icg * k)


def clip_weight_items(
    plan: RecipePlan,
    modules: dict[str, Any],
    items: Sequence[tuple[str, Any, Any]],
    bits: int,
    threads: int | None = None,
) -> tuple[list[tuple[str, Any, Any]], list[tuple[Any, Any]], dict[str, float]]:
    """``weight_range="bn-mse"`` on ``(name, weight, destination)`` items of
    :func:`~squant_rs.model.layers.quantize_into`: each weight
    whose input statistics are known is replaced by a copy clipped per
    output channel to ``[r min, r max]`` (:func:`clip_ratios`, importance
    :func:`weight_importance`; the others keep ``[min, max]``), so that the
    quantizer's ``(s, z)`` come from the clipped range; the caller's
    weights are not modified. A destination that is its weight is replaced
    by a fresh tensor (the weight keeps its float values for the bias
    correction); :func:`finish_clip_items` makes it the weight's data.
    ``threads``: the threads of each :func:`clip_ratios` search.

    Returns:
        ``(items, swaps, mean ratio per layer name)``.
    """
    import torch

    out: list[tuple[str, Any, Any]] = []
    swaps: list[tuple[Any, Any]] = []
    mean_ratio: dict[str, float] = {}
    for name, w, dst in items:
        module = modules.get(name)
        var = None if module is None else input_variance(plan, name, module)
        if var is None or w.numel() == 0 or w.dim() < 2:
            out.append((name, w, dst))  # no statistics: the min/max range
            continue
        t = w.detach()
        if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
            t = t.cpu().double()
        host = np.asarray(t.numpy()).reshape(int(w.shape[0]), -1)
        imp = weight_importance(module, tuple(w.shape), var)
        r = clip_ratios(host, imp, bits, threads=threads)
        mean_ratio[name] = float(r.mean())
        if bool((r == 1.0).all()):
            out.append((name, w, dst))
            continue
        clipped = torch.from_numpy(clip_rows(host, r, threads).reshape(tuple(w.shape)))
        clipped = clipped.to(dtype=w.dtype, device=w.device)
        if dst is w:
            fresh = torch.empty_like(w)
            swaps.append((w, fresh))
            dst = fresh
        out.append((name, clipped, dst))
    return out, swaps, mean_ratio


def finish_clip_items(swaps: Sequence[tuple[Any, Any]]) -> None:
    """Give each weight of :func:`clip_weight_items`'s swaps its quantized data."""
    import torch

    with torch.no_grad():
        for w, fresh in swaps:
            w.data = fresh
