"""insert_observers: where observers go, what they share, what stays float, and bad options.

Models are the digits networks (real conv-BN-ReLU chains, residual adds, max
pooling, flatten into linears) and small hand-written graphs for the cases
they lack (cat, embedding, no quantizable op).  Every run is fully checked
(conftest), which includes that the pass leaves the outputs exactly equal
(it is declared exact) and that every inserted node carries ``tensor_meta``.
"""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import fxcompress
from fxcompress.errors import ConfigError
from fxcompress.examples.digits import DigitsCNN, DigitsResNet
from fxcompress.ops import describe
from fxcompress.quant import QuantSpec, default_activation_spec, default_weight_spec
from fxcompress.quant.activations import ActivationObserver
from fxcompress.quant.layers import ObservedLayer
from fxcompress.quant.placement import find_chains
from fxcompress.verify import stage_of

X = torch.randn(4, 1, 8, 8)


def _observed(model: nn.Module, options: dict | None = None, x: torch.Tensor = X) -> fxcompress.Result:
    step = ("insert_observers", options) if options else "insert_observers"
    return fxcompress.run(model.eval(), ["fuse_conv_bn", step], x)


def _observer_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Observer call nodes by the name of the value they observe."""
    return {n.args[0].name: n for n in gm.graph.nodes if n.op == "call_module"
            and isinstance(gm.get_submodule(str(n.target)), ActivationObserver)}


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def test_default_placement_on_the_digits_cnn() -> None:
    model = DigitsCNN().eval()
    with torch.no_grad():
        expected = fxcompress.run(model, ["fuse_conv_bn"], X).model(X)
    result = _observed(model)
    gm = result.model
    row = result.report.rows[1]

    assert row.modified and row.stats["layers_quantized"] == 6 and row.stats["kept_float"] == {}
    layers = {p: m for p, m in gm.named_modules() if isinstance(m, ObservedLayer)}
    assert sorted(layers) == ["branch.0", "branch.3", "conv.0", "fc1", "fc2", "stem.0"]
    assert all(m.spec == default_weight_spec() for m in layers.values())
    assert stage_of(gm) == "observed"
    assert not [name for name, m in gm.named_modules() if m.training]  # new modules follow eval mode
    with torch.no_grad():
        torch.testing.assert_close(gm(X), expected, rtol=0, atol=0)  # observers change nothing

    observed = _observer_nodes(gm)
    # The input; each conv+ReLU after its ReLU; the residual add's output after its ReLU;
    # the last conv (before max pooling); fc1 after its ReLU.  Not fc2: only the output reads it.
    assert set(observed) == {"x", "stem_2", "branch_2", "relu", "conv_2", "relu_1"}
    assert row.stats["observers"] == row.stats["observer_calls"] == 6
    for node in observed.values():
        assert gm.get_submodule(str(node.target)).spec == default_activation_spec()
        assert node.meta["tensor_meta"].shape == node.args[0].meta["tensor_meta"].shape
    # Nothing between a conv and its ReLU.
    assert _node(gm, "stem_2").args[0] is _node(gm, "stem_0")


def test_conv_residual_add_is_fused_and_its_other_operand_observed() -> None:
    gm = _observed(DigitsCNN()).model
    add = _node(gm, "add")
    observed = _observer_nodes(gm)
    # x + branch(x): the conv output goes into the add unobserved (x86 fuses the add as a
    # post-op), the residual is the observed stem output, and the sum is observed after its ReLU.
    assert add.args == (observed["stem_2"], _node(gm, "branch_3"))
    assert list(_node(gm, "relu").users) == [observed["relu"]]


class Residual1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv1d(1, 4, 3, padding=1), nn.Conv1d(4, 4, 3, padding=1), nn.Conv1d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.head(torch.relu(self.b(y) + y))


def test_a_1d_conv_residual_add_is_not_fused() -> None:
    # The 1-D int8 conv has no fused sum: the add runs in float after the kernel, so conv b's
    # chain ends at b and the add is no quantization point; the relu after it is (head reads it).
    x = torch.randn(4, 1, 16)
    gm = fxcompress.trace(Residual1d().eval(), x)
    b = _node(gm, "b")
    chain = find_chains(gm, [describe(b, gm)])[b]
    assert chain.end is b and chain.add is None and chain.residual is None
    observed = _observer_nodes(_observed(Residual1d(), x=x).model)
    assert "add" not in observed and "b" not in observed and "relu" in observed


def test_qparams_preserving_ops_reuse_their_inputs_observer() -> None:
    gm = _observed(DigitsCNN()).model
    observed = _observer_nodes(gm)
    # relu -> observer -> max pool -> conv: the pool output is not observed again.
    assert _node(gm, "pool1").args[0] is observed["relu"]
    assert _node(gm, "conv_0").args[0] is _node(gm, "pool1")
    # conv -> observer -> max pool -> flatten -> fc1: neither is observed again.
    assert _node(gm, "fc1").args[0] is _node(gm, "flatten")
    assert _node(gm, "pool2").args[0] is observed["conv_2"]


def test_observer_goes_where_the_values_are_computed() -> None:
    gm = _observed(DigitsResNet()).model
    observed = _observer_nodes(gm)
    # adaptive avg pool -> flatten -> fc: observed at the pool, flatten carries its qparams.
    assert "pool" in observed and _node(gm, "flatten").args[0] is observed["pool"]


@pytest.mark.parametrize("layer, act, fused", [
    (nn.Conv2d(1, 4, 3), nn.ReLU6(), True),
    (nn.Conv2d(1, 4, 3), nn.Hardswish(), True),
    (nn.Conv2d(1, 4, 3), nn.SiLU(), True),
    (nn.Conv2d(1, 4, 3), nn.Sigmoid(), False),
    (nn.Conv2d(1, 4, 3), nn.GELU(), False),  # oneDNN's conv has no GELU post-op
    (nn.Linear(8, 4), nn.GELU(), True),
    (nn.Linear(8, 4), nn.Tanh(), True),
    # the 1-D int8 conv fuses only ReLU, the 3-D one nothing: lowering's vocabulary, one table
    (nn.Conv1d(1, 4, 3), nn.ReLU(), True),
    (nn.Conv1d(1, 4, 3), nn.Hardswish(), False),
    (nn.Conv3d(1, 4, 3), nn.ReLU(), False),
], ids=["conv-relu6", "conv-hardswish", "conv-silu", "conv-sigmoid", "conv-gelu", "linear-gelu", "linear-tanh",
        "conv1d-relu", "conv1d-hardswish", "conv3d-relu"])
def test_post_ops_are_fused_when_x86_fuses_them(layer: nn.Module, act: nn.Module, fused: bool) -> None:
    inputs = {nn.Conv1d: torch.randn(4, 1, 8), nn.Conv2d: X, nn.Conv3d: torch.randn(2, 1, 4, 4, 4)}
    x = inputs.get(type(layer), torch.randn(3, 8))
    gm = fxcompress.trace(nn.Sequential(layer, act).eval(), x)
    op, activation = _node(gm, "_0"), _node(gm, "_1")
    chain = find_chains(gm, [describe(op, gm)])[op]
    assert chain.end is (activation if fused else op)
    assert chain.data.op == "placeholder" and chain.add is None


class TwoBranchCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1)
        return self.head(y)


def test_all_inputs_of_a_cat_share_one_observer() -> None:
    result = _observed(TwoBranchCat())
    gm = result.model
    observed = _observer_nodes(gm)
    cat = next(n for n in gm.graph.nodes if n.target is torch.cat)
    first, second = cat.args[0]
    assert first is observed["relu"] and second is observed["b"]
    assert first.target == second.target  # one module, called at both branch ends
    assert _node(gm, "head").args[0] is cat  # the cat output carries that observer's qparams
    assert result.report.rows[1].stats["observers"] == 2  # the input's and the shared one
    assert "relu" in gm.get_submodule(str(first.target)).where and "b" in gm.get_submodule(str(first.target)).where


class InputCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([x, self.conv(x)], dim=1))


def test_a_cat_of_a_float_input_and_a_conv_output_shares_one_observer() -> None:
    gm = _observed(InputCat()).model
    cat = next(n for n in gm.graph.nodes if n.target is torch.cat)
    first, second = cat.args[0]
    assert first.args[0].name == "x" and second.args[0].name == "conv"
    assert first.target == second.target
    assert _node(gm, "conv").args[0] is first  # x is observed once, for the conv and the cat


def test_skip_keeps_first_and_last_layer_float() -> None:
    result = _observed(DigitsCNN(), {"skip": ["stem.0", "fc2"]})
    gm = result.model
    row = result.report.rows[1]
    assert isinstance(gm.get_submodule("stem.0"), nn.Conv2d) and isinstance(gm.get_submodule("fc2"), nn.Linear)
    assert row.stats["kept_float"] == {"stem.0": "out of scope (scope/skip)", "fc2": "out of scope (scope/skip)"}
    observed = _observer_nodes(gm)
    assert "x" not in observed  # only the skipped stem reads the input
    assert "stem_2" in observed and "relu_1" not in observed  # fc2 is float: fc1's output stays float


def test_scope_restricts_the_layers() -> None:
    result = _observed(DigitsCNN(), {"scope": ["branch"]})
    layers = sorted(p for p, m in result.model.named_modules() if isinstance(m, ObservedLayer))
    assert layers == ["branch.0", "branch.3"]


def test_weights_or_activations_alone() -> None:
    weights_only = _observed(DigitsCNN(), {"activations": None}).model
    assert not _observer_nodes(weights_only)
    assert sum(isinstance(m, ObservedLayer) for m in weights_only.modules()) == 6
    activations_only = _observed(DigitsCNN(), {"weights": None}).model
    assert not any(isinstance(m, ObservedLayer) for m in activations_only.modules())
    assert len(_observer_nodes(activations_only)) == 6


def test_specs_from_dicts_as_recipes_give_them() -> None:
    gm = _observed(DigitsCNN(), {"weights": {"bits": 4, "granularity": "per_channel"},
                                 "activations": {"bits": 8, "signed": False, "symmetric": False}}).model
    layer = gm.get_submodule("fc1")
    assert layer.spec == QuantSpec(bits=4, granularity="per_channel")
    assert layer.weight_scale.shape == (64,) and not layer.weight_zero_point.any()


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.proj = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids))


def test_embedding_weights_when_asked() -> None:
    ids = torch.randint(0, 50, (2, 5))
    default = fxcompress.run(Embedder().eval(), ["insert_observers"], ids)
    assert isinstance(default.model.get_submodule("embed"), nn.Embedding)
    result = fxcompress.run(Embedder().eval(), [("insert_observers", {"ops": ["embedding", "linear"]})], ids)
    gm = result.model
    assert isinstance(gm.get_submodule("embed"), ObservedLayer)
    assert set(_observer_nodes(gm)) == {"embed"}  # indices are not observed; the linear's input is


def test_does_not_fire_without_quantizable_ops() -> None:
    model = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Softmax(dim=1))
    result = fxcompress.run(model.eval(), ["insert_observers"], X)
    row = result.report.rows[0]
    assert not row.modified and row.stats["layers_quantized"] == 0 and row.stats["observers"] == 0


def test_a_second_run_adds_nothing() -> None:
    first = _observed(DigitsCNN()).model
    again = fxcompress.run(first, ["insert_observers"], X)
    row = again.report.rows[0]
    assert not row.modified and row.stats["observer_calls"] == 0
    assert set(row.stats["kept_float"].values()) == {"already quantized (ObservedLayer)"}


@pytest.mark.parametrize("options, message", [
    ({"weights": {"bits": 9}}, "bits"),
    ({"weights": {"bits": 1}}, "bits"),
    ({"weights": {"bitz": 8}}, "bitz"),
    ({"weights": None, "activations": None}, "nothing to quantize"),
    ({"activations": {"granularity": "per_channel"}}, "per_tensor"),
    ({"ops": ["conv", "attention"]}, "ops"),
    ({"weights": "int8"}, "weights"),
])
def test_bad_options_fail_before_any_work(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        fxcompress.run(DigitsCNN().eval(), [("insert_observers", options)], X)


@pytest.mark.parametrize("axis", [2, -3])
def test_per_channel_axis_out_of_range(axis: int) -> None:
    # fc1's weight has 2 dims, the convs' 4: axis 2 and -3 exist for the convs only.
    spec = {"granularity": "per_channel", "axis": axis}
    with pytest.raises(ConfigError, match=f"axis {axis} is out of range.*ndim=2"):
        fxcompress.run(DigitsCNN().eval(), [("insert_observers", {"weights": spec})], X)
