"""The arithmetic contract of lowered static int8 models, and a checker that proves it op by op.

What holds on every x86 CPU oneDNN supports (AVX2, AVX512, AVX512-VNNI, AMX), for the
static int8 modules :func:`check_contract` looks at (:data:`STATIC_MODULES`):

* ``backend="reference"``: each module computes exactly the arithmetic of
  :mod:`fxcompress.quant.int_math` with portable torch ops (integer accumulation in
  float64, which is exact whatever algorithm torch picks, then float32 steps in a fixed
  order), so a reference-lowered model equals its folded graph **bit for bit, on any CPU**.
* ``backend="x86"``: each module, **given the same inputs** as its reference twin,
  returns uint8 codes within :data:`CODE_TOLERANCE` (one code) of the twin's, and
  float32 values within :data:`FLOAT_TOLERANCE` of them, relative to the largest
  magnitude of that output. The kernels accumulate exactly (where a CPU's kernels would
  saturate, the layer runs the reference path instead: :mod:`fxcompress.quant.isa`),
  then finish in float32 in an order that depends on the kernel path (AMX rounds the
  fused residual ``sum`` and some 3-channel first convs differently from AVX512-VNNI, at
  about 1 output in 10^4; oneDNN evaluates SiLU, hardswish and GELU with its own
  approximations); a float32 rounding difference moves a requantized code by one at most.
* A layer **kept float** (no kernel for it, out of scope, or slower here under
  ``lower(only_if_faster=True)``) computes in float32 with its dequantized weight: the
  float model's arithmetic, within float32 round-off of the folded layer's exact integer
  result, not bit for bit.
* **End to end, nothing is promised for x86**: a one-code difference early in a deep
  network can grow. Benchmarks report the measured agreement with the folded graph.

:func:`check_contract` proves the per-op statement on given inputs by teacher forcing:
it runs the lowered graph with every x86 module replaced by its reference twin (so each
op sees exactly the inputs the folded graph gives it) and runs the x86 module beside it
on the same inputs, recording how far the two outputs are apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from fxcompress.errors import InputError
from fxcompress.quant.lowered import (
    Dequantize, LoweredModule, QuantAdaptiveAvgPool2d, QuantAdd, QuantConvNd, QuantLinear, QuantMaxPool2d, Quantize,
    QuantizeProduct, QuantMul, QuantTable, WeightOnlyConv,
)

__all__ = ["CODE_TOLERANCE", "FLOAT_TOLERANCE", "STATIC_MODULES", "OpAgreement", "ContractReport",
           "check_contract", "reference_twin", "lowered_module_io"]

#: The most a uint8 output code of an x86 module may differ from its reference twin's.
CODE_TOLERANCE = 1
#: The most a float32 output may differ from the reference twin's, relative to the
#: largest magnitude of that output (a few float32 ulps of rounding order).
FLOAT_TOLERANCE = 2.0 ** -16
#: The modules the contract covers: the static int8 graph's (uint8 activations).
STATIC_MODULES: tuple[type[LoweredModule], ...] = (
    Quantize, QuantizeProduct, Dequantize, QuantConvNd, QuantLinear, QuantMaxPool2d, QuantAdaptiveAvgPool2d,
    QuantAdd, QuantTable, QuantMul,
)


@dataclass(frozen=True)
class OpAgreement:
    """One x86 module against its reference twin on the same inputs.

    ``differing`` counts output elements that are not equal; ``max_diff`` is in codes for a
    uint8 output, relative to the output's largest magnitude for a float one; ``holds``
    says whether it is within the contract's bound.
    """

    node: str
    module: str
    dtype: str
    numel: int
    differing: int
    max_diff: float
    bound: float

    @property
    def holds(self) -> bool:
        return self.max_diff <= self.bound


@dataclass
class ContractReport:
    """Every x86 static module checked on one set of inputs.

    ``output`` is the graph's output computed on the reference twins: what the folded
    graph computes, bit for bit. ``unchecked`` names the x86 lowered modules outside the
    contract (dynamic and weight-only linears: float in, float out), which ran as they are.
    """

    ops: list[OpAgreement] = field(default_factory=list)
    output: Any = None
    unchecked: list[str] = field(default_factory=list)

    @property
    def holds(self) -> bool:
        return all(op.holds for op in self.ops)

    @property
    def violations(self) -> list[OpAgreement]:
        return [op for op in self.ops if not op.holds]

    def differing_codes(self) -> tuple[int, int]:
        """``(differing, total)`` uint8 output codes over all ops."""
        codes = [op for op in self.ops if op.dtype == "uint8"]
        return sum(op.differing for op in codes), sum(op.numel for op in codes)

    def summary(self) -> str:
        differing, total = self.differing_codes()
        verdict = "holds" if self.holds else f"BROKEN at {', '.join(op.node for op in self.violations[:5])}"
        return (f"{len(self.ops)} x86 ops checked against their reference twins: contract {verdict}; "
                f"{differing} of {total} uint8 codes differ (by at most {CODE_TOLERANCE})")


def reference_twin(module: LoweredModule) -> LoweredModule:
    """The same module on ``backend="reference"``: rebuilt from its config and state."""
    twin = type(module)(**{**module.config(), "backend": "reference"})
    twin.load_state_dict(module.state_dict())
    return twin.train(module.training)


def _clone(value: Any) -> Any:
    # Modules may write into an argument (a consumed residual): each call gets its own copy.
    if isinstance(value, torch.Tensor):
        return value.clone(memory_format=torch.preserve_format)
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


def _compare(node: str, module: nn.Module, expected: torch.Tensor, got: torch.Tensor) -> OpAgreement:
    if expected.shape != got.shape or expected.dtype != got.dtype:
        return OpAgreement(node, type(module).__name__, str(expected.dtype).removeprefix("torch."),
                           expected.numel(), expected.numel(), float("inf"), 0.0)
    if expected.dtype == torch.uint8:
        diff = (expected.to(torch.int16) - got.to(torch.int16)).abs()
        max_diff, bound = float(diff.max()) if diff.numel() else 0.0, float(CODE_TOLERANCE)
        differing = int((diff != 0).sum())
    else:
        e, g = expected.double(), got.double()
        scale = float(e.abs().max()) if e.numel() else 0.0
        delta = (e - g).abs()
        nan_mismatch = bool((e.isnan() != g.isnan()).any())
        raw = float(delta.nan_to_num(0.0).max()) if delta.numel() else 0.0
        max_diff = float("inf") if nan_mismatch else (raw / scale if scale > 0 else raw)
        bound = FLOAT_TOLERANCE
        differing = int((delta.nan_to_num(0.0) != 0).sum())
    return OpAgreement(node, type(module).__name__, str(expected.dtype).removeprefix("torch."),
                       expected.numel(), differing, max_diff, bound)


class _TeacherForced(fx.Interpreter):
    """Runs the graph on reference twins; each x86 static module also runs, on the same inputs."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.report = ContractReport()
        self._twins: dict[str, LoweredModule] = {}
        self._node: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self._node = n
        return super().run_node(n)

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        module = self.fetch_attr(str(target))
        if not isinstance(module, STATIC_MODULES) or module.backend == "reference":
            # A layer kept float (WeightOnlyConv) runs no kernel: the float model's arithmetic.
            if isinstance(module, LoweredModule) and module.backend != "reference" and \
                    not isinstance(module, WeightOnlyConv):
                self.report.unchecked.append(str(target))
            return super().call_module(target, args, kwargs)
        twin = self._twins.get(str(target))
        if twin is None:
            twin = self._twins[str(target)] = reference_twin(module)
        expected = twin(*_clone(args), **_clone(kwargs))
        got = module(*_clone(args), **_clone(kwargs))
        name = self._node.name if self._node is not None else str(target)
        self.report.ops.append(_compare(name, module, expected, got))
        return expected


def check_contract(lowered: fx.GraphModule, *args: Any, **kwargs: Any) -> ContractReport:
    """Check the x86 contract of every static module of ``lowered`` on these inputs.

    Teacher-forced: the graph runs on reference twins (the folded graph's values) and each
    x86 module is compared with its twin on the twin's inputs. The report lists every
    module checked; ``report.holds`` is the verdict. ``lowered`` is not modified.
    """
    placeholders = [n for n in lowered.graph.nodes if n.op == "placeholder"]
    positional = list(args)
    for node in placeholders[len(args):]:  # keyword inputs, in the graph's order
        if node.target in kwargs:
            positional.append(kwargs[node.target])
        elif node.args:
            positional.append(node.args[0])  # the placeholder's default
        else:
            raise InputError(f"check_contract: no value for the graph input {node.target!r}; pass it "
                             f"positionally or by name, as the model is called")
    with torch.inference_mode():
        interpreter = _TeacherForced(lowered)
        interpreter.report.output = interpreter.run(*positional)
    return interpreter.report


def lowered_module_io(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, tuple[list[torch.Tensor], torch.Tensor]]:
    """``path -> (inputs, output)`` of every lowered module on one run of ``model`` (no grad),
    cloned, in call order; the first call of a module called twice. The inputs to teacher-force
    one op with elsewhere (its ONNX twin, another backend). Hooks are removed afterwards."""
    seen: dict[str, list] = {}
    hooks = []
    for path, module in model.named_modules():
        if isinstance(module, LoweredModule):
            hooks.append(module.register_forward_pre_hook(
                lambda m, a, path=path: seen.setdefault(path, [[t.clone() for t in a]]) and None))
            hooks.append(module.register_forward_hook(
                lambda m, a, out, path=path: seen[path].append(out.clone()) if len(seen[path]) == 1 else None))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return {path: (record[0], record[1]) for path, record in seen.items()}

