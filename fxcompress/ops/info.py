"""The answer :func:`fxcompress.ops.describe` gives: :class:`Kind`, :class:`Effects`, :class:`OpInfo`."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

__all__ = ["Kind", "Effects", "PURE", "NotPlain", "OpInfo"]


class Kind(str, enum.Enum):
    """Op families; the channel rules of pruning and quantization are per family."""

    PLACEHOLDER = "placeholder"
    OUTPUT = "output"
    CONSTANT = "constant"  # get_attr
    CONV = "conv"
    LINEAR = "linear"
    BILINEAR = "bilinear"  # x1ᵀ W x2 per output feature (nn.Bilinear, F.bilinear)
    RECURRENT = "recurrent"  # nn.RNN / nn.LSTM / nn.GRU
    NORM = "norm"
    ELEMENTWISE = "elementwise"  # binary arithmetic and comparisons, with broadcasting
    ACTIVATION = "activation"  # unary, pointwise
    SOFTMAX = "softmax"
    POOL = "pool"  # per-channel spatial resampling: pooling, interpolation, spatial padding
    RESHAPE = "reshape"  # the same data in another shape: view, reshape, flatten, (un)squeeze, expand
    PERMUTE = "permute"  # dims reordered: permute, transpose, swapaxes
    CONCAT = "concat"
    SPLIT = "split"
    GETITEM = "getitem"
    MATMUL = "matmul"
    EMBEDDING = "embedding"
    ATTENTION = "attention"
    REDUCTION = "reduction"
    # A no-op at inference: identity, contiguous, clone always; dropout and
    # stochastic depth only when ``params["training"]`` is False.
    IDENTITY = "identity"
    SHAPE = "shape"  # size(), dim(), .shape: non-tensor results
    ASSERT = "assert"  # torch._assert: a runtime check with no result; never removed
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Effects:
    """What an op does besides computing its result.

    ``mutates``: the positional arguments it writes in place (``x.add_(y)``,
    ``operator.iadd``, ``inplace=True``, an aten schema's written arguments, a
    module's ``mutates_args``).  ``random``: its result depends on the random
    number generator (``torch.rand*``, dropout in training, ...).  ``may_alias``:
    its result may share memory with an input (views, reshapes, in-place ops, and
    every op whose semantics are unknown).  ``declared_impure``: the module or
    function says it must run even when its result is unused (a true
    ``fxc_impure`` attribute, or a module's ``mutates_args``).  ``side_effect``:
    torch says the call has side effects (``fx.Node.is_impure``: asserts,
    profiler markers, ...).
    """

    mutates: tuple[int, ...] = ()
    random: bool = False
    may_alias: bool = False
    declared_impure: bool = False
    side_effect: bool = False


#: The effects of an op that only computes its result, in new memory.
PURE = Effects()


@dataclass(frozen=True)
class NotPlain:
    """A module derived from a torch class that does not compute what the class computes:
    the ``kind`` and ``op`` the class has, and the ``reason`` (its own ``forward``, hooks, ...)."""

    kind: Kind
    op: str
    reason: str


@dataclass(frozen=True)
class OpInfo:
    """What one node means.

    ``op`` is a canonical name ("conv2d", "add", "max_pool2d", "view", ...).
    ``inputs`` are the data inputs (nodes or constants) in order: for
    ``torch.cat``/``torch.stack`` the tensors joined, for attention
    ``(query, key, value)``.  ``params`` holds the named non-data arguments
    (stride, dim, groups, ...; variadic shapes such as ``x.view(b, -1)``
    packed into one tuple), plus ``channel_dim`` for ops that have channels.
    For weighted ops, ``weight``/``bias`` are the tensors (from the module or a
    ``get_attr``) and ``weight_node``/``bias_node`` the nodes of functional forms.

    ``effects`` says what the op does besides computing its result.

    Plainness: a module is described as its torch class only when it computes exactly
    what that class computes: the class's own ``forward`` (and ``_conv_forward``), no
    forward hooks, no parametrized weight.  Any other module derived from a torch class
    (a ``Conv2d`` subclass with its own ``forward``, a hooked ``Linear``) has kind
    ``UNKNOWN``, op its class name and ``not_plain`` set (:class:`NotPlain`: what the
    class computes, and why this module does not), so a pass that ignores it still never
    treats the module as the class, and a pass that lists what it left alone can say why.
    """

    kind: Kind
    op: str
    node: fx.Node
    module: nn.Module | None = None
    inputs: tuple = ()
    params: dict[str, Any] = field(default_factory=dict)
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    weight_node: fx.Node | None = None
    bias_node: fx.Node | None = None
    effects: Effects = PURE
    not_plain: NotPlain | None = None

    # -- channel geometry of weighted ops ---------------------------------
    @property
    def groups(self) -> int:
        return int(self.params.get("groups", 1))

    @property
    def transposed(self) -> bool:
        return bool(self.params.get("transposed", False))

    @property
    def weight_out_dim(self) -> int:
        """The weight dim indexing output channels (1 for transposed conv)."""
        return 1 if self.transposed else 0

    @property
    def weight_in_dim(self) -> int:
        """The weight dim indexing input channels (per group for conv)."""
        return 0 if self.transposed else 1

    @property
    def channel_dim(self) -> int:
        """The activation dim that holds channels: 1 for conv/norm/pool (NC...), -1 for linear/layer norm."""
        return int(self.params.get("channel_dim", 1))

    @property
    def family(self) -> Kind:
        """``kind``, or for a module that is not plain the kind of the torch class it derives
        from: for telling what was left alone and why, never for deciding what it computes."""
        return self.not_plain.kind if self.not_plain is not None else self.kind

    @property
    def family_op(self) -> str:
        """``op``, or for a module that is not plain the op of the torch class it derives from
        (the counterpart of :attr:`family`)."""
        return self.not_plain.op if self.not_plain is not None else self.op

    @property
    def is_noop(self) -> bool:
        """Whether the op returns its first input unchanged at inference (identity, contiguous,
        clone; dropout and stochastic depth when not training)."""
        return self.kind is Kind.IDENTITY and not self.params.get("training", False)
