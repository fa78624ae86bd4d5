"""Channel dependency analysis: units, groups and frozen reasons on real architectures."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from fxcompress import zoo
from fxcompress.capture import trace
from fxcompress.prune import build_channel_graph


def _graph(name: str):
    model = zoo.build(name)
    gm = trace(model, (zoo.example_input(name, batch=1, reduced=True),))
    return gm, build_channel_graph(gm)


def _space(cg, gm, node_name):
    return cg.spaces[next(n for n in gm.graph.nodes if n.name == node_name)]


def _units(cg, ids: torch.Tensor) -> torch.Tensor:
    return cg.unit_of[ids.reshape(-1)]


@pytest.fixture(scope="module")
def resnet18():
    return _graph("resnet18")


def test_residual_adds_join_the_stream(resnet18):
    gm, cg = resnet18
    stem = cg.params[("conv1", "weight", 0)].ids
    block_out = cg.params[("layer1.0.conv2", "weight", 0)].ids
    # the stem, every layer1 block's last conv and layer2.0's input are one channel stream
    assert torch.equal(_units(cg, stem), _units(cg, block_out))
    assert torch.equal(_units(cg, stem), _units(cg, cg.params[("layer2.0.conv1", "weight", 1)].ids))
    assert torch.equal(_units(cg, stem), _units(cg, cg.params[("layer1.0.bn2", "running_mean", 0)].ids))
    # the inner channels of a block are a group of their own: 64 independent units
    inner = _units(cg, cg.params[("layer1.0.conv1", "weight", 0)].ids)
    assert inner.unique().numel() == 64
    assert not set(inner.tolist()) & set(_units(cg, stem).tolist())
    group = cg.groups[int(cg.group_of_unit[inner[0]])]
    assert group.modules == ["layer1.0.conv1"] and not group.frozen


def test_classifier_outputs_are_frozen_and_nothing_else(resnet18):
    gm, cg = resnet18
    fc = _units(cg, cg.params[("fc", "weight", 0)].ids)
    assert all(cg.frozen_units[int(u)].startswith("model output") for u in fc)
    assert set(cg.frozen_units) == set(fc.tolist())
    fc_in = cg.params[("fc", "weight", 1)].ids
    assert not set(_units(cg, fc_in).tolist()) & set(cg.frozen_units)


def test_concat_maps_offsets_to_each_producer():
    gm, cg = _graph("densenet121")
    # denselayer2's first conv reads cat(pool0, denselayer1.conv2): segments at offsets 0 and 64
    consumer = cg.params[("features.denseblock1.denselayer2.conv1", "weight", 1)].ids
    pool_src = cg.params[("features.conv0", "weight", 0)].ids
    new = cg.params[("features.denseblock1.denselayer1.conv2", "weight", 0)].ids
    assert torch.equal(_units(cg, consumer), torch.cat([_units(cg, pool_src), _units(cg, new)]))
    # the per-channel BatchNorm over the concatenation is sliced by the same segments
    norm = cg.params[("features.denseblock1.denselayer2.norm1", "weight", 0)].ids
    assert torch.equal(_units(cg, norm), _units(cg, consumer))


def test_depthwise_conv_joins_its_input_and_output_channels():
    gm, cg = _graph("mobilenet_v2")
    expand = _units(cg, cg.params[("features.2.conv.0.0", "weight", 0)].ids)
    depthwise = _units(cg, cg.params[("features.2.conv.1.0", "weight", 0)].ids)
    assert torch.equal(expand, depthwise)
    assert expand.unique().numel() == expand.numel()  # still one unit per channel


def test_grouped_conv_removes_whole_groups():
    gm, cg = _graph("resnext50_32x4d")
    conv = gm.get_submodule("layer1.0.conv2")
    per_group = conv.out_channels // conv.groups
    out = _units(cg, cg.params[("layer1.0.conv2", "weight", 0)].ids).reshape(conv.groups, per_group)
    feeding = _units(cg, cg.params[("layer1.0.conv1", "weight", 0)].ids).reshape(conv.groups, -1)
    assert (out == out[:, :1]).all() and out[:, 0].unique().numel() == conv.groups
    assert torch.equal(feeding, out[:, :1].expand_as(feeding))


def test_channel_shuffle_keeps_positions_in_step():
    gm, cg = _graph("shufflenet_v2_x0_5")
    # stage2.1: x1 (first half of the input) and the branch output sit side by side in the shuffle
    # view [N, 2, C/2, H, W]: position k of both rows must go together
    branch_out = _units(cg, cg.params[("stage2.1.branch2.5", "weight", 0)].ids)
    cat = _space(cg, gm, "cat_1")
    half = cat.ids.numel() // 2
    assert torch.equal(_units(cg, cat.ids[:half]), branch_out)
    # the branch's inner channels stay free: one unit per channel
    inner = _units(cg, cg.params[("stage2.1.branch2.0", "weight", 0)].ids)
    assert inner.unique().numel() == inner.numel()
    assert not cg.frozen_units.keys() - set(_units(cg, cg.params[("fc", "weight", 0)].ids).tolist())


def test_flatten_maps_each_channel_to_its_spatial_block():
    model = torchvision.models.vgg11(num_classes=10)
    gm = trace(model.eval(), (torch.randn(1, 3, 32, 32),))
    cg = build_channel_graph(gm)
    cols = cg.params[("classifier.0", "weight", 1)].ids  # 512 * 7 * 7 inputs
    last_conv = cg.params[("features.18", "weight", 0)].ids
    assert cols.numel() == 512 * 49
    assert torch.equal(_units(cg, cols).reshape(512, 49), _units(cg, last_conv)[:, None].expand(512, 49))


class _Roll(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).roll(1, dims=1))


def test_unknown_op_freezes_its_channels_naming_op_and_node():
    gm = trace(_Roll(), (torch.randn(1, 3, 8, 8),))
    cg = build_channel_graph(gm)
    conv = _units(cg, cg.params[("conv", "weight", 0)].ids)
    assert {cg.frozen_units[int(u)] for u in conv} == {"roll at node roll: channel semantics unknown"}


def test_out_of_scope_layers_freeze_every_coupled_channel(resnet18):
    gm, _ = resnet18
    cg = build_channel_graph(gm, lambda node: not str(node.target).startswith("layer1.1"))
    stream = _units(cg, cg.params[("conv1", "weight", 0)].ids)
    assert all("outside the pass's scope" in cg.frozen_units[int(u)] for u in stream)
    inner = _units(cg, cg.params[("layer1.0.conv1", "weight", 0)].ids)
    assert not set(inner.tolist()) & set(cg.frozen_units)
