"""Which layers ``quantize_model`` quantizes, and the per-layer weight step."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import functools
import gc
import math
import re
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _squant_rs as _native
from ..errors import InvalidArgumentError, SquantError
from ..tensor.quantized import QuantizedTensor, check_hand_made, from_native, quantize_tensor
from ..tensor.validate import (
    UnsupportedDtypeError,
    check_threads,
    with_weight_index,
)

if TYPE_CHECKING:
    from typing import ParamSpec, TypeVar  # Python 3.10+, annotations only

    import torch
    from torch import nn

    _P = ParamSpec("_P")
    _R = TypeVar("_R")

#: Progress callback: ``(done, total, name)``.
ProgressFn = Callable[[int, int, str], None]


# --------------------------------------------------------------------------
# Shared helpers (also used by formats.safetensors)


def check_patterns(patterns: object, name: str) -> tuple[str, ...]:
    """``patterns`` as a tuple of fnmatch patterns (a bare string is one)."""
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        return (patterns,)
    if not isinstance(patterns, Sequence) and not hasattr(patterns, "__iter__"):
        raise TypeError(f"{name} must be a pattern string or a sequence of them")
    out = tuple(patterns)
    for p in out:
        if not isinstance(p, str):
            raise TypeError(f"{name} patterns must be strings, got {p!r}")
    return out


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` matches one of the (case-sensitive) fnmatch patterns."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


#: Elements per chunk of the float64 sums in :func:`relative_error`.
_NORM_CHUNK = 1 << 20

#: Below this norm the float32 sums may have lost squares to underflow.
_NORM_TINY = 1e-18


def relative_error(w: Any, w_hat: Any) -> float:
    """``||w_hat - w|| / ||w||`` (0 when both are 0) for numpy arrays or torch
    tensors. The norms are taken in float32 (float64 for float64 input);
    where a float32 sum of squares overflows or may underflow (weights near
    ``1e20`` or ``1e-20``), they are summed again in float64, a chunk at a
    time, so the result is finite for any finite weights."""
    num, den = _norms(w, w_hat, exact=False)
    if not (math.isfinite(num) and math.isfinite(den)) or den < _NORM_TINY:
        num, den = _norms(w, w_hat, exact=True)
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def quantized_relative_error(w: Any, qt: QuantizedTensor, threads: int | None = None) -> float:
    """:func:`relative_error` of ``w`` and ``qt.dequantize()``, dequantizing
    a block of output channels (about ``2^20`` elements) at a time, so no
    weight-sized dequantized copy is ever held (``save_quantized`` writes
    codes, not floats). Equal to ``relative_error(w, qt.dequantize())`` up
    to the order of the float32 sums."""
    oc = int(w.shape[0]) if len(w.shape) else 1
    per_channel = max(1, math.prod(int(d) for d in w.shape[1:]))
    step = max(1, _NORM_CHUNK // per_channel)
    if step >= oc:
        return relative_error(w, qt.dequantize(threads))
    num_sq = den_sq = 0.0
    for c0 in range(0, oc, step):
        part = dataclasses.replace(
            qt,
            codes=qt.codes[c0 : c0 + step],
            scale=qt.scale[c0 : c0 + step],
            zero_point=qt.zero_point[c0 : c0 + step],
        )
        w_part = w[c0 : c0 + step]
        w_hat = part.dequantize(threads)
        num, den = _norms(w_part, w_hat, exact=False)
        if not (math.isfinite(num) and math.isfinite(den)) or den < _NORM_TINY:
            num, den = _norms(w_part, w_hat, exact=True)
        num_sq += num * num
        den_sq += den * den
    num_t, den_t = math.sqrt(num_sq), math.sqrt(den_sq)
    if den_t > 0:
        return num_t / den_t
    return 0.0 if num_t == 0 else math.inf


def _norms(w: Any, w_hat: Any, exact: bool) -> tuple[float, float]:
    """``(||w_hat - w||, ||w||)``: fast (BLAS, the input's precision), or
    ``exact`` (squares summed in float64, a chunk at a time)."""
    if isinstance(w, np.ndarray):
        a = np.asarray(w).reshape(-1)
        b = np.asarray(w_hat).reshape(-1)
        if not exact:
            dt: Any = np.float64 if a.dtype == np.float64 else np.float32
            with np.errstate(over="ignore", under="ignore", invalid="ignore"):
                a = a.astype(dt, copy=False)
                return float(np.linalg.norm(b.astype(dt, copy=False) - a)), float(np.linalg.norm(a))
        num_sq = den_sq = 0.0
        for i in range(0, a.size, _NORM_CHUNK):
            a64 = a[i : i + _NORM_CHUNK].astype(np.float64)
            d64 = b[i : i + _NORM_CHUNK].astype(np.float64) - a64
            num_sq += float(np.dot(d64, d64))
            den_sq += float(np.dot(a64, a64))
        return math.sqrt(num_sq), math.sqrt(den_sq)
    import torch

    ta = w.detach().reshape(-1)
    tb = w_hat.detach().reshape(-1)
    if not exact:
        tdt = torch.float64 if ta.dtype == torch.float64 else torch.float32
        t32 = ta.to(tdt)
        num_t = torch.linalg.vector_norm(tb.to(tdt) - t32)
        return float(num_t), float(torch.linalg.vector_norm(t32))
    num = torch.zeros((), dtype=torch.float64, device=ta.device)
    den = torch.zeros((), dtype=torch.float64, device=ta.device)
    step = _NORM_CHUNK if ta.device.type == "cpu" else 16 * _NORM_CHUNK
    for i in range(0, ta.numel(), step):
        c64 = ta[i : i + step].to(torch.float64)
        d64 = tb[i : i + step].to(torch.float64) - c64
        num += torch.dot(d64, d64)
        den += torch.dot(c64, c64)
    return math.sqrt(float(num)), math.sqrt(float(den))


def _layer_types() -> tuple[type[Any], ...]:
    from torch import nn

    return (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def warn_unmatched(
    patterns: Sequence[str], names: Sequence[str], what: str, stacklevel: int
) -> None:
    """A ``UserWarning`` for every pattern that matches none of ``names``
    (a typo in a skip pattern would otherwise quantize what it meant to keep)."""
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            warnings.warn(
                f"skip pattern {p!r} matches no {what}", UserWarning, stacklevel=stacklevel + 1
            )


@dataclass
class LayerPlan:
    """What :func:`plan_layers` decided for a model's Conv/Linear layers."""

    #: ``(name, module)`` per distinct weight to quantize, in module order.
    chosen: list[tuple[str, nn.Module]] = field(default_factory=list)
    #: ``(name, owner, module)``: layer ``name`` shares the weight of chosen
    #: layer ``owner``.
    tied: list[tuple[str, str, nn.Module]] = field(default_factory=list)
    #: Conv/Linear layers (and ConvTranspose) left float, by name.
    skipped: list[str] = field(default_factory=list)
    #: Why a layer was left float, where the reason is not a skip pattern.
    notes: list[str] = field(default_factory=list)
    #: Every layer's name (chosen, tied or skipped), in module order (an
    #: attention's projections where the attention is).
    names: list[str] = field(default_factory=list)


def plan_layers(model: nn.Module, skip: Sequence[str], stacklevel: int = 2) -> LayerPlan:
    """Which Conv1d/2d/3d and Linear weights SQuant quantizes, and the input
    projections of ``nn.MultiheadAttention`` (``in_proj_weight``, or
    ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``): each is a
    Linear weight (one row per output channel) that the attention holds as
    a parameter of its own, planned as the layer ``<attention>.in_proj``
    (``.q_proj``...), an :class:`AttentionProjection` (not part of the
    model) over it.

    A layer is left float when its module name matches a ``skip`` pattern,
    when it is a ``ConvTranspose``, when its weight is parametrized or not a
    plain ``nn.Parameter``, when its weight has no element (e.g.
    ``Linear(0, 4)``), or when it is part of a TorchScript module
    (``torch.jit.script``/``trace``); the report notes each of these but
    the ``skip`` pattern.

    Shared weights: a weight used by several layers (tied parameters, or one
    module reachable under several names) is quantized once and reported
    under every name. If any of its layers is left float (a skip pattern
    included), all of them stay float, and a weight also used by a module
    that is not a Conv/Linear layer, e.g. a Linear tied to an Embedding,
    stays float too (quantizing it would change that module silently); both
    cases are noted in the report.

    Warns (``UserWarning``) for a skip pattern that matches no layer and for
    a model without any Conv/Linear layer.
    """
    from torch import nn
    from torch.nn.parameter import UninitializedParameter
    from torch.nn.utils import parametrize

    plan = LayerPlan()
    types = _layer_types()
    transpose = nn.modules.conv._ConvTransposeNd
    layer_names: list[str] = []
    groups: dict[int, list[tuple[str, nn.Module]]] = {}  # weight id -> candidate layers
    float_ids: dict[int, str] = {}  # weight id -> a layer that keeps it float
    modules = list(model.named_modules(remove_duplicate=False))
    scripted: list[str] = []  # TorchScript modules (their layers are not nn.Conv2d & co.)
    script_type = _script_module_type()
    # (layer name, layer module, module holding the weight, parameter name)
    candidates: list[tuple[str, Any, Any, str]] = []
    for name, module in modules:
        if (
            script_type is not None
            and isinstance(module, script_type)
            and not any(name == s or name.startswith(s + ".") or not s for s in scripted)
        ):
            scripted.append(name)
            if any(True for _ in module.parameters()):
                plan.notes.append(
                    f"{name or '(model)'}: a TorchScript module ({type(module).__name__}); "
                    "its layers are not quantized, left float"
                )
            continue
        if isinstance(module, (transpose, *types)):
            candidates.append((name, module, module, "weight"))
        elif isinstance(module, nn.MultiheadAttention):
            for pname in ATTENTION_PROJECTIONS:
                if getattr(module, pname, None) is not None:
                    proj = AttentionProjection(module, pname)
                    candidates.append((proj.layer_name(name), proj, module, pname))
    for name, module, holder, pname in candidates:
        layer_names.append(name)
        # A parametrized weight is computed on every read (spectral_norm's
        # power iteration updates its buffers in training mode): not read.
        parametrized = _may_be_parametrized(holder) and parametrize.is_parametrized(holder, pname)
        weight = None if parametrized else getattr(holder, pname, None)
        if isinstance(module, transpose) or matches_any(name, skip):
            plan.skipped.append(name)
            if weight is not None:
                float_ids.setdefault(id(weight), name)
            if not matches_any(name, skip):  # (not the caller's own skip)
                plan.notes.append(f"{name}: {type(module).__name__}, not quantized; left float")
            continue
        if isinstance(weight, UninitializedParameter):
            raise InvalidArgumentError(
                f"layer {name!r} is a lazy module that has not been initialized yet: "
                "run one forward pass first"
            )
        if parametrized or not isinstance(weight, nn.Parameter):
            plan.skipped.append(name)
            plan.notes.append(
                f"{name}: parametrized weight (torch.nn.utils.parametrize), not quantized; "
                "left float"
                if parametrized
                else f"{name}: weight is not an nn.Parameter (a tensor computed in the "
                "forward, e.g. by the old torch.nn.utils.weight_norm), not quantized; "
                "left float"
            )
            continue
        if weight.numel() == 0:
            plan.skipped.append(name)
            plan.notes.append(
                f"{name}: weight of shape {tuple(weight.shape)} has no element, left as is"
            )
            continue
        groups.setdefault(id(weight), []).append((name, module))

    # Uses of a candidate weight outside the layers' own weights.
    foreign: dict[int, str] = {}
    plain_named = nn.Module.named_parameters
    for mname, module in modules:
        if type(module).named_parameters is plain_named:
            # named_parameters(recurse=False) without its generators: the
            # module's own parameters, None and repeats left out.
            own_params = module._parameters
            if not own_params or groups.keys().isdisjoint(map(id, own_params.values())):
                continue
            named: Any = _distinct_params(own_params)
        else:
            named = module.named_parameters(recurse=False)
        if isinstance(module, types) and not isinstance(module, transpose):
            own: tuple[str, ...] = ("weight",)
        elif isinstance(module, nn.MultiheadAttention):
            own = ATTENTION_PROJECTIONS
        else:
            own = ()
        for pname, param in named:
            if id(param) in groups and pname not in own:
                label = f"{mname}.{pname}" if mname else pname
                foreign.setdefault(id(param), f"{label} ({type(module).__name__})")

    for wid, members in groups.items():
        names = [n for n, _ in members]
        reason = None
        if wid in float_ids:
            reason = f"shares its weight with {float_ids[wid]!r}, which is left float"
        elif wid in foreign:
            reason = f"shares its weight with {foreign[wid]}, which SQuant does not quantize"
        if reason is not None:
            for n in names:
                plan.skipped.append(n)
                plan.notes.append(f"{n or '(model)'}: {reason}; left float")
            continue
        owner, module = members[0]
        plan.chosen.append((owner, module))
        plan.tied += [(n, owner, m) for n, m in members[1:]]

    plan.names = layer_names
    order = {n: i for i, n in enumerate(layer_names)}
    plan.chosen.sort(key=lambda item: order[item[0]])
    plan.skipped.sort(key=order.__getitem__)
    if not layer_names:
        warnings.warn(
            f"the model ({type(model).__name__}) has no Conv1d/2d/3d or Linear layer: "
            "nothing to quantize",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
    warn_unmatched(skip, layer_names, "Conv/Linear layer", stacklevel + 1)
    return plan


#: ``nn.MultiheadAttention``'s input projection weights (``in_proj_weight``
#: when query, key and value have the embedding's size, else the three
#: others), each a Linear weight of the attention's own.
ATTENTION_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


class AttentionProjection:
    """One input projection of an ``nn.MultiheadAttention`` seen as a
    Linear layer for quantization: ``weight`` is the attention's parameter
    itself (``(out_features, in_features)``, one row per output channel;
    never bias-corrected: an attention's inputs have no statistics here,
    so no bias or feature counts are read). Not part of the model and never
    called: the attention computes with the weight, so writing the
    quantized values into it quantizes the attention. With ``abits``, the
    input quantizer of ``in_proj_weight`` is an
    :class:`~squant_rs.model.activations.AttentionInputQuantizer` hooked on
    the attention (query, key and value); the separate projections'
    inputs stay float.

    ``attention`` is the module and ``param`` the parameter's name."""

    def __init__(self, attention: Any, param: str) -> None:
        self.attention = attention
        self.param = param

    def layer_name(self, attention_name: str) -> str:
        """The layer's name where the attention is ``attention_name``:
        ``<attention>.in_proj`` for ``in_proj_weight`` (``q_proj``...)."""
        short = self.param[: -len("_weight")]
        return f"{attention_name}.{short}" if attention_name else short

    @staticmethod
    def applies(module: Any, param: str) -> bool:
        """Whether ``module`` is an ``nn.MultiheadAttention`` with the
        projection weight ``param``."""
        from torch import nn

        return (
            isinstance(module, nn.MultiheadAttention) and getattr(module, param, None) is not None
        )

    @property
    def weight(self) -> Any:
        return getattr(self.attention, self.param)


def _script_module_type() -> type[Any] | None:
    """``torch.jit.ScriptModule`` (``None`` where torch has none)."""
    import torch

    jit = getattr(torch, "jit", None)
    return getattr(jit, "ScriptModule", None)


def _distinct_params(params: dict[str, Any]) -> list[tuple[str, Any]]:
    """``(name, parameter)`` of a module's own parameters as
    ``named_parameters(recurse=False)`` gives them (``None`` and repeats
    left out)."""
    seen: set[int] = set()
    out = []
    for pname, param in params.items():
        if param is None or id(param) in seen:
            continue
        seen.add(id(param))
        out.append((pname, param))
    return out


def _may_be_parametrized(module: Any) -> bool:
    """False when ``module`` certainly has no ``parametrizations`` attribute
    (``parametrize.is_parametrized`` would look it up through
    ``nn.Module.__getattr__``, which builds an exception every time)."""
    return (
        "parametrizations" in module._modules
        or "parametrizations" in module.__dict__
        or hasattr(type(module), "parametrizations")
    )


def select_layers(
    model: nn.Module, skip: Sequence[str]
) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """The ``(name, module)`` pairs whose weights SQuant quantizes (one per
    distinct weight), in module order, and the names of the Conv/Linear
    layers left float: :func:`plan_layers` in short (same warnings)."""
    plan = plan_layers(model, skip, stacklevel=3)
    return plan.chosen, plan.skipped


def quantize_layer_weight(
    name: str,
    weight: Any,
    bits: int,
    mode: str,
    backend: str,
    threads: int | None,
    quantizer: str = "asymmetric",
) -> tuple[Any, float]:
    """``quantize_tensor`` on one named weight, timed (ms); errors name the layer."""
    start = time.perf_counter()
    try:
        qt = quantize_tensor(
            weight, bits, mode, backend=backend, threads=threads, quantizer=quantizer
        )
    except (SquantError, UnsupportedDtypeError) as exc:
        raise type(exc)(f"{name or 'weight'}: {exc}") from exc
    return qt, (time.perf_counter() - start) * 1e3


# --------------------------------------------------------------------------
# The whole-model pass


def copy_model(
    model: nn.Module,
    fresh: Sequence[Any],
    memo: dict[Any, Any] | None = None,
    shared: set[int] | None = None,
) -> nn.Module:
    """``copy.deepcopy(model)``, except that every parameter in ``fresh`` is
    not cloned: its copy is a new parameter of the same type, shape, dtype,
    device, strides and ``requires_grad`` whose values are uninitialised
    (for weights about to be overwritten). Parameters tied between modules
    stay tied in the copy.

    Modules whose class copies the ordinary way (no ``__deepcopy__``,
    ``__reduce__``, ``__reduce_ex__``, ``__getstate__`` or slots of its own)
    are rebuilt directly, the way ``deepcopy`` would, without its generic
    dispatch on every attribute; anything else goes through ``deepcopy``
    with the same memo.

    ``memo`` (``deepcopy``'s memo, empty or absent) is filled: it maps the
    ``id`` of every object of ``model`` that was copied to its copy.

    ``shared`` (a set, where given) gets the ``id`` of every module,
    parameter and buffer of the copy's module tree that is ``model``'s own
    object, not a copy: what a ``__deepcopy__`` that returns ``self`` (or
    a ``__reduce__`` that keeps the original's parameters) leaves shared.
    Writing into those would change ``model``: see
    :func:`check_not_shared`. (Only what ``deepcopy`` copied is looked at:
    the modules copied here are new, with new parameters and buffers.)

    Returns:
        The copy."""
    import torch

    if memo is None:
        memo = {}
    with torch.no_grad(), gc_paused():
        for p in fresh:
            if id(p) not in memo:
                data = torch.empty_like(p, memory_format=torch.preserve_format)
                memo[id(p)] = type(p)(data, p.requires_grad)
        copier = _Copier(memo)
        copied: nn.Module = copier.copy(model)
    if shared is not None:
        shared.update(copier.shared(model))
    return copied


def check_not_shared(shared: set[int], written: Iterable[tuple[str, Any]]) -> None:
    """Raise unless none of ``written`` (``(what, object)`` pairs: the
    modules, parameters and buffers of a model copy about to be written,
    ``what`` naming each; ``None`` objects are passed over) is one the copy
    shares with the original (``shared``, filled by :func:`copy_model`).
    Nothing is read from ``written`` when nothing is shared.

    Raises:
        InvalidArgumentError: naming the first shared one.
    """
    if not shared:
        return
    for what, obj in written:
        if obj is not None and id(obj) in shared:
            raise InvalidArgumentError(
                f"{what} is shared between the model and its deep copy (copy.deepcopy "
                "returned the original: e.g. a module whose __deepcopy__ returns self): "
                "writing it in the copy would change the model passed in, which is left "
                "unchanged; make copy.deepcopy copy it"
            )


def with_gc_paused(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn`` run with the garbage collector paused (:func:`gc_paused`):
    for calls that build a model copy and return it, so that the collector
    does not scan the young copy over and over while it is being built
    and returned (if the caller drops it at once, its objects are freed
    before the collector ever looks at them)."""

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with gc_paused():
            return fn(*args, **kwargs)

    return run


class gc_paused:  # noqa: N801 - used like a function: ``with gc_paused():``
    """Python's cyclic garbage collector paused for a ``with`` block (as
    :mod:`timeit` does), then restored to the state it had.

    Copying a model allocates tens of thousands of containers (each module's
    ``__dict__``, hook dictionaries, parameters) that all stay alive: every
    700 allocations the collector would scan the young ones again for
    nothing, and every few copies walk every object of the interpreter
    (torch's included) -- most of a copy's time on a ShuffleNet. Nothing
    is left uncollected: the collector runs again after the block. (A
    class, not a generator: nothing is allocated once the collector is
    back, which would make it scan the new copy at once.)"""

    def __enter__(self) -> None:
        self.was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self.was:
            gc.enable()


#: Values ``deepcopy`` returns as they are.
_ATOMIC: frozenset[type] = frozenset(
    {type(None), int, float, bool, complex, str, bytes, type, range, type(Ellipsis)}
)


class _Copier:
    """``copy.deepcopy`` of a module tree, fast for plain modules, the
    containers of their ``__dict__`` and plain CPU buffers (see
    :func:`copy_model`). Uses and fills ``deepcopy``'s memo, storages
    included, so that whatever it hands to ``deepcopy`` stays consistent."""

    def __init__(self, memo: dict[Any, Any]) -> None:
        import torch
        from torch import nn

        self.memo = memo
        self.plain: dict[type, bool] = {}
        self.module: Any = nn.Module
        self.tensor: Any = torch.Tensor
        self.parameter: Any = nn.Parameter
        self.strided = torch.strided
        self.make_subclass = torch.Tensor._make_subclass
        self.atomic = _ATOMIC
        self.odict = OrderedDict
        # Module.__setstate__ is __dict__.update plus defaults for keys an
        # old pickle may lack: with all of them there, the update alone.
        self.set_state = nn.Module.__setstate__
        self.state_keys = frozenset(nn.Module().__dict__)
        #: Modules and tensors ``deepcopy`` returned as they were given.
        self.kept: list[Any] = []
        #: Modules ``deepcopy`` made (e.g. a ``__deepcopy__`` of their own):
        #: what they hold may still be the original's.
        self.made: list[Any] = []

    def _is_plain(self, cls: Any) -> bool:
        ok = self.plain.get(cls)
        if ok is None:
            import copyreg

            ok = (
                getattr(cls, "__deepcopy__", None) is None
                and cls.__reduce_ex__ is object.__reduce_ex__
                and cls.__reduce__ is object.__reduce__
                and cls.__getstate__ is self.module.__getstate__
                and not copyreg._slotnames(cls)  # type: ignore[attr-defined]
                and cls not in copyreg.dispatch_table
            )
            self.plain[cls] = ok
        return ok

    def copy(self, obj: Any) -> Any:
        """``copy.deepcopy(obj, self.memo)``, walked in Rust
        (``_squant_rs.copy_tree``): plain modules rebuilt as ``deepcopy``
        would, through ``__getstate__``/``__setstate__``, with empty
        containers and atomic values inline; dictionaries, tuples and sets;
        parameters as ``Parameter.__deepcopy__`` makes them; plain, dense,
        contiguous CPU tensors that own all of their storage cloned, their
        storage recorded in the memo as ``Tensor.__deepcopy__`` does. The
        rest comes back to :meth:`_other`."""
        return _native.copy_tree(obj, self)

    def _other(self, obj: Any) -> Any:
        """What :meth:`copy` does not copy itself: ``deepcopy`` (the
        modules and tensors it returns as they are, or makes, noted for
        :meth:`shared`)."""
        out = copy.deepcopy(obj, self.memo)
        if out is obj:
            if isinstance(out, (self.module, self.tensor)):
                self.kept.append(out)
        elif isinstance(out, self.module):
            self.made.append(out)
        return out

    def shared(self, model: nn.Module) -> set[int]:
        """The ``id`` of every module, parameter and buffer under what
        ``deepcopy`` returned (:meth:`_other`) that is ``model``'s own:
        everything under a module kept as it was, and whatever a module
        ``deepcopy`` made still holds of ``model``'s. (The rest of the copy
        is new.) Empty, and nothing walked, where ``deepcopy`` kept and
        made no module."""

        def objects(root: Any) -> Iterator[Any]:
            if not isinstance(root, self.module):
                yield root  # a tensor
                return
            for m in root.modules():
                yield m
                yield from (t for t in m._parameters.values() if t is not None)
                yield from (t for t in m._buffers.values() if t is not None)

        out = {id(t) for root in self.kept for t in objects(root)}
        if self.made:
            own = {id(t) for t in objects(model)}
            out.update(i for root in self.made for i in map(id, objects(root)) if i in own)
        return out


@dataclass(frozen=True, eq=False)
class LayerResult:
    """What quantizing one weight into its destination gave."""

    qtensor: QuantizedTensor
    #: ``||w_hat - w|| / ||w||`` of the values written.
    rel_error: float
    #: Time spent on this weight (ms); for the Rust pass, its share of the
    #: pass's wall time, in proportion to the time the pass's threads spent
    #: on it.
    time_ms: float
    #: The dot products asked for this weight (``dots`` of
    #: :func:`quantize_into`), where the native pass computed them.
    dot: np.ndarray | None = None


_WEIGHT_INDEX = re.compile(r"weight (\d+): (.*)", re.S)


class _Destinations:
    """Writeable numpy views of CPU destination tensors for the native
    passes (bfloat16 as its int16 bit patterns); a destination that is not
    C-contiguous (e.g. channels-last) gets a temporary array, copied into it
    by :meth:`finish`."""

    def __init__(self) -> None:
        import torch

        self.back: list[tuple[Any, np.ndarray]] = []
        self.bf16 = torch.bfloat16
        self.i16 = torch.int16

    def view(self, t: Any) -> np.ndarray:
        d = t.detach()
        if d.dtype is self.bf16:
            d = d.view(self.i16)
        out: np.ndarray = d.numpy()
        if not out.flags.c_contiguous:
            out = np.empty(out.shape, out.dtype)
            self.back.append((t, out))
        return out

    def finish(self) -> None:
        import torch

        with torch.no_grad():
            for dst, tmp in self.back:
                src = torch.from_numpy(tmp)
                if dst.dtype == torch.bfloat16:
                    src = src.view(torch.bfloat16)
                dst.copy_(src)
        self.back.clear()


def dequantize_tensors(
    qts: Sequence[QuantizedTensor], threads: int | None = None
) -> list[torch.Tensor]:
    """``[qt.dequantize() for qt in qts]`` for quantized tensors whose codes,
    scale and zero point are CPU torch tensors or numpy arrays, as CPU torch
    tensors of each one's dtype, in one parallel native pass: the values are
    written straight into the new tensors (no float32 intermediate, no torch
    op whose speed depends on torch's thread count). Bit-identical to
    ``dequantize()``, with its checks of ``threads`` and of hand-made
    instances.

    Returns:
        One tensor per quantized tensor, in order.

    Raises:
        The exceptions of ``dequantize()`` (``SquantError`` subclasses,
        ``TypeError``), for the first bad quantized tensor, named
        ``"weight {i}: ..."``.
    """
    import torch

    from ..torch.adapter import _float_dtypes

    threads = check_threads(threads)
    dests = _Destinations()
    outs: list[torch.Tensor] = []
    views: list[np.ndarray] = []
    for i, qt in enumerate(qts):
        if not qt.grid_checked:
            try:
                check_hand_made(qt)
            except (SquantError, TypeError) as exc:
                raise with_weight_index(exc, i) from None
        dtype = qt.dtype
        if not isinstance(dtype, torch.dtype):
            dtype = getattr(torch, np.dtype(dtype).name)
        if dtype not in _float_dtypes(torch):
            raise UnsupportedDtypeError(f"cannot dequantize to {qt.dtype}")
        t = torch.empty(qt.shape, dtype=dtype)
        outs.append(t)
        views.append(dests.view(t))
    _native.dequantize_into(
        [_host(qt.codes) for qt in qts],
        [_host(qt.scale) for qt in qts],
        [_host(qt.zero_point) for qt in qts],
        views,
        None,
        threads,
    )
    dests.finish()
    return outs


def _host(a: Any) -> np.ndarray:
    """A numpy array of a numpy array or CPU tensor (no copy when possible;
    a copy of a hand-made instance's negative view: numpy needs the values
    themselves)."""
    if isinstance(a, np.ndarray):
        return a
    out: np.ndarray = a.detach().resolve_neg().numpy()
    return out


def quantize_into(
    items: Sequence[tuple[str, Any, Any]],
    bits: int,
    mode: str,
    backend: str,
    threads: int | None,
    quantizer: str = "asymmetric",
    dots: Sequence[tuple[np.ndarray, np.ndarray | None] | None] | None = None,
) -> list[LayerResult]:
    """Quantize every ``(name, weight, destination)`` and write the weight's
    dequantized value into ``destination`` (a tensor of the weight's shape,
    dtype and device, fully overwritten). When ``destination`` is the
    weight itself, the values are written into a new tensor that then
    becomes the weight's ``.data``.

    Weights for the Rust core (``backend="rust"``, or ``"auto"`` on the CPU)
    run in one parallel native pass that writes the destinations directly
    and computes the relative errors (float64 sums) on the way. The others
    take :func:`quantize_tensor` one at a time; those on the CPU are then
    dequantized into their destinations, errors included, in one native
    pass too. ``bits``, ``mode``, ``backend``, ``threads`` and ``quantizer``
    must be valid. Every result equals ``quantize_tensor(weight, bits, mode,
    backend=backend, quantizer=quantizer)`` and its ``dequantize()``, bit
    for bit.

    ``dots`` (one entry per item, or ``None``): ``(v_hat, v_w)`` float64
    vectors of the weight's channel length for an item whose weight and
    destination are CPU float32: the native pass also computes, per output
    channel, ``w_hat . v_hat - w . v_w`` (``(w_hat - w) . v_hat`` where
    ``v_w`` is ``None``) as each channel is written, into the result's
    ``dot`` (``None`` where the item did not go through the native pass).

    Returns:
        One :class:`LayerResult` per item, in order.

    Raises:
        SquantError, UnsupportedDtypeError: for the first weight in order
            that cannot be quantized, the message starting with its name.
    """
    import torch

    from ..torch.adapter import check_torch_weight, host_float32, to_numpy_f32

    items = list(items)
    in_place: list[tuple[Any, Any]] = []
    for i, (name, w, dst) in enumerate(items):
        if dst is w:
            fresh = torch.empty_like(w, memory_format=torch.preserve_format)
            in_place.append((w, fresh))
            items[i] = (name, w, fresh)
    native: list[int] = []
    for i, (name, w, dst) in enumerate(items):
        try:
            check_torch_weight(w)
        except (SquantError, UnsupportedDtypeError) as exc:
            raise type(exc)(f"{name or 'weight'}: {exc}") from exc
        if backend != "torch" and w.is_cpu and dst.is_cpu:
            native.append(i)
    out: list[LayerResult | None] = [None] * len(items)
    failure: tuple[int, Exception] | None = None
    dests = _Destinations()
    arrays: list[np.ndarray] = []
    for k, i in enumerate(native):
        try:
            arrays.append(host_float32(items[i][1], bits, quantizer))
        except (SquantError, UnsupportedDtypeError) as exc:
            # Raised below, unless a weight before it fails first.
            failure = (i, type(exc)(f"{items[i][0] or 'weight'}: {exc}"))
            native = native[:k]
            break
    if native:
        outs = [dests.view(items[i][2]) for i in native]
        start = time.perf_counter()
        try:
            asked = None if dots is None else [dots[i] for i in native]
            res = _native.quantize_into(arrays, outs, bits, mode, True, threads, quantizer, asked)
        except SquantError as exc:
            m = _WEIGHT_INDEX.match(str(exc))
            if m is None:  # pragma: no cover - every per-weight error is indexed
                raise
            i = native[int(m.group(1))]
            failure = (i, type(exc)(f"{items[i][0] or 'weight'}: {m.group(2)}"))
        else:
            # The pass's wall time, shared between the layers in proportion
            # to the time its threads spent on each (so the rows add up to
            # the time the pass took, whatever the thread count).
            wall = (time.perf_counter() - start) * 1e3
            spent = sum(r[6] for r in res)
            share = wall / spent if spent > 0 else 0.0
            for i, (codes, scale, zp, kf, cf, err, ms, dot) in zip(native, res):
                w = items[i][1]
                qt = from_native(
                    (codes, scale, zp, kf, cf), bits, mode, w.dtype, w.device, quantizer
                )
                out[i] = LayerResult(qt, err, ms * share, dot)
            dests.finish()
    done = set(native)
    later: list[tuple[int, QuantizedTensor, float]] = []  # CPU results to dequantize
    for i, (name, w, dst) in enumerate(items):
        if failure is not None and i >= failure[0]:
            # The pass failed here: raise unless an earlier weight fails.
            raise failure[1]
        if i in done:
            continue
        qt, ms = quantize_layer_weight(name, w.detach(), bits, mode, backend, threads, quantizer)
        if qt.codes.device.type == "cpu" and dst.device.type == "cpu":
            later.append((i, qt, ms))
            continue
        w_hat = qt.dequantize()
        err = relative_error(w, w_hat)
        with torch.no_grad():
            dst.copy_(w_hat)
        out[i] = LayerResult(qt, err, ms)
    if later:
        errs = _native.dequantize_into(
            [qt.codes.numpy() for _, qt, _ in later],
            [qt.scale.numpy() for _, qt, _ in later],
            [qt.zero_point.numpy() for _, qt, _ in later],
            [dests.view(items[i][2]) for i, _, _ in later],
            [to_numpy_f32(items[i][1]) for i, _, _ in later],
            threads,
        )
        assert errs is not None
        dests.finish()
        for (i, qt, ms), err in zip(later, errs):
            out[i] = LayerResult(qt, err, ms)
    with torch.no_grad():
        for w, fresh in in_place:
            w.data = fresh
    return [r for r in out if r is not None]
