"""Each quantization module round-trips exactly: every observer, every weight spec, every stage.

Observers must come back with their exact state, so a loaded observer goes on
calibrating to the same qparams; layer wrappers with every weight spec
(8/6/4/2 bits, signed or not, per tensor/channel/group, packed storage) must
come back with the same state and outputs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import fx, nn

from fxcompress import artifact
from fxcompress.quant import QuantSpec, make_observer
from fxcompress.quant.activations import QDQ, ActivationFakeQuant, ActivationObserver
from fxcompress.quant.fake_quant import FakeQuantize
from fxcompress.quant.layers import FakeQuantLayer, FoldedLayer, ObservedLayer

from conftest import realistic
from identical import assert_identical, assert_same_state


def _graph(modules: dict[str, nn.Module], n_inputs: int = 1) -> fx.GraphModule:
    """A graph calling each module on the same inputs, returning their outputs as a tuple."""
    graph = fx.Graph()
    xs = [graph.placeholder(f"x{i}") for i in range(n_inputs)]
    graph.output(tuple(graph.call_module(name, tuple(xs)) for name in modules))
    return fx.GraphModule(modules, graph)


def _round_trip(gm: fx.GraphModule, path: Path) -> fx.GraphModule:
    artifact.save(gm, path, overwrite=True)
    return artifact.load(path)


def _batches(seed: int, n: int, channels_last: bool = False) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(2, 8, 4, 4, generator=gen) * (1 + i) + 0.3 * i for i in range(n)]
    return [x.to(memory_format=torch.channels_last) for x in out] if channels_last else out


# -- observers -------------------------------------------------------------------------------

OBSERVER_SPECS: dict[str, QuantSpec] = {
    "minmax_tensor": QuantSpec(bits=8, signed=False, symmetric=False, observer="minmax"),
    "minmax_channel": QuantSpec(granularity="per_channel", axis=1, observer="minmax"),
    "minmax_group": QuantSpec(bits=4, granularity="per_group", axis=1, group_size=4, observer="minmax"),
    "moving_average_tensor": QuantSpec(signed=False, symmetric=False, observer="moving_average",
                                       averaging_constant=0.3),
    "moving_average_channel": QuantSpec(granularity="per_channel", axis=1, observer="moving_average"),
    "histogram": QuantSpec(signed=False, symmetric=False, observer="histogram", bins=256),
    "percentile": QuantSpec(signed=False, symmetric=False, observer="percentile", percentile=99.0, bins=128),
    "mse_tensor": QuantSpec(observer="mse", bins=512),
    "mse_channel": QuantSpec(granularity="per_channel", axis=1, observer="mse"),
    "mse_group": QuantSpec(granularity="per_group", axis=1, group_size=4, observer="mse"),
}


def _observer(name: str, fixed: bool) -> ActivationObserver:
    observer = make_observer(OBSERVER_SPECS[name], where=f"node_{name}")
    if fixed:
        observer.fix_range(-2.0, 5.0)
    return ActivationObserver(observer)


def _cases() -> list[Any]:
    cases = [pytest.param(n, False, id=n) for n in OBSERVER_SPECS]
    return cases + [pytest.param(n, True, id=f"{n}_fixed_range") for n in ("histogram", "percentile", "mse_tensor")]


@pytest.mark.parametrize("seen", [0, 2])
@pytest.mark.parametrize("name,fixed", _cases())
def test_observer_round_trips_and_calibrates_on_identically(name: str, fixed: bool, seen: int,
                                                            tmp_path: Path) -> None:
    module = _observer(name, fixed)
    with torch.inference_mode():  # as the calibrate pass observes
        for x in _batches(0, seen, channels_last=name == "histogram"):
            module(x)
    gm = _graph({"obs": module})
    loaded = _round_trip(gm, tmp_path / "obs.fxc")
    theirs = loaded.get_submodule("obs")
    assert type(theirs.observer) is type(module.observer)
    assert theirs.where == module.where and theirs.spec == module.spec
    assert_same_state(gm, loaded)
    # Calibrating on: more batches (one reaching beyond the range so far), then the qparams.
    more = _batches(1, 3)
    more[1] = more[1] * 4
    direct = copy.deepcopy(gm)
    for model in (direct, loaded):
        with torch.inference_mode():
            for x in more:
                model(x)
        model.get_submodule("obs").finalize()
    assert_same_state(direct, loaded)
    scale, zero_point = loaded.get_submodule("obs").qparams()
    assert torch.equal(scale, direct.get_submodule("obs").scale)
    assert torch.equal(zero_point, direct.get_submodule("obs").zero_point)
    # A calibrated observer round-trips as well.
    assert_identical(direct, _round_trip(direct, tmp_path / "calibrated.fxc"), [(more[0],)])


@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("observing", [False, True])
def test_activation_fake_quant_round_trips_mid_training(observing: bool, learnable: bool, tmp_path: Path) -> None:
    observer = make_observer(OBSERVER_SPECS["moving_average_tensor"], where="relu")
    with torch.inference_mode():
        observer(_batches(0, 1)[0])
    fake_quant = FakeQuantize.from_observer(observer, learnable=learnable, observe=observing)
    gm = _graph({"fq": ActivationFakeQuant(fake_quant)}).train()
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.01) if learnable else None
    before = fake_quant.scale.detach().clone()
    for x in _batches(1, 2):  # a few training steps: the scale moves (learnt or observed)
        out = gm(x.requires_grad_())[0]
        if optimizer is not None:
            optimizer.zero_grad()
            (out - x.detach()).square().mean().backward()
            optimizer.step()
    assert not torch.equal(fake_quant.scale.detach(), before) or not (observing or learnable)
    loaded = _round_trip(gm, tmp_path / "fq.fxc")
    theirs = loaded.get_submodule("fq").fake_quant
    assert (theirs.learnable, theirs.observer_enabled, theirs.fake_quant_enabled) == (learnable, observing, True)
    assert isinstance(theirs.scale, nn.Parameter) == learnable
    assert loaded.training and loaded.get_submodule("fq").training
    assert_identical(gm, loaded, [(x,) for x in _batches(2, 2)])


def test_qdq_round_trips(tmp_path: Path) -> None:
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    qdq = QDQ(spec, torch.tensor(0.05), torch.tensor(131, dtype=torch.int32), where="add_3")
    gm = _graph({"qdq": qdq})
    loaded = _round_trip(gm, tmp_path / "qdq.fxc")
    assert loaded.get_submodule("qdq").where == "add_3" and loaded.get_submodule("qdq").spec == spec
    assert_identical(gm, loaded, [(x,) for x in _batches(0, 2)])


# -- layer wrappers with every weight spec ---------------------------------------------------

WEIGHT_SPECS: dict[str, QuantSpec] = {
    "int8_tensor": QuantSpec(granularity="per_tensor"),
    "int8_channel": QuantSpec(granularity="per_channel"),
    "int8_group": QuantSpec(granularity="per_group", group_size=4),
    "uint8_affine_channel": QuantSpec(signed=False, symmetric=False, granularity="per_channel"),
    "int6_affine_channel": QuantSpec(bits=6, symmetric=False, granularity="per_channel", observer="mse"),
    "int4_tensor": QuantSpec(bits=4, granularity="per_tensor", observer="moving_average"),
    "int4_channel": QuantSpec(bits=4, granularity="per_channel"),
    "uint4_affine_group": QuantSpec(bits=4, signed=False, symmetric=False, granularity="per_group", group_size=4),
    "int2_channel": QuantSpec(bits=2, granularity="per_channel", observer="mse"),
    "uint2_affine_group": QuantSpec(bits=2, signed=False, symmetric=False, granularity="per_group", group_size=4),
}
# Each layer with an input; every weight has a multiple of 4 values per output channel.
LAYERS: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], torch.Tensor]]] = {
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), lambda g: torch.randn(2, 4, 5, 5, generator=g)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 2, bias=False), lambda g: torch.randn(2, 4, 7, generator=g)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 6, 2, stride=2), lambda g: torch.randn(1, 4, 3, 3, generator=g)),
    "linear": (lambda: nn.Linear(8, 5), lambda g: torch.randn(3, 8, generator=g)),
    "embedding": (lambda: nn.Embedding(10, 8, padding_idx=0), lambda g: torch.randint(0, 10, (2, 5), generator=g)),
}


def _stages(layer: str, spec: QuantSpec, learnable: bool) -> dict[str, nn.Module]:
    factory, _ = LAYERS[layer]
    observed = ObservedLayer(realistic(factory(), seed=1), make_observer(spec, where=layer))
    fake_quant = FakeQuantLayer.from_observed(copy.deepcopy(observed), learnable_scale=learnable)
    folded = FoldedLayer.fold(copy.deepcopy(observed))
    return {"observed": observed, "fake_quant": fake_quant, "folded": folded}


@pytest.mark.parametrize("spec_name", sorted(WEIGHT_SPECS))
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layer_wrappers_round_trip_with_every_weight_spec(layer: str, spec_name: str, tmp_path: Path) -> None:
    spec = WEIGHT_SPECS[spec_name]
    gm = _graph(_stages(layer, spec, learnable=spec.bits == 4))
    loaded = _round_trip(gm, tmp_path / "layers.fxc")
    folded = loaded.get_submodule("folded")
    assert folded.packed == (spec.bits in (2, 4)) and folded.module.weight is None
    assert torch.equal(folded.int_weight(), gm.get_submodule("folded").int_weight())
    gen = torch.Generator().manual_seed(3)
    assert_identical(gm, loaded, [(LAYERS[layer][1](gen),) for _ in range(2)])


@pytest.mark.parametrize("layer", ["conv2d", "conv1d", "linear"])
def test_folded_layer_with_input_scale_round_trips_on_its_integer_path(layer: str, tmp_path: Path) -> None:
    folded = _stages(layer, WEIGHT_SPECS["int8_channel"], learnable=False)["folded"]
    folded.set_input_scale(0.0625)
    assert folded.integer_exact
    gm = _graph({"folded": folded})
    loaded = _round_trip(gm, tmp_path / "exact.fxc")
    assert torch.equal(loaded.get_submodule("folded").input_scale, torch.tensor(0.0625))
    gen = torch.Generator().manual_seed(4)
    on_grid = torch.round(LAYERS[layer][1](gen) * 16) / 16  # input codes: the integer path runs
    assert_identical(gm, loaded, [(on_grid,)])
