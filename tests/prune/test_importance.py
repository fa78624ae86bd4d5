"""Importance criteria, checked against hand computations on the trained digits CNN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxcompress
from fxcompress.capture import trace
from fxcompress.errors import ConfigError
from fxcompress.examples.digits import load_digits_data, pretrained_digits_cnn
from fxcompress.prune import activation_terms, build_channel_graph, taylor_terms, unit_scores


@pytest.fixture(scope="module")
def digits():
    data = load_digits_data()
    gm = trace(pretrained_digits_cnn(), (data.test_x[:4],))
    return gm, build_channel_graph(gm), data


def _conv_units(cg):
    """Units of the `conv` group (conv.0 -> BN conv.1 -> flatten -> fc1), in channel order."""
    return cg.unit_of[cg.params[("conv.0", "weight", 0)].ids]


def test_l2_sums_every_member_of_the_unit(digits):
    gm, cg, _ = digits
    conv, bn, fc1 = gm.get_submodule("conv.0"), gm.get_submodule("conv.1"), gm.get_submodule("fc1")
    # each conv channel feeds 2x2 = 4 consecutive fc1 inputs through the flatten
    expected = (conv.weight.pow(2).sum(dim=(1, 2, 3)) + bn.weight.pow(2) + bn.bias.pow(2)
                + fc1.weight.pow(2).reshape(64, 32, 4).sum(dim=(0, 2))).sqrt()
    scores = unit_scores(gm, cg, "l2")
    assert torch.allclose(scores[_conv_units(cg)].float(), expected.detach(), rtol=1e-5)


def test_l1_and_bn_scale(digits):
    gm, cg, _ = digits
    conv, bn, fc1 = gm.get_submodule("conv.0"), gm.get_submodule("conv.1"), gm.get_submodule("fc1")
    l1 = (conv.weight.abs().sum(dim=(1, 2, 3)) + bn.weight.abs() + bn.bias.abs()
          + fc1.weight.abs().reshape(64, 32, 4).sum(dim=(0, 2)))
    assert torch.allclose(unit_scores(gm, cg, "l1")[_conv_units(cg)].float(), l1.detach(), rtol=1e-5)
    bn_scale = unit_scores(gm, cg, "bn_scale")
    assert torch.allclose(bn_scale[_conv_units(cg)].float(), bn.weight.abs().detach(), rtol=1e-6)
    # fc1's hidden units have no norm: they fall back to l2
    hidden = cg.unit_of[cg.params[("fc1", "weight", 0)].ids]
    assert torch.equal(bn_scale[hidden], unit_scores(gm, cg, "l2")[hidden])


def test_custom_function_is_called_per_member(digits):
    gm, cg, _ = digits
    counts = unit_scores(gm, cg, lambda t, dim: torch.ones(t.shape[dim]))
    # conv.0 row + BN weight + BN bias + 4 fc1 columns
    assert torch.equal(counts[_conv_units(cg)], torch.full((32,), 7.0, dtype=torch.float64))
    with pytest.raises(ConfigError, match="one per index"):
        unit_scores(gm, cg, lambda t, dim: torch.ones(3))


def test_random_is_seeded(digits):
    gm, cg, _ = digits
    a, b = unit_scores(gm, cg, "random", seed=1), unit_scores(gm, cg, "random", seed=1)
    assert torch.equal(a, b) and not torch.equal(a, unit_scores(gm, cg, "random", seed=2))


def test_taylor_accumulates_weight_times_gradient(digits):
    gm, cg, data = digits
    batches = [(data.train_x[i:i + 32], data.train_y[i:i + 32]) for i in (0, 32)]
    terms = taylor_terms(gm, batches, F.cross_entropy)
    conv = gm.get_submodule("conv.0")
    expected = torch.zeros_like(conv.weight)
    for x, y in batches:
        grad, = torch.autograd.grad(F.cross_entropy(gm(x), y), [conv.weight])
        expected += (conv.weight * grad).abs()
    assert torch.allclose(terms[id(conv.weight)], expected, rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in gm.parameters())
    scores = unit_scores(gm, cg, "taylor", taylor=terms)
    assert (scores[_conv_units(cg)] > 0).all()


def test_taylor_needs_a_loss_and_data(digits):
    gm, cg, data = digits
    with pytest.raises(ConfigError, match="loss_fn and calibration_data"):
        taylor_terms(gm, None, F.cross_entropy)
    with pytest.raises(ConfigError, match="loss_fn and calibration_data"):
        taylor_terms(gm, [(data.train_x[:4], data.train_y[:4])], None)
    with pytest.raises(ConfigError, match="unknown importance"):
        unit_scores(gm, cg, "l3")


class _MLP(torch.nn.Module):
    """Two linears: the hidden units' only consumer is ``out``; ``attention_mask`` zeroes padded tokens."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden, self.out = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x, attention_mask):
        return self.out(torch.relu(self.hidden(x))) * attention_mask.unsqueeze(-1)


def _mlp_batches():
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        x = torch.randn(2, 5, 8, generator=g)
        mask = torch.ones(2, 5, dtype=torch.long)
        mask[1, 3:] = 0
        x[1, 3:] = 1e3  # padding: huge values that must never count
        batches.append({"x": x, "attention_mask": mask})
    return batches


def test_activation_is_consumer_column_norm_times_activation_norm_on_real_tokens():
    model, batches = _MLP().eval(), _mlp_batches()
    gm = trace(model, dict(batches[0]))
    cg = build_channel_graph(gm)
    terms = activation_terms(gm, cg, batches, (), {k: v for k, v in batches[0].items()})
    scores = unit_scores(gm, cg, "activation", activation=terms)
    with torch.no_grad():  # by hand: |W_out[:, j]| * |relu(hidden(x))_j| over the real tokens
        h = torch.cat([torch.relu(model.hidden(b["x"]))[b["attention_mask"].bool()] for b in batches])
        expected = model.out.weight.norm(dim=0).double() * h.double().norm(dim=0)
    hidden_units = cg.unit_of[cg.params[("hidden", "weight", 0)].ids]
    assert torch.allclose(scores[hidden_units], expected, rtol=1e-6)


def test_activation_needs_data_and_custom_zero_scores_are_refused(digits):
    gm, cg, data = digits
    with pytest.raises(ConfigError, match="activation_terms"):
        unit_scores(gm, cg, "activation")
    with pytest.raises(ConfigError, match="calibration_data"):
        activation_terms(gm, cg, None, (data.test_x[:4],), {})
    with pytest.raises(ConfigError, match="ranks nothing"):
        unit_scores(gm, cg, lambda t, dim: torch.zeros(t.shape[dim]))
    with pytest.raises(ConfigError, match="calibration_data"):
        fxcompress.run(pretrained_digits_cnn(), [("prune_channels", {"importance": "activation"})],
                       data.test_x[:4], progress=False)


def test_activation_prunes_the_digits_cnn_and_keeps_it_running(digits):
    _, _, data = digits
    batches = [data.train_x[i * 64:(i + 1) * 64] for i in range(4)]
    result = fxcompress.run(pretrained_digits_cnn(), [("prune_channels", {"ratio": 0.5, "importance": "activation"})],
                            data.test_x[:4], calibration_data=batches, check="full", progress=False)
    assert result.report.rows[0].stats["removed_channels"] > 0
    assert result.model(data.test_x[:8]).shape == (8, 10)
