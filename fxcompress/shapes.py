"""Shape propagation: every tensor node of a ``GraphModule`` annotated with its value's metadata.

:func:`propagate_shapes` runs the graph once on copies of the example inputs and records
``node.meta["tensor_meta"]`` (torch's own key, nested like the value) and
``node.meta["type"]`` on every node; passes call it after they rewrite, and
:func:`record_meta` annotates a node they create from a value they computed. The run never
changes the model's state: buffers and the global RNG are restored (:func:`buffers_restored`),
and the inputs are never written into.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from .boundary import clone_inputs
from .errors import InputError

__all__ = ["propagate_shapes", "record_meta", "tensor_metadata", "bind_placeholders", "buffers_restored"]


def propagate_shapes(gm: fx.GraphModule, args: tuple, kwargs: dict | None = None) -> Any:
    """Run ``gm`` once on the inputs and record ``tensor_meta``/``type`` on every node.

    Returns the output.  Runs under ``no_grad`` and leaves the module's state
    as it was: buffers written during the run (BatchNorm statistics in
    training mode, observer ranges) are restored, and so is the global RNG, so
    two propagations of the same graph compute the same values even in
    training mode.  Raises :class:`InputError` when the inputs do not fit the
    model, naming the node that failed.
    """
    kwargs = kwargs or {}
    values = clone_inputs(bind_placeholders(gm, args, kwargs))  # the inputs are never written into
    interp = _MetaRecorder(gm)
    with torch.no_grad(), _rng_forked(values), buffers_restored(gm):
        try:
            return interp.run(*values)
        except Exception as exc:
            node = interp.current
            where = f"node {node.name!r} ({node.op} {_target_name(node)})" if node is not None else "the graph"
            shapes = "[" + ", ".join(_describe_value(v) for v in values) + "]"
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            raise InputError(
                f"the example inputs do not fit the model: {where} failed with "
                f"{type(exc).__name__}: {first_line}. Inputs given: {shapes}; check their shape, "
                f"dtype and number"
            ) from exc


def _target_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    return type(value).__name__


@contextlib.contextmanager
def _rng_forked(values: list[Any]) -> Iterator[None]:
    """Fork the CPU RNG (and that of any CUDA device an input lives on)."""
    cuda = sorted({v.device.index or 0 for v in values if isinstance(v, torch.Tensor) and v.is_cuda})
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        yield


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version counter
        return None


@contextlib.contextmanager
def buffers_restored(gm: nn.Module) -> Iterator[Callable[[], dict[str, str]]]:
    """Restore every buffer (object and values) after the block.

    Buffers are small next to the weights (running statistics, observer
    ranges), so one copy per propagation costs little; it is what lets the
    manager re-run the graph after every pass without feeding the example
    inputs into statistics.  Yields a function that says, once the block is
    over, which buffers the block changed: ``{qualified name: "replaced" or
    "written"}``.
    """
    saved = [(path, m, name, buf, buf.clone(), _version(buf)) for path, m in gm.named_modules()
             for name, buf in m._buffers.items() if buf is not None]

    def changes() -> dict[str, str]:
        found = {}
        for path, m, name, buf, values, version in saved:
            key = f"{path}.{name}" if path else name
            if m._buffers.get(name) is not buf:
                found[key] = "replaced"
            elif _version(buf) != version or (version is None and not torch.equal(buf, values)):
                found[key] = "written"
        return found

    changed: dict[str, str] = {}
    try:
        yield lambda: changed
    finally:
        changed.update(changes())
        with torch.no_grad():
            for _, module, name, buf, values, _ in saved:
                # A buffer written under inference_mode (e.g. by calibration) can only
                # be updated in place inside inference_mode.
                with torch.inference_mode() if buf.is_inference() else contextlib.nullcontext():
                    buf.copy_(values)
                module._buffers[name] = buf


def bind_placeholders(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    """Map positional + keyword inputs onto the graph's placeholders, in order."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = [str(p.target).lstrip("*") for p in placeholders]
    if len(args) > len(placeholders):
        raise InputError(f"the model takes {len(placeholders)} inputs {names}, got {len(args)} positional inputs")
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise InputError(f"unknown keyword inputs {unknown}; the model takes {names}")
    values: list[Any] = list(args)
    for node, name in zip(placeholders[len(args):], names[len(args):]):
        if name in kwargs:
            values.append(kwargs[name])
        elif node.args:  # the default value the tracer recorded
            values.append(node.args[0])
        else:
            raise InputError(f"missing example input {name!r}; the model takes {names}")
    return values


class _MetaRecorder(fx.Interpreter):
    """An interpreter that records metadata on each node as it runs it."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        result = super().run_node(n)
        record_meta(n, result)
        return result


_MEMORY_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def tensor_metadata(t: torch.Tensor) -> TensorMetadata:
    """torch's ``TensorMetadata`` of a tensor, as ``ShapeProp`` records it.

    Same fields and values as ``torch.fx.passes.shape_prop._extract_tensor_metadata``
    for dense tensors, but the memory format comes from the C++ contiguity
    checks: torch's own goes through Python reference code (symbolic-shape
    safe, which concrete tensors do not need) and was most of capture's time.
    """
    if t.layout is not torch.strided or t.is_quantized:
        return _extract_tensor_metadata(t)
    memory_format = next((f for f in _MEMORY_FORMATS if t.is_contiguous(memory_format=f)), None)
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), memory_format, False, {})


def record_meta(node: fx.Node, value: Any) -> None:
    """Store torch's ``tensor_meta`` (nested like the value) and ``type`` on a node.

    Passes use it to annotate nodes they create; a node whose value holds no
    tensor has no ``tensor_meta``.
    """
    found = False

    def extract(obj: Any) -> Any:
        nonlocal found
        if isinstance(obj, torch.Tensor):
            found = True
            return tensor_metadata(obj)
        return obj

    meta = fx.node.map_aggregate(value, extract)
    if found:
        node.meta["tensor_meta"] = meta
    else:
        node.meta.pop("tensor_meta", None)
    node.meta["type"] = type(value)
