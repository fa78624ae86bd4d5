"""Lowered models under torch.compile with inductor's freezing (fxcompress.oplib.frozen).

With freezing on, the int8 convs, the fused residual sums, the linears and the quantize
steps are traced as direct oneDNN calls with weights packed at compile time plus
elementwise ops, instead of opaque calls of the operator library. What holds on every x86
CPU: a model without fused residual sums is the eager model bit for bit (the same kernel
calls, the same quantize formula); a fused sum is computed in the fused kernel's reference
arithmetic, which the x86 kernel matches bit for bit on AVX512-VNNI and within the per-op
contract's one code elsewhere (AMX), so a residual model is held to that.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

import fxcompress
from fxcompress.examples import digits
from fxcompress.quant.spec import portable_weight_spec


def _static(backend: str = "x86") -> list:
    return fxcompress.recipes.int8_static(weights=portable_weight_spec(), backend=backend, only_if_faster=False)


@pytest.fixture(scope="module")
def digits_data():
    data = digits.load_digits_data()
    return [(data.train_x[i:i + 32], data.train_y[i:i + 32]) for i in range(0, 96, 32)], data.test_x[:24]


def _lowered(model: nn.Module, batches: list, x: torch.Tensor, backend: str = "x86") -> torch.fx.GraphModule:
    return fxcompress.run(model, _static(backend), x[:4], calibration_data=batches, progress=False).model


def _compile_frozen(model: nn.Module, x: torch.Tensor, **options) -> tuple[nn.Module, str]:
    """The model compiled with freezing, its output on ``x`` checked by the caller, and the
    generated code of that first call."""
    torch._dynamo.reset()
    compiled = torch.compile(model, **options)
    with torch._inductor.config.patch(freezing=True), torch.inference_mode():
        _, code = run_and_get_code(compiled, x)
    return compiled, "\n".join(code)


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(20 * torch.log10(ref.norm() / (ref - out).norm().clamp_min(1e-30)))


def test_frozen_cnn_calls_onednn_directly_and_equals_eager(digits_data) -> None:
    batches, x = digits_data
    model = _lowered(digits.pretrained_digits_cnn(), batches, x)
    compiled, code = _compile_frozen(model, x)
    with torch.inference_mode():
        assert torch.equal(compiled(x), model(x))
        assert torch.equal(compiled(x[:5]), model(x[:5]))  # another batch size, recompiled: same numbers
    assert "onednn.qconv_pointwise" in code and "onednn.qlinear_pointwise" in code
    # No int8 layer is left behind an opaque Python operator call but the stem's conv of the
    # 1-channel digit images (whose layout inductor cannot tell: see fxcompress.oplib.frozen).
    assert code.count("torch.ops.fxcompress.qconv.default(") == 1
    for opaque in ("fxcompress.qlinear.", "fxcompress.quantize."):
        assert opaque not in code, opaque


def test_frozen_resnet_fuses_its_residual_sums_within_the_contract(digits_data) -> None:
    batches, x = digits_data
    model = _lowered(digits.pretrained_digits_resnet(), batches, x)
    compiled, code = _compile_frozen(model, x)
    assert "fxcompress.qconv_add_" not in code and "onednn.qconv_pointwise" in code
    with torch.inference_mode():
        eager, out = model(x), compiled(x)
    assert _sqnr(eager, out) >= 30.0  # inf on AVX512-VNNI: the same codes
    assert (eager.argmax(1) == out.argmax(1)).float().mean() >= 0.95


def test_frozen_dynamic_batch_equals_eager(digits_data) -> None:
    batches, x = digits_data
    model = _lowered(digits.pretrained_digits_cnn(), batches, x)
    compiled, _ = _compile_frozen(model, x, dynamic=True)
    with torch.inference_mode():
        for n in (24, 3, 17):
            assert torch.equal(compiled(x[:n]), model(x[:n]))


def test_frozen_reference_backend_keeps_its_operators(digits_data) -> None:
    """The reference backend promises portable arithmetic: no oneDNN call is traced for it."""
    batches, x = digits_data
    model = _lowered(digits.pretrained_digits_cnn(), batches, x, backend="reference")
    compiled, code = _compile_frozen(model, x)
    with torch.inference_mode():
        assert torch.equal(compiled(x), model(x))
    assert "onednn.qconv_pointwise" not in code and "fxcompress.qconv" in code


def test_frozen_graph_input_guard_still_refuses_nan(digits_data) -> None:
    batches, x = digits_data
    model = _lowered(digits.pretrained_digits_cnn(), batches, x)
    compiled, _ = _compile_frozen(model, x)
    bad = x.clone()
    bad[1, 0, 2, 3] = float("nan")
    with torch.inference_mode(), pytest.raises(RuntimeError, match="input 'x' holds NaN or Inf"):
        compiled(bad)


class _SqueezeExcite(nn.Module):
    """conv + SiLU, a squeeze-excitation gate, conv: efficientnet's block in small."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU())
        self.squeeze = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 4, 1), nn.SiLU(), nn.Conv2d(4, 16, 1),
                                     nn.Sigmoid())
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.head(y * self.squeeze(y))


def test_frozen_squeeze_excitation_block_is_within_one_code_of_eager() -> None:
    """quantize_product and the swish post-op fuse with inductor's own float ops (its sigmoid
    may differ from aten's by an ulp): every output within one output step of eager."""
    torch.manual_seed(0)
    model = _SqueezeExcite().eval()
    images = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    lowered = fxcompress.run(model, _static(), images[0], calibration_data=images, progress=False).model
    kinds = {type(m).__name__ for m in lowered.modules()}
    assert "QuantizeProduct" in kinds, kinds
    compiled, code = _compile_frozen(lowered, images[1])
    with torch.inference_mode():
        eager, out = lowered(images[1]), compiled(images[1])
    step = (eager.max() - eager.min()) / 255  # the float head's output: compare in its own units
    assert (out - eager).abs().max() <= step + 1e-6
    assert "fxcompress.quantize_product" not in code
