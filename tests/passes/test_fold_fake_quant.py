"""fold_fake_quant: integer weights, explicit quantize-dequantize, and equal outputs to fake-quant.

The trained digits CNN on scikit-learn's digits images.
"""

from __future__ import annotations

import math
from typing import Iterator

import pytest
import torch
from torch import fx, nn

import fxcompress
from fxcompress.errors import ConfigError
from fxcompress.examples.digits import accuracy, load_digits_data, pretrained_digits_cnn
from fxcompress.quant import QuantSpec, quantize
from fxcompress.quant.activations import QDQ, quant_source
from fxcompress.passes.fold_fake_quant import BIAS_CODE_LIMIT
from fxcompress.quant.layers import FoldedLayer, ObservedLayer
from fxcompress.verify import stage_of

DATA = load_digits_data(0)
CALIBRATION = [DATA.train_x[i * 32:(i + 1) * 32] for i in range(4)]
EXAMPLE = DATA.train_x[:2]
STATIC = ["fuse_conv_bn", "insert_observers", "calibrate", "fold_fake_quant"]


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    return 10 * math.log10(reference.pow(2).sum().item() / (reference - approximation).pow(2).sum().item())


def _run(pipeline: list, model: nn.Module | None = None, data=CALIBRATION) -> fxcompress.Result:
    return fxcompress.run(model or pretrained_digits_cnn(), pipeline, EXAMPLE, calibration_data=data)


def test_weights_become_int8_with_scales_and_state_shrinks() -> None:
    observed = _run(STATIC[:3]).model
    result = _run(STATIC)
    gm = result.model
    row = result.report.rows[-1]
    assert row.modified and stage_of(gm) == "folded"
    assert not [name for name, m in gm.named_modules() if m.training]
    assert row.stats["layers"] == {"int8": 6} and row.stats["qdq"] == 6 and row.stats["removed_qdq"] == 0
    assert row.stats["weight_bytes"]["after"] * 4 == row.stats["weight_bytes"]["before"]
    for path, module in observed.named_modules():
        if isinstance(module, ObservedLayer):
            folded = gm.get_submodule(path)
            assert isinstance(folded, FoldedLayer) and folded.weight.dtype == torch.int8
            assert torch.equal(folded.weight, quantize(module.weight, module.weight_scale,
                                                       module.weight_zero_point, module.spec))
            assert folded.module.weight is None and folded.bias is not None  # the float weight is gone
    # Only biases, scales and the activation qparams are float: no float weight is left.
    assert not [n for n, t in gm.state_dict().items() if t.is_floating_point() and n.endswith("weight")]
    before, after = result.report.rows[1].after, result.report.after  # after fuse_conv_bn, after folding
    assert after.state_bytes < 0.3 * before.state_bytes


def test_folded_model_keeps_accuracy_and_is_close_to_float() -> None:
    model = pretrained_digits_cnn()
    gm = _run(STATIC, model).model
    with torch.no_grad():
        assert sqnr_db(model(DATA.test_x), gm(DATA.test_x)) > 25
    assert accuracy(gm, DATA.test_x, DATA.test_y) >= accuracy(model, DATA.test_x, DATA.test_y) - 1.0


def test_folding_after_fake_quant_keeps_the_outputs() -> None:
    """The fake-quant graph accumulates in float32, the folded one exactly (as the int8
    kernels do): the same outputs but where float32 rounding crossed a rounding tie."""
    fake = _run(STATIC[:3] + ["to_fake_quant"]).model
    folded = _run(STATIC[:3] + ["to_fake_quant", "fold_fake_quant"]).model
    with torch.no_grad():
        a, b = fake(DATA.test_x), folded(DATA.test_x)
    assert torch.equal(a.argmax(1), b.argmax(1))
    assert float((a - b).abs().median()) < 1e-5  # float32 round-off but at the rare ties
    assert sqnr_db(a, b) > 35


def test_folded_layers_compute_as_the_int8_kernels() -> None:
    """With its input's scale, a folded layer accumulates exactly and rescales in float32 as
    the kernels do; off the input grid (or without the scale) it computes in float."""
    result = _run(STATIC)
    gm = result.model
    assert result.report.rows[-1].stats["integer_exact"] == 6
    layer = gm.get_submodule("conv.0")
    assert layer.integer_exact and "input_scale=" in repr(layer)
    scale = float(layer.input_scale)
    codes = torch.randint(0, 120, (4, 16, 4, 4)).float()
    x = codes * scale
    w = layer.int_weight().double()
    acc = torch.nn.functional.conv2d(codes.double(), w, None, layer.module.stride, layer.module.padding)
    expected = (acc.float() * torch.tensor(scale)) * layer.weight_scale.view(1, -1, 1, 1) \
        + layer.bias.view(1, -1, 1, 1)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
        float_path = torch.nn.functional.conv2d(x, layer.dequantized_weight(), layer.bias,
                                                layer.module.stride, layer.module.padding)
        torch.testing.assert_close(layer(x), float_path, rtol=1e-5, atol=1e-5)
        off_grid = x + scale / 3
        assert torch.equal(layer(off_grid), torch.nn.functional.conv2d(
            off_grid, layer.dequantized_weight(), layer.bias, layer.module.stride, layer.module.padding))
    layer.set_input_scale(None)
    assert not layer.integer_exact and "input_scale" not in repr(layer)


@pytest.mark.parametrize("bits, packed", [(4, True), (2, True), (3, False)])
def test_low_bit_weights_are_packed(bits: int, packed: bool) -> None:
    spec = QuantSpec(bits=bits, granularity="per_channel")
    result = _run(["fuse_conv_bn", ("insert_observers", {"weights": spec}), "calibrate", "fold_fake_quant"])
    layer = result.model.get_submodule("fc1")  # a 64 x 128 weight
    assert layer.packed is packed
    assert layer.weight.dtype == (torch.uint8 if packed else torch.int8)
    assert layer.weight.numel() == (64 * 128 * bits // 8 if packed else 64 * 128)
    values = layer.int_weight()
    assert values.shape == (64, 128) and values.dtype == torch.int8
    assert int(values.min()) >= spec.qmin and int(values.max()) <= spec.qmax
    torch.testing.assert_close(layer.dequantized_weight(),
                               (values.float() * layer.weight_scale[:, None]), rtol=0, atol=0)
    assert result.report.rows[-1].stats["layers"] == {f"int{bits}": 6}


def test_activations_become_constant_quantize_dequantize() -> None:
    gm = _run(STATIC).model
    qdq = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), QDQ)]
    assert {n.args[0].name for n in qdq} == {"x", "stem_2", "branch_2", "relu", "conv_2", "relu_1"}
    module = gm.get_submodule(str(qdq[0].target))
    assert module.scale.dtype == torch.float32 and module.zero_point.dtype == torch.int32
    x = DATA.test_x
    q = torch.clamp(torch.round(x / module.scale) + module.zero_point, 0, 255)
    torch.testing.assert_close(module(x), (q - module.zero_point) * module.scale, rtol=0, atol=0)
    # The flatten into fc1 carries the QDQ of the last conv through max pooling.
    flatten = next(n for n in gm.graph.nodes if n.name == "flatten")
    assert quant_source(flatten, gm).args[0].name == "conv_2"


def _with_duplicate_qdq(gm: fx.GraphModule) -> fx.GraphModule:
    """Call the QDQ of relu's output again after the max pool that follows it (equal qparams)."""
    pool = next(n for n in gm.graph.nodes if n.name == "pool1")
    qdq = pool.args[0]
    with gm.graph.inserting_after(pool):
        again = gm.graph.call_module(str(qdq.target), (pool,))
    pool.replace_all_uses_with(again, delete_user_cb=lambda user: user is not again)
    again.meta = dict(pool.meta)
    gm.recompile()
    return gm


def test_redundant_quantize_dequantize_is_removed() -> None:
    observed = _with_duplicate_qdq(_run(STATIC[:3]).model)
    with torch.no_grad():
        expected = _run(STATIC).model(DATA.test_x)
    result = fxcompress.run(observed, ["fold_fake_quant"], EXAMPLE)
    assert result.report.rows[0].stats["removed_qdq"] == 1
    gm = result.model
    pool = next(n for n in gm.graph.nodes if n.name == "pool1")
    assert not any(u.op == "call_module" and isinstance(gm.get_submodule(str(u.target)), QDQ) for u in pool.users)
    with torch.no_grad():
        torch.testing.assert_close(result.model(DATA.test_x), expected, rtol=0, atol=0)


def test_folding_before_calibration_is_refused_before_any_work() -> None:
    seen: list[int] = []

    def data() -> Iterator[torch.Tensor]:
        for i, b in enumerate(CALIBRATION):
            seen.append(i)
            yield b

    with pytest.raises(ConfigError, match=r"'fold_fake_quant'.*requires \['calibrate'\]"):
        _run(["fuse_conv_bn", "insert_observers", "fold_fake_quant", "calibrate"], data=data())
    assert seen == []


def test_does_not_fire_on_a_float_graph_history() -> None:
    observed = _run(["fuse_conv_bn", ("insert_observers", {"scope": ["fc2"], "activations": None}),
                     "calibrate"]).model
    result = fxcompress.run(observed, ["fold_fake_quant"], EXAMPLE)
    assert result.report.rows[0].stats["layers"] == {"int8": 1}
    again = fxcompress.run(result.model, ["fold_fake_quant"], EXAMPLE)
    assert not again.report.rows[0].modified


@pytest.mark.parametrize("module, x", [
    (nn.Conv1d(4, 8, 3, padding=1), torch.randn(2, 4, 16)),
    (nn.Conv3d(2, 4, 3, stride=2), torch.randn(1, 2, 7, 7, 7)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), torch.randn(2, 4, 5, 5)),
    (nn.Linear(8, 3), torch.randn(2, 5, 8)),
    (nn.Embedding(20, 6, padding_idx=0), torch.randint(0, 20, (2, 7))),
], ids=["conv1d", "conv3d", "conv_transpose2d", "linear_3d_input", "embedding"])
def test_every_weighted_module_type_folds(module: nn.Module, x: torch.Tensor) -> None:
    model = nn.Sequential(module).eval()
    observe = ("insert_observers", {"activations": None, "ops": ["conv", "linear", "embedding"]})
    fake = fxcompress.run(model, [observe, "calibrate", "to_fake_quant"], x).model
    result = fxcompress.run(model, [observe, "calibrate", "fold_fake_quant"], x)
    assert isinstance(result.model.get_submodule("0"), FoldedLayer)
    with torch.no_grad():
        expected, folded = model(x), result.model(x)
        torch.testing.assert_close(folded, fake(x), rtol=1e-6, atol=1e-6)
    assert sqnr_db(expected, folded) > 35  # 8-bit per-channel weights alone


@pytest.mark.parametrize("spec", [
    {"bits": 4, "granularity": "per_group", "group_size": 16},  # the linears: 128 and 64 inputs
    {"bits": 8, "granularity": "per_tensor", "observer": "mse"},
    {"bits": 6, "granularity": "per_channel", "observer": "mse"},
    {"bits": 8, "signed": False, "symmetric": False, "granularity": "per_channel"},
], ids=["int4-per-group", "int8-per-tensor-mse", "int6-per-channel-mse", "uint8-affine"])
def test_folded_weights_equal_their_fake_quant_for_any_spec(spec: dict) -> None:
    observe = ["fuse_conv_bn", ("insert_observers", {"weights": spec, "scope": ["fc1", "fc2"]}), "calibrate"]
    fake = _run(observe + ["to_fake_quant"]).model
    folded = _run(observe + ["fold_fake_quant"]).model
    assert folded.get_submodule("fc1").weight.dtype == (torch.int8 if spec.get("signed", True) and spec["bits"] != 4
                                                        else torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(folded(DATA.test_x), fake(DATA.test_x), rtol=1e-5, atol=1e-5)


def test_a_nearly_dead_channel_is_requantized_on_the_scale_its_bias_needs() -> None:
    """A BatchNorm with a gamma of ~0 and a beta of 5 folds into a conv channel of weights ~1e-9
    under a bias of 5: on its observed scale the bias is beyond int32 on the accumulator grid,
    so that channel (and only it) gets the scale that fits and its weights are requantized; the
    other channels keep theirs bit for bit, and the outputs barely move."""
    model = pretrained_digits_cnn()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        bn.weight[0] = 1e-8
        bn.bias[0] = 5.0
    observed = _run(STATIC[:3], model).model
    result = _run(STATIC, model)
    assert result.report.rows[-1].stats["bias_widened_channels"] == 1
    path, before = next((p, m) for p, m in observed.named_modules() if isinstance(m, ObservedLayer))
    after = result.model.get_submodule(path)
    assert after.weight_scale[0] > before.weight_scale[0]
    assert torch.equal(after.weight_scale[1:], before.weight_scale[1:]) and torch.equal(after.weight[1:], quantize(
        before.module.weight, before.weight_scale, before.weight_zero_point, before.spec)[1:])
    step = float(after.input_scale) * float(after.weight_scale[0])
    assert abs(float(after.bias[0].detach()) / step) <= BIAS_CODE_LIMIT * (1 + 1e-6)
    with torch.no_grad():
        assert (after.dequantized_weight()[0] - before.module.weight[0]).abs().max() <= after.weight_scale[0] / 2
        assert sqnr_db(observed(DATA.test_x), result.model(DATA.test_x)) > 25
