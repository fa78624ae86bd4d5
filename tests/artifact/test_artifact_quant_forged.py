"""A damaged or forged config of a quantization module raises ArtifactError naming it, never a bare error.

``forge`` rewrites graph.json and recomputes every hash (what an attacker
without the key can do), so the integrity layer lets the edit through and the
module codecs are what is tested.  Saving refuses, before writing, a module
that would not come back the same.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import fx, nn

from fxcompress import artifact
from fxcompress.artifact import values
from fxcompress.errors import ArtifactError
from fxcompress.quant import QuantSpec, make_observer
from fxcompress.quant.activations import QDQ, ActivationObserver
from fxcompress.quant.layers import FakeQuantLayer, FoldedLayer, ObservedLayer

from artifact_forge import forge
from conftest import realistic


def _observed(module: nn.Module, spec: QuantSpec) -> ObservedLayer:
    return ObservedLayer(realistic(module, seed=2), make_observer(spec))


def _model() -> fx.GraphModule:
    """One module of each kind side by side, each fed the same input."""
    act = ActivationObserver(make_observer(QuantSpec(signed=False, symmetric=False, observer="histogram", bins=256)))
    with torch.inference_mode():
        act(torch.randn(2, 8))
    act.finalize()
    modules = {
        "folded4": FoldedLayer.fold(_observed(nn.Linear(8, 6), QuantSpec(bits=4, granularity="per_channel"))),
        "folded8": FoldedLayer.fold(_observed(nn.Linear(8, 5), QuantSpec(granularity="per_channel"))),
        "observed": _observed(nn.Linear(8, 3), QuantSpec(granularity="per_channel")),
        "fake_quant": FakeQuantLayer.from_observed(_observed(nn.Linear(8, 4), QuantSpec(granularity="per_channel")),
                                                   learnable_scale=True),
        "act": act,
        "qdq": QDQ(QuantSpec(signed=False, symmetric=False), torch.tensor(0.1), torch.tensor(200, dtype=torch.int32)),
    }
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(tuple(graph.call_module(name, (x,)) for name in modules))
    return fx.GraphModule(modules, graph)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("quant") / "good.fxc"
    artifact.save(_model(), path)
    return path


def _spec(change: dict) -> Callable[[dict], None]:
    return lambda config: config["spec"].update(change)


def _set(*keys: str, value: Any) -> Callable[[dict], None]:
    def edit(config: dict) -> None:
        for key in keys[:-1]:
            config = config[key]
        config[keys[-1]] = value
    return edit


def _drop(key: str) -> Callable[[dict], None]:
    return lambda config: config.pop(key)


def _observer_spec(change: dict) -> Callable[[dict], None]:
    return lambda config: config["weight_observer"]["config"]["spec"].update(change)


CONV_DESC = {"type": "torch.nn.Conv2d", "config": {"in_channels": 8, "out_channels": 3, "kernel_size": (1, 1)}}
# (module, edit of its config, what the error says)
FORGERIES: dict[str, tuple[str, Callable[[dict], None], str]] = {
    "packed_weight_read_as_8_bit": ("folded4", _spec({"bits": 8}), "weight has shape"),
    "4_bit_packing_read_as_2_bit": ("folded4", _spec({"bits": 2}), "packed weight"),
    "8_bit_weight_read_as_4_bit": ("folded8", _spec({"bits": 4}), "stored packed"),
    "8_bit_values_outside_3_bits": ("folded8", _spec({"bits": 3}), "outside the"),
    "signed_weight_read_as_unsigned": ("folded8", _spec({"signed": False}), "dtype torch.int8"),
    "per_channel_scales_read_per_tensor": ("folded8", _spec({"granularity": "per_tensor"}), "qparams have shape"),
    "invalid_spec": ("folded8", _spec({"bits": 9}), "QuantSpec.bits"),
    "unknown_spec_field": ("folded8", _spec({"colour": "red"}), "no field"),
    "spec_not_a_dict": ("folded8", _set("spec", value=(8, True)), "stored as a dict"),
    "layer_shape_differs_from_weight": ("folded8", _set("module", "config", "out_features", value=7), "shape"),
    "layer_of_another_kind": ("folded8", _set("module", value={"type": "torch.nn.ReLU", "config": {}}), "tensors"),
    "layer_type_not_registered": ("folded8", _set("module", "type", value="os.system"), "not registered"),
    "layer_description_not_a_dict": ("folded8", _set("module", value=3), "has no type"),
    "layer_description_extra_key": ("folded8", _set("module", "code", value="x"), "has keys"),
    "config_key_missing": ("folded8", _drop("spec"), "config keys"),
    "observer_state_of_another_granularity": ("observed", _observer_spec({"granularity": "per_tensor"}),
                                              "one value per qparam"),
    "observer_of_another_kind": ("observed", _set("weight_observer", "type",
                                                  value="fxcompress.quant.observers.MovingAverageMinMaxObserver"),
                                 "expected 'moving_average'"),
    "observer_replaced_by_a_conv": ("observed", _set("weight_observer", value=CONV_DESC), "Conv2d expects tensors"),
    "histogram_bins_differ_from_state": ("act", _set("observer", "config", "spec", "bins", value=128), "shape"),
    "flag_not_a_bool": ("fake_quant", _set("weight_fake_quant", "config", "learnable", value="yes"),
                        "True or False"),
    "learnable_scale_read_as_a_buffer": ("fake_quant", _set("weight_fake_quant", "config", "learnable", value=False),
                                         "must be a buffer"),
    "qdq_read_per_channel": ("qdq", _spec({"granularity": "per_channel"}), "do not fit per_channel"),
    "qdq_zero_point_outside_signed_range": ("qdq", _spec({"signed": True}), r"outside \[-128, 127\]"),
    "where_not_a_string": ("qdq", _set("where", value=3), "must be a string"),
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_config_raises_artifact_error_naming_the_module(name: str, good: Path, tmp_path: Path) -> None:
    target, edit, message = FORGERIES[name]

    def graph(doc: dict) -> None:
        desc = doc["modules"][target]
        config = values.decode(desc["config"], "test")
        edit(config)
        desc["config"] = values.encode(config, "test")

    path = tmp_path / "forged.fxc"
    shutil.copy(good, path)
    forge(path, graph=graph)
    with pytest.raises(ArtifactError, match=message) as caught:
        artifact.load(path)
    assert type(caught.value) is ArtifactError
    assert repr(target) in str(caught.value) or f"'{target}." in str(caught.value)


def test_the_unforged_artifact_loads(good: Path) -> None:
    x = torch.randn(3, 8)
    assert all(torch.equal(a, b) for a, b in zip(artifact.load(good)(x), _model()(x)))


def test_save_refuses_a_module_that_would_not_come_back_the_same(tmp_path: Path) -> None:
    gm = _model()
    with_note = copy.deepcopy(gm)
    with_note.get_submodule("folded8").note = "set after folding"  # state the codec does not store
    with pytest.raises(ArtifactError, match=r"'folded8'.*attribute 'note'"):
        artifact.save(with_note, tmp_path / "m.fxc")
    with_weight = copy.deepcopy(gm)
    with_weight.get_submodule("folded8").module.weight = nn.Parameter(torch.zeros(5, 8))
    with pytest.raises(ArtifactError, match=r"'folded8.module'.*no tensor 'weight'"):
        artifact.save(with_weight, tmp_path / "m.fxc")
    hooked = copy.deepcopy(gm)
    hooked.get_submodule("observed").weight_observer.register_forward_hook(lambda *a: None)
    with pytest.raises(ArtifactError, match="'observed.weight_observer' has hooks"):
        artifact.save(hooked, tmp_path / "m.fxc")
    assert not list(tmp_path.iterdir())  # nothing written
