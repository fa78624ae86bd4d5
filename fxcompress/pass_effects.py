"""What a pass did beyond its result, as the manager sees it after every pass.

:func:`align_new_modules` gives modules a pass created the train/eval mode of
what they replace (or of their parent); :class:`Fingerprints` tells whether a
pass visibly changed anything, so that a ``modified`` flag is never claimed
for an unchanged graph.
"""

from __future__ import annotations

import weakref
import zlib
from typing import Any

import torch
from torch import fx


__all__ = ["align_new_modules", "Fingerprints"]


def align_new_modules(gm: fx.GraphModule, before: dict[str, torch.nn.Module]) -> None:
    """Give modules a pass added the train/eval flag of what they replace, else of their parent.

    Modules are created in training mode; a rewrite of an eval-mode model must
    not leave, say, a quantized conv in training mode (an eval-only pass would
    then refuse the result, and an artifact would save the wrong flag).
    Parents come before children in ``named_modules``, so a new container's
    new children follow it.
    """
    known = {id(m) for m in before.values()}
    for name, module in gm.named_modules():
        if id(module) in known:
            continue
        if name in before:
            module.training = before[name].training
        elif name:
            module.training = gm.get_submodule(name.rpartition(".")[0]).training


class Fingerprints:
    """What a pass can visibly change, for the ``modified`` flag: the graph's code, which
    module sits at each path, and the values of every state tensor and graph constant.

    Values are a CRC-32 of the tensor's bytes, so rewriting a tensor with the values it
    had is no change.  A tensor is hashed again only when it is a new object or its
    in-place version counter moved (inference tensors keep none: always hashed), so a
    pass that touches little costs little.
    """

    def __init__(self) -> None:
        self._crc: dict[int, tuple[weakref.ref, int | None, int]] = {}

    def _tensor(self, t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return id(t)
        if t.layout is not torch.strided or t.device.type != "cpu":
            return id(t), t.data_ptr()  # not hashed: only a new object or storage counts as a change
        try:
            version: int | None = t._version
        except RuntimeError:  # an inference tensor keeps no version counter
            version = None
        cached = self._crc.get(id(t))
        if cached is not None and cached[0]() is t and version is not None and cached[1] == version:
            crc = cached[2]
        else:
            crc = zlib.crc32(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
            self._crc[id(t)] = (weakref.ref(t), version, crc)
        return str(t.dtype), tuple(t.shape), crc

    def __call__(self, gm: fx.GraphModule) -> tuple:
        from .ops import attr_value  # on use: `import fxcompress` stays light

        state = tuple((k, self._tensor(t)) for k, t in gm.state_dict(keep_vars=True).items())
        constants = []
        for node in gm.graph.find_nodes(op="get_attr"):
            try:
                constants.append(self._tensor(attr_value(gm, str(node.target))))
            except AttributeError:
                constants.append(object())
        modules = tuple((name, id(m)) for name, m in gm.named_modules())
        return str(gm.graph), modules, state, tuple(constants)
