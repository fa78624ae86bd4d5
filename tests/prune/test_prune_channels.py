"""The prune_channels pass end to end: real smaller modules, exactness, scope, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress import zoo
from fxcompress.capture import trace
from fxcompress.errors import ConfigError
from fxcompress.examples.digits import accuracy, load_digits_data, pretrained_digits_cnn
from fxcompress.passes.prune_channels import PruneChannels
from fxcompress.prune import apply_removal, build_channel_graph, select, silence, unit_scores
from fxcompress.train import finetune


@pytest.fixture(scope="module")
def resnet18():
    return zoo.build("resnet18"), zoo.example_input("resnet18", batch=2, reduced=True)


def _prune(model, x, **options):
    scope = {k: options.pop(k) for k in ("scope", "skip") if k in options}
    return fxcompress.run(model, [("prune_channels", {**options, **scope})], (x,))


def test_modules_become_real_smaller_modules(resnet18):
    model, x = resnet18
    before = copy.deepcopy(model.state_dict())
    result = _prune(model, x, ratio=0.5)
    gm = result.model
    conv = gm.get_submodule("layer1.0.conv1")
    assert type(conv) is nn.Conv2d and conv.out_channels == 32 and conv.weight.shape == (32, 32, 3, 3)
    bn = gm.get_submodule("layer1.0.bn1")
    assert type(bn) is nn.BatchNorm2d and bn.num_features == 32 and bn.running_var.shape == (32,)
    fc = gm.get_submodule("fc")
    assert (fc.in_features, fc.out_features) == (256, 1000)
    assert gm(x).shape == model(x).shape
    row = result.report.rows[0]
    assert row.modified and row.stats["removed_channels"] > 0
    assert row.stats["frozen"] == {"model output (output shapes never change)": 1000}
    assert result.report.rows[0].after.parameters < result.report.before.parameters / 3
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # caller's model intact


def _exact_prune(model, x, ratio):
    """Silence the channels to be removed, then remove them: outputs must not move."""
    gm = trace(copy.deepcopy(model), (x,))
    cg = build_channel_graph(gm)
    removed = select(cg, unit_scores(gm, cg, "l2"), ratio=ratio) & ~cg.norm_units
    silence(gm, cg, removed)
    with torch.no_grad():
        reference = gm(x)
        apply_removal(gm, cg, removed)
        gm.recompile()
        return reference, gm(x), int(removed.sum())


def test_pruning_silenced_channels_is_exact(resnet18, rel_err):
    reference, pruned, n = _exact_prune(*resnet18, ratio=0.5)
    assert n > 1000 and rel_err(reference, pruned) < 1e-5


def test_ratio_zero_is_an_exact_no_op(resnet18):
    model, x = resnet18
    result = _prune(model, x, ratio=0.0)
    assert not result.report.rows[0].modified
    assert torch.equal(result.model(x), model(x))


def test_skip_keeps_the_layer_and_everything_coupled_to_it(resnet18):
    model, x = resnet18
    gm = _prune(model, x, ratio=0.5, skip="layer1.0.conv2").model
    # conv2 writes the layer1 stream: the stem and every block output of layer1 keep 64 channels,
    # and it reads layer1.0.conv1's outputs, which keep their 64 channels too
    assert gm.get_submodule("conv1").out_channels == 64
    assert gm.get_submodule("layer1.1.conv2").out_channels == 64
    assert gm.get_submodule("layer1.0.conv2").weight.shape == (64, 64, 3, 3)
    assert gm.get_submodule("layer1.0.conv1").out_channels == 64
    # the rest is pruned as usual
    assert gm.get_submodule("layer1.1.conv1").out_channels == 32
    assert gm.get_submodule("layer2.0.conv1").out_channels == 64


def test_round_to_and_global_ranking(resnet18):
    model, x = resnet18
    gm = _prune(model, x, ratio=0.3, round_to=8).model
    convs = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)
    gm = _prune(model, x, ratio=0.3, global_ranking=True, max_ratio=0.5).model
    widths = {gm.get_submodule(f"layer{i}.0.conv1").out_channels / 2 ** (5 + i) for i in range(1, 5)}
    assert len(widths) > 1 and min(widths) >= 0.5  # per-group fractions differ, capped at 0.5


def test_layer_norm_groups_match_an_explicit_reference(rel_err):
    """A LayerNorm's statistics change when channels go: compare with the sub-network by hand."""
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4)).eval()
    x = torch.randn(5, 8)
    gm = fxcompress.run(model, [("prune_channels", {"ratio": 0.5})], (x,)).model
    lin1, norm, lin2 = model[0], model[1], model[3]
    kept = torch.nonzero(torch.isin(lin1.weight, gm.get_submodule("0").weight).all(dim=1)).reshape(-1)
    assert kept.numel() == 8
    with torch.no_grad():
        h = F.linear(x, lin1.weight[kept], lin1.bias[kept])
        h = F.gelu(F.layer_norm(h, (8,), norm.weight[kept], norm.bias[kept], norm.eps))
        expected = F.linear(h, lin2.weight[:, kept], lin2.bias)
    assert gm.get_submodule("1").normalized_shape == (8,)
    assert rel_err(expected, gm(x)) < 1e-6


@pytest.mark.parametrize("importance", ["l2", "taylor"])
def test_pruned_and_briefly_finetuned_digits_cnn_keeps_its_accuracy(importance):
    """A behavioural guard (benchmarks/digits_pruning.py measures the real figures, over seeds)."""
    data = load_digits_data()
    model = pretrained_digits_cnn()
    order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(0))
    batches = [(data.train_x[i], data.train_y[i]) for i in order.split(64)]
    result = fxcompress.run(model, [("prune_channels", {"ratio": 0.5, "importance": importance})],
                            (data.test_x[:8],), calibration_data=batches[:8], loss_fn=F.cross_entropy)
    pruned = finetune(result.model, batches, F.cross_entropy, steps=200, lr=1e-3, progress=False)
    assert result.report.rows[0].after.parameters < 0.3 * result.report.before.parameters
    assert accuracy(pruned, data.test_x, data.test_y) >= accuracy(model, data.test_x, data.test_y) - 1.5


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, match", [
    ({"ratio": 1.0}, "ratio must be a number in \\[0, 1\\)"),
    ({"ratio": -0.1}, "ratio must be a number in \\[0, 1\\)"),
    ({"round_to": 0}, "round_to must be an int >= 1"),
    ({"min_channels": 0}, "min_channels must be an int >= 1"),
    ({"max_ratio": 1.0}, "max_ratio must be a number in \\(0, 1\\)"),
    ({"importance": "l3"}, "importance must be one of"),
    ({"layer_ratios": {"layer1.*": 1.5}}, "layer_ratios\\['layer1.\\*'\\]"),
])
def test_bad_options_are_refused_before_any_work(options, match):
    with pytest.raises(ConfigError, match=match):
        PruneChannels(**options)


def test_bad_patterns_and_missing_taylor_inputs(resnet18):
    model, x = resnet18
    with pytest.raises(ConfigError, match="skip pattern 'layer9.\\*' matches no module"):
        _prune(model, x, skip="layer9.*")
    with pytest.raises(ConfigError, match="match no prunable layer"):
        _prune(model, x, layer_ratios={"decoder.*": 0.2})
    with pytest.raises(ConfigError, match=r"pass 'prune_channels' \(entry 0\) needs calibration_data"):
        _prune(model, x, importance="taylor")


def test_a_model_whose_every_group_is_frozen_is_returned_unchanged():
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    x = torch.randn(2, 8)
    result = fxcompress.run(model, [("prune_channels", {"ratio": 0.5})], (x,))
    row = result.report.rows[0]
    assert not row.modified and torch.equal(result.model(x), model(x))
    assert "every channel group is frozen" in row.stats["notes"][0]
    assert "model output" in row.stats["notes"][0]


class _RangeRecorder(nn.Module):
    """An observer by the stage protocol of fxcompress.verify (``fxc_role``): records the range seen."""

    fxc_role = "observer"

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("low", torch.tensor(float("inf")))
        self.register_buffer("high", torch.tensor(float("-inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.low.copy_(torch.minimum(self.low, x.detach().min()))
        self.high.copy_(torch.maximum(self.high, x.detach().max()))
        return x


def test_pruning_after_quantization_is_refused(resnet18):
    model, x = resnet18
    gm = trace(copy.deepcopy(model), (x,))
    conv = next(n for n in gm.graph.nodes if n.target == "conv1")
    gm.add_submodule("conv1_observer", _RangeRecorder())
    with gm.graph.inserting_after(conv):
        observed = gm.graph.call_module("conv1_observer", (conv,))
    conv.replace_all_uses_with(observed, delete_user_cb=lambda user: user is not observed)
    gm.recompile()
    with pytest.raises(ConfigError, match="runs on float graphs, but the graph is already observed; run it on "
                                          "the model before it was quantized"):
        fxcompress.run(gm, ["prune_channels"], (x,))


def test_a_custom_importance_returning_nan_is_refused(resnet18):
    model, x = resnet18

    def broken(t: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.full((t.shape[dim],), float("nan"))

    with pytest.raises(ConfigError, match=r"custom importance 'broken' returned \d+ NaN/Inf scores for conv1.weight"):
        _prune(model, x, importance=broken)


class Reused(nn.Module):
    """One conv object under two names, applied twice: its input channels are the graph input's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.alias = self.conv
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.alias(self.conv(x)))


def test_a_conv_reached_under_two_names_keeps_channels_its_other_call_cannot_lose():
    model, x = Reused().eval(), torch.randn(1, 4, 6, 6)
    result = _prune(model, x, ratio=0.5)
    row = result.report.rows[0]
    assert not row.modified and torch.equal(result.model(x), model(x))
    assert any("conv.weight is used by more than one call" in reason for reason in row.stats["frozen"])


def test_scope_reasons_name_module_paths_as_scope_does(resnet18):
    model, x = resnet18
    frozen = _prune(model, x, ratio=0.3, scope=["layer1.*"]).report.rows[0].stats["frozen"]
    assert "layer4.0.conv1: outside the pass's scope" in frozen and "fc: outside the pass's scope" in frozen
    assert not any(reason.startswith("layer4_0_conv1") for reason in frozen)

