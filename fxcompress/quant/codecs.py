"""What the artifact codecs of the quantization modules share.

Every quantization module that can sit in a graph (the layer wrappers, the
activation quantizers, the fake-quant module and each observer) stores itself
in an artifact (:mod:`fxcompress.artifact.modules`) as a config of plain values
plus its ``state_dict()``, and is registered next to its definition with
:func:`register`.  The pieces here keep those codecs short and strict:

* a :class:`~fxcompress.quant.spec.QuantSpec` is stored as its ``to_dict()``
  and read back by :func:`spec_from_config`, validated like any new spec;
* submodules are described and rebuilt through the registry
  (:func:`fxcompress.artifact.modules.describe_child`, :func:`child`), never
  imported by a name read from the file;
* qparams are checked against the spec and the tensor they quantize
  (:func:`check_qparams`, :func:`qparam_shape`), integer weights against the
  spec's range (:func:`check_codes`).

Anything a damaged or forged config gets wrong raises ``ArtifactError``
(:func:`malformed`), which the registry prefixes with the module's path.
Registration uses ``check=True``: saving rebuilds each such module from its
encoded config and a copy of its tensors and refuses a model that would not
come back the same, before anything is written.
"""

from __future__ import annotations

from typing import Any, Collection, Mapping

import torch

from fxcompress.artifact.modules import build_child, register_module
from fxcompress.errors import ArtifactError, ConfigError
from fxcompress.quant.qparams import reduction_view
from fxcompress.quant.spec import QuantSpec

__all__ = [
    "QPARAM_NDIM",
    "register",
    "malformed",
    "expect_keys",
    "flag",
    "text",
    "spec_from_config",
    "child",
    "own_state",
    "qparam_shape",
    "check_qparams",
    "check_codes",
]

#: The rank of a scale / zero point per granularity: ``[]``, ``[C]``, ``[C, G]``.
QPARAM_NDIM = {"per_tensor": 0, "per_channel": 1, "per_group": 2}


def register(cls: type) -> type:
    """Register ``cls`` (which defines ``_fxc_config`` / ``_fxc_from_config``) with the artifact
    registry under ``<module>.<qualname>``, with the save-time rebuild check."""
    return register_module(cls, check=True)


def malformed(reason: str) -> ArtifactError:
    """The error for a stored config or state that cannot be what was saved."""
    return ArtifactError(f"malformed artifact: {reason}")


def expect_keys(config: Mapping[str, Any], keys: Collection[str]) -> None:
    """Raise unless ``config`` has exactly ``keys``."""
    if set(config) != set(keys):
        raise malformed(f"config keys {sorted(config)}, expected {sorted(keys)}")


def flag(config: Mapping[str, Any], key: str) -> bool:
    """``config[key]``, which must be a bool."""
    value = config[key]
    if not isinstance(value, bool):
        raise malformed(f"config {key!r} must be True or False, got {value!r}")
    return value


def text(config: Mapping[str, Any], key: str) -> str:
    """``config[key]``, which must be a str."""
    value = config[key]
    if not isinstance(value, str):
        raise malformed(f"config {key!r} must be a string, got {value!r}")
    return value


def spec_from_config(value: Any) -> QuantSpec:
    """The spec stored as ``spec.to_dict()``, validated like a new spec."""
    if not isinstance(value, dict):
        raise malformed(f"a QuantSpec must be stored as a dict, got {type(value).__name__}")
    try:
        return QuantSpec.from_dict(value)
    except ConfigError as exc:
        raise malformed(f"stored QuantSpec: {exc}") from exc


def child(name: str, desc: Any, state: Mapping[str, torch.Tensor], kind: type | tuple[type, ...], *,
          missing: Collection[str] = ()) -> Any:
    """Submodule ``name`` rebuilt through the registry; it must be an instance of ``kind``."""
    module = build_child(name, desc, state, missing=missing)
    if not isinstance(module, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise malformed(f"submodule {name!r} is a {type(module).__qualname__}, expected "
                        f"{' or '.join(k.__qualname__ for k in kinds)}")
    return module


def own_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a module's state that are its own tensors (not a submodule's)."""
    return {k: t for k, t in state.items() if "." not in k}


def qparam_shape(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the scale / zero point with which ``spec`` quantizes a tensor of ``shape``."""
    try:
        return tuple(reduction_view(torch.empty(shape, device="meta"), spec).shape[:-1])
    except (ConfigError, RuntimeError) as exc:
        raise malformed(f"{spec} cannot quantize a tensor of shape {tuple(shape)}: {exc}") from exc


def check_qparams(scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec, what: str, *,
                  shape: tuple[int, ...] | None = None, empty_ok: bool = False) -> None:
    """Raise unless ``(scale, zero_point)`` are float32 / int32 qparams that ``spec`` gives.

    Their shape must be ``shape`` when given, else have the granularity's rank
    (``[]``, ``[C]``, ``[C, G]``); ``empty_ok`` also accepts the empty ``[0]``
    of qparams not computed yet.  Zero points must lie in ``[qmin, qmax]``.
    """
    if scale.dtype != torch.float32 or zero_point.dtype != torch.int32:
        raise malformed(f"{what} scale / zero point have dtypes {scale.dtype} / {zero_point.dtype}, "
                        "expected float32 / int32")
    if scale.shape != zero_point.shape:
        raise malformed(f"{what} scale {tuple(scale.shape)} and zero point {tuple(zero_point.shape)} differ in shape")
    if empty_ok and tuple(scale.shape) == (0,):
        return
    if shape is not None and tuple(scale.shape) != tuple(shape):
        raise malformed(f"{what} qparams have shape {tuple(scale.shape)}; {spec.granularity} quantization of "
                        f"this tensor gives {tuple(shape)}")
    if scale.dim() != QPARAM_NDIM[spec.granularity] or 0 in scale.shape:
        raise malformed(f"{what} qparams of shape {tuple(scale.shape)} do not fit {spec.granularity} quantization")
    if zero_point.numel() and (int(zero_point.min()) < spec.qmin or int(zero_point.max()) > spec.qmax):
        raise malformed(f"{what} zero points lie outside [{spec.qmin}, {spec.qmax}] of {spec.bits}-bit "
                        f"{'signed' if spec.signed else 'unsigned'} quantization")


def check_codes(codes: torch.Tensor, spec: QuantSpec, what: str) -> None:
    """Raise unless ``codes`` are integers of ``spec``'s dtype within ``[qmin, qmax]``."""
    if codes.dtype != spec.dtype:
        raise malformed(f"{what} has dtype {codes.dtype}; {spec.bits}-bit {'signed' if spec.signed else 'unsigned'} "
                        f"values are stored as {spec.dtype}")
    if codes.numel() and (int(codes.min()) < spec.qmin or int(codes.max()) > spec.qmax):
        raise malformed(f"{what} holds values in [{int(codes.min())}, {int(codes.max())}], outside the "
                        f"[{spec.qmin}, {spec.qmax}] of its {spec.bits}-bit spec")
