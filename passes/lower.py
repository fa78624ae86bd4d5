"""``lower``: a folded graph becomes a graph of integer kernels (x86 oneDNN) or their reference."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from torch import fx

from fxcompress.capture import propagate_shapes
from fxcompress.errors import ConfigError, LoweringError
from fxcompress.pass_base import Pass, PassContext, PassResult, check_choice
from fxcompress.quant.activations import QDQ
from fxcompress.quant.isa import int8_arithmetic
from fxcompress.quant.kernels import onednn_int8_support
from fxcompress.quant.lowering import check_backend_option, resolve_backend
from fxcompress.quant.lowering.build import uint8_qparams
from fxcompress.quant.lowering.state import LoweringStats
from fxcompress.quant.lowering.static import StaticLowering
from fxcompress.quant.lowering.choice import choose
from fxcompress.quant.lowering.onnxruntime import use_onnxruntime_arithmetic
from fxcompress.quant.lowered_base import ARITHMETICS
from fxcompress.quant.lowering.timing import best_medians, float_reference

__all__ = ["IF_SLOWER", "Lower"]

#: What ``lower`` does when the lowered model is slower than float: keep it and warn, or keep float.
IF_SLOWER = ("warn", "keep_float")
#: Alternating rounds of the whole-model speed check; each model keeps its best median.
SPEED_ROUNDS = 3


@dataclass(frozen=True)
class Lower(Pass):
    """Turns the folded graph into lowered modules that compute on integers: every quantized
    2-D conv and linear the int8 kernels can take runs as one (its ReLU / ReLU6 / hardtanh /
    leaky ReLU and a conv's residual add fused), activations stay
    uint8 channels-last between int8 ops (requantized inside the kernels; max pools,
    reshapes, concatenations, uint8 adds and average pools in between), quantized at the
    graph inputs and dequantized exactly where a float op or an output reads them; no
    observer, fake-quant or quantize-dequantize is left. Outputs keep their dtypes.

    With ``backend="reference"`` the lowered model computes what the folded graph
    computes, bit for bit, on any CPU: both round as :mod:`fxcompress.quant.int_math`
    specifies. With ``backend="x86"`` each lowered op, given the same inputs, is within
    one code of its reference (the per-op contract of :mod:`fxcompress.quant.contract`,
    which :func:`~fxcompress.quant.contract.check_contract` verifies op by op): oneDNN's
    kernel paths (AVX2, AVX512-VNNI, AMX) accumulate exactly but round their float32
    steps differently; end to end, agreement is measured, not promised. The kernels also
    fuse SiLU, hardswish, GELU and tanh, which oneDNN evaluates with its own approximations
    (within the per-op contract; much faster where they are frequent, as in EfficientNet);
    ``approximate_post_ops=False`` keeps them float ops after a float-output kernel
    instead, applied exactly as torch does by the quantization that follows.

    ``backend="x86"`` runs oneDNN's kernels where their preconditions hold at the shape
    of each call and the reference path (dequantize, float compute, requantize: the
    same arithmetic with portable ops) elsewhere; ``"reference"`` runs only the latter;
    None takes the run's backend. On a CPU without the x86 int8 kernels the lowered
    modules run the reference path and the report says so; on one whose int8 dot products
    saturate (AVX2, AVX512 without VNNI: :mod:`fxcompress.quant.isa`) so do the layers whose
    weights could overflow them (8-bit weights; 7-bit ones never do, see
    :func:`~fxcompress.quant.spec.portable_weight_spec`). ``strict`` raises
    raises :class:`~fxcompress.errors.LoweringError` for that, for any layer left
    float and for any kernel fallback at the traced shapes. A layer the kernels cannot
    take at all (not a 2-D conv or linear, weights not signed symmetric per channel,
    input not quantized to uint8) keeps its folded module (integer weights, computed in
    float). ``only_if_faster`` times, on this CPU at each layer's traced shapes, the ways a
    quantized layer can run: its int8 chain, the layer kept float (its input dequantized and
    output quantized where its neighbours are integer), and for a conv with a fused residual
    the int8 conv with the add done in float (the same values; faster where oneDNN's fused
    ``sum`` kernel is slow); int8 stays unless another way is faster by more than 10%
    (:mod:`fxcompress.quant.lowering.choice`); it applies to the x86 backend (the reference
    one is portable by choice, not timed). With it, ``check_speed`` or
    ``if_slower="keep_float"`` the lowered model is timed against the float version of the
    folded model (its layers with dequantized weights, no quantization points; the two
    timed in alternating rounds). When the lowered model is slower, ``if_slower="warn"``
    (the default) keeps it and a ``UserWarning`` says so; ``if_slower="keep_float"``
    returns that float model instead, so the result is never slower than float here, and
    the stats (``kept_float``) and the report say why. Per-layer choices cannot promise
    that alone: a layer kept float still pays the quantization points its int8 neighbours
    need. Stats: ``int8_nodes`` (count), ``int8_ops`` (per kind), ``float_nodes``
    (quantized layer -> why not int8), ``fallbacks`` ([{node, reason}] for ops on the
    reference path), ``quantize`` /
    ``dequantize`` (float boundaries), ``choices`` (layers per way, with ``only_if_faster``),
    ``speed`` (when measured), ``kept_float`` (with ``if_slower="keep_float"``: the int8
    model's and the float model's milliseconds, and what was discarded, when float won).

    ``arithmetic="onnxruntime"`` makes the quantize steps, uint8 adds and the convs
    onnxruntime fuses into ``QLinearConv`` round as onnxruntime's kernels do, so that the
    model's QDQ export (``fxcompress.export_onnx``) computes the same codes there
    (:mod:`fxcompress.quant.lowering.onnxruntime`); each such op stays within one code of
    the default (oneDNN's) order. Stats: ``onnxruntime_arithmetic`` (switched per module
    type) and ``onednn_arithmetic`` (module path -> why it keeps oneDNN's order).
    """

    name = "lower"
    requires = ("fold_fake_quant",)

    backend: str | None = None
    only_if_faster: bool = False
    check_speed: bool = False
    if_slower: str = "warn"
    strict: bool = False
    approximate_post_ops: bool = True
    arithmetic: str = "onednn"

    def __post_init__(self) -> None:
        check_backend_option(self.backend)
        check_choice("arithmetic", self.arithmetic, ARITHMETICS)
        check_choice("if_slower", self.if_slower, IF_SLOWER)
        if self.strict and self.if_slower == "keep_float":
            raise ConfigError("strict=True (every layer int8) and if_slower='keep_float' (float when "
                              "faster) contradict each other; choose one")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        backend = resolve_backend(self.backend, ctx)
        notes: list[str] = []
        if backend == "x86" and not (support := onednn_int8_support()):
            if self.strict:
                raise LoweringError(f"lower(backend='x86', strict=True): the x86 int8 kernels cannot run "
                                    f"here: {support.reason}; use backend='reference' or strict=False")
            notes.append(f"x86 int8 kernels unavailable ({support.reason}): every lowered module runs "
                         f"the reference path")
        measure = self.only_if_faster or self.check_speed or self.if_slower == "keep_float"
        reference = float_reference(gm) if measure else None
        kept_qdq = [n.name for n in gm.graph.nodes if n.op == "call_module"
                    and isinstance(m := gm.get_submodule(str(n.target)), QDQ) and uint8_qparams(m) is None]
        measured = self.only_if_faster and backend == "x86"  # the reference backend is chosen, not timed
        lowering = StaticLowering(gm, ctx, backend, choose if measured else None,
                                  approximate_post_ops=self.approximate_post_ops)
        stats = lowering.run()
        switched, kept_onednn = use_onnxruntime_arithmetic(gm) if self.arithmetic == "onnxruntime" else ({}, {})
        args, kwargs = ctx.example_inputs()
        propagate_shapes(gm, args, kwargs)  # annotates the new nodes (and fills the kernel caches)
        fallbacks = _fallbacks(stats, backend) + [
            {"node": name, "reason": "activation quantization is not 8-bit unsigned: kept as "
                                     "quantize-dequantize in float"} for name in kept_qdq]
        if self.strict and (fallbacks or stats.float_nodes):
            first = fallbacks[0] if fallbacks else next(iter(stats.float_nodes.items()))
            raise LoweringError(f"lower(strict=True): {len(fallbacks)} fallbacks and {len(stats.float_nodes)} "
                                f"layers not int8, e.g. {first}; pass strict=False to accept them")
        out: dict[str, Any] = {
            "int8_nodes": sum(stats.int8_ops.values()), "int8_ops": dict(stats.int8_ops),
            "float_nodes": dict(stats.float_nodes), "fallbacks": fallbacks,
            "quantize": stats.boundaries["quantize"], "dequantize": stats.boundaries["dequantize"],
        }
        if measured:
            out["choices"] = dict(stats.choices)
        notes.append(_summary(stats, fallbacks, backend))
        if self.arithmetic == "onnxruntime":
            out["onnxruntime_arithmetic"], out["onednn_arithmetic"] = switched, kept_onednn
            notes.append(f"onnxruntime arithmetic: {', '.join(f'{n} {k}' for k, n in sorted(switched.items()))}"
                         + (f"; {len(kept_onednn)} ops keep oneDNN's order (onnxruntime runs them in float), "
                            f"e.g. {next(iter(kept_onednn))}: {next(iter(kept_onednn.values()))}"
                            if kept_onednn else ""))
        overflow = [f for f in fallbacks if "could overflow" in f["reason"]]
        if overflow:
            notes.append(f"this CPU's int8 kernels ({int8_arithmetic().describe()}) could overflow with the "
                         f"weights of {len(overflow)} layers, which run the reference path (exact, slower); "
                         f"7-bit weights (fxcompress.quant.spec.portable_weight_spec()) run on the kernels here")
        if reference is not None:
            out["speed"] = speed = _speed_check(gm, reference, args, kwargs, notes,
                                                warn=self.if_slower == "warn")
            if self.if_slower == "keep_float" and speed["lowered_ms"] > speed["float_ms"]:
                return _keep_float(reference, out, notes)
        out["notes"] = notes
        return PassResult(gm, bool(stats.int8_ops or stats.boundaries), out)


def _fallbacks(stats: LoweringStats, backend: str) -> list[dict[str, str]]:
    """Lowered ops whose x86 kernel refuses their traced shapes (they run the reference path)."""
    if backend != "x86":
        return []
    found = []
    for name, (module, shapes) in stats.lowered.items():
        support = module.kernel_support(*shapes)
        if not support:
            found.append({"node": name, "reason": support.reason})
    return found


def _summary(stats: LoweringStats, fallbacks: list, backend: str) -> str:
    ops = ", ".join(f"{n} {k}" for k, n in sorted(stats.int8_ops.items())) or "nothing"
    text = (f"int8 ({backend}): {ops}; {len(stats.float_nodes)} quantized layers not int8; "
            f"{stats.boundaries['quantize']} quantize / {stats.boundaries['dequantize']} dequantize points")
    return text + (f"; {len(fallbacks)} reference fallbacks" if fallbacks else "")


def _speed_check(gm: fx.GraphModule, reference: fx.GraphModule, args: tuple, kwargs: dict,
                 notes: list[str], *, warn: bool) -> dict[str, float]:
    """Time lowered vs float on the example inputs, in alternating rounds (each keeps its best
    median, so a burst of load on a shared machine does not decide); note (and with ``warn``,
    warn) when lowered is slower."""
    best = best_medians({"lowered": lambda: gm(*args, **kwargs), "float": lambda: reference(*args, **kwargs)},
                        SPEED_ROUNDS, min_run_time=0.1)
    t_lowered, t_float = best["lowered"], best["float"]
    if t_lowered > t_float:
        message = (f"the lowered model is slower than its float version on the example inputs "
                   f"({t_lowered * 1e3:.2f} ms vs {t_float * 1e3:.2f} ms)")
        if warn:
            warnings.warn(f"fxcompress lower: {message}", UserWarning, stacklevel=2)
        notes.append(message)
    return {"lowered_ms": t_lowered * 1e3, "float_ms": t_float * 1e3}


def _keep_float(reference: fx.GraphModule, out: dict[str, Any], notes: list[str]) -> PassResult:
    """``if_slower="keep_float"`` and float won: the float model replaces the lowered one, and
    the stats say what was discarded (the int8 counts move under ``kept_float``)."""
    discarded = {k: out[k] for k in ("int8_nodes", "int8_ops", "quantize", "dequantize")}
    out.update(int8_nodes=0, int8_ops={}, quantize=0, dequantize=0, fallbacks=[])
    out["kept_float"] = {"lowered_ms": out["speed"]["lowered_ms"], "float_ms": out["speed"]["float_ms"],
                         "discarded": discarded}
    notes.append(f"if_slower='keep_float': kept the float model (layers with dequantized weights, "
                 f"{discarded['int8_nodes']} int8 ops discarded); pass if_slower='warn' to keep int8")
    out["notes"] = notes
    return PassResult(reference, True, out)
