"""A lowered conv's eager plan (fxcompress.quant.eager_plan): the kernel call it remembers is
exactly the operator's, and every change the operator would see makes it choose again."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import fxcompress.oplib
from fxcompress.errors import InputError
from fxcompress.quant import uint8 as U
from fxcompress.quant.contract import reference_twin
from fxcompress.quant.eager_plan import EagerPlan, disabled
from fxcompress.quant.kernels import onednn_int8_support
from fxcompress.quant.lowered import QuantConv1d, QuantConv2d, QuantConvNd

from test_lowered import digits_features, portable_scale, quantized

ONEDNN = onednn_int8_support()
pytestmark = pytest.mark.skipif(not ONEDNN, reason=f"oneDNN int8 unavailable: {ONEDNN.reason}")


def lowered(conv: nn.Module, *, residual: bool = False, float_out: bool = False, post_op: str = "relu",
            size: int = 12) -> tuple[QuantConvNd, torch.Tensor]:
    torch.manual_seed(0)
    dims = len(conv.kernel_size)
    x = digits_features(3, conv.in_channels, size)
    x = x[..., 0, :] if dims == 1 else x
    qx, xs, xzp = quantized(x)
    os_, ozp = U.choose_qparams_uint8(conv(x).relu() * 1.03)
    res = dict(residual=True, residual_scale=0.02, residual_zero_point=3) if residual else {}
    cls = QuantConv1d if dims == 1 else QuantConv2d
    m = cls.from_float(conv, portable_scale(conv.weight), xs, xzp, None if float_out else os_, ozp,
                       post_op=post_op, **res)
    return m, qx


def operator_output(m: QuantConvNd, x: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
    """What the registered operator computes for ``m`` on ``x`` (the dispatcher's call, no plan)."""
    uint8_out = m.output == "uint8"
    head = (x, m.weight, m.weight_scale, m.bias, m.input_scale, m.input_zero_point,
            m.output_scale if uint8_out else None, m.output_zero_point if uint8_out else None)
    tail = (list(m.stride), list(m.padding), list(m.dilation), m.groups, list(m.pre_padding), m.padding_mode,
            m.post_op, list(m.post_op_args), m.use_kernels)
    if r is None:
        return torch.ops.fxcompress.qconv(*head, *tail)
    out = r.clone(memory_format=torch.channels_last)
    torch.ops.fxcompress.qconv_add_(*head, out, m.residual_scale if uint8_out else None,
                                    m.residual_zero_point if uint8_out else None, *tail)
    return out


def residual_for(m: QuantConvNd, qx: torch.Tensor) -> torch.Tensor:
    shape = (qx.shape[0], *m._out_shape(m.padded_shape(qx.shape)))
    r = (torch.randn(shape) if m.output == "float32" else torch.randint(0, 256, shape, dtype=torch.uint8))
    return r.contiguous(memory_format=torch.channels_last)


CONVS = {
    "3x3": lambda: nn.Conv2d(16, 32, 3, padding=1),
    "depthwise strided": lambda: nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16),
    "same, even kernel (pre-padding)": lambda: nn.Conv2d(16, 8, 4, padding="same"),
    "reflect": lambda: nn.Conv2d(16, 8, 3, padding=1, padding_mode="reflect"),
    "1-D": lambda: nn.Conv1d(16, 8, 5, padding=2),
}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_plan_calls_what_the_operator_computes(name: str) -> None:
    m, qx = lowered(CONVS[name]())
    first = m(qx)
    assert isinstance(m._eager_plan, EagerPlan) and m._eager_plan.call is not None
    assert torch.equal(first, operator_output(m, qx))
    assert torch.equal(m(qx), first)  # replayed


@pytest.mark.parametrize("float_out", [False, True])
@pytest.mark.parametrize("consume", [False, True])
def test_plan_with_a_fused_residual(float_out: bool, consume: bool) -> None:
    m, qx = lowered(nn.Conv2d(16, 32, 3, padding=1), residual=True, float_out=float_out)
    m.consume_residual = consume
    for _ in range(2):  # the first call makes the plan, the second replays it
        r = residual_for(m, qx)
        expected = operator_output(m, qx, r)
        before = r.clone()
        out = m(qx, r)
        assert torch.equal(out, expected)
        assert torch.equal(r, out) if consume else torch.equal(r, before)
    with pytest.raises(InputError, match="shape"):  # still checked on the planned path
        m(qx, r[:, :, :6])
    with pytest.raises(InputError, match="residual"):
        m(qx)


def test_plan_follows_in_place_edits_and_loads() -> None:
    m, qx = lowered(nn.Conv2d(16, 32, 3, padding=1))
    other, _ = lowered(nn.Conv2d(16, 32, 3, padding=1))
    with torch.no_grad():
        other.weight.neg_()
        other.output_zero_point.fill_(7)
    before = m(qx)
    m.load_state_dict(other.state_dict())  # in-place copies: new version counters
    assert torch.equal(m(qx), other(qx)) and not torch.equal(m(qx), before)
    with torch.no_grad():
        m.bias.add_(0.5)
        m.input_scale.mul_(1.5)
    assert torch.equal(m(qx), operator_output(m, qx))
    m.weight_scale = m.weight_scale * 2  # a new tensor assigned
    assert torch.equal(m(qx), operator_output(m, qx))


def test_plan_follows_configuration_and_shape_changes() -> None:
    m, qx = lowered(nn.Conv2d(16, 32, 3, padding=1))
    m(qx)
    m.backend = "reference"  # any attribute set drops the plan
    assert m._eager_plan is None
    assert torch.equal(m(qx), reference_twin(m)(qx))
    m.backend = "x86"
    m(qx)
    m.add_pre_padding((1, 0, 0, 1))
    assert torch.equal(m(qx), operator_output(m, qx))
    small = U.quantize_uint8(digits_features(2, 16, 7), 0.01, 0)
    assert torch.equal(m(small), operator_output(m, small))  # another per-sample shape: chosen again
    assert m._eager_plan.sample_shape == small.shape[1:]
    with pytest.raises(InputError, match="uint8"):
        m(small.float())


def test_plan_is_never_copied_or_saved() -> None:
    m, qx = lowered(nn.Conv2d(16, 32, 3, padding=1))
    expected = m(qx)
    assert m._eager_plan is not None
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m)), torch.load(buffer, weights_only=False)):
        assert "_eager_plan" not in other.__dict__
        assert torch.equal(other(qx), expected)


def test_no_replay_for_inference_tensors_or_the_reference_backend() -> None:
    with torch.inference_mode():  # state without version counters: an edit could not be seen
        m, qx = lowered(nn.Conv2d(16, 32, 3, padding=1))
        out = m(qx)
        assert not m._eager_plan.holds(qx, m._buffers) and torch.equal(out, operator_output(m, qx))
        m.weight.neg_()  # unseen by a version counter: reset_cache(), as for the operator's own cache
        m.reset_cache()
        assert torch.equal(m(qx), operator_output(m, qx)) and not torch.equal(m(qx), out)
    twin = reference_twin(lowered(nn.Conv2d(16, 32, 3, padding=1))[0])
    twin(qx)
    assert twin._eager_plan.call is None  # reference arithmetic: the operator decides every call


def test_compilers_see_the_operator_not_the_plan() -> None:
    m, qx = lowered(nn.Conv2d(16, 32, 3, padding=1))
    expected = m(qx)  # a plan exists now
    program = torch.export.export(m, (qx,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("fxcompress.qconv") for t in targets), targets
    assert not any("onednn" in t for t in targets), targets
    assert torch.equal(program.module()(qx), expected)
    traced = torch.jit.trace(m, (qx,))
    assert "fxcompress::qconv" in str(traced.graph)
    assert fxcompress.oplib.cache.entries(m.weight) >= 1


def test_disabled_chooses_through_the_operator() -> None:
    m, qx = lowered(nn.Conv2d(16, 32, 3, padding=1))
    with disabled():
        without = m(qx)
        assert m._eager_plan is None
    assert torch.equal(m(qx), without) and m._eager_plan is not None
