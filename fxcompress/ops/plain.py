"""Plainness: whether a module computes exactly what its torch class computes.

:func:`fxcompress.ops.describe` describes a module as a torch class (a conv, a BatchNorm,
a ReLU) only when it is plain, so that an op table entry is never applied to code it does
not describe: a ``Conv2d`` subclass that standardises its weight in ``forward``, a
``Linear`` with a forward hook that rescales its output, a conv whose weight a
parametrization computes.  This is the one answer to "is this module what torch's class
computes?" that every pass shares.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["not_plain"]

# The methods through which a torch class computes its result; a subclass that overrides
# any of them computes something else.
_COMPUTING_METHODS = ("forward", "_conv_forward")


def not_plain(module: nn.Module, cls: type[nn.Module]) -> str | None:
    """Why ``module`` (an instance of torch's ``cls``) does not compute what ``cls`` computes,
    or None when it does: it keeps ``cls``'s ``forward`` (and ``_conv_forward``), has no
    forward hooks and no parametrized tensors."""
    name = type(module).__name__
    for method in _COMPUTING_METHODS:
        torch_own = getattr(cls, method, None)
        if torch_own is not None and getattr(type(module), method, None) is not torch_own:
            return f"{name} overrides {cls.__name__}.{method}"
    if module._forward_hooks or module._forward_pre_hooks:
        return f"{name} has forward hooks"
    if parametrize.is_parametrized(module):
        return f"{name} has a parametrized weight"
    return None
