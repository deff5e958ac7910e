"""A cheap graph capture for the recipe: the ``torch.fx`` symbolic trace's
nodes, without ``torch.fx``'s per-node machinery.

:func:`capture` runs ``type(model).forward`` on symbolic values like
``torch.fx.Tracer`` does (the same leaf modules, the same ``placeholder``,
``get_attr`` (a parameter read through a module attribute),
``call_module`` / ``call_function`` / ``call_method`` and ``output``
records in the same order, the same users), and keeps only what the recipe
reads: each node's ``op``, ``target``, ``args``, ``kwargs`` and ``users``.
It has no node names and no generated code, and a buffer or constant tensor
that ``torch.fx`` would turn into a ``get_attr`` node stays the tensor
itself (the recipe treats both alike: no statistics, no layer's output).

It is conservative: whatever it does not mirror exactly (a forward with
default or variadic arguments, a value used in control flow, iterated
(but for tuple unpacking, as ``torch.fx``), converted to a number, an
argument type ``torch.fx`` would make a node of or reject, a
``torch.fx.wrap`` registry it does not know, a module outside the model)
raises, and the caller traces with ``torch.fx`` instead
(:func:`squant_rs.model.fold.trace`). On MobileNetV2 the ``torch.fx`` trace
took ~7.5 ms on the shared 2-core machine, this capture ~1.1 ms
(``docs/recipe.md``, cost).
"""

from __future__ import annotations

import bisect
import dis
import enum
import inspect
import operator
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


class CaptureError(Exception):
    """The capture cannot mirror ``torch.fx`` here (the caller falls back)."""


class Node:
    """One recorded operation (the fields of ``torch.fx.Node`` that the
    recipe reads)."""

    __slots__ = ("args", "kwargs", "op", "target", "users")

    def __init__(self, op: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.op = op
        self.target = target
        self.args = args
        self.kwargs = kwargs
        #: The nodes that read this one's value, in order (as ``torch.fx``).
        self.users: dict[Node, None] = {}

    def __repr__(self) -> str:
        return f"Node({self.op}, {self.target!r})"


class Graph:
    """The recorded nodes in execution order (``torch.fx.Graph.nodes``)."""

    __slots__ = ("nodes",)

    def __init__(self) -> None:
        self.nodes: list[Node] = []


# Argument types recorded as they are (torch.fx's base types, less the
# symbolic ones, which a plain forward does not produce).
_ATOMS: set[type[Any]] = {int, float, bool, str, complex, type(None), type(...)}


#: Whether a function is a Tensor method or property, by function.
_METHODS: dict[Any, bool] = {}


class _Capture:
    def __init__(self, model: nn.Module, paths: dict[int, str]) -> None:
        import torch

        self.graph = Graph()
        self.model = model
        self.paths = paths
        self.param_names: dict[int, str] | None = None
        self.params: dict[str, Value] = {}
        self.atoms = set(_ATOMS) | {torch.dtype, torch.device, torch.memory_format, torch.layout}
        self.tensor = torch.Tensor
        self.unsupported = (torch._C.ScriptMethod, torch._ops.HigherOrderOperator)
        self.tensor_method = torch.overrides.is_tensor_method_or_property
        self.leaf_cache: dict[type[Any], bool] = {}

    def is_method(self, func: Any) -> bool:
        """``torch.overrides.is_tensor_method_or_property`` (which sets up a
        warnings filter on every call), remembered per function."""
        known = _METHODS.get(func)
        if known is None:
            known = _METHODS[func] = bool(self.tensor_method(func))
        return known

    def arg(self, a: Any, reads: dict[Node, None]) -> Any:
        """``a`` with each value replaced by its node (``torch.fx``'s
        ``create_arg``, for the types it accepts that a forward passes)."""
        t = type(a)
        if t is Value:
            node = a.node
            reads[node] = None
            return node
        if t is Attribute:
            node = a.materialize()
            reads[node] = None
            return node
        if t in self.atoms or isinstance(a, (self.tensor, enum.Enum)):
            return a
        if t is tuple:
            return tuple(self.arg(x, reads) for x in a)
        if t is list:
            return [self.arg(x, reads) for x in a]
        if t is dict:
            if not all(type(k) is str for k in a):
                raise CaptureError("dict argument with non-string keys")
            return {k: self.arg(v, reads) for k, v in a.items()}
        if t is slice:
            return slice(self.arg(a.start, reads), self.arg(a.stop, reads), self.arg(a.step, reads))
        if isinstance(a, tuple):  # torch.Size, a named tuple: stored as torch.fx does
            items = [self.arg(x, reads) for x in a]
            return t(*items) if hasattr(a, "_fields") else tuple(items)
        if isinstance(a, list):
            return [self.arg(x, reads) for x in a]
        raise CaptureError(f"argument of type {t.__name__}")

    def record(self, op: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Node:
        reads: dict[Node, None] = {}
        node = Node(op, target, self.arg(args, reads), self.arg(kwargs, reads))
        for r in reads:
            r.users[node] = None
        self.graph.nodes.append(node)
        return node

    def value(self, op: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Value:
        return Value(self, self.record(op, target, args, kwargs))

    def parameter(self, p: Any) -> Any:
        """A parameter read in a forward: one ``get_attr`` value per
        parameter of the model (as ``torch.fx``), else ``p`` itself."""
        if self.param_names is None:
            names: dict[int, str] = {}
            for n, q in self.model.named_parameters():
                names.setdefault(id(q), n)
            self.param_names = names
        name = self.param_names.get(id(p))
        if name is None:
            return p
        v = self.params.get(name)
        if v is None:
            v = self.params[name] = self.value("get_attr", name, (), {})
        return v

    def is_leaf(self, m: nn.Module) -> bool:
        """``squant_rs.model.fold``'s tracer's leaves: the recipe's module
        types, and ``torch.fx``'s default (``torch.nn`` modules but
        ``nn.Sequential``)."""
        t = type(m)
        leaf = self.leaf_cache.get(t)
        if leaf is None:
            from torch import nn

            from .fold import leaf_types

            mod = getattr(t, "__module__", "") or ""
            leaf = issubclass(t, leaf_types()) or (
                (mod.startswith("torch.nn") or mod.startswith("torch.ao.nn"))
                and not issubclass(t, nn.Sequential)
            )
            self.leaf_cache[t] = leaf
        return leaf


class Value:
    """A symbolic value (``torch.fx.Proxy``'s behaviour for what it mirrors)."""

    __slots__ = ("cap", "node")

    def __init__(self, cap: _Capture, node: Node) -> None:
        self.cap = cap
        self.node = node

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: tuple[type[Any], ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Value:
        cap = _find(args, kwargs)
        if isinstance(func, cap.unsupported):
            raise CaptureError(f"{func!r}")
        if cap.is_method(func):
            return cap.value("call_method", func.__name__, tuple(args), dict(kwargs or {}))
        return cap.value("call_function", func, tuple(args), dict(kwargs or {}))

    def __getattr__(self, name: str) -> Attribute:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return Attribute(self, name)

    def __repr__(self) -> str:
        return f"Proxy({self.node.op})"

    def __bool__(self) -> bool:
        raise CaptureError("a captured value used in control flow")

    def __iter__(self) -> Iterator[Any]:
        # `a, b = value` unpacks into getitem nodes, as under torch.fx (which
        # reads the calling instruction the same way); other iteration fails.
        frame = inspect.currentframe()
        caller = frame.f_back if frame is not None else None
        if caller is not None:
            insts = list(dis.get_instructions(caller.f_code))
            if sys.version_info >= (3, 11):
                at = bisect.bisect_left([i.offset for i in insts], caller.f_lasti)
            else:  # pragma: no cover - Python 3.9/3.10
                at = caller.f_lasti // 2
            if at < len(insts) and insts[at].opname == "UNPACK_SEQUENCE":
                return (self[i] for i in range(insts[at].argval))  # type: ignore[index]
        raise CaptureError("a captured value iterated")

    def __len__(self) -> int:
        raise CaptureError("len() of a captured value")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise CaptureError("a captured value called")

    __hash__ = object.__hash__


class Attribute(Value):
    """``value.name``: a ``call_method`` when called, else a ``getattr``
    node made when first used (as ``torch.fx.Attribute``)."""

    __slots__ = ("attr", "made", "root")

    def __init__(self, root: Value, attr: str) -> None:  # noqa: D107
        self.cap = root.cap
        self.root = root
        self.attr = attr
        self.made: Node | None = None

    def __repr__(self) -> str:
        # torch.fx's repr reads the node, which makes it (a user of the root)
        return f"Proxy({self.materialize().op})"

    def materialize(self) -> Node:
        if self.made is None:
            self.made = self.cap.record("call_function", getattr, (self.root, self.attr), {})
        return self.made

    def __getattr__(self, name: str) -> Attribute:
        if name == "node":
            return self.materialize()  # type: ignore[return-value]
        return super().__getattr__(name)

    def __call__(self, *args: Any, **kwargs: Any) -> Value:
        return self.cap.value("call_method", self.attr, (self.root, *args), kwargs)


def _find(args: Any, kwargs: Any) -> _Capture:
    """The capture of the first symbolic value in ``args``/``kwargs``."""
    stack = [args, kwargs]
    while stack:
        a = stack.pop()
        if isinstance(a, Value):
            return a.cap
        if isinstance(a, (tuple, list)):
            stack.extend(a)
        elif isinstance(a, dict):
            stack.extend(a.values())
    raise CaptureError("no captured value among the arguments")


def _magic(name: str) -> None:
    target = getattr(operator, name)

    def impl(self: Value, *rest: Any) -> Value:
        return self.cap.value("call_function", target, (self, *rest), {})

    def rimpl(self: Value, other: Any) -> Value:
        return self.cap.value("call_function", target, (other, self), {})

    dunder = f"__{name.strip('_')}__"
    setattr(Value, dunder, impl)
    if name in _REFLECTABLE:
        setattr(Value, f"__r{name.strip('_')}__", rimpl)


# torch.fx's magic methods (torch/fx/graph.py), no in-place ones: `x += y`
# records operator.add as under torch.fx.
_REFLECTABLE = (
    "add sub mul floordiv truediv mod pow lshift rshift and_ or_ xor getitem matmul"
).split()
for _name in ["eq", "ne", "lt", "gt", "le", "ge", "pos", "neg", "invert", *_REFLECTABLE]:
    _magic(_name)


def _wrapped_functions() -> list[tuple[dict[str, Any], str, Any]]:
    """The functions registered with ``torch.fx.wrap``, as
    ``(globals, name, function)`` (raises where torch's registry is not the
    one this module knows)."""
    import builtins

    from torch.fx import _symbolic_trace as st

    table = getattr(st, "_wrapped_fns_to_patch", None)
    methods = getattr(st, "_wrapped_methods_to_patch", None)
    if not isinstance(table, dict) or not isinstance(methods, list):
        raise CaptureError("unknown torch.fx wrap registry")
    if methods:
        raise CaptureError("torch.fx wraps Tensor methods")
    out = []
    for key, frame_dict in table.items():
        name = key[1]
        if name in frame_dict:
            out.append((frame_dict, name, frame_dict[name]))
        elif hasattr(builtins, name):
            out.append((frame_dict, name, getattr(builtins, name)))
    return out


def _leaf_function(fn: Any) -> Any:
    """``fn`` recorded as a ``call_function`` node when a captured value is
    among its arguments (``torch.fx.wrap``'s behaviour)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            cap = _find(args, kwargs)
        except CaptureError:
            return fn(*args, **kwargs)
        return cap.value("call_function", fn, args, kwargs)

    return wrapper


def capture(model: nn.Module, modules: dict[str, nn.Module] | None = None) -> Graph:
    """The nodes ``squant_rs.model.fold``'s ``torch.fx`` tracer records for
    ``model`` (see the module docstring). ``modules``: ``model``'s
    ``named_modules()`` as a dict, where the caller has it.

    Raises:
        CaptureError: the capture cannot mirror ``torch.fx`` on this model;
            any other exception: the forward failed on symbolic values.
    """
    from torch import nn
    from torch.fx import _symbolic_trace as st

    if modules is None:
        modules = dict(model.named_modules())
    paths = {id(m): name for name, m in modules.items()}
    fn = type(model).forward
    if not inspect.isfunction(fn):
        raise CaptureError("forward is not a Python function")
    code = fn.__code__
    if code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS) or fn.__defaults__:
        raise CaptureError("forward with variadic or default arguments")
    if code.co_kwonlyargcount or code.co_argcount < 1:
        raise CaptureError("forward with keyword-only arguments")
    set_tracing = getattr(st, "_set_is_fx_tracing", None)
    is_tracing = getattr(st, "_get_is_fx_tracing", None)
    if set_tracing is None or is_tracing is None:
        raise CaptureError("unknown torch.fx tracing flag")
    wrapped = _wrapped_functions()

    cap = _Capture(model, paths)
    inputs = [
        cap.value("placeholder", name, (), {}) for name in code.co_varnames[1 : code.co_argcount]
    ]
    orig_call = nn.Module.__call__
    orig_getattr = nn.Module.__getattr__
    parameter = nn.Parameter

    def module_getattr(mod: nn.Module, name: str) -> Any:
        v = orig_getattr(mod, name)
        return cap.parameter(v) if isinstance(v, parameter) else v

    def module_call(mod: nn.Module, *args: Any, **kwargs: Any) -> Any:
        path = paths.get(id(mod))
        if path is None:
            raise CaptureError("a module that is not a submodule of the model")
        if cap.is_leaf(mod):
            return cap.value("call_module", path, args, kwargs)
        return orig_call(mod, *args, **kwargs)

    was_tracing = is_tracing()
    patched: list[tuple[dict[str, Any], str, Any]] = []
    nn.Module.__call__ = module_call  # type: ignore[method-assign]
    nn.Module.__getattr__ = module_getattr  # type: ignore[method-assign]
    try:
        set_tracing(True)
        for frame_dict, name, f in wrapped:
            patched.append((frame_dict, name, frame_dict.get(name, _MISSING)))
            frame_dict[name] = _leaf_function(f)
        out = fn(model, *inputs)
        cap.record("output", "output", (out,), {})
    finally:
        nn.Module.__call__ = orig_call  # type: ignore[method-assign]
        nn.Module.__getattr__ = orig_getattr  # type: ignore[method-assign]
        for frame_dict, name, old in reversed(patched):
            if old is _MISSING:
                frame_dict.pop(name, None)
            else:
                frame_dict[name] = old
        set_tracing(was_tracing)
    return cap.graph


_MISSING = object()
