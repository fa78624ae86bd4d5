"""A small typed JSON encoding for the constants in an fx graph and module configs.

JSON scalars stand for themselves (``null``, booleans, integers, finite floats,
strings: ``json`` round-trips floats exactly through ``repr``).  Everything
else is an object with a type tag ``t`` and a value ``v``::

    {"t": "tuple", "v": [...]}          {"t": "list", "v": [...]}
    {"t": "dict", "v": [[k, v], ...]}   {"t": "size", "v": [2, 3]}
    {"t": "slice", "v": [start, stop, step]}
    {"t": "float", "v": "inf" | "-inf" | "nan"}
    {"t": "dtype" | "memory_format" | "layout", "v": "float32"}
    {"t": "device", "v": "cpu"}         {"t": "ellipsis"}
    {"t": "node", "v": "conv1"}         (graph nodes only)

Bare JSON arrays and untagged objects never occur, so decoding is a strict
grammar: anything else is a malformed artifact.  Nothing is ever evaluated.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch

from fxcompress.errors import ArtifactError

__all__ = ["encode", "decode"]

_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def encode(value: Any, where: str, node_name: Callable[[torch.fx.Node], str] | None = None) -> Any:
    """Encode ``value``; raise ``ArtifactError`` naming ``where`` for anything unsupported."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else {"t": "float", "v": repr(float(value))}
    if isinstance(value, torch.fx.Node) and node_name is not None:
        return {"t": "node", "v": node_name(value)}
    if isinstance(value, torch.Size):
        return {"t": "size", "v": [encode(v, where) for v in value]}
    if type(value) is tuple:  # namedtuples would come back as plain tuples: refuse them
        return {"t": "tuple", "v": [encode(v, where, node_name) for v in value]}
    if isinstance(value, list):  # includes torch.fx's immutable_list
        return {"t": "list", "v": [encode(v, where, node_name) for v in value]}
    if isinstance(value, dict) and type(value) in (dict, torch.fx.immutable_collections.immutable_dict):
        if not all(k is None or isinstance(k, (bool, int, float, str)) for k in value):
            raise ArtifactError(f"{where}: dict keys must be None, bool, int, float or str")
        return {"t": "dict", "v": [[encode(k, where), encode(v, where, node_name)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"t": "slice", "v": [encode(v, where, node_name) for v in (value.start, value.stop, value.step)]}
    if isinstance(value, torch.dtype):
        return {"t": "dtype", "v": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"t": "memory_format", "v": str(value).removeprefix("torch.")}
    if isinstance(value, torch.layout):
        return {"t": "layout", "v": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"t": "device", "v": str(value)}
    if value is Ellipsis:
        return {"t": "ellipsis"}
    raise ArtifactError(
        f"{where}: cannot store a value of type {type(value).__module__}.{type(value).__qualname__} "
        "(artifacts hold None, bool, int, float, str, tuple, list, dict, slice, torch.Size, "
        "torch.dtype/device/memory_format/layout and Ellipsis)"
    )


def decode(obj: Any, where: str, nodes: Mapping[str, torch.fx.Node] | None = None) -> Any:
    """Decode what :func:`encode` produced; raise ``ArtifactError`` on anything else."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
        raise ArtifactError(f"malformed artifact: {where} holds an untagged JSON {type(obj).__name__}")
    tag, v = obj["t"], obj.get("v")
    if set(obj) != ({"t"} if tag == "ellipsis" else {"t", "v"}):
        raise ArtifactError(f"malformed artifact: {where} has a {tag!r} value with keys {sorted(obj)}")
    if tag in ("tuple", "list", "size", "slice", "dict") and not isinstance(v, list):
        raise ArtifactError(f"malformed artifact: {where} has a {tag!r} value that is not a list")
    if tag == "tuple":
        return tuple(decode(x, where, nodes) for x in v)
    if tag == "list":
        return [decode(x, where, nodes) for x in v]
    if tag == "size":
        items = [decode(x, where) for x in v]
        if not all(type(x) is int for x in items):
            raise ArtifactError(f"malformed artifact: {where} has a torch.Size of non-integers")
        return torch.Size(items)
    if tag == "slice" and len(v) == 3:
        return slice(*(decode(x, where, nodes) for x in v))
    if tag == "dict" and all(isinstance(p, list) and len(p) == 2 for p in v):
        keys = [decode(k, where) for k, _ in v]
        if all(k is None or isinstance(k, (bool, int, float, str)) for k in keys):
            return {k: decode(x, where, nodes) for k, (_, x) in zip(keys, v)}
    if tag == "ellipsis":
        return Ellipsis
    if tag == "float" and v in _FLOATS:
        return _FLOATS[v]
    if tag == "node" and nodes is not None and isinstance(v, str):
        if v not in nodes:
            raise ArtifactError(f"malformed artifact: {where} refers to node {v!r} before it is defined")
        return nodes[v]
    if tag in ("dtype", "memory_format", "layout") and isinstance(v, str) and v.isidentifier():
        kind = {"dtype": torch.dtype, "memory_format": torch.memory_format, "layout": torch.layout}[tag]
        found = getattr(torch, v, None)
        if isinstance(found, kind):
            return found
    if tag == "device" and isinstance(v, str):
        try:
            return torch.device(v)
        except (RuntimeError, ValueError):
            pass
    raise ArtifactError(f"malformed artifact: {where} has an invalid {tag!r} value {v!r}")
