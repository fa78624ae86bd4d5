"""``cast``: half-precision deployment (float16 / bfloat16) with the model's output dtypes kept."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fxcompress.capture import record_meta
from fxcompress.errors import ConfigError
from fxcompress.pass_base import Pass, PassContext, PassResult, check_choice
from fxcompress.report import state_bytes
from fxcompress.verify import role_of, stage_of

__all__ = ["Cast"]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Cast(Pass):
    """Runs the in-scope float part of the model in ``dtype`` (``float16`` or ``bfloat16``):
    floating parameters, buffers and graph constants are stored in ``dtype`` (the state
    halves), and the outputs keep the dtypes they had.

    Casts are inserted only where dtypes would otherwise mix: a float input that meets
    ``dtype`` weights (graph inputs, tensors the model creates in float32), and, before the
    output, back to each output's original dtype. A module whose parameters are in another
    float dtype (out of scope) gets its inputs cast to that dtype instead. An explicit
    upcast in the model (``x.float()`` before a softmax) is kept up to the next op that
    mixes it with ``dtype`` values. Lowered modules keep their integer state and float32
    scales. Eval mode only; a graph with observers or fake-quant is refused (cast a float
    or a lowered graph). Stats: ``modules`` and ``constants`` cast, ``casts_inserted``,
    ``bytes_before``/``bytes_after``.
    """

    name = "cast"
    eval_only = True

    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, tuple(_DTYPES))

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stage = stage_of(gm)
        if stage in ("observed", "fake_quant"):
            raise ConfigError(f"the graph is at the {stage} stage; cast a float graph, or a lowered "
                              f"one after fold_fake_quant + lower")
        target = _DTYPES[self.dtype]
        before = state_bytes(gm)
        out_dtypes = _output_dtypes(gm)
        modules, constants = _cast_state(gm, ctx, target)
        inserted = _Caster(gm, target).run_inputs(*ctx.example_inputs())
        inserted += _restore_outputs(gm, out_dtypes)
        after = state_bytes(gm)
        stats: dict[str, Any] = {"modules": modules, "constants": constants, "casts_inserted": inserted,
                                 "bytes_before": before, "bytes_after": after}
        stats["notes"] = [f"{modules} modules and {constants} constants now {self.dtype}; {inserted} casts "
                          f"inserted; state {before / 2**20:.1f} -> {after / 2**20:.1f} MiB"]
        return PassResult(gm, modules + constants > 0, stats)


def _is_float(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _output_dtypes(gm: fx.GraphModule) -> dict[fx.Node, torch.dtype]:
    """The dtype each floating output node has now (the manager recorded ``tensor_meta``)."""
    output = next(iter(gm.graph.find_nodes(op="output")))
    dtypes = {}
    for node in output.all_input_nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "dtype") and meta.dtype.is_floating_point:
            dtypes[node] = meta.dtype
    return dtypes


def _cast_state(gm: fx.GraphModule, ctx: PassContext, target: torch.dtype) -> tuple[int, int]:
    """Replace in-scope float leaf modules by cast copies, and cast float ``get_attr`` tensors.

    Copies, not in-place edits: the leaves of a traced graph are the model's own objects.
    """
    modules = constants = 0
    memo: dict[int, Any] = {}  # one memo for all copies: tied weights stay tied
    for node in gm.graph.find_nodes(op="call_module"):
        module = gm.get_submodule(str(node.target))
        if not ctx.in_scope(node) or any(role_of(m) is not None for m in module.modules()):
            continue
        tensors = [t for t in (*module.parameters(), *module.buffers()) if _is_float(t)]
        if not tensors or all(t.dtype == target for t in tensors):
            continue
        gm.set_submodule(str(node.target), copy.deepcopy(module, memo).to(target))
        modules += 1
    for node in gm.graph.find_nodes(op="get_attr"):
        owner_path, _, attr = str(node.target).rpartition(".")
        owner = gm.get_submodule(owner_path)
        value = getattr(owner, attr)
        if not ctx.in_scope(node) or role_of(owner) is not None or not _is_float(value) or value.dtype == target:
            continue
        cast = value.detach().to(target)
        if isinstance(value, nn.Parameter):
            owner._parameters[attr] = nn.Parameter(cast, requires_grad=value.requires_grad)
        elif attr in owner._buffers:
            owner._buffers[attr] = cast
        else:
            setattr(owner, attr, cast)
        constants += 1
    return modules, constants


class _Caster(fx.Interpreter):
    """Runs the graph once, inserting ``.to(dtype)`` where float dtypes would mix.

    Every node it runs gets fresh ``tensor_meta`` (dtypes change throughout).
    """

    def __init__(self, gm: fx.GraphModule, target: torch.dtype) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.target = target
        self.casts: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}

    def run_inputs(self, args: tuple, kwargs: dict) -> int:
        """Run on the example inputs; returns the number of casts inserted."""
        placeholders = self.graph.find_nodes(op="placeholder")
        values = list(args)
        for node in placeholders[len(args):]:
            name = str(node.target).lstrip("*")
            values.append(kwargs[name] if name in kwargs else node.args[0])
        with torch.no_grad():
            self.run(*values)
        return len(self.casts)

    def run_node(self, n: fx.Node) -> Any:
        if n.op not in ("placeholder", "get_attr", "output"):
            self._align_inputs(n)
        result = super().run_node(n)
        if n.op != "output":
            record_meta(n, result)
        return result

    def _wanted(self, n: fx.Node) -> torch.dtype | None:
        """The float dtype ``n`` needs its inputs in, or None when nothing would mix."""
        dtypes = {self.env[a].dtype for a in n.all_input_nodes if _is_float(self.env[a])}
        if n.op == "call_module":
            params = {t.dtype for t in self.module.get_submodule(str(n.target)).parameters() if _is_float(t)}
            if len(params) == 1:  # a float module computes in its parameters' dtype
                (own,) = params
                return own if dtypes - {own} else None
            dtypes |= params
        return self.target if len(dtypes) > 1 else None

    def _align_inputs(self, n: fx.Node) -> None:
        wanted = self._wanted(n)
        if wanted is None:
            return
        for a in n.all_input_nodes:
            value = self.env[a]
            if not _is_float(value) or value.dtype == wanted:
                continue
            cast = self.casts.get((a, wanted))
            if cast is None:
                with self.graph.inserting_after(a):
                    cast = self.graph.call_method("to", (a, wanted))
                self.env[cast] = value.to(wanted)
                record_meta(cast, self.env[cast])
                self.casts[(a, wanted)] = cast
            n.replace_input_with(a, cast)


def _restore_outputs(gm: fx.GraphModule, dtypes: dict[fx.Node, torch.dtype]) -> int:
    """Cast each floating output back to its original dtype; returns the casts inserted."""
    output = next(iter(gm.graph.find_nodes(op="output")))
    added: dict[fx.Node, fx.Node] = {}
    for node, dtype in dtypes.items():
        meta = node.meta.get("tensor_meta")
        if meta is None or meta.dtype == dtype:
            continue
        with gm.graph.inserting_before(output):
            cast = gm.graph.call_method("to", (node, dtype))
        cast.meta = {**node.meta, "tensor_meta": meta._replace(dtype=dtype)}
        added[node] = cast
    if added:
        output.args = fx.node.map_arg(output.args, lambda a: added.get(a, a))
    return len(added)
