"""lower: folded graphs become integer kernels; fidelity vs the folded graph, fallbacks, bad input.

Fidelity follows the arithmetic contract (:mod:`fxcompress.quant.contract`): the reference
backend equals the folded graph bit for bit on any CPU; the x86 backend is checked op by op
(teacher-forced, each op within one code of its reference twin), because oneDNN's kernel paths
round differently (AVX2, AVX512-VNNI, AMX) and a one-code difference can grow end to end.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxcompress
from fxcompress import artifact, recipes, zoo
from fxcompress.errors import ConfigError, LoweringError
from fxcompress.examples.digits import accuracy, load_digits_data, pretrained_digits_cnn
from fxcompress.quant.activations import QDQ
from fxcompress.quant.contract import check_contract
from fxcompress.quant.isa import int8_arithmetic
from fxcompress.quant.kernels import onednn_int8_support
from fxcompress.quant.layers import FoldedLayer
from fxcompress.quant.lowered import (
    Dequantize, LoweredModule, QuantAdaptiveAvgPool2d, QuantAdd, QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear,
    QuantMaxPool2d, Quantize, WeightOnlyConv,
)
from fxcompress.quant.spec import QuantSpec, portable_weight_spec
from fxcompress.verify import stage_of

FOLD = ["fuse_conv_bn", "insert_observers", "calibrate", "fold_fake_quant"]
needs_onednn = pytest.mark.skipif(not onednn_int8_support(), reason="no x86 int8 kernels here")
#: Whether this CPU's int8 kernels take 8-bit weights (VNNI/AMX) or only 7-bit ones (AVX2).
EXACT_PRODUCTS = bool(onednn_int8_support()) and int8_arithmetic().exact_products


def assert_agrees(low: fx.GraphModule, folded_gm: fx.GraphModule, *inputs: torch.Tensor,
                  exact: tuple[int, ...] | None = None, min_sqnr: float = 100.0) -> None:
    """The contract: reference-lowered graphs equal the folded graph; x86 ops each within a code.

    ``exact`` lists the outputs that must be bit for bit (default: all); the others (held to
    ``min_sqnr``) pass through float ops whose rounding differs from the folded graph's: a
    reduction over a channels-last tensor, or a layer kept float (float32 accumulation).
    """
    expected = folded_gm(*inputs)
    report = check_contract(low, *inputs)
    assert report.holds, report.summary()
    assert report.unchecked == []  # a static graph: every x86 module is under the contract
    outputs = [report.output]
    if not report.ops:  # nothing runs on x86 kernels: the model itself is the reference
        outputs.append(low(*inputs))
    for out in outputs:  # on reference twins the lowered graph is the folded graph
        for i, (got, want) in enumerate(zip(_leaves(out), _leaves(expected))):
            if exact is None or i in exact:
                assert torch.equal(got, want), f"output {i}"
            else:
                assert sqnr(want, got) >= min_sqnr, f"output {i}"


def _leaves(value: object) -> list[torch.Tensor]:
    return list(value) if isinstance(value, (tuple, list)) else [value]  # type: ignore[list-item]


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (20 * torch.log10(ref.norm() / (ref - out).norm().clamp_min(1e-30))).item()


def modules(gm: fx.GraphModule, cls: type | tuple) -> list[tuple[fx.Node, nn.Module]]:
    return [(n, gm.get_submodule(n.target)) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), cls)]


def folded(model: nn.Module, x: torch.Tensor | tuple, calibration: list, **observe) -> fx.GraphModule:
    passes = list(FOLD)
    if observe:
        passes[1] = ("insert_observers", observe)
    return fxcompress.run(model, passes, x if isinstance(x, tuple) else (x,), calibration_data=calibration).model


def _resnet18(**observe: object) -> tuple[fx.GraphModule, torch.Tensor]:
    model = zoo.build("resnet18")
    x = zoo.example_input("resnet18", batch=2, reduced=True)
    calibration = [zoo.example_input("resnet18", batch=4, reduced=True, seed=s) for s in range(2)]
    return folded(model, x, calibration, **observe), x


@pytest.fixture(scope="module")
def resnet18() -> tuple[fx.GraphModule, torch.Tensor]:
    """Default (8-bit) weights."""
    return _resnet18()


@pytest.fixture(scope="module")
def resnet18_portable() -> tuple[fx.GraphModule, torch.Tensor]:
    """7-bit weights, which every x86 CPU's int8 kernels take."""
    return _resnet18(weights=portable_weight_spec())


@pytest.mark.parametrize("backend, weights", [("x86", "default"), ("x86", "portable"), ("reference", "default")])
def test_resnet18_lowers_every_conv_with_fused_residuals(resnet18, resnet18_portable, backend: str,
                                                         weights: str) -> None:
    gm, x = resnet18 if weights == "default" else resnet18_portable
    result = fxcompress.run(gm, [("lower", {"backend": backend})], (x,))
    low, row = result.model, result.report.rows[0]
    assert row.modified and stage_of(low) == "lowered"
    assert not modules(low, (FoldedLayer, QDQ))
    convs = modules(low, QuantConv2d)
    assert len(convs) == 20 and row.stats["int8_ops"] == {"conv": 20, "linear": 1, "max_pool": 1}
    assert all(m.backend == backend for _, m in modules(low, LoweredModule))
    fused = [(n, m) for n, m in convs if m.residual]
    assert len(fused) == 8 and all(m.post_op == "relu" for _, m in fused)
    # The residual is written in place exactly where nothing reads it afterwards (verifier: check="full").
    assert all(m.consume_residual and m.mutates_args == (1,) for _, m in fused)
    # One Quantize at the input and one before the head; the last block's residual is read in float.
    assert (row.stats["quantize"], row.stats["dequantize"]) == (2, 1)
    assert row.stats["float_nodes"] == {}
    fallbacks = row.stats["fallbacks"]
    if backend == "x86" and weights == "default" and not EXACT_PRODUCTS:
        # AVX2-class kernels could overflow with 8-bit weights: every weighted op takes the
        # (exact) reference path, and the report says why and what to do.
        assert len(fallbacks) == 21 and all("could overflow" in f["reason"] for f in fallbacks)
        assert any("portable_weight_spec" in note for note in row.stats["notes"])
    else:
        assert fallbacks == []
    assert low(x).dtype == torch.float32
    assert_agrees(low, gm, x)
    assert row.after.state_bytes <= 0.27 * fxcompress.run(zoo.build("resnet18"), [], (x,)).report.before.state_bytes


@needs_onednn
def test_x86_activations_stay_uint8_between_int8_ops(resnet18_portable) -> None:
    gm, x = resnet18_portable
    low = fxcompress.run(gm, ["lower"], (x,)).model
    dtypes = {n.name: n.meta["tensor_meta"].dtype for n in low.graph.nodes if "tensor_meta" in n.meta}
    for node, module in modules(low, (QuantConv2d, QuantMaxPool2d)):
        assert dtypes[node.args[0].name] == torch.uint8
    layer1 = low.get_submodule("layer1.0.conv1")
    assert layer1.kernel_support(low.graph.find_nodes(op="call_module", target="fxc_lowered.maxpool")[0]
                                 .meta["tensor_meta"].shape)


def test_digits_cnn_lowered_accuracy_equals_fake_quant() -> None:
    data = load_digits_data()
    model = pretrained_digits_cnn()
    calibration = [data.train_x[i:i + 64] for i in range(0, 512, 64)]
    for weights in (QuantSpec.from_dict({"bits": 8, "granularity": "per_channel"}), portable_weight_spec()):
        gm = folded(model, data.test_x[:8], calibration, weights=weights)
        low = fxcompress.run(gm, ["lower", "eliminate_dead_nodes"], (data.test_x[:8],)).model
        with torch.no_grad():
            assert abs(accuracy(low, data.test_x, data.test_y) - accuracy(gm, data.test_x, data.test_y)) <= 0.2
            assert_agrees(low, gm, data.test_x)
        assert abs(accuracy(low, data.test_x, data.test_y) - accuracy(model, data.test_x, data.test_y)) <= 1.0


class TwoBranch(nn.Module):
    """Two conv branches joined by a plain add and an average pool: uint8 add / pool cases."""

    def __init__(self, pooled: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.c, self.d = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(pooled)
        self.e, self.f = nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = F.relu(self.a(x)), F.relu(self.b(x))
        joined = self.c(a) + self.d(b)  # a, b also feed convs: both quantized
        return self.e(a + b), self.f(self.pool(a)) + joined.mean()


@pytest.mark.parametrize("pooled, pool_kernel", [(1, True), (3, False)])
def test_uint8_add_and_pool_with_shape_fallbacks_reported(pooled: int, pool_kernel: bool) -> None:
    model = TwoBranch(pooled).eval()
    x = torch.randn(2, 8, 7, 7)
    gm = folded(model, x, [torch.randn(4, 8, 7, 7) for _ in range(2)], weights=portable_weight_spec())
    expected = gm(x)
    result = fxcompress.run(gm, ["lower"], (x,))
    low, stats = result.model, result.report.rows[0].stats
    assert len(modules(low, QuantAdd)) == 1 and len(modules(low, QuantAdaptiveAvgPool2d)) == 1
    assert stats["int8_ops"]["add"] == 1 and stats["int8_ops"]["avg_pool"] == 1
    pool_fallbacks = [f for f in stats["fallbacks"] if f["node"] == "pool"]
    if onednn_int8_support():
        assert bool(pool_fallbacks) != pool_kernel
        if pool_fallbacks:
            assert "equal windows" in pool_fallbacks[0]["reason"]
    assert_agrees(low, gm, x, exact=(0,))  # output 1 ends in a float mean() over a channels-last tensor
    for a, b in zip(expected, low(x)):
        assert sqnr(a, b) >= 35


class Activations(nn.Module):
    """Convs and linears followed by each activation the kernels know."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(5))
        self.fc1, self.fc2, self.fc3 = nn.Linear(8 * 36, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts = (F.silu, F.hardswish, F.relu6, lambda v: F.leaky_relu(v, 0.1), torch.tanh)
        for conv, act in zip(self.convs, acts):
            x = act(conv(x))
        x = F.gelu(self.fc1(torch.flatten(x, 1)))
        return self.fc3(F.leaky_relu(self.fc2(x), 0.05))


@pytest.mark.parametrize("backend", ["x86", "reference"])
def test_lowered_outputs_follow_the_contract(backend: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = Activations().eval()
    x = torch.randn(4, 8, 6, 6)
    gm = folded(model, x, [torch.randn(8, 8, 6, 6) for _ in range(3)], weights=portable_weight_spec())
    lower = ("lower", {"backend": backend, "approximate_post_ops": False})
    result = fxcompress.run(gm, [lower, "eliminate_dead_nodes"], (x,))
    low = result.model
    posts = {str(n.target): m.post_op for n, m in modules(low, (QuantConv2d, QuantLinear))}
    # Without approximate post-ops, only the activations oneDNN computes as torch does are fused.
    assert posts == {"convs.0": "none", "convs.1": "none", "convs.2": "hardtanh", "convs.3": "none",
                     "convs.4": "none", "fc1": "none", "fc2": "leaky_relu", "fc3": "none"}
    # The float activations before a quantization are applied by the Quantize itself.
    applied = sorted(m.activation for _, m in modules(low, Quantize) if m.activation != "none")
    assert applied == ["gelu", "hardswish", "leaky_relu", "swish", "tanh"]
    for seed in range(3):
        batch = torch.randn(16, 8, 6, 6, generator=torch.Generator().manual_seed(seed))
        assert_agrees(low, gm, batch)
    artifact.save(result, tmp_path / "activations.fxc")  # the activations travel in Quantize's config
    assert torch.equal(artifact.load(tmp_path / "activations.fxc")(batch), low(batch))


class SqueezeExcite(nn.Module):
    """conv -> SiLU -> squeeze-excitation gate -> conv, as in EfficientNet."""

    def __init__(self) -> None:
        super().__init__()
        self.expand, self.project = nn.Conv2d(8, 32, 1), nn.Conv2d(32, 8, 1)
        self.fc1, self.fc2 = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.expand(x))
        gate = torch.sigmoid(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.project(y * gate)


def test_squeeze_excitation_gate_is_quantized_in_one_pass(tmp_path) -> None:
    from fxcompress.quant.lowered import QuantizeProduct
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 12)
    gm = folded(SqueezeExcite().eval(), x, [torch.randn(4, 8, 12, 12) for _ in range(3)],
                weights=portable_weight_spec())
    result = fxcompress.run(gm, ["lower", "eliminate_dead_nodes"], (x,))
    assert len(modules(result.model, QuantizeProduct)) == 1
    batch = torch.randn(8, 8, 12, 12)
    assert_agrees(result.model, gm, batch)
    artifact.save(result, tmp_path / "se.fxc")
    assert torch.equal(artifact.load(tmp_path / "se.fxc")(batch), result.model(batch))


def test_quantize_product_equals_multiply_then_quantize() -> None:
    from fxcompress.quant.lowered import QuantizeProduct
    from fxcompress.quant.uint8 import quantize_uint8
    for shape in [(2, 24, 5, 5), (2, 96, 60, 60), (1, 3000, 11, 11)]:  # one chunk, many rows, rows > chunk
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last) * 2
        gains = torch.rand(shape[0], shape[1], 1, 1)
        module = QuantizeProduct.from_qparams(0.015, 7)
        out = module(x, gains)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(out, quantize_uint8(x * gains, 0.015, 7))
        assert torch.equal(module(x.contiguous(), gains), out)  # other layouts: multiply, then quantize


def test_quantize_applies_its_activation_chunk_by_chunk_exactly(tmp_path) -> None:
    from fxcompress.quant.uint8 import quantize_uint8
    for shape in [(2, 8, 5, 5), (3, 40, 70, 70)]:  # below and above the chunk size
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last) * 3
        module = Quantize.from_qparams(0.02, 100, activation="swish")
        assert "activation=swish" in repr(module)
        out = module(x)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(out, quantize_uint8(F.silu(x), 0.02, 100))
        rebuilt = Quantize(**module.config())
        rebuilt.load_state_dict(module.state_dict())
        assert torch.equal(rebuilt(x), out)
    with pytest.raises(ConfigError, match="post_op must be one of"):
        Quantize(activation="softplus")


@needs_onednn
def test_post_ops_fuse_silu_and_friends_by_default() -> None:
    torch.manual_seed(0)
    model = Activations().eval()
    x = torch.randn(4, 8, 6, 6)
    gm = folded(model, x, [torch.randn(8, 8, 6, 6) for _ in range(3)], weights=portable_weight_spec())
    low = fxcompress.run(gm, ["lower"], (x,)).model  # approximate post-ops are the default
    posts = {str(n.target): m.post_op for n, m in modules(low, (QuantConv2d, QuantLinear))}
    assert posts["convs.0"] == "swish" and posts["convs.1"] == "hardswish" and posts["fc1"] == "gelu"
    batch = torch.randn(16, 8, 6, 6)
    assert_agrees(low, gm, batch)  # oneDNN's own SiLU/GELU: still within a code per op


class Mixed(nn.Module):
    """What the int8 kernels cannot take: a transposed conv; and a linear after a float op."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose1d(4, 8, 2, stride=2)
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        y = self.up(s).mean(-1)
        return self.fc(y) + self.conv(x).flatten(1).sum(1, keepdim=True)


def test_layers_the_kernels_cannot_take_stay_folded_with_reasons() -> None:
    model = Mixed().eval()
    inputs = (torch.randn(2, 1, 6, 6), torch.randn(2, 4, 10))
    calibration = [(torch.randn(4, 1, 6, 6), torch.randn(4, 4, 10)) for _ in range(2)]
    gm = fxcompress.run(model, FOLD, inputs, calibration_data=calibration).model
    result = fxcompress.run(gm, ["lower"], inputs)
    stats, low = result.report.rows[0].stats, result.model
    assert "no int8 transposed conv" in stats["float_nodes"]["up"]
    assert isinstance(low.get_submodule("up"), FoldedLayer)
    assert isinstance(low.get_submodule("conv"), QuantConv2d) and isinstance(low.get_submodule("fc"), QuantLinear)
    assert sqnr(gm(*inputs), low(*inputs)) >= 35


class EveryConv(nn.Module):
    """Every conv kind: 1/2/3-D, depthwise 9x9 'same' (ConvMixer), even-kernel 'same', the
    reflect/replicate/circular modes, grouped, residual adds in 1-D and 3-D, transposed."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, padding=1)
        self.c1r = nn.Conv1d(8, 8, 4, padding="same", padding_mode="reflect")
        self.c2 = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 9, padding="same", groups=16)
        self.even = nn.Conv2d(16, 16, 4, padding="same", padding_mode="replicate")
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, padding_mode="circular", groups=4)
        self.up = nn.ConvTranspose2d(32, 8, 2, stride=2)
        self.c3 = nn.Conv3d(2, 4, 3, padding=1)
        self.c3b = nn.Conv3d(4, 4, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, s: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = F.relu(self.c1(s))
        a = F.relu(self.c1r(a)) + a
        y = F.relu(self.dw(F.relu(self.c2(x))))
        y = self.up(F.relu(self.grouped(self.even(y))))
        z = F.relu(self.c3(v))
        return a, y, self.c3b(z) + z


def every_conv_inputs(batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 20, generator=g), torch.randn(batch, 3, 12, 12, generator=g),
            torch.randn(batch, 2, 5, 6, 6, generator=g))


def test_every_conv_kind_lowers_or_stays_folded_with_its_reason() -> None:
    torch.manual_seed(0)
    model = EveryConv().eval()
    inputs = every_conv_inputs(2, 0)
    calibration = [every_conv_inputs(4, s) for s in (1, 2)]
    gm = folded(model, inputs, calibration, weights=portable_weight_spec())
    result = fxcompress.run(gm, ["lower", "eliminate_dead_nodes"], inputs)
    low, stats = result.model, result.report.rows[0].stats
    kinds = {name: type(low.get_submodule(name)) for name in ("c1", "c1r", "c2", "dw", "even", "grouped", "up",
                                                                 "c3", "c3b")}
    assert kinds == {"c1": QuantConv1d, "c1r": QuantConv1d, "c2": QuantConv2d, "dw": QuantConv2d,
                     "even": QuantConv2d, "grouped": QuantConv2d, "up": FoldedLayer, "c3": QuantConv3d,
                     "c3b": QuantConv3d}
    assert set(stats["float_nodes"]) == {"up"} and "transposed" in stats["float_nodes"]["up"]
    assert stats["fallbacks"] == []
    assert low.get_submodule("even").pre_padding == (1, 2, 1, 2)  # 'same' with an even kernel: asymmetric
    # The 1-D and 3-D residual adds run in float after their int8 conv: the same values.
    batch = every_conv_inputs(3, 7)
    assert_agrees(low, gm, *batch, exact=(0, 2), min_sqnr=60)  # the transposed conv reads channels-last


@pytest.mark.parametrize("weights, lowered", [
    (QuantSpec(bits=4, granularity="per_channel"), True),  # 4-bit codes run on the int8 kernel
    (QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_channel"), False),
])
def test_weight_specs(weights: QuantSpec, lowered: bool) -> None:
    model = pretrained_digits_cnn()
    data = load_digits_data()
    gm = folded(model, data.test_x[:4], [data.train_x[:64]], weights=weights)
    result = fxcompress.run(gm, ["lower"], (data.test_x[:4],))
    assert bool(modules(result.model, QuantConv2d)) == lowered
    if not lowered:
        assert all("signed symmetric" in r for r in result.report.rows[0].stats["float_nodes"].values())
    assert sqnr(gm(data.test_x), result.model(data.test_x)) >= 35


@pytest.mark.parametrize("weights", ["default", "portable"])
def test_only_if_faster_times_each_layer_and_keeps_the_contract(resnet18, resnet18_portable, weights: str) -> None:
    gm, x = resnet18 if weights == "default" else resnet18_portable
    result = fxcompress.run(gm, [("lower", {"only_if_faster": True})], (x,))
    stats, low = result.report.rows[0].stats, result.model
    choices = stats["choices"]
    # Every quantized layer was timed and given a way; which one depends on this CPU.
    assert sum(choices.values()) == 21 and set(choices) <= {"int8", "separate add", "float"}
    kept = [n for n, reason in stats["float_nodes"].items() if reason.startswith("kept float: float is fastest")]
    assert len(kept) == choices.get("float", 0)
    assert stats["int8_ops"].get("conv", 0) + stats["int8_ops"].get("linear", 0) == \
        choices.get("int8", 0) + choices.get("separate add", 0)
    by_name = {n.name: n for n in low.graph.nodes}
    assert all(type(low.get_submodule(by_name[n].target)) in (WeightOnlyConv, nn.Linear) for n in kept)
    assert set(stats["speed"]) == {"lowered_ms", "float_ms"}
    # Int8 and separate-add layers compute what the folded graph does; a layer kept float
    # accumulates in float32, a rounding away from its exact integer result.
    assert_agrees(low, gm, x, exact=() if choices.get("float") else None, min_sqnr=35)


def test_choice_prefers_float_over_a_slow_int8_way() -> None:
    from fxcompress.quant.lowering.choice import Candidates, choose
    conv = nn.Conv2d(64, 64, 3, padding=1)
    slow = QuantConv2d.from_float(conv, conv.weight.detach().flatten(1).abs().amax(1) / 63, 0.02, 3, 0.05, 2,
                                  backend="reference")  # float64 accumulation: slower than a float conv anywhere
    candidates = Candidates(int8=slow, float_module=conv.eval(), separate=None, input_shape=(1, 64, 28, 28),
                            output_shape=(1, 64, 28, 28), input_qparams=(0.02, 3), output_qparams=(0.05, 2),
                            residual=None, residual_qparams=None, post_op="relu", post_op_args=())
    choice = choose(candidates)
    assert choice.way == "float" and set(choice.times_us) == {"int8", "float"}
    assert "float is fastest" in choice.reason and "threads" in choice.reason


def test_strict_refuses_fallbacks_and_float_layers() -> None:
    model = Mixed().eval()
    inputs = (torch.randn(2, 1, 6, 6), torch.randn(2, 4, 10))
    calibration = [(torch.randn(4, 1, 6, 6), torch.randn(4, 4, 10))]
    gm = fxcompress.run(model, FOLD, inputs, calibration_data=calibration).model
    with pytest.raises(LoweringError, match="strict"):
        fxcompress.run(gm, [("lower", {"strict": True})], inputs)


def test_recipe_copy_and_artifact_round_trip(tmp_path) -> None:
    data = load_digits_data()
    # Untimed, so the structure checked below does not depend on this CPU's speeds.
    result = fxcompress.run(pretrained_digits_cnn(), recipes.int8_static(only_if_faster=False), (data.test_x[:8],),
                            calibration_data=[data.train_x[:128]])
    low = result.model
    assert [r.name for r in result.report.rows][-2:] == ["lower", "eliminate_dead_nodes"]
    expected = low(data.test_x)
    assert torch.equal(copy.deepcopy(low)(data.test_x), expected)
    artifact.save(result, tmp_path / "digits.fxc")
    loaded = artifact.load(tmp_path / "digits.fxc")
    assert torch.equal(loaded(data.test_x), expected)
    assert {type(m) for _, m in modules(loaded, LoweredModule)} >= {Quantize, QuantConv2d, QuantLinear}


def test_lowering_a_graph_never_folded_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="fold_fake_quant"):
        fxcompress.run(pretrained_digits_cnn(), ["lower"], (torch.randn(2, 1, 8, 8),))


def test_unknown_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="backend"):
        fxcompress.run(pretrained_digits_cnn(), [("lower", {"backend": "arm"})], (torch.randn(2, 1, 8, 8),))


def test_dequantize_module_sits_exactly_where_float_ops_read(resnet18) -> None:
    gm, x = resnet18
    low = fxcompress.run(gm, ["lower"], (x,)).model
    (node, _), = modules(low, Dequantize)
    assert [u.name for u in node.users] == ["layer4_1_conv2"]  # the float residual of the last block


class Shared(nn.Module):
    """One conv called at three sites with different input ranges, and reached under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.alias = self.conv
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.conv(x))
        b = F.relu(self.conv(y * 3))
        c = F.relu(self.alias(a))
        return self.head(a + b + c)


def shared_graph() -> fx.GraphModule:
    """``Shared`` traced, with its third call going through the second name: tracing resolves
    every name of a module to its first, but a GraphModule may call it under both."""
    gm = fx.symbolic_trace(Shared().eval())
    gm.add_submodule("alias", gm.conv)
    third = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "conv"][2]
    third.target = "alias"
    gm.recompile()
    return gm


def test_a_layer_called_at_several_sites_is_lowered_per_site_with_one_weight(tmp_path) -> None:
    torch.manual_seed(0)
    model = shared_graph()
    inputs = (torch.randn(2, 8, 10, 10), torch.randn(2, 8, 10, 10))
    calibration = [(torch.randn(4, 8, 10, 10), torch.randn(4, 8, 10, 10)) for _ in range(2)]
    observed = fxcompress.run(model, FOLD[:2], inputs)
    assert observed.report.rows[1].stats["layers_quantized"] == 2 and observed.report.rows[1].stats["kept_float"] == {}
    gm = fxcompress.run(model, [FOLD[0], ("insert_observers", {"weights": portable_weight_spec()}), *FOLD[2:]],
                        inputs, calibration_data=calibration).model
    assert gm.conv is gm.alias  # one folded layer under both names
    # Its sites read inputs of different scales: the folded graph computes it in float.
    assert not gm.conv.integer_exact and gm.head.integer_exact
    lowered = fxcompress.run(gm, ["lower", "eliminate_dead_nodes"], inputs)
    low, stats = lowered.model, lowered.report.rows[0].stats
    sites = [(n, m) for n, m in modules(low, QuantConv2d) if m.out_channels == 8]
    assert len(sites) == 3 and stats["int8_ops"]["conv"] == 4 and stats["float_nodes"] == {}
    assert len({(m.input_scale.item(), m.input_zero_point.item()) for _, m in sites}) == 3  # own qparams each
    assert len({m.weight.data_ptr() for _, m in sites}) == 1  # one weight
    report = check_contract(low, *inputs)
    assert report.holds, report.summary()
    assert sqnr(gm(*inputs), report.output) >= 35  # the float-computed folded layer vs its exact sites
    artifact.save(lowered, tmp_path / "shared.fxc")
    loaded = artifact.load(tmp_path / "shared.fxc")
    assert torch.equal(loaded(*inputs), low(*inputs))
    assert len({m.weight.data_ptr() for n, m in modules(loaded, QuantConv2d) if m.out_channels == 8}) == 1


class Pads(nn.Module):
    """TensorFlow-style 'same' (a zero pad, then a conv), a reflection pad between convs, and a
    pad with a non-zero value (its values are off the grid)."""

    def __init__(self) -> None:
        super().__init__()
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.a = nn.Conv2d(3, 8, 3, stride=2)
        self.reflect = nn.ReflectionPad2d(1)
        self.b = nn.Conv2d(8, 8, 3)
        self.c = nn.Conv2d(8, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.a(self.pad(x)))
        y = F.relu(self.b(self.reflect(y)))
        return self.c(F.pad(y, (1, 1, 1, 1), value=0.5))


@pytest.mark.parametrize("only_if_faster", [False, True])
def test_pads_are_absorbed_computed_on_codes_or_kept_float(only_if_faster: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 13, 13)
    gm = folded(Pads().eval(), x, [torch.randn(4, 3, 13, 13) for _ in range(2)], weights=portable_weight_spec())
    result = fxcompress.run(gm, [("lower", {"only_if_faster": only_if_faster}), "eliminate_dead_nodes"], (x,))
    low = result.model
    if only_if_faster:  # whichever way each layer took, it computes the padded conv
        kept = result.report.rows[0].stats["choices"].get("float", 0)
        assert_agrees(low, gm, torch.randn(3, 3, 13, 13), exact=() if kept else None, min_sqnr=35)
        return
    assert low.get_submodule("a").pre_padding == (0, 1, 0, 1)  # the zero pad went into the conv
    assert not [n for n in low.graph.nodes if n.op == "call_module" and n.target == "pad"]
    pads = [n for n in low.graph.nodes if n.op == "call_function" and n.target is F.pad
            and n.meta["tensor_meta"].dtype == torch.uint8]
    assert [(n.name, n.args[2]) for n in pads] == [("reflect", "reflect")]  # on codes, between int8 convs
    assert result.report.rows[0].stats["quantize"] == 2  # the input, and after the 0.5-valued pad
    assert_agrees(low, gm, torch.randn(3, 3, 13, 13))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_lowered_model_refuses_non_finite_inputs_by_name(resnet18_portable, bad: float, tmp_path) -> None:
    """The float model returns NaN/Inf for such inputs; integer codes cannot carry them, so the
    lowered model says so instead of returning plausible logits."""
    from fxcompress.errors import InputError
    gm, x = resnet18_portable
    result = fxcompress.run(gm, ["lower"], (x,))
    poisoned = x.clone()
    poisoned[1, 2, 3, 4] = bad
    if bad != bad:  # NaN survives the folded graph's fake quantization (Inf saturates there)
        assert not torch.isfinite(gm(poisoned)).all()
    artifact.save(result, tmp_path / "low.fxc")
    for low in (result.model, artifact.load(tmp_path / "low.fxc")):
        with pytest.raises(InputError, match="input 'x' holds NaN or Inf"):
            low(poisoned)
        assert torch.isfinite(low(x)).all()
