"""Every stage of the int8 flows saves and loads bit-identically, partly lowered models included.

``fxcompress.run`` can return a graph at any stage: observed (after
``insert_observers``), calibrated, fake-quantized (QAT), folded, lowered, and
lowered only in part (a layer the int8 kernels cannot take, or one out of
scope, stays a ``FoldedLayer``).  Each one must round-trip through an artifact:
same graph, modules, state, training flags and outputs, and an observed model
must calibrate on after loading exactly as it would have without the round trip.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxcompress
from fxcompress import artifact, recipes, zoo
from fxcompress.examples import digits
from fxcompress.quant.activations import ActivationFakeQuant, ActivationObserver, QDQ
from fxcompress.quant.layers import FakeQuantLayer, FoldedLayer, ObservedLayer

from identical import assert_identical, assert_same_state

# Lowered graphs run on the portable reference backend: exact on every CPU.
STATIC = recipes.int8_static(backend="reference")
QAT = recipes.int8_qat(steps=3, lr=1e-3, backend="reference")
QAT_LEARNABLE = [("to_fake_quant", {"learnable_scale": True}) if e == "to_fake_quant" else e for e in QAT]


def _name(entry: Any) -> str:
    return entry if isinstance(entry, str) else entry[0]


def _digits_case() -> tuple[nn.Module, torch.Tensor, list]:
    data = digits.load_digits_data()
    batches = [(data.train_x[i:i + 32], data.train_y[i:i + 32]) for i in range(0, 128, 32)]
    return digits.pretrained_digits_cnn(), data.test_x[:16], batches


def _resnet_case() -> tuple[nn.Module, torch.Tensor, list]:
    x = zoo.example_input("resnet18", batch=2, reduced=True)
    gen = torch.Generator().manual_seed(1)
    batches = [(zoo.example_input("resnet18", batch=2, reduced=True, seed=s),
                torch.randint(0, 1000, (2,), generator=gen)) for s in (1, 2)]
    return zoo.build("resnet18"), x, batches


CASES = {"digits_cnn": _digits_case, "resnet18": _resnet_case}
STAGE_TYPES = {"insert_observers": ObservedLayer, "calibrate": ActivationObserver, "to_fake_quant": FakeQuantLayer,
               "finetune": ActivationFakeQuant, "fold_fake_quant": FoldedLayer}


def _round_trip(gm: fx.GraphModule, path: Path, inputs: list) -> fx.GraphModule:
    artifact.save(gm, path, overwrite=True)
    loaded = artifact.load(path)
    assert_identical(gm, loaded, inputs)
    return loaded


@pytest.mark.parametrize("recipe", ["static", "qat", "qat_learnable_scale"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_stage_round_trips(case: str, recipe: str, tmp_path: Path) -> None:
    model, x, batches = CASES[case]()
    pipeline = {"static": STATIC, "qat": QAT, "qat_learnable_scale": QAT_LEARNABLE}[recipe]
    gm: nn.Module = model
    seen = []
    for entry in pipeline:
        result = fxcompress.run(gm, [entry], x, calibration_data=batches, loss_fn=F.cross_entropy,
                                progress=False)
        gm = result.model
        name = _name(entry)
        if name in STAGE_TYPES:
            assert any(type(m) is STAGE_TYPES[name] for m in gm.modules()), name
        seen.append(name)
        artifact.save(result, tmp_path / f"{name}.fxc")
        loaded = artifact.load(tmp_path / f"{name}.fxc")
        assert_identical(gm, loaded, [(x,), (batches[0][0],)])
        if name == "to_fake_quant":  # a model saved while training keeps its flags
            _round_trip(copy.deepcopy(gm).train(), tmp_path / "train.fxc", [(x,)])
    assert "lower" in seen
