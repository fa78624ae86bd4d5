"""Fixtures for the artifact tests: small real models, their artifacts, a key pair."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import fx, nn

from fxcompress import artifact, zoo


def realistic(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded non-degenerate weights for small hand-built torchvision models (eval mode)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.2)
    return model.eval()


@pytest.fixture(scope="session")
def mlp() -> fx.GraphModule:
    """torchvision's MLP block, tiny: a few hundred parameters, an artifact of a few kB."""
    model = torchvision.ops.MLP(6, [8, 4], norm_layer=nn.LayerNorm, dropout=0.1)
    return fx.symbolic_trace(realistic(model))


@pytest.fixture(scope="session")
def mobilenet() -> fx.GraphModule:
    """mobilenet_v3_small with the zoo's realistic weights, traced."""
    return fx.symbolic_trace(zoo.build("mobilenet_v3_small"))


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(private, public) PEM paths of a fresh Ed25519 key pair."""
    d = tmp_path_factory.mktemp("keys")
    artifact.generate_keypair(d / "private.pem", d / "public.pem")
    return d / "private.pem", d / "public.pem"


@pytest.fixture(scope="session")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A second, unrelated key pair."""
    d = tmp_path_factory.mktemp("other_keys")
    artifact.generate_keypair(d / "private.pem", d / "public.pem")
    return d / "private.pem", d / "public.pem"
