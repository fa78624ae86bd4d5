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
from fxcompress.pass_base import PassContext
from fxcompress.passes.calibrate import Calibrate
from fxcompress.passes.fold_fake_quant import FoldFakeQuant
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
    x = zoo.example_input("resnet18", batch=1, reduced=True)
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


# resnet18 takes 20-40 s per pipeline on 2 shared cores: `make test-all` runs it, and
# benchmarks/artifact_stages.py reports the same stages (size, save, load, equal).  The digits
# CNN holds every stage's module types and runs in the fast suite.
_SLOW = pytest.mark.slow


@pytest.mark.parametrize("case,recipe", [
    ("digits_cnn", "static"), ("digits_cnn", "qat"), ("digits_cnn", "qat_learnable_scale"),
    pytest.param("resnet18", "static", marks=_SLOW), pytest.param("resnet18", "qat", marks=_SLOW),
    pytest.param("resnet18", "qat_learnable_scale", marks=_SLOW),
])
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


class UpsamplingNet(nn.Module):
    """Convs around a ConvTranspose2d (no int8 kernel takes it), then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.up(F.relu(self.conv1(x))))
        x = self.conv3(F.relu(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _seeded_net() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UpsamplingNet().eval()


@pytest.mark.parametrize("backend", ["x86", "reference"])
@pytest.mark.parametrize("where", [{"skip": ["conv2"]}, {"scope": ["conv1", "fc"]}])
def test_partly_lowered_model_round_trips(backend: str, where: dict, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    x, batches = torch.randn(2, 3, 8, 8, generator=gen), [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(3)]
    pipeline = [("lower", {"backend": backend, **where}) if _name(e) == "lower" else e for e in recipes.int8_static()]
    result = fxcompress.run(_seeded_net(), pipeline, x, calibration_data=batches, progress=False)
    gm = result.model
    folded = sorted(p for p, m in gm.named_modules() if type(m) is FoldedLayer)
    kept = {"up", "conv2"} if "skip" in where else {"up", "conv2", "conv3"}
    assert set(folded) == kept  # the transposed conv and the layers out of scope stay folded
    assert any(type(m).__module__.startswith("fxcompress.quant.lowered") for m in gm.modules())
    artifact.save(result, tmp_path / "partial.fxc")
    loaded = artifact.load(tmp_path / "partial.fxc")
    assert_identical(gm, loaded, [(x,), (batches[0],)])
    assert all(loaded.get_submodule(p).module.weight is None for p in folded)  # integers only, still


def _observers(gm: fx.GraphModule) -> dict[str, ActivationObserver]:
    return {p: m for p, m in gm.named_modules() if isinstance(m, ActivationObserver)}


@pytest.mark.parametrize("observer", ["minmax", "histogram", "moving_average", "percentile", "mse"])
def test_observed_model_saved_mid_calibration_calibrates_on_identically(observer: str, tmp_path: Path) -> None:
    data = digits.load_digits_data()
    x = data.test_x[:4]
    first, rest = [data.train_x[i:i + 32] for i in (0, 32)], [data.train_x[i:i + 32] for i in (64, 96, 128)]
    activations = {"bits": 8, "signed": False, "symmetric": False, "observer": observer}
    observed = fxcompress.run(digits.pretrained_digits_cnn(), ["fuse_conv_bn",
                              ("insert_observers", {"activations": activations})], x, progress=False).model
    # Partly calibrated: the observers hold statistics of the first batches, no qparams yet.
    with torch.inference_mode():
        for batch in first:
            observed(batch)
    assert all(not m.calibrated and m.observer.has_data for m in _observers(observed).values())
    artifact.save(observed, tmp_path / "mid.fxc")
    loaded = artifact.load(tmp_path / "mid.fxc")
    assert_same_state(observed, loaded)
    direct = copy.deepcopy(observed)
    for gm in (direct, loaded):  # the calibrate pass itself, on the rest of the data
        Calibrate()(gm, PassContext(example_args=(x,), calibration_data=rest, progress=False))
    assert_same_state(direct, loaded)
    for path, module in _observers(direct).items():
        scale, zero_point = _observers(loaded)[path].qparams()
        assert torch.equal(scale, module.scale) and torch.equal(zero_point, module.zero_point), path
        assert scale.numel() == 1 and float(scale) > 0
    # And it folds to the same model.
    fold = [FoldFakeQuant()(gm, PassContext(example_args=(x,), progress=False)).gm for gm in (direct, loaded)]
    assert_same_state(*fold)
    assert torch.equal(fold[0](data.test_x), fold[1](data.test_x))
