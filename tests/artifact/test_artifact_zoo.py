"""Acceptance: every torchvision classifier round-trips bit-identically (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import fx

from fxcompress import artifact, zoo


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.list_classifiers())
def test_every_classifier_round_trips(name: str, tmp_path: Path) -> None:
    gm = fx.symbolic_trace(zoo.build(name))
    artifact.save(gm, tmp_path / "m.fxc")
    loaded = artifact.load(tmp_path / "m.fxc")
    x = zoo.example_input(name, reduced=True)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
    del gm, loaded  # the largest models hold gigabytes
