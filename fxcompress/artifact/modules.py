"""How ``call_module`` leaves are stored: a type name, a config, and their tensors.

A leaf is stored as ``{"type": NAME, "config": {...}}`` (config in the typed
JSON of :mod:`.values`) plus its ``state_dict()`` tensors in the weights file,
and rebuilt by looking ``NAME`` up in this registry: no class is ever imported
by a name read from a file, except fxcompress's own modules and a fixed list
of torchvision modules.  Three kinds of entries:

* **torch.nn classes** (convs, linears, norms, activations, pools, pads,
  dropout, embedding, attention, ...): the config is the constructor's
  arguments, read from the attributes of the same name (``bias`` and
  ``add_bias_kv`` from whether those tensors exist).  The module is rebuilt on
  the ``meta`` device, so nothing is initialised, and its tensors are then
  swapped in.  On save, every such leaf is rebuilt this way as a dry run and
  compared with the original (state names and shapes, config, plain attributes),
  so a module that would not come back the same is refused before writing.
* **containers** (``Sequential``, ``ModuleList``, ``ModuleDict``, and
  ``Sequential`` subclasses that keep ``Sequential.forward``, such as
  torchvision's ``Conv2dNormActivation``, which load as ``nn.Sequential``):
  their children are stored recursively.
* **registered classes** (every fxcompress module that can sit in a graph:
  the lowered modules, the quantization wrappers, observers and fake-quant
  modules; or yours), see :func:`register_module`.  A registered class that
  holds other modules describes them through this same registry
  (:func:`describe_child` in its config, :func:`build_child` when it is
  rebuilt), so every nested module obeys the rules above; one registered with
  ``check=True`` is also rebuilt at save time from its config and a copy of
  its tensors and must come back the same (types, tensors, plain attributes).

Only the exact registered type matches: a subclass of ``nn.Conv2d`` with its
own ``forward`` is not a ``Conv2d``, and is refused with its path and class.
Modules carrying hooks are refused too: a hook is code, and code is not stored.
"""

from __future__ import annotations

import contextvars
import importlib
import inspect
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping

import torch
from torch import nn

from fxcompress.artifact import values
from fxcompress.artifact.allowlist import import_fxcompress_module
from fxcompress.artifact.module_state import assign_state, difference, swap_state
from fxcompress.errors import ArtifactError

__all__ = ["register_module", "supported_modules", "describe", "build", "describe_child", "build_child",
           "assign_state"]

ToConfig = Callable[[nn.Module], dict]
FromConfig = Callable[[dict, dict[str, torch.Tensor]], nn.Module]


@dataclass(frozen=True)
class _Codec:
    name: str
    cls: type
    to_config: ToConfig
    from_config: FromConfig
    dry_run: bool  # rebuild on meta at save time and compare (torch.nn-style classes)
    check: bool = False  # registered classes: rebuild from a copy at save time and compare


_by_name: dict[str, _Codec] = {}
_by_cls: dict[type, _Codec] = {}
_builtins_added = False
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
_CONTAINERS = {"torch.nn.Sequential": nn.Sequential, "torch.nn.ModuleList": nn.ModuleList, "torch.nn.ModuleDict": nn.ModuleDict}

_NN_CLASSES = (
    "Conv1d Conv2d Conv3d ConvTranspose1d ConvTranspose2d ConvTranspose3d Linear Bilinear Identity "
    "Flatten Unflatten BatchNorm1d BatchNorm2d BatchNorm3d InstanceNorm1d InstanceNorm2d InstanceNorm3d "
    "LayerNorm GroupNorm RMSNorm LocalResponseNorm ReLU ReLU6 LeakyReLU PReLU ELU SELU CELU GELU SiLU "
    "Mish Hardswish Hardsigmoid Hardtanh Sigmoid Tanh Softmax LogSoftmax Softmax2d Softplus Softsign "
    "Tanhshrink Hardshrink Softshrink LogSigmoid GLU Threshold Dropout Dropout1d Dropout2d Dropout3d "
    "AlphaDropout MaxPool1d MaxPool2d MaxPool3d AvgPool1d AvgPool2d AvgPool3d AdaptiveAvgPool1d "
    "AdaptiveAvgPool2d AdaptiveAvgPool3d AdaptiveMaxPool1d AdaptiveMaxPool2d AdaptiveMaxPool3d "
    "ZeroPad1d ZeroPad2d ZeroPad3d ConstantPad1d ConstantPad2d ConstantPad3d ReflectionPad1d "
    "ReflectionPad2d ReflectionPad3d ReplicationPad1d ReplicationPad2d ReplicationPad3d Upsample "
    "UpsamplingNearest2d UpsamplingBilinear2d PixelShuffle PixelUnshuffle ChannelShuffle Embedding "
    "MultiheadAttention"
).split()
# Constructor arguments that are not stored under their own name: ("has", path) is
# whether that tensor exists, ("attr", path) is read from another attribute.
_DERIVED = {"bias": ("has", "bias"), "add_bias_kv": ("has", "bias_k")}
_DERIVED_BY_CLASS = {"MultiheadAttention": {"bias": ("has", "in_proj_bias")}}
_SWIN = {"dim": ("attr", "qkv.in_features"), "qkv_bias": ("has", "qkv.bias"), "proj_bias": ("has", "proj.bias")}
# torchvision modules a user may keep as leaves (tracing goes through them by default).
# Registered classes that moved to another module: the name older artifacts store -> the current one.
_RENAMED = {"fxcompress.quant.lowered_pool.QuantAdd": "fxcompress.quant.lowered_add.QuantAdd"}
_TORCHVISION = {
    "torchvision.ops.stochastic_depth.StochasticDepth": {},
    "torchvision.ops.misc.Permute": {},
    "torchvision.models.swin_transformer.ShiftedWindowAttention": _SWIN,
    "torchvision.models.swin_transformer.ShiftedWindowAttentionV2": _SWIN,
}


def register_module(
    cls: type | None = None,
    *,
    name: str | None = None,
    to_config: ToConfig | None = None,
    from_config: FromConfig | None = None,
    check: bool = False,
) -> Any:
    """Make ``cls`` storable as a ``call_module`` leaf; usable as a class decorator.

    ``to_config(module) -> dict`` returns the constructor-level config (values
    the typed JSON can hold); ``from_config(config, state) -> module`` rebuilds
    the module from it and from ``state``, the module's ``state_dict()`` as
    loaded (parameters arrive as ``nn.Parameter``), rebuilding any cache (such
    as prepacked oneDNN weights) itself.  Without the two functions, the class
    must define ``_fxc_config(self)`` and a classmethod
    ``_fxc_from_config(cls, config, state)``.  ``name`` (default: the class's
    ``_fxc_name`` attribute, else ``module.qualname``) is what the file stores;
    it must be stable across versions.  Register at import of the defining
    module: on load, names under ``fxcompress.`` are imported on demand, others
    must have been imported by the caller.

    A class holding submodules puts :func:`describe_child` of each in its
    config and rebuilds them with :func:`build_child`; :func:`assign_state`
    installs its own stored tensors with their names, dtypes and shapes
    checked.  With ``check=True``, saving a leaf of this class first rebuilds
    it from its encoded config and a copy of its tensors and refuses the
    model (``ArtifactError``, nothing written) unless the copy has the same
    submodule types, tensors (names, dtypes, shapes, values) and plain
    attributes: the save-time proof that the artifact will load bit-identical.
    """
    if cls is None:
        return lambda c: register_module(c, name=name, to_config=to_config, from_config=from_config, check=check)
    to_config = to_config or getattr(cls, "_fxc_config", None)
    from_config = from_config or getattr(cls, "_fxc_from_config", None)
    if to_config is None or from_config is None:
        raise ArtifactError(
            f"register_module({cls.__qualname__}): pass to_config and from_config, or define "
            "_fxc_config(self) and classmethod _fxc_from_config(cls, config, state)"
        )
    name = name or getattr(cls, "_fxc_name", None) or f"{cls.__module__}.{cls.__qualname__}"
    if not _DOTTED.fullmatch(name):
        raise ArtifactError(f"register_module({cls.__qualname__}): name {name!r} must be a dotted Python name")
    _builtins()  # a name clash with a torch.nn entry must be seen now, not at the first save
    _add(_Codec(name, cls, to_config, from_config, dry_run=False, check=check))
    return cls


def supported_modules() -> list[str]:
    """Sorted type names that can be stored as leaves: torch.nn, containers, torchvision, registered."""
    _builtins()
    return sorted({*_by_name, *_CONTAINERS, *_TORCHVISION})


def _add(codec: _Codec) -> None:
    old = _by_name.get(codec.name)
    if old is not None and old.cls is not codec.cls:
        raise ArtifactError(f"register_module: {codec.name!r} is already registered to {old.cls!r}")
    _by_name[codec.name] = codec
    _by_cls[codec.cls] = codec


def _ctor_codec(name: str, cls: type, derived: Mapping[str, tuple[str, str]]) -> _Codec:
    """A codec that reads constructor arguments back from same-named attributes."""
    params = [
        p for p in inspect.signature(cls.__init__).parameters.values()
        if p.name not in ("self", "device", "dtype") and not p.name.startswith("_")
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]

    def to_config(module: nn.Module) -> dict:
        config = {}
        for p in params:
            if p.name in derived:
                how, source = derived[p.name]
                value = _get(module, source)
                config[p.name] = value is not None if how == "has" else value
            elif hasattr(module, p.name):
                config[p.name] = getattr(module, p.name)
            elif p.default is p.empty:  # a required argument we cannot recover
                raise ArtifactError(f"{name} has no attribute {p.name!r} to rebuild it from")
        return config

    def from_config(config: dict, state: dict[str, torch.Tensor], missing: Collection[str] = ()) -> nn.Module:
        with torch.device("meta"):  # nothing is initialised; the stored tensors replace these
            module = cls(**config)
        swap_state(module, state, missing)
        return module

    return _Codec(name, cls, to_config, from_config, dry_run=True)


def _get(module: nn.Module, dotted: str) -> Any:
    for part in dotted.split("."):
        module = getattr(module, part, None)
    return module


def _builtins() -> None:
    global _builtins_added
    if _builtins_added:
        return
    _builtins_added = True
    for cls_name in _NN_CLASSES:
        cls = getattr(nn, cls_name)
        derived = {**_DERIVED, **_DERIVED_BY_CLASS.get(cls_name, {})}
        _add(_ctor_codec(f"torch.nn.{cls_name}", cls, derived))
    linear = nn.modules.linear.NonDynamicallyQuantizableLinear  # MultiheadAttention.out_proj
    _add(_ctor_codec("torch.nn.modules.linear.NonDynamicallyQuantizableLinear", linear, _DERIVED))


def _lookup_name(name: str) -> _Codec:
    _builtins()
    name = _RENAMED.get(name, name)
    if name not in _by_name and name.startswith("fxcompress."):
        import_fxcompress_module(name)
    if name not in _by_name and name in _TORCHVISION:
        module, _, attr = name.rpartition(".")
        cls = getattr(importlib.import_module(module), attr)
        _add(_ctor_codec(name, cls, _TORCHVISION[name]))
    if name not in _by_name:
        raise ArtifactError(
            f"the artifact holds a module of type {name!r}, which is not registered here; import the "
            "module that registers it (fxcompress.artifact.register_module) before loading"
        )
    return _by_name[name]


def _lookup_cls(cls: type) -> _Codec | None:
    _builtins()
    name = f"{cls.__module__}.{cls.__qualname__}"
    if cls not in _by_cls and name in _TORCHVISION:
        _lookup_name(name)
    return _by_cls.get(cls)


def _is_container(module: nn.Module) -> str | None:
    for name, cls in _CONTAINERS.items():
        if type(module) is cls:
            return name
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        return "torch.nn.Sequential"
    return None


# The path of the leaf being described or built, so that a registered class's
# describe_child / build_child calls (which do not know where their module sits)
# name the full path of a nested module in errors.
_current_path: contextvars.ContextVar[str] = contextvars.ContextVar("fxcompress_artifact_path", default="")
_MALFORMED = "malformed artifact: "


def describe(path: str, module: nn.Module) -> dict:
    """The stored description of the leaf at ``path``; ``ArtifactError`` if unrepresentable."""
    for sub_path, sub in module.named_modules(prefix=path):
        hooks = (sub._forward_hooks, sub._forward_pre_hooks, sub._backward_hooks, sub._backward_pre_hooks)
        if any(hooks):
            raise ArtifactError(f"module {sub_path!r} has hooks; an artifact stores no code: remove them first")
    return _describe(path, module, encode=True, missing=())


def describe_child(name: str, module: nn.Module, *, missing: Collection[str] = ()) -> dict:
    """The description of submodule ``name`` of a registered module, for its config.

    Call it from ``to_config`` / ``_fxc_config``: the result holds plain values
    (the outer config's encoding stores them) and is built back by
    :func:`build_child`.  The submodule goes through this registry like a leaf
    (a torch.nn class, a container or a registered class; the same dry run,
    the same refusals).  ``missing`` names tensors of a torch.nn submodule
    that its owner removed (set to None, such as the float weight of a
    folded layer): they are neither stored nor compared, and must be None.
    """
    parent = _current_path.get()
    return _describe(f"{parent}.{name}" if parent else name, module, encode=False, missing=missing)


def _describe(path: str, module: nn.Module, *, encode: bool, missing: Collection[str]) -> dict:
    container = _is_container(module)
    if container is not None:
        if module._parameters or module._buffers or missing:
            raise ArtifactError(f"container {path!r} holds its own tensors; artifacts cannot rebuild it")
        return {"type": container, "children": [
            [n, _describe(f"{path}.{n}", c, encode=encode, missing=())] for n, c in module.named_children()]}
    codec = _lookup_cls(type(module))
    if codec is None:
        cls = type(module)
        raise ArtifactError(
            f"module {path!r} of type {cls.__module__}.{cls.__qualname__} cannot be stored in an artifact: "
            "it is not a supported torch.nn module. Register it with fxcompress.artifact.register_module, "
            "or trace through it (do not make it a leaf module)"
        )
    _check_missing(path, module, codec, missing)
    token = _current_path.set(path)
    try:
        config = codec.to_config(module)
    finally:
        _current_path.reset(token)
    if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
        raise ArtifactError(f"module {path!r}: {codec.name} config must be a dict with str keys")
    encoded = values.encode(config, f"module {path!r} config")
    if codec.dry_run:
        _dry_run(path, module, codec, config, missing)
    elif codec.check and encode:  # a nested module is checked as part of its top-level leaf
        _check_rebuild(path, module, codec, encoded)
    return {"type": codec.name, "config": encoded if encode else config}


def _check_missing(path: str, module: nn.Module, codec: _Codec, missing: Collection[str]) -> None:
    if not missing:
        return
    if not codec.dry_run:
        raise ArtifactError(f"module {path!r} ({codec.name}): only torch.nn modules can be stored without "
                            f"some of their tensors ({sorted(missing)})")
    for name in missing:
        slots = module._parameters if name in module._parameters else module._buffers
        if name not in slots or slots[name] is not None:
            raise ArtifactError(f"module {path!r} ({codec.name}) must have no tensor {name!r} to be stored "
                                "without it")


def _dry_run(path: str, module: nn.Module, codec: _Codec, config: dict, missing: Collection[str] = ()) -> None:
    """Rebuild ``module`` on meta from its config and insist it comes back the same."""
    try:
        with torch.device("meta"):
            rebuilt = codec.cls(**config)
    except Exception as exc:  # the constructor's own complaint, with our context
        raise ArtifactError(f"module {path!r} ({codec.name}) cannot be rebuilt from its attributes: {exc}") from exc
    want = {k: tuple(t.shape) for k, t in module.state_dict().items()}
    got = {k: tuple(t.shape) for k, t in rebuilt.state_dict().items() if k not in missing}
    problem = None
    if want != got:
        problem = f"its tensors {want} would come back as {got}"
    elif codec.to_config(rebuilt) != config:
        problem = f"its config {config} would come back as {codec.to_config(rebuilt)}"
    else:
        plain = (bool, int, float, str, tuple, type(None))
        for key, value in vars(module).items():
            if key == "training":  # restored separately for every module
                continue
            other = vars(rebuilt).get(key, value)
            if isinstance(value, plain) and isinstance(other, plain) and other != value:
                problem = f"its attribute {key!r} = {value!r} would come back as {other!r}"
                break
    if problem:
        raise ArtifactError(f"module {path!r} ({codec.name}) cannot be stored faithfully: {problem}")


def _check_rebuild(path: str, module: nn.Module, codec: _Codec, encoded: Any) -> None:
    """Rebuild a registered ``module`` from its encoded config and a copy of its tensors;
    insist on the same module (see :func:`register_module`'s ``check``)."""
    state = {k: nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad) if isinstance(t, nn.Parameter)
             else t.detach().clone() for k, t in module.state_dict(keep_vars=True).items()}
    try:
        rebuilt = _build(path, {"type": codec.name, "config": encoded}, state, decode=True, missing=())
    except ArtifactError as exc:
        raise ArtifactError(f"module {path!r} ({codec.name}) would not load back: {exc}") from exc
    problem = difference(module, rebuilt)
    if problem:
        raise ArtifactError(f"module {path!r} ({codec.name}) cannot be stored faithfully: {problem}")


def build(path: str, desc: Any, state: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild the leaf described by ``desc`` with its ``state`` (names relative to it)."""
    return _build(path, desc, state, decode=True, missing=())


def build_child(name: str, desc: Any, state: Mapping[str, torch.Tensor], *,
                missing: Collection[str] = ()) -> nn.Module:
    """Rebuild submodule ``name`` from what :func:`describe_child` gave, inside ``from_config``.

    ``state`` is the owner's state (as ``from_config`` received it): the
    entries under ``name.`` are the submodule's.  A malformed description or
    state raises ``ArtifactError`` naming the submodule's full path.  Tensors
    named in ``missing`` come back as meta tensors of the shape the config
    gives; the owner must replace or remove them (as it did before saving).
    """
    parent = _current_path.get()
    prefix = name + "."
    sub = {k[len(prefix):]: t for k, t in state.items() if k.startswith(prefix)}
    return _build(f"{parent}.{name}" if parent else name, desc, sub, decode=False, missing=missing)


def _build(path: str, desc: Any, state: Mapping[str, torch.Tensor], *, decode: bool,
           missing: Collection[str]) -> nn.Module:
    if not isinstance(desc, dict) or not isinstance(desc.get("type"), str):
        raise ArtifactError(f"malformed artifact: module {path!r} has no type")
    name = desc["type"]
    if name in _CONTAINERS:
        children = desc.get("children")
        if set(desc) != {"type", "children"} or not isinstance(children, list) or missing:
            raise ArtifactError(f"malformed artifact: container {path!r} is not described by its children")
        built = OrderedDict()
        for item in children:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)) or item[0] in built:
                raise ArtifactError(f"malformed artifact: container {path!r} has a bad child entry")
            prefix = item[0] + "."
            sub = {k[len(prefix):]: t for k, t in state.items() if k.startswith(prefix)}
            built[item[0]] = _build(f"{path}.{item[0]}", item[1], sub, decode=decode, missing=())
        module = _CONTAINERS[name](built) if name != "torch.nn.ModuleList" else nn.ModuleList(built.values())
        if set(module.state_dict()) != set(state):
            raise ArtifactError(f"malformed artifact: container {path!r} has tensors none of its children own")
        return module
    if set(desc) != {"type", "config"}:
        raise ArtifactError(f"malformed artifact: module {path!r} has keys {sorted(desc)}")
    codec = _lookup_name(name)
    config = values.decode(desc["config"], f"module {path!r} config") if decode else desc["config"]
    if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
        raise ArtifactError(f"malformed artifact: module {path!r} config is not a dict with str keys")
    if missing and not codec.dry_run:
        raise ArtifactError(f"malformed artifact: module {path!r} must be a torch.nn module, not {name}")
    token = _current_path.set(path)
    try:
        module = codec.from_config(config, dict(state), missing) if missing else codec.from_config(config, dict(state))
    except ArtifactError as exc:
        if getattr(exc, "fxc_path", None) is not None:  # a nested module's error, already located
            raise
        raise _located(exc, path, name) from exc
    except Exception as exc:  # a constructor rejecting a forged or damaged config
        raise _located(exc, path, name) from exc
    finally:
        _current_path.reset(token)
    if type(module) is not codec.cls or set(module.state_dict()) - set(missing) != set(state):
        raise ArtifactError(f"{name}.from_config did not rebuild module {path!r} with exactly its stored tensors")
    return module


def _located(exc: Exception, path: str, name: str) -> ArtifactError:
    """``exc`` as an ``ArtifactError`` naming the module it arose in."""
    reason = str(exc).removeprefix(_MALFORMED) if isinstance(exc, ArtifactError) else f"cannot rebuild it: {exc}"
    located = ArtifactError(f"{_MALFORMED}module {path!r} ({name}): {reason}")
    located.fxc_path = path  # type: ignore[attr-defined]
    return located
