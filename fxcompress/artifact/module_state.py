"""Putting stored tensors into rebuilt modules, and comparing a rebuilt module with its original.

The registry (:mod:`.modules`) rebuilds every leaf from its config with
placeholder tensors (on the meta device for torch.nn classes) and then hands it
its stored tensors through :func:`swap_state` or :func:`assign_state`: names,
dtypes, shapes and parameter/buffer kinds are checked, and the stored tensors
are used as they are, so the rebuilt state is bit-identical.
:func:`difference` is the save-time comparison behind ``register_module(...,
check=True)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Collection, Mapping

import torch
from torch import nn

from fxcompress.errors import ArtifactError

__all__ = ["assign_state", "swap_state", "difference"]

_MALFORMED = "malformed artifact: "


def swap_state(module: nn.Module, state: Mapping[str, torch.Tensor], missing: Collection[str] = ()) -> None:
    """Put ``state``'s tensors in place of the module's own, names and shapes checked.

    The tensors named in ``missing`` are not stored: they stay on the meta device.
    """
    own = {k: t for k, t in module.state_dict(keep_vars=True).items() if k not in missing}
    if set(own) != set(state):
        raise ArtifactError(
            f"{_MALFORMED}{type(module).__qualname__} expects tensors {sorted(own)}, "
            f"the artifact has {sorted(state)}"
        )
    for key, tensor in state.items():
        if own[key].shape != tensor.shape:
            raise ArtifactError(
                f"{_MALFORMED}{type(module).__qualname__} tensor {key!r} has shape "
                f"{tuple(tensor.shape)}, its config implies {tuple(own[key].shape)}"
            )
        owner_path, _, field = key.rpartition(".")
        owner = module.get_submodule(owner_path)
        if field in owner._parameters:
            if not isinstance(tensor, nn.Parameter):
                raise ArtifactError(f"{_MALFORMED}{key!r} must be a parameter")
            owner._parameters[field] = tensor
        else:
            owner._buffers[field] = tensor
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta and n not in missing]
    if left:
        raise ArtifactError(f"{type(module).__qualname__} keeps tensors outside its state_dict: {left}")


def assign_state(module: nn.Module, state: Mapping[str, torch.Tensor], *, resizable: Collection[str] = ()) -> None:
    """Install ``state`` as ``module``'s own tensors (not its submodules'), in place of the ones it has.

    For a registered class's ``from_config``: build the module with placeholder
    tensors of the right kind, then hand it its stored ones.  The names must be
    exactly the module's own persistent tensors; each must have its
    placeholder's dtype and, unless named in ``resizable`` (state whose shape
    depends on what was observed: check those yourself), its shape; a
    parameter must arrive as ``nn.Parameter`` and a buffer as a plain tensor.
    Anything else raises ``ArtifactError``.  The stored tensors are used as
    they are (no copy), so the rebuilt state is bit-identical.
    """
    own = {k: t for k, t in [*module._parameters.items(), *module._buffers.items()]
           if t is not None and k not in module._non_persistent_buffers_set}
    if set(own) != set(state):
        raise ArtifactError(f"{_MALFORMED}{type(module).__qualname__} expects tensors {sorted(own)}, "
                            f"the artifact has {sorted(state)}")
    for key, tensor in state.items():
        placeholder, is_parameter = own[key], key in module._parameters
        if tensor.dtype != placeholder.dtype:
            raise ArtifactError(f"{_MALFORMED}tensor {key!r} has dtype {tensor.dtype}, expected {placeholder.dtype}")
        if key not in resizable and tensor.shape != placeholder.shape:
            raise ArtifactError(f"{_MALFORMED}tensor {key!r} has shape {tuple(tensor.shape)}, "
                                f"expected {tuple(placeholder.shape)}")
        if isinstance(tensor, nn.Parameter) != is_parameter:
            raise ArtifactError(f"{_MALFORMED}tensor {key!r} must be a {'parameter' if is_parameter else 'buffer'}")
        (module._parameters if is_parameter else module._buffers)[key] = tensor


def difference(module: nn.Module, rebuilt: nn.Module) -> str | None:
    """What differs between two modules: submodule types, tensors, plain attributes (not training flags)."""
    subs, rebuilt_subs = dict(module.named_modules()), dict(rebuilt.named_modules())
    if list(subs) != list(rebuilt_subs):
        return f"its submodules {list(subs)} would come back as {list(rebuilt_subs)}"
    for name, sub in subs.items():
        other = rebuilt_subs[name]
        where = f"submodule {name!r}" if name else "it"
        if type(other) is not type(sub):
            return f"{where} of type {type(sub).__qualname__} would come back as {type(other).__qualname__}"
        mine, theirs = _plain_attributes(sub), _plain_attributes(other)
        if mine != theirs:
            key = next(k for k in sorted({*mine, *theirs}) if mine.get(k, ...) != theirs.get(k, ...))
            return f"{where}: attribute {key!r} = {mine.get(key)!r} would come back as {theirs.get(key)!r}"
    state, rebuilt_state = module.state_dict(), rebuilt.state_dict()
    if list(state) != list(rebuilt_state):
        return f"its tensors {list(state)} would come back as {list(rebuilt_state)}"
    for key, t in state.items():
        r = rebuilt_state[key]
        if (t.dtype, t.shape) != (r.dtype, r.shape):
            return f"tensor {key!r} ({t.dtype}, {tuple(t.shape)}) would come back as ({r.dtype}, {tuple(r.shape)})"
        if not torch.equal(_bits(t), _bits(r)):
            return f"tensor {key!r} would come back with different values"
    return None


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values as integers of their bits (NaNs and signed zeros compare bit for bit;
    an integer view of the element size compares about as fast as the values themselves)."""
    return t.detach().contiguous().reshape(-1).view(_SAME_SIZE_INT.get(t.element_size(), torch.int64))


def _plain_attributes(module: nn.Module) -> dict[str, Any]:
    """Public non-module, non-tensor attributes of plain or frozen-dataclass value types."""
    out = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key == "training":
            continue
        if isinstance(value, (bool, int, float, str, tuple, type(None))) or (
                dataclasses.is_dataclass(value) and not isinstance(value, type)):
            out[key] = value
    return out
