"""Saving and loading gives the same model: outputs, graph, state, layout, flags, bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import fx, nn
from torch.utils import _pytree as pytree
from torchvision.models import swin_transformer as swin
from torchvision.models import vision_transformer as vit
from torchvision.models.feature_extraction import create_feature_extractor

import fxcompress
from fxcompress import artifact, zoo
from fxcompress.api import state_hash

from artifact_forge import read_members
from conftest import realistic


def _structure(gm: fx.GraphModule) -> list[tuple]:
    return [(n.op, n.name, str(n.target), str(n.args), str(n.kwargs)) for n in gm.graph.nodes]


def _assert_same_model(gm: fx.GraphModule, loaded: fx.GraphModule, *inputs: object) -> None:
    expected, got = gm(*inputs), loaded(*inputs)
    leaves_e, leaves_g = pytree.tree_leaves(expected), pytree.tree_leaves(got)
    assert pytree.tree_structure(expected) == pytree.tree_structure(got)
    assert all(torch.equal(a, b) for a, b in zip(leaves_e, leaves_g))
    assert all(float(a.detach().float().std()) > 1e-3 for a in leaves_e if a.numel() > 1)  # not a degenerate model
    assert _structure(loaded) == _structure(gm)
    state, loaded_state = gm.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)


# regnet_x_400mf: its modules have names that are not identifiers ("block1-0").
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "googlenet", "regnet_x_400mf"])
def test_zoo_model_round_trips_bit_identically(name: str, tmp_path: Path) -> None:
    gm = fx.symbolic_trace(zoo.build(name))
    artifact.save(gm, tmp_path / "m.fxc")
    loaded = artifact.load(tmp_path / "m.fxc")
    _assert_same_model(gm, loaded, zoo.example_input(name, batch=2, reduced=True))
    assert type(loaded).__name__ == type(gm).__name__
    assert not loaded.training


@pytest.mark.parametrize("kind", ["vit", "swin", "swin_v2"])
def test_small_transformers_round_trip(kind: str, tmp_path: Path) -> None:
    if kind == "vit":
        model = vit.VisionTransformer(32, 16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10)
    else:
        v2 = kind == "swin_v2"
        model = swin.SwinTransformer(
            [4, 4], 16, [2, 2], [2, 4], [4, 4], num_classes=10,
            block=swin.SwinTransformerBlockV2 if v2 else swin.SwinTransformerBlock,
            downsample_layer=swin.PatchMergingV2 if v2 else swin.PatchMerging,
        )
    gm = fx.symbolic_trace(realistic(model))
    artifact.save(gm, tmp_path / "t.fxc")
    _assert_same_model(gm, artifact.load(tmp_path / "t.fxc"), torch.randn(2, 3, 32, 32))


def test_dict_outputs_of_a_feature_extractor(tmp_path: Path) -> None:
    gm = create_feature_extractor(zoo.build("resnet18"), return_nodes={"layer2": "mid", "fc": "logits"})
    artifact.save(gm, tmp_path / "fe.fxc")
    loaded = artifact.load(tmp_path / "fe.fxc")
    out = loaded(zoo.example_input("resnet18", reduced=True))
    assert isinstance(out, dict) and list(out) == ["mid", "logits"]
    _assert_same_model(gm, loaded, zoo.example_input("resnet18", reduced=True))


def test_pytree_calling_convention_dict_input_tuple_output(tmp_path: Path) -> None:
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 3)

        def forward(self, batch: dict) -> tuple:
            return self.proj(batch["a"]) + batch["b"], batch["a"].sum()

    gm = fx.symbolic_trace(realistic(Head()), concrete_args={"batch": {"a": fx._symbolic_trace.PH, "b": fx._symbolic_trace.PH}})
    artifact.save(gm, tmp_path / "p.fxc")
    loaded = artifact.load(tmp_path / "p.fxc")
    assert loaded.code == gm.code
    _assert_same_model(gm, loaded, {"a": torch.randn(2, 4), "b": torch.randn(2, 3)})


def test_shared_tensors_are_stored_once_and_stay_shared(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(12, 8)
            self.head = nn.Linear(8, 12, bias=False)
            self.head.weight = self.embed.weight  # tied, as in language models

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(ids)) + self.embed.weight.sum()

    gm = fx.symbolic_trace(realistic(Tied()))
    artifact.save(gm, tmp_path / "tied.fxc")
    loaded = artifact.load(tmp_path / "tied.fxc")
    assert loaded.head.weight is loaded.embed.weight
    assert artifact.verify(tmp_path / "tied.fxc")["model"]["tensors"] == 1
    _assert_same_model(gm, loaded, torch.tensor([[1, 5, 11]]))


def test_channels_last_weights_keep_their_layout(tmp_path: Path) -> None:
    model = zoo.build("resnet18").to(memory_format=torch.channels_last)
    gm = fx.symbolic_trace(model)
    artifact.save(gm, tmp_path / "cl.fxc")
    loaded = artifact.load(tmp_path / "cl.fxc")
    assert loaded.conv1.weight.stride() == gm.conv1.weight.stride() != nn.Conv2d(3, 64, 7).weight.stride()
    x = zoo.example_input("resnet18", reduced=True).to(memory_format=torch.channels_last)
    _assert_same_model(gm, loaded, x)


@pytest.mark.filterwarnings("ignore:Attempted to insert a get_attr Node")  # the plain attribute, on purpose
def test_tensor_kinds_dtypes_grad_and_training_flags(tmp_path: Path) -> None:
    model = realistic(torchvision.ops.MLP(6, [8, 4], norm_layer=nn.BatchNorm1d))
    gm = fx.symbolic_trace(model)
    gm.register_buffer("codes", torch.arange(-8, 8, dtype=torch.int8).reshape(4, 4), persistent=True)
    gm.register_buffer("scale", torch.tensor([0.5, 0.25, 2.0, 1.0], dtype=torch.bfloat16), persistent=False)
    gm.offset = torch.full((4,), 3, dtype=torch.uint8)  # a plain tensor attribute
    gm.register_parameter("gain", nn.Parameter(torch.full((4,), 1.5), requires_grad=False))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        reads = [gm.graph.get_attr(t) for t in ("codes", "scale", "offset", "gain")]
        deq = gm.graph.call_method("float", (reads[0],))
        y = gm.graph.call_function(torch.matmul, (out.args[0], deq))
        y = gm.graph.call_function(torch.mul, (y, reads[1]))
        y = gm.graph.call_function(torch.add, (y, reads[2]))
        y = gm.graph.call_function(torch.mul, (y, reads[3]))
    out.args = (y,)
    gm.recompile()
    gm.get_submodule("1").train()  # the first BatchNorm stays in training mode
    artifact.save(gm, tmp_path / "k.fxc")
    loaded = artifact.load(tmp_path / "k.fxc")
    assert loaded.codes.dtype == torch.int8 and "codes" in loaded.state_dict()
    assert loaded.scale.dtype == torch.bfloat16 and "scale" in dict(loaded.named_buffers())
    assert "scale" not in loaded.state_dict()
    assert "offset" not in dict(loaded.named_buffers()) and loaded.offset.dtype == torch.uint8
    assert isinstance(loaded.gain, nn.Parameter) and not loaded.gain.requires_grad
    assert loaded.get_submodule("0").weight.requires_grad
    assert [m.training for m in loaded.modules()] == [m.training for m in gm.modules()]
    gm.eval(), loaded.eval()
    _assert_same_model(gm, loaded, torch.randn(5, 6))


def test_saving_twice_gives_identical_bytes(tmp_path: Path, mobilenet: fx.GraphModule, keys: tuple[Path, Path]) -> None:
    for key in (None, keys[0]):
        artifact.save(mobilenet, tmp_path / "a.fxc", key=key, overwrite=True)
        artifact.save(mobilenet, tmp_path / "b.fxc", key=key, overwrite=True)
        assert (tmp_path / "a.fxc").read_bytes() == (tmp_path / "b.fxc").read_bytes()
    # A loaded model saves to the same graph and weights; only the manifest's parent differs.
    artifact.save(artifact.load(tmp_path / "a.fxc"), tmp_path / "c.fxc")
    first, again = read_members(tmp_path / "a.fxc"), read_members(tmp_path / "c.fxc")
    assert first["graph.json"] == again["graph.json"] and first["weights.safetensors"] == again["weights.safetensors"]


def test_result_of_run_records_pipeline_report_source_and_parent(tmp_path: Path) -> None:
    model = zoo.build("resnet18")
    x = zoo.example_input("resnet18", reduced=True)
    result = fxcompress.run(model, ["fuse_conv_bn", "eliminate_dead_nodes"], x)
    first_id = artifact.save(result, tmp_path / "r1.fxc")
    manifest = artifact.verify(tmp_path / "r1.fxc")
    assert [p["name"] for p in manifest["pipeline"]] == ["fuse_conv_bn", "eliminate_dead_nodes"]
    assert manifest["source_state_sha256"] == state_hash(model)
    assert manifest["report"] == result.report.to_dict()
    assert manifest["parent"] is None
    assert manifest["versions"]["torch"] == torch.__version__
    loaded = artifact.load(tmp_path / "r1.fxc")
    assert loaded.meta["fxcompress_artifact"]["manifest_sha256"] == first_id
    second = fxcompress.run(loaded, ["eliminate_dead_nodes"], x)
    second_id = artifact.save(second, tmp_path / "r2.fxc", manifest_extra={"note": "second step"})
    manifest = artifact.verify(tmp_path / "r2.fxc")
    assert manifest["parent"] == first_id and manifest["extra"] == {"note": "second step"}
    assert torch.equal(artifact.load(tmp_path / "r2.fxc")(x), second.model(x))
    # Version 2: the lineage (each earlier step, oldest first), the passes run so far, the inputs.
    (step,) = manifest["history"]
    assert step["id"] == first_id and [p["name"] for p in step["pipeline"]] == ["fuse_conv_bn", "eliminate_dead_nodes"]
    assert step["after"] == result.report.to_dict()["after"]
    assert manifest["passes_run"] == ["fuse_conv_bn", "eliminate_dead_nodes", "eliminate_dead_nodes"]
    assert manifest["inputs"] == [{"name": "x", "shape": list(x.shape), "dtype": "float32"}]
    assert loaded.meta["fxcompress_history"] == ["fuse_conv_bn", "eliminate_dead_nodes"]
    lineage = artifact.load(tmp_path / "r2.fxc").meta["fxcompress_artifact"]["history"]
    assert [h["id"] for h in lineage] == [first_id, second_id]
    assert lineage[1]["pipeline"] == manifest["pipeline"]


@pytest.mark.parametrize("passes", [[], ["quantize_dynamic"], [("quantize_weights", {"group_size": 32})]],
                         ids=["float", "dynamic", "weight_only"])
def test_the_bert_style_example_saves_float_and_quantized(passes, tmp_path: Path) -> None:
    from fxcompress.examples.bert import BertConfig, BertStyleEncoder, bert_inputs

    config = BertConfig(vocab_size=1200, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                        max_positions=32)
    ids = bert_inputs(2, 8, config)
    result = fxcompress.run(BertStyleEncoder(config), passes, ids, progress=False)  # arange, zeros_like, None check
    artifact.save(result, tmp_path / "bert.fxc")
    loaded = artifact.load(tmp_path / "bert.fxc")
    assert torch.equal(loaded(ids), result.model(ids))
    assert torch.equal(loaded(bert_inputs(3, 5, config, seed=1)), result.model(bert_inputs(3, 5, config, seed=1)))
