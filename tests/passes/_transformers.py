"""Small transformer models for the dynamic / weight-only / cast tests (real architectures, tiny sizes)."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from fxcompress.examples.bert import BertConfig, BertStyleEncoder, bert_inputs

__all__ = ["SMALL_BERT", "small_bert", "small_vit", "vit_input"]

SMALL_BERT = BertConfig(vocab_size=800, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256,
                        max_positions=64)


def small_bert() -> tuple[nn.Module, torch.Tensor]:
    """A 2-layer BERT-style encoder and a batch of token ids."""
    return BertStyleEncoder(SMALL_BERT, seed=1), bert_inputs(2, 24, SMALL_BERT, seed=2)


def small_vit(seed: int = 0) -> nn.Module:
    """torchvision's VisionTransformer at a tiny size, its zero-initialised head re-drawn."""
    gen = torch.Generator().manual_seed(seed)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=128, mlp_dim=256, num_classes=16)
    with torch.no_grad():
        for p in model.parameters():  # torchvision leaves biases, head and class token at 0
            if not p.any():
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def vit_input(batch: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
