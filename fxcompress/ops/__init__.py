"""Op semantics: what a node *means*, in one place.

Passes ask :func:`describe` "is this a conv, and where are its weight, bias,
channel dims and groups?" instead of matching node targets themselves.  The
``call_module``, ``call_function`` and ``call_method`` forms of an op (``nn.Conv2d``,
``F.conv2d``; ``nn.MaxPool2d``, ``F.max_pool2d``; ``torch.add``, ``x + y``,
``x.add(y)``; ``x.view``, ``torch.reshape``) all describe to the same
:class:`OpInfo` kind and canonical ``op`` name.

An :class:`OpInfo` also says what the op does besides computing its result
(:class:`Effects`: the arguments it writes in place, whether it is random, whether
its result may alias an input, whether it is declared impure) and whether a module
is *plain*: a module is described as a torch class only when it computes exactly
what that class computes (its ``forward``, no hooks, no parametrization); any other
module derived from a torch class is ``Kind.UNKNOWN`` with ``not_plain`` set
(:class:`NotPlain`: what the class computes, and why the module does not; :mod:`.plain`).

Layout: :mod:`.info` (the answer), :mod:`.tables` (what each torch module, function
and method is), :mod:`.effects`, :mod:`.plain`, :mod:`.describe` (reading a node
through the tables).  A new front end (``torch.export`` raised to module form) only
extends the tables, through :func:`register_function` (ATen operators such as
``aten.linear.default``), :func:`register_method`, :func:`register_qualified` and
:func:`register_module`; every pass then knows its nodes.

Guarantee: :func:`describe` never guesses and never raises.  A target it does
not know gets kind ``Kind.UNKNOWN``; analyses must treat that as "semantics
unknown" (e.g. pruning freezes the channels that flow through it).
"""

from .describe import (
    WEIGHTED_KINDS, attr_tensor, attr_value, describe, describe_module, layers_inside, meta_shape, tensor_shape,
)
from .effects import call_arguments
from .info import PURE, Effects, Kind, NotPlain, OpInfo
from .plain import not_plain
from .tables import register_function, register_method, register_module, register_qualified

__all__ = ["Kind", "OpInfo", "Effects", "PURE", "NotPlain", "describe", "describe_module", "register_function",
           "register_method", "register_module", "register_qualified", "tensor_shape", "meta_shape", "attr_tensor", "attr_value",
           "layers_inside", "WEIGHTED_KINDS", "not_plain", "call_arguments"]
