"""The torchvision zoo through static int8 quantization and lowering, fully checked.

Every model (realistic random weights from ``fxcompress.zoo``, reduced resolution) goes
through ``fuse_conv_bn -> insert_observers -> calibrate -> fold_fake_quant -> lower ->
eliminate_dead_nodes`` under ``check="full"``. The lowered model must run and give
finite outputs, hold no observer, fake-quant or quantize-dequantize, run int8 where the
ops allow (every layer still folded is listed with its reason), and keep the arithmetic
contract (fxcompress.quant.contract) on every x86 op: teacher-forced, each op within one
code of its reference twin, on whatever kernel path this CPU takes (AVX2, AVX512-VNNI,
AMX). End to end the x86 model is not compared: a code that rounds the other way early in
a random-weight net can move the output by a few dB, differently on each CPU. The
teacher-forced run itself is the reference lowering, which computes the integer ops as the
folded graph does, bit for bit; its float ops run on channels-last tensors and may reduce
in another order, so it is held to SQNR >= 35 dB against the folded graph, or, for a net whose
folded graph is itself that sensitive (maxvit_t: a 1e-6 relative change of the input moves the
folded output to ~27 dB, as one flipped code early on propagates), to within 6 dB of the folded
graph's own sensitivity to such a float round-off. CI runs the models up to 30M parameters; all
80 are marked slow.
"""

from __future__ import annotations

import pytest
import torch

import fxcompress
from fxcompress import zoo
from fxcompress.quant.activations import QDQ
from fxcompress.quant.contract import check_contract
from fxcompress.quant.isa import int8_arithmetic
from fxcompress.quant.kernels import onednn_int8_support
from fxcompress.quant.spec import default_weight_spec, portable_weight_spec
from fxcompress.quant.layers import FoldedLayer
from fxcompress.verify import role_of

# The weights this CPU's int8 kernels take, so that the kernels run (8-bit weights would take
# the reference path where int8 dot products saturate; fxcompress.quant.isa).
WEIGHTS = (default_weight_spec() if onednn_int8_support() and int8_arithmetic().exact_products
           else portable_weight_spec())
FOLD = ["fuse_conv_bn", ("insert_observers", {"weights": WEIGHTS}), "calibrate", "fold_fake_quant"]
CASES = [pytest.param(name, id=name) for name in zoo.ci_subset()] + [
    pytest.param(name, id=f"{name}-all", marks=pytest.mark.slow)
    for name in zoo.list_classifiers() if name not in zoo.ci_subset()
]


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (20 * torch.log10(ref.norm() / (ref - out).norm().clamp_min(1e-30))).item()


def _logits(out: object) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out  # type: ignore[return-value]


@pytest.mark.parametrize("name", CASES)
def test_zoo_model_lowers_and_runs(name: str) -> None:
    model = zoo.build(name)
    x = zoo.example_input(name, batch=2, reduced=True)
    calibration = [zoo.example_input(name, batch=2, reduced=True, seed=s) for s in (1, 2)]
    # Fusion's exactness, with its round-off tolerance per model, is tests/zoo/test_zoo_foundation.py's
    # subject; deep nets (resnet152) exceed the default 1e-4 by float32 round-off alone.
    folded = fxcompress.run(model, FOLD, (x,), calibration_data=calibration, tolerance=1e-3).model
    result = fxcompress.run(folded, ["lower", "eliminate_dead_nodes"], (x,))
    low, stats = result.model, result.report.rows[0].stats
    with torch.no_grad():
        expected, out = _logits(folded(x)), _logits(low(x))
    assert torch.isfinite(out).all()
    report = check_contract(low, x)
    assert report.holds, report.summary()
    roles = {role_of(m) for _, m in low.named_modules()}
    assert not roles & {"observer", "fake_quant"}
    assert not any(isinstance(m, QDQ) for m in low.modules())
    left = {n.name for n in low.graph.nodes if n.op == "call_module"
            and isinstance(low.get_submodule(n.target), FoldedLayer)}
    assert left <= set(stats["float_nodes"])
    assert stats["int8_ops"].get("conv", 0) + stats["int8_ops"].get("linear", 0) >= 1
    reference_sqnr = sqnr(expected, _logits(report.output))
    if reference_sqnr < 35:
        own = _round_off_sensitivity(folded, x, expected)
        assert reference_sqnr >= own - 6, (
            f"teacher-forced reference vs folded: {reference_sqnr:.1f} dB, below 35 dB and more than 6 dB "
            f"below the folded graph's own sensitivity to a float round-off of its input ({own:.1f} dB)")


def _round_off_sensitivity(folded: torch.nn.Module, x: torch.Tensor, expected: torch.Tensor) -> float:
    """SQNR of the folded graph's output against itself on inputs that differ by float round-off only.

    Two such inputs: ``x`` in channels-last memory (the float ops reduce in another order) and
    ``x * (1 + 1e-6)``. The lower of the two is how far a reordered float op alone can move this
    graph's output, the most an end-to-end comparison of two correct lowerings can promise.
    """
    with torch.no_grad():
        reordered = _logits(folded(x.contiguous(memory_format=torch.channels_last)))
        nudged = _logits(folded(x * (1 + 1e-6)))
    return min(sqnr(expected, reordered), sqnr(expected, nudged))
