"""What to quantize to: :class:`QuantSpec` and the two default specs.

A spec is a small frozen value: it says how many bits, which integer range,
how scale/zero point are shared (per tensor, per channel, per group) and which
observer estimates the range.  It validates itself on construction, so a bad
spec fails with :class:`~fxcompress.errors.ConfigError` naming the field before
any work is done, and it round-trips through plain dicts for recipes and
manifests.

Decisions (documented in ``docs/quantization.md``):

* ``symmetric=True, signed=False`` is allowed: the zero point is
  ``2**(bits-1)`` (128 for 8 bits), i.e. the signed symmetric grid shifted into
  the unsigned range; torch.ao's default ``quint8`` symmetric scheme does the
  same.
* ``histogram`` and ``percentile`` observers are per-tensor only: they keep a
  2048-bin histogram, which is right for activations and wasteful per channel.
  Per-channel and per-group weights use ``minmax``, ``moving_average`` or
  ``mse``.
* Options of an observer that is not selected (e.g. ``bins`` with ``minmax``)
  are validated but otherwise ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from fxcompress.errors import ConfigError

__all__ = [
    "GRANULARITIES",
    "OBSERVERS",
    "QuantSpec",
    "default_weight_spec",
    "portable_weight_spec",
    "default_activation_spec",
]

#: Ways a scale/zero point is shared across a tensor.
GRANULARITIES = ("per_tensor", "per_channel", "per_group")
#: Observer kinds understood by :func:`fxcompress.quant.make_observer`.
OBSERVERS = ("minmax", "moving_average", "histogram", "percentile", "mse")
# Histogram-backed observers keep one histogram per tensor (see module doc).
_PER_TENSOR_ONLY = ("histogram", "percentile")


def _fail(field: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"QuantSpec.{field}={value!r} is invalid: {why}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor (or family of tensors) is quantized.

    Attributes:
        bits: integer width, 2..8.  Values are stored in ``int8``/``uint8``
            (and may be packed two or four per byte for 4/2 bits).
        signed: integer range ``[-2**(bits-1), 2**(bits-1)-1]`` if True,
            ``[0, 2**bits-1]`` otherwise.
        symmetric: the range is centred on zero and the zero point is fixed
            (0 when signed, ``2**(bits-1)`` when unsigned); otherwise affine.
        granularity: ``"per_tensor"``, ``"per_channel"`` (one scale per index
            of ``axis``) or ``"per_group"`` (per channel of ``axis``, and
            within it one scale per ``group_size`` consecutive elements of the
            remaining dims flattened in row-major order).
        axis: channel axis for per-channel / per-group (negative allowed; it is
            checked against the tensor's ``ndim`` when a tensor is observed).
        group_size: elements per group; required for, and only allowed with,
            ``per_group``.
        observer: range estimator, one of :data:`OBSERVERS`.
        averaging_constant: ``moving_average`` update weight, in (0, 1].
        percentile: ``percentile`` observer's upper percentile, in (50, 100].
        bins: histogram bins for ``histogram``/``percentile``/``mse``, 16..65536.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    granularity: str = "per_tensor"
    axis: int = 0
    group_size: Optional[int] = None
    observer: str = "minmax"
    averaging_constant: float = 0.01
    percentile: float = 99.99
    bins: int = 2048

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or not 2 <= self.bits <= 8:
            raise _fail("bits", self.bits, "must be an integer from 2 to 8")
        for name in ("signed", "symmetric"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, getattr(self, name), "must be True or False")
        if self.granularity not in GRANULARITIES:
            raise _fail("granularity", self.granularity, f"must be one of {GRANULARITIES}")
        if not _is_int(self.axis):
            raise _fail("axis", self.axis, "must be an integer")
        if self.granularity == "per_group":
            if not _is_int(self.group_size) or self.group_size < 1:
                raise _fail(
                    "group_size", self.group_size,
                    "granularity='per_group' needs a positive integer group_size",
                )
        elif self.group_size is not None:
            raise _fail(
                "group_size", self.group_size,
                f"only meaningful with granularity='per_group' (got {self.granularity!r})",
            )
        if self.observer not in OBSERVERS:
            raise _fail("observer", self.observer, f"must be one of {OBSERVERS}")
        if self.observer in _PER_TENSOR_ONLY and self.granularity != "per_tensor":
            raise _fail(
                "observer", self.observer,
                f"supports granularity='per_tensor' only (got {self.granularity!r}); "
                "use 'minmax' or 'mse' for per-channel/per-group tensors",
            )
        if not isinstance(self.averaging_constant, (int, float)) or not (
            0.0 < self.averaging_constant <= 1.0
        ):
            raise _fail("averaging_constant", self.averaging_constant, "must be in (0, 1]")
        if not isinstance(self.percentile, (int, float)) or not 50.0 < self.percentile <= 100.0:
            raise _fail("percentile", self.percentile, "must be in (50, 100]")
        if not _is_int(self.bins) or not 16 <= self.bins <= 65536:
            raise _fail("bins", self.bins, "must be an integer from 16 to 65536")

    @property
    def qmin(self) -> int:
        """Smallest integer value of the quantized range."""
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        """Largest integer value of the quantized range."""
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def dtype(self) -> torch.dtype:
        """Plain storage dtype of unpacked values: ``torch.int8`` or ``torch.uint8``."""
        return torch.int8 if self.signed else torch.uint8

    def replace(self, **changes: Any) -> "QuantSpec":
        """A copy with ``changes`` applied (validated like a new spec)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; :meth:`from_dict` gives back an equal spec."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantSpec":
        """Build a spec from a dict such as a recipe entry.

        Missing keys take their defaults; unknown keys raise ``ConfigError``
        (a typo must not silently fall back to a default).
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"QuantSpec.from_dict expects a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"QuantSpec has no field(s) {unknown}; known fields: {sorted(known)}"
            )
        return cls(**dict(data))


def default_weight_spec() -> QuantSpec:
    """8-bit signed symmetric per-channel (axis 0) min/max weights.

    What x86 oneDNN int8 kernels take: they ignore weight zero points, so
    weights must be symmetric (zero point 0).
    """
    return QuantSpec(
        bits=8, signed=True, symmetric=True, granularity="per_channel", axis=0,
        observer="minmax",
    )


def portable_weight_spec() -> QuantSpec:
    """7-bit signed symmetric per-channel (axis 0) min/max weights: exact and fast on every x86 CPU.

    oneDNN's int8 kernels on CPUs without VNNI (AVX2, AVX512 without VNNI) add u8 x s8
    products in saturating 16-bit pairs; 8-bit weights can overflow them, so such layers
    run the (slower) reference path there (see :mod:`fxcompress.quant.isa`). Weights of
    at most 7 bits never overflow, so their layers run the int8 kernels on every x86 CPU,
    at the cost of one bit of weight precision.
    """
    return default_weight_spec().replace(bits=7)


def default_activation_spec() -> QuantSpec:
    """8-bit unsigned affine per-tensor activations with the histogram observer.

    oneDNN's ``qconv_pointwise``/``qlinear_pointwise`` accept only uint8
    activations; affine keeps the full range for one-sided (post-ReLU) data.
    """
    return QuantSpec(
        bits=8, signed=False, symmetric=False, granularity="per_tensor",
        observer="histogram",
    )
