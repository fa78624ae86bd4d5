"""``insert_observers``: observe weights and activations where the lowered graph quantizes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from fxcompress.errors import ConfigError
from fxcompress.ops import Kind, OpInfo, describe, describe_module
from fxcompress.pass_base import Pass, PassContext, PassResult, check_choice
from fxcompress.quant.activations import ActivationObserver, preserves_qparams, quant_source
from fxcompress.quant.layers import ObservedLayer, layer_support
from fxcompress.quant.observers import make_observer
from fxcompress.quant.fusion import FusedChain, is_float_value
from fxcompress.quant.placement import (
    POST_OP_PLACEMENTS, RESIDUAL_ADDS, consumed_quantized, find_chains, is_cat, residual_chains,
)
from fxcompress.quant.spec import QuantSpec, default_activation_spec, default_weight_spec
from fxcompress.rewrite import replace_modules
from fxcompress.verify import role_of

__all__ = ["InsertObservers", "OP_KINDS", "ACTIVATION_OBSERVERS", "as_spec"]

#: The op kinds this pass can quantize, by option name.
OP_KINDS: dict[str, Kind] = {"conv": Kind.CONV, "linear": Kind.LINEAR, "embedding": Kind.EMBEDDING}
#: The submodule holding the activation observers (one child per quantization point).
ACTIVATION_OBSERVERS = "fxc_act"


def as_spec(value: QuantSpec | dict | None, option: str) -> QuantSpec | None:
    """A spec from a spec, its dict form (recipes) or None; ConfigError naming the option."""
    if value is None or isinstance(value, QuantSpec):
        return value
    if isinstance(value, dict):
        try:
            return QuantSpec.from_dict(value)
        except ConfigError as exc:
            raise ConfigError(f"option {option!r}: {exc}") from exc
    raise ConfigError(f"option {option!r} must be a QuantSpec, a dict or None, "
                      f"got {type(value).__name__}")


@dataclass(frozen=True)
class InsertObservers(Pass):
    """Wraps every in-scope conv and linear (and embedding, with ``ops``) in an observed layer
    whose weight observer is calibrated on the spot, and inserts activation observers where a
    statically quantized x86 graph holds integer activations; outputs are unchanged.

    ``weights`` / ``activations`` are :class:`~fxcompress.quant.QuantSpec` values or
    their dict form; None leaves that side float.  Defaults: 8-bit signed symmetric
    per-channel weights (min/max) and 8-bit unsigned affine per-tensor activations
    with the histogram observer, what oneDNN's int8 kernels take.  Activations are
    quantized per tensor (the kernels take one activation scale).

    Placement (:mod:`fxcompress.quant.placement`): the input of each quantized op;
    its output after what x86 fuses into it (conv+relu is observed after the relu,
    conv+add(+relu) after the add or relu, with the add's other operand observed
    as the residual input), and only where a consumer takes it quantized; one
    observer shared by all inputs of a ``cat`` that is consumed quantized; none
    after ops that preserve qparams (max pool, flatten, reshape, dropout, ...),
    whose output reuses their input's.  The observer for an input produced by
    such ops is placed before them, at the op that computes the values.  Layers
    left float (out of scope, functional calls, unsupported modules) are listed
    with the reason.  ``residual_adds="separate"`` fuses no add into its conv: the conv's output
    and the add's result are observed on their own, so ``lower`` makes the add a uint8 add
    (the structure onnxruntime's QDQ fusion takes: QLinearConv + QLinearAdd); the default
    ``"fuse"`` places what x86's fused ``sum`` needs.  ``post_ops="tables"`` fuses only
    ReLU and ReLU6/hardtanh into a conv or linear (what QLinearConv fuses): any other
    activation after one (SiLU, hardswish, GELU, tanh, leaky ReLU) is observed at its input
    too, when its output is consumed quantized, and ``lower`` computes it on the codes as a
    256-entry table (:class:`~fxcompress.quant.lowered.QuantTable`, ONNX ``GatherElements``); the default
    ``"fuse"`` fuses every activation the x86 kernel fuses.  Stats: ``layers_quantized``, ``observers`` (modules),
    ``observer_calls`` (nodes), ``kept_float`` (module path -> reason).
    """

    name = "insert_observers"
    exact = True

    weights: QuantSpec | dict | None = field(default_factory=default_weight_spec)
    activations: QuantSpec | dict | None = field(default_factory=default_activation_spec)
    ops: tuple[str, ...] = ("conv", "linear")
    residual_adds: str = "fuse"
    post_ops: str = "fuse"

    def __post_init__(self) -> None:
        weights = as_spec(self.weights, "weights")
        activations = as_spec(self.activations, "activations")
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "activations", activations)
        if weights is None and activations is None:
            raise ConfigError("weights and activations are both None: nothing to quantize")
        if activations is not None and activations.granularity != "per_tensor":
            raise ConfigError(f"activations must be quantized per_tensor (the int8 kernels "
                              f"take one activation scale), got granularity={activations.granularity!r}")
        check_choice("residual_adds", self.residual_adds, RESIDUAL_ADDS)
        check_choice("post_ops", self.post_ops, POST_OP_PLACEMENTS)
        unknown = [k for k in self.ops if k not in OP_KINDS]
        if unknown or not self.ops:
            raise ConfigError(f"ops must be a non-empty subset of {tuple(OP_KINDS)}, "
                              f"got {self.ops!r}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        quantized, kept = _select_layers(gm, ctx, {OP_KINDS[k] for k in self.ops})
        wrapped = 0
        if self.weights is not None:
            # One observed layer per module object, at every name it has: a module called at
            # several sites (or reached under two names) keeps one weight; each call site gets
            # its own activation observers below.
            chosen = {id(info.module) for info in quantized}
            spec = self.weights
            wrapped = replace_modules(gm, lambda path, m: ObservedLayer(m, make_observer(spec, where=path))
                                      if id(m) in chosen else None)
        calls = 0
        if self.activations is not None:
            calls = _Placer(gm, self.activations).place(find_chains(gm, quantized, self.residual_adds, self.post_ops))
        modules = len(_observer_modules(gm))
        stats: dict[str, Any] = {"layers_quantized": len({id(i.module) for i in quantized}),
                                 "observers": modules, "observer_calls": calls, "kept_float": kept}
        return PassResult(gm, bool(wrapped or calls), stats)


def _select_layers(gm: fx.GraphModule, ctx: PassContext, kinds: set[Kind]) -> tuple[list[OpInfo], dict[str, str]]:
    """The op nodes to quantize (graph order), and each layer kept float with the reason."""
    # A module whose tensors a get_attr reads cannot be replaced without changing what that
    # read computes. (A module under several names is replaced at all of them.)
    read = {str(n.target).rpartition(".")[0] for n in gm.graph.nodes if n.op == "get_attr"}
    chosen: list[OpInfo] = []
    kept: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        info = describe(node, gm)
        if info.family not in kinds:
            continue
        where = str(node.target) if node.op == "call_module" else node.name
        reason = _reason_kept(info, ctx, read)
        if reason is None:
            chosen.append(info)
        else:
            kept[where] = reason
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for path, module in gm.named_modules():
        if path in called or describe_module(module).family not in kinds:
            continue
        parent = next((c for c in called if path.startswith(c + ".")), None)
        if parent and role_of(gm.get_submodule(parent)) is not None:
            continue  # the float module inside one of our layers
        kept[path] = (f"inside {parent!r} ({type(gm.get_submodule(parent)).__name__}), called as one module"
                      if parent else "not called by the graph (unused, or its tensors are read by get_attr)")
    return chosen, kept


def _reason_kept(info: OpInfo, ctx: PassContext, read: set[str]) -> str | None:
    node = info.node
    if node.op != "call_module":
        return "functional call: the weight is not owned by a module"
    if not ctx.in_scope(node):
        return "out of scope (scope/skip)"
    reason = layer_support(info.module)
    if reason is not None:
        return reason
    if str(node.target) in read:
        return "a get_attr node reads the module's tensors"
    if info.kind is not Kind.EMBEDDING and not is_float_value(node):
        return "the output is not a floating-point tensor"
    return None


def _observer_modules(gm: fx.GraphModule) -> dict[str, nn.Module]:
    container = getattr(gm, ACTIVATION_OBSERVERS, None)
    return dict(container.items()) if isinstance(container, nn.ModuleDict) else {}


class _Placer:
    """Inserts the activation observer nodes for the chosen ops' chains."""

    def __init__(self, gm: fx.GraphModule, spec: QuantSpec) -> None:
        self.gm, self.graph, self.spec = gm, gm.graph, spec
        if not isinstance(getattr(gm, ACTIVATION_OBSERVERS, None), nn.ModuleDict):
            gm.add_submodule(ACTIVATION_OBSERVERS, nn.ModuleDict().train(gm.training))
        self.modules: nn.ModuleDict = getattr(gm, ACTIVATION_OBSERVERS)
        self.roots: dict[fx.Node, fx.Node] = {}  # observed value -> its observer node
        self.last_placeholder = next((n for n in reversed(gm.graph.nodes) if n.op == "placeholder"), None)

    def place(self, chains: dict[fx.Node, FusedChain]) -> int:
        """Insert every observer; returns the number of observer nodes."""
        wanted = consumed_quantized(self.gm, chains)
        # Chain ends first: they are the integer outputs every later decision builds on.
        for chain in chains.values():
            if chain.end in wanted:
                self._observe(chain.end, users=None)
        by_add = residual_chains(chains)
        for node in list(self.graph.nodes):
            chain = chains.get(node)
            if chain is not None and chain.data is not None and is_float_value(chain.data) \
                    and (not chain.standalone or chain.end in wanted):
                self._ensure(node, chain.data)  # a standalone chain's operand: for a quantized result only
            if node in by_add and by_add[node].end in wanted:
                self._ensure(node, by_add[node].residual)
            elif node in wanted and is_cat(node, self.gm):
                self._share(node)
        self._label()
        return len(self.roots)

    def _observe(self, value: fx.Node, users: list[fx.Node] | None) -> fx.Node:
        """The observer node of ``value`` (created on first use); rewires ``users`` (None: all)."""
        obs = self.roots.get(value)
        if obs is None:
            key = value.name
            while hasattr(self.modules, key):  # a ModuleDict attribute ("float", "type") or an earlier run's
                key += "_"
            self.modules[key] = ActivationObserver(make_observer(self.spec)).train(self.gm.training)
            anchor = self.last_placeholder if value.op == "placeholder" else value
            with self.graph.inserting_after(anchor):
                obs = self.graph.call_module(f"{ACTIVATION_OBSERVERS}.{key}", (value,))
            obs.meta.update({k: value.meta[k] for k in ("tensor_meta", "type") if k in value.meta})
            self.roots[value] = obs
        for user in list(value.users) if users is None else users:
            if user is not obs:
                user.replace_input_with(value, obs)
        return obs

    def _ensure(self, consumer: fx.Node, value: fx.Node) -> None:
        """Make ``consumer`` read ``value`` quantized: reuse what is there, else observe where the
        values are computed (above ops that preserve qparams)."""
        if quant_source(value, self.gm) is not None:
            return
        child, node = consumer, value
        while (source := preserves_qparams(node, self.gm)) is not None:
            child, node = node, source
        if is_float_value(node):
            self._observe(node, users=[child])

    def _share(self, cat: fx.Node) -> None:
        """One observer module for every input of ``cat`` (its output then carries the same qparams)."""
        for value in describe(cat, self.gm).inputs:
            if isinstance(value, fx.Node):
                self._ensure(cat, value)
        inputs = [i for i in describe(cat, self.gm).inputs if isinstance(i, fx.Node)]  # rewired by _ensure
        targets = list(dict.fromkeys(str(s.target) for i in inputs if (s := quant_source(i, self.gm)) is not None))
        for other in targets[1:]:
            for node in self.graph.nodes:
                if node.op == "call_module" and node.target == other:
                    node.target = targets[0]
            del self.modules[other.rpartition(".")[2]]

    def _label(self) -> None:
        """Each observer's ``where``: the nodes whose values it observes (error messages name them)."""
        observed: dict[str, list[str]] = {}
        for value, obs in self.roots.items():
            observed.setdefault(str(obs.target), []).append(value.name)
        for target, names in observed.items():
            self.gm.get_submodule(target).where = ", ".join(names)
