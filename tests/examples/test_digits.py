"""The bundled digits example: deterministic data and training, real accuracy, traceable models."""

from __future__ import annotations

import torch
from torch import fx, nn

from fxcompress.examples import digits


def _equal_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_data_split_is_seeded_and_normalised() -> None:
    data = digits.load_digits_data(seed=0)
    assert data.train_x.shape == (1438, 1, 8, 8) and data.test_x.shape == (359, 1, 8, 8)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert set(data.train_y.tolist()) == set(range(10))
    assert abs(data.train_x.mean().item()) < 1e-5
    assert abs(data.train_x.std().item() - 1) < 1e-5
    again = digits.load_digits_data(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(data, again))
    other = digits.load_digits_data(seed=1)
    assert not torch.equal(data.test_y, other.test_y)


def test_training_is_deterministic_and_leaves_global_state_alone() -> None:
    data = digits.load_digits_data()
    torch.manual_seed(0)
    first = digits.DigitsCNN()
    second = digits.DigitsCNN()
    second.load_state_dict(first.state_dict())
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    digits.train(first, data, epochs=2, seed=3)
    digits.train(second, data, epochs=2, seed=3)
    assert _equal_state(first, second)
    assert torch.equal(rng, torch.get_rng_state())
    assert torch.get_num_threads() == threads
    assert not first.training
    third = digits.DigitsCNN()
    third.load_state_dict(second.state_dict())
    digits.train(third, data, epochs=1, seed=4)
    assert not _equal_state(second, third)


def test_pretrained_cnn_reaches_95_percent_and_is_a_fresh_copy() -> None:
    data = digits.load_digits_data()
    model = digits.pretrained_digits_cnn()
    assert digits.accuracy(model, data.test_x, data.test_y) >= 95.0
    with torch.no_grad():
        model.fc2.weight.zero_()
    assert digits.accuracy(digits.pretrained_digits_cnn(), data.test_x, data.test_y) >= 95.0


def test_pretrained_resnet_reaches_95_percent() -> None:
    data = digits.load_digits_data()
    model = digits.pretrained_digits_resnet()
    assert digits.accuracy(model, data.test_x, data.test_y) >= 95.0


def test_accuracy_restores_training_flag() -> None:
    data = digits.load_digits_data()
    model = digits.DigitsResNet().train()
    value = digits.accuracy(model, data.test_x[:50], data.test_y[:50])
    assert 0.0 <= value <= 100.0
    assert model.training


def test_models_trace_with_the_structure_passes_need() -> None:
    x = digits.load_digits_data().test_x[:4]
    for model in (digits.DigitsCNN(), digits.DigitsResNet()):
        gm = fx.symbolic_trace(model.eval())
        kinds = {type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
        assert {nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Linear} <= kinds
        adds = [n for n in gm.graph.nodes if "add" in str(n.target)]
        assert adds, "a residual add"
        torch.testing.assert_close(gm(x), model(x))
