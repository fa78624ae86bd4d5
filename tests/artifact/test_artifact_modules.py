"""Every storable module type comes back from an artifact computing the same thing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torchvision
from torch import fx, nn
from torch.utils import _pytree as pytree
from torchvision.models import swin_transformer as swin

from fxcompress import artifact
from fxcompress.artifact import values
from fxcompress.errors import ArtifactError

from artifact_forge import forge
from conftest import realistic

S = (2, 3, 4, 4)  # a small NCHW input
# name -> (module factory with non-default arguments, input shapes); a shape of
# ("long", high, *shape) is an integer input.
CASES: dict[str, tuple[Callable[[], nn.Module], list[Any]]] = {
    "Conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2, bias=False, padding_mode="reflect"), [(2, 4, 9)]),
    "Conv2d": (lambda: nn.Conv2d(4, 6, (3, 1), padding="same", dilation=2), [(2, 4, 8, 8)]),
    "Conv3d": (lambda: nn.Conv3d(2, 4, 3, padding=1, padding_mode="circular"), [(1, 2, 5, 5, 5)]),
    "ConvTranspose1d": (lambda: nn.ConvTranspose1d(4, 2, 3, stride=2, output_padding=1, groups=2), [(2, 4, 6)]),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, bias=False), [(1, 4, 5, 5)]),
    "ConvTranspose3d": (lambda: nn.ConvTranspose3d(2, 2, 2, stride=2, dilation=2), [(1, 2, 3, 3, 3)]),
    "Linear": (lambda: nn.Linear(5, 3, bias=False), [(2, 5)]),
    "modules.linear.NonDynamicallyQuantizableLinear": (lambda: nn.modules.linear.NonDynamicallyQuantizableLinear(4, 3), [(2, 4)]),
    "Bilinear": (lambda: nn.Bilinear(3, 4, 2), [(2, 3), (2, 4)]),
    "Identity": (lambda: nn.Identity(), [(2, 3)]),
    "Flatten": (lambda: nn.Flatten(0, 1), [(2, 3, 4)]),
    "Unflatten": (lambda: nn.Unflatten(1, (2, 3)), [(2, 6)]),
    "BatchNorm1d": (lambda: nn.BatchNorm1d(3, eps=1e-3, momentum=None), [(4, 3)]),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(3, affine=False), [S]),
    "BatchNorm3d": (lambda: nn.BatchNorm3d(2, track_running_stats=False), [(2, 2, 3, 3, 3)]),
    "InstanceNorm1d": (lambda: nn.InstanceNorm1d(3, affine=True), [(2, 3, 5)]),
    "InstanceNorm2d": (lambda: nn.InstanceNorm2d(3, track_running_stats=True), [S]),
    "InstanceNorm3d": (lambda: nn.InstanceNorm3d(2, eps=1e-3), [(1, 2, 3, 3, 3)]),
    "LayerNorm": (lambda: nn.LayerNorm((3, 4), eps=1e-4, bias=False), [(2, 3, 4)]),
    "GroupNorm": (lambda: nn.GroupNorm(2, 4, affine=False), [(2, 4, 3)]),
    "RMSNorm": (lambda: nn.RMSNorm(4, eps=1e-3), [(2, 4)]),
    "LocalResponseNorm": (lambda: nn.LocalResponseNorm(3, alpha=1e-3, beta=0.5, k=2.0), [(2, 5, 4, 4)]),
    "ReLU": (lambda: nn.ReLU(inplace=True), [S]),
    "ReLU6": (lambda: nn.ReLU6(inplace=True), [S]),
    "LeakyReLU": (lambda: nn.LeakyReLU(0.2), [S]),
    "PReLU": (lambda: nn.PReLU(3, init=0.1), [S]),
    "ELU": (lambda: nn.ELU(alpha=0.5), [S]),
    "SELU": (lambda: nn.SELU(), [S]),
    "CELU": (lambda: nn.CELU(alpha=2.0), [S]),
    "GELU": (lambda: nn.GELU(approximate="tanh"), [S]),
    "SiLU": (lambda: nn.SiLU(), [S]),
    "Mish": (lambda: nn.Mish(), [S]),
    "Hardswish": (lambda: nn.Hardswish(), [S]),
    "Hardsigmoid": (lambda: nn.Hardsigmoid(), [S]),
    "Hardtanh": (lambda: nn.Hardtanh(-2.0, 0.5), [S]),
    "Sigmoid": (lambda: nn.Sigmoid(), [S]),
    "Tanh": (lambda: nn.Tanh(), [S]),
    "Softmax": (lambda: nn.Softmax(dim=0), [S]),
    "LogSoftmax": (lambda: nn.LogSoftmax(dim=1), [S]),
    "Softmax2d": (lambda: nn.Softmax2d(), [S]),
    "Softplus": (lambda: nn.Softplus(beta=2.0, threshold=5.0), [S]),
    "Softsign": (lambda: nn.Softsign(), [S]),
    "Tanhshrink": (lambda: nn.Tanhshrink(), [S]),
    "Hardshrink": (lambda: nn.Hardshrink(0.3), [S]),
    "Softshrink": (lambda: nn.Softshrink(0.3), [S]),
    "LogSigmoid": (lambda: nn.LogSigmoid(), [S]),
    "GLU": (lambda: nn.GLU(dim=0), [(4, 3)]),
    "Threshold": (lambda: nn.Threshold(0.1, 20.0), [S]),
    "Dropout": (lambda: nn.Dropout(p=0.3), [S]),
    "Dropout1d": (lambda: nn.Dropout1d(0.2), [(2, 3, 4)]),
    "Dropout2d": (lambda: nn.Dropout2d(0.2), [S]),
    "Dropout3d": (lambda: nn.Dropout3d(0.2), [(2, 3, 2, 2, 2)]),
    "AlphaDropout": (lambda: nn.AlphaDropout(0.2), [S]),
    "MaxPool1d": (lambda: nn.MaxPool1d(3, stride=2, padding=1, return_indices=True), [(2, 3, 9)]),
    "MaxPool2d": (lambda: nn.MaxPool2d(2, ceil_mode=True), [(2, 3, 5, 5)]),
    "MaxPool3d": (lambda: nn.MaxPool3d(2, dilation=1), [(1, 2, 4, 4, 4)]),
    "AvgPool1d": (lambda: nn.AvgPool1d(3, stride=1, padding=1, count_include_pad=False), [(2, 3, 6)]),
    "AvgPool2d": (lambda: nn.AvgPool2d(2, divisor_override=3), [S]),
    "AvgPool3d": (lambda: nn.AvgPool3d(2, ceil_mode=True), [(1, 2, 3, 3, 3)]),
    "AdaptiveAvgPool1d": (lambda: nn.AdaptiveAvgPool1d(2), [(2, 3, 5)]),
    "AdaptiveAvgPool2d": (lambda: nn.AdaptiveAvgPool2d((2, None)), [(2, 3, 5, 4)]),
    "AdaptiveAvgPool3d": (lambda: nn.AdaptiveAvgPool3d(1), [(1, 2, 3, 3, 3)]),
    "AdaptiveMaxPool1d": (lambda: nn.AdaptiveMaxPool1d(2, return_indices=True), [(2, 3, 5)]),
    "AdaptiveMaxPool2d": (lambda: nn.AdaptiveMaxPool2d(3), [(2, 3, 5, 5)]),
    "AdaptiveMaxPool3d": (lambda: nn.AdaptiveMaxPool3d((1, 2, 2)), [(1, 2, 3, 4, 4)]),
    "ZeroPad1d": (lambda: nn.ZeroPad1d((1, 2)), [(2, 3, 4)]),
    "ZeroPad2d": (lambda: nn.ZeroPad2d((1, 0, 2, 1)), [S]),
    "ZeroPad3d": (lambda: nn.ZeroPad3d(1), [(1, 2, 2, 2, 2)]),
    "ConstantPad1d": (lambda: nn.ConstantPad1d(2, 3.5), [(2, 3, 4)]),
    "ConstantPad2d": (lambda: nn.ConstantPad2d((1, 1, 0, 2), -1.0), [S]),
    "ConstantPad3d": (lambda: nn.ConstantPad3d(1, 0.5), [(1, 2, 2, 2, 2)]),
    "ReflectionPad1d": (lambda: nn.ReflectionPad1d(2), [(2, 3, 5)]),
    "ReflectionPad2d": (lambda: nn.ReflectionPad2d((1, 2, 1, 0)), [S]),
    "ReflectionPad3d": (lambda: nn.ReflectionPad3d(1), [(1, 2, 3, 3, 3)]),
    "ReplicationPad1d": (lambda: nn.ReplicationPad1d(2), [(2, 3, 4)]),
    "ReplicationPad2d": (lambda: nn.ReplicationPad2d(1), [S]),
    "ReplicationPad3d": (lambda: nn.ReplicationPad3d((1, 0, 1, 0, 1, 0)), [(1, 2, 2, 2, 2)]),
    "Upsample": (lambda: nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), [(1, 2, 3, 3)]),
    "UpsamplingNearest2d": (lambda: nn.UpsamplingNearest2d(size=(5, 7)), [(1, 2, 3, 3)]),
    "UpsamplingBilinear2d": (lambda: nn.UpsamplingBilinear2d(scale_factor=1.5), [(1, 2, 4, 4)]),
    "PixelShuffle": (lambda: nn.PixelShuffle(2), [(1, 8, 3, 3)]),
    "PixelUnshuffle": (lambda: nn.PixelUnshuffle(2), [(1, 2, 4, 4)]),
    "ChannelShuffle": (lambda: nn.ChannelShuffle(2), [(1, 4, 2, 2)]),
    "Embedding": (lambda: nn.Embedding(10, 4, padding_idx=1, scale_grad_by_freq=True), [("long", 10, 2, 5)]),
    "MultiheadAttention": (
        lambda: nn.MultiheadAttention(8, 2, add_bias_kv=True, kdim=6, vdim=5, batch_first=True),
        [(2, 3, 8), (2, 4, 6), (2, 4, 5)],
    ),
}


def _inputs(shapes: list[Any], gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randint(0, s[1], s[2:], generator=gen) if s[0] == "long" else torch.randn(s, generator=gen)
            for s in shapes]


def _leaf_model(module: nn.Module, n_inputs: int) -> fx.GraphModule:
    """A graph that calls ``module`` as its one call_module leaf."""
    graph = fx.Graph()
    xs = [graph.placeholder(f"x{i}") for i in range(n_inputs)]
    graph.output(graph.call_module("leaf", tuple(xs)))
    return fx.GraphModule({"leaf": module}, graph)


def _same(a: Any, b: Any) -> bool:
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb))


def _round_trip(gm: fx.GraphModule, inputs: list[torch.Tensor], path: Path) -> fx.GraphModule:
    artifact.save(gm, path)
    loaded = artifact.load(path)
    # Clones: in-place activations write into their input.
    assert _same(gm(*[x.clone() for x in inputs]), loaded(*[x.clone() for x in inputs]))
    return loaded


def test_cases_cover_every_supported_torch_nn_class() -> None:
    nn_names = {n.removeprefix("torch.nn.") for n in artifact.supported_modules() if n.startswith("torch.nn.")}
    containers = {"Sequential", "ModuleList", "ModuleDict"}
    assert nn_names - containers == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_nn_leaf_round_trips(name: str, tmp_path: Path) -> None:
    factory, shapes = CASES[name]
    module = realistic(factory(), seed=1)
    gen = torch.Generator().manual_seed(2)
    loaded = _round_trip(_leaf_model(module, len(shapes)), _inputs(shapes, gen), tmp_path / "m.fxc")
    rebuilt = loaded.leaf
    assert type(rebuilt) is type(module)
    assert rebuilt.extra_repr() == module.extra_repr()
    original_state, loaded_state = module.state_dict(), rebuilt.state_dict()
    assert original_state.keys() == loaded_state.keys()
    assert all(torch.equal(original_state[k], loaded_state[k]) for k in original_state)


def _tracer_keeping(*leaf_types: type) -> fx.Tracer:
    class KeepLeaves(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, leaf_types) or super().is_leaf_module(m, qualname)

    return KeepLeaves()


@pytest.mark.parametrize("window", [swin.ShiftedWindowAttention, swin.ShiftedWindowAttentionV2])
def test_swin_model_with_window_attention_kept_as_leaf(window: type, tmp_path: Path) -> None:
    block = swin.SwinTransformerBlock if window is swin.ShiftedWindowAttention else swin.SwinTransformerBlockV2
    model = realistic(swin.SwinTransformer([4, 4], 16, [2], [2], [4, 4], num_classes=5, block=block), seed=3)
    tracer = _tracer_keeping(window, torchvision.ops.StochasticDepth, torchvision.ops.Permute)
    gm = fx.GraphModule(model, tracer.trace(model))
    assert {type(m) for m in gm.modules()} >= {window, torchvision.ops.StochasticDepth, torchvision.ops.Permute}
    loaded = _round_trip(gm, [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))], tmp_path / "s.fxc")
    assert type(loaded.get_submodule("features.1.0.attn")) is window


def test_sequential_subclass_leaf_loads_as_sequential(tmp_path: Path) -> None:
    model = realistic(nn.Sequential(torchvision.ops.Conv2dNormActivation(3, 4, 3, activation_layer=nn.Hardswish)))
    gm = fx.GraphModule(model, _tracer_keeping(torchvision.ops.Conv2dNormActivation).trace(model))
    loaded = _round_trip(gm, [torch.randn(S)], tmp_path / "c.fxc")
    assert type(loaded.get_submodule("0")) is nn.Sequential
    assert [type(m) for m in loaded.get_submodule("0")] == [nn.Conv2d, nn.BatchNorm2d, nn.Hardswish]


class Scale(nn.Module):
    """A module of ours, storable through the class protocol."""

    _fxc_name = "tests.artifact.Scale"

    def __init__(self, channels: int, power: int) -> None:
        super().__init__()
        self.power = power
        self.weight = nn.Parameter(torch.ones(channels, 1, 1))
        self.cache = None  # stands for a prepacked copy: rebuilt, never stored

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight**self.power

    def _fxc_config(self) -> dict:
        return {"channels": self.weight.shape[0], "power": self.power}

    @classmethod
    def _fxc_from_config(cls, config: dict, state: dict[str, torch.Tensor]) -> "Scale":
        module = cls(**config)
        module.load_state_dict(state, assign=True)
        module.cache = state["weight"].detach() ** module.power
        return module


def test_registered_module_round_trips_and_rebuilds_its_cache(tmp_path: Path) -> None:
    artifact.register_module(Scale)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), Scale(3, power=3))
    gm = fx.GraphModule(model, _tracer_keeping(Scale).trace(realistic(model)))
    loaded = _round_trip(gm, [torch.randn(S)], tmp_path / "r.fxc")
    rebuilt = loaded.get_submodule("1")
    assert type(rebuilt) is Scale and rebuilt.power == 3
    assert torch.equal(rebuilt.cache, model[1].weight.detach() ** 3)


def test_registered_function_is_allowed_and_resolved(tmp_path: Path) -> None:
    def clipped_gelu(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x).clamp(max=1.0)

    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(clipped_gelu, (x,)))
    gm = fx.GraphModule(nn.Module(), graph)
    with pytest.raises(ArtifactError, match="clipped_gelu.*allow-list"):
        artifact.save(gm, tmp_path / "f.fxc")
    assert not (tmp_path / "f.fxc").exists()
    artifact.register_function(clipped_gelu, "tests.artifact.clipped_gelu")
    loaded = _round_trip(gm, [torch.randn(S) * 3], tmp_path / "f.fxc")
    assert next(n for n in loaded.graph.nodes if n.op == "call_function").target is clipped_gelu


def test_register_module_refuses_a_class_without_the_protocol() -> None:
    with pytest.raises(ArtifactError, match="_fxc_config"):
        artifact.register_module(nn.Module)


def test_registering_first_in_a_fresh_process_keeps_torch_nn_supported(tmp_path: Path) -> None:
    # The registry fills its torch.nn entries lazily; a registration must not pre-empt that.
    code = (
        "import torch, sys\n"
        "from torch import fx, nn\n"
        "from fxcompress import artifact\n"
        "class Mine(nn.Module):\n"
        "    def _fxc_config(self): return {}\n"
        "    @classmethod\n"
        "    def _fxc_from_config(cls, config, state): return cls()\n"
        "artifact.register_module(Mine, name='tests.Mine')\n"
        "gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()))\n"
        "artifact.save(gm, sys.argv[1])\n"
        "x = torch.randn(1, 3, 4, 4)\n"
        "assert torch.equal(artifact.load(sys.argv[1])(x), gm(x))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.fxc")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr


def test_docs_example_of_a_module_holding_a_module_round_trips(tmp_path: Path) -> None:
    # The block of docs/artifacts.md that defines a class through describe_child / build_child.
    text = (Path(__file__).resolve().parents[2] / "docs" / "artifacts.md").read_text()
    block = next(b for b in re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M) if "build_child" in b)
    namespace: dict[str, Any] = {"__name__": "artifacts_doc"}
    exec(compile(block, "docs/artifacts.md", "exec"), namespace)
    conv = realistic(nn.Conv2d(3, 4, 3, padding=1), seed=5)
    q = torch.randint(-127, 128, conv.weight.shape, dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    module = namespace["Int8Conv"](conv, q, torch.tensor(0.01))
    loaded = _round_trip(_leaf_model(module, 1), [torch.randn(S)], tmp_path / "doc.fxc")
    assert loaded.leaf.conv.weight is None and torch.equal(loaded.leaf.q, q)
    artifact.save(_leaf_model(module, 1), tmp_path / "doc.fxc", overwrite=True)

    def smaller_conv(doc: dict) -> None:  # the stored q no longer fits the conv's config
        config = values.decode(doc["modules"]["leaf"]["config"], "test")
        config["conv"]["config"]["out_channels"] = 2
        doc["modules"]["leaf"]["config"] = values.encode(config, "test")

    forge(tmp_path / "doc.fxc", graph=smaller_conv)
    with pytest.raises(ArtifactError, match=r"module 'leaf(\.conv)?'.*shape"):
        artifact.load(tmp_path / "doc.fxc")
