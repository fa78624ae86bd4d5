"""A BERT-style text encoder written out the way Hugging Face's ``BertModel`` is, in plain torch.

Hugging Face's ``BertModel`` does not trace symbolically and ``nn.TransformerEncoder``
does not either; this model keeps their arithmetic (embeddings + LayerNorm; per layer
separate query/key/value ``nn.Linear`` projections, ``softmax(QK^T / sqrt(d) + mask) V``
written out with ``view``/``permute``/``matmul``, output projection, residual +
LayerNorm, GELU MLP, residual + LayerNorm) in a form that does, so the dynamic and
weight-only passes can be measured on a transformer built like the ones deployed.
Weights are initialised as BERT's are (normal with std 0.02, LayerNorm 1/0, seeded);
no download is involved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["BertConfig", "BertStyleEncoder", "bert_inputs"]


@dataclass(frozen=True)
class BertConfig:
    """Sizes of the encoder; the defaults are BERT-base's."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12


class _SelfAttention(nn.Module):
    """``BertSelfAttention`` + ``BertSelfOutput``: attention, projection, residual, LayerNorm."""

    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.hidden_size // c.num_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.size()
        return x.view(b, n, self.num_heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.query(hidden)), self._heads(self.key(hidden)), self._heads(self.value(hidden))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask
        context = torch.matmul(torch.softmax(scores, dim=-1), v).permute(0, 2, 1, 3)
        b, n = hidden.size(0), hidden.size(1)
        return self.norm(self.dense(context.reshape(b, n, -1)) + hidden)


class _Layer(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.attention = _SelfAttention(c)
        self.intermediate = nn.Linear(c.hidden_size, c.intermediate_size)
        self.act = nn.GELU()
        self.output = nn.Linear(c.intermediate_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.attention(hidden, mask)
        return self.norm(self.output(self.act(self.intermediate(hidden))) + hidden)


class BertStyleEncoder(nn.Module):
    """Token ids ``(B, L)`` (and optionally a 0/1 ``attention_mask``) -> hidden states ``(B, L, H)``."""

    def __init__(self, config: BertConfig = BertConfig(), *, seed: int = 0) -> None:
        super().__init__()
        c = self.config = config
        self.word = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position = nn.Embedding(c.max_positions, c.hidden_size)
        self.token_type = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(_Layer(c) for _ in range(c.num_layers))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    m.weight.normal_(0.0, 0.02, generator=gen)
                if isinstance(m, nn.Linear):
                    m.bias.zero_()
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        hidden = self.word(input_ids) + self.position(positions) + self.token_type(torch.zeros_like(input_ids))
        hidden = self.norm(hidden)
        if attention_mask is None:
            mask = torch.zeros_like(input_ids, dtype=hidden.dtype)[:, None, None, :]
        else:  # 1 = attend, 0 = padding; as in BERT, padding gets a large negative score
            mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * -10000.0
        for layer in self.layers:
            hidden = layer(hidden, mask)
        return hidden


def bert_inputs(batch: int, length: int, config: BertConfig = BertConfig(), *, seed: int = 0) -> torch.Tensor:
    """Seeded random token ids ``(batch, length)`` (ids 1000 and up, as real word pieces are)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(min(1000, config.vocab_size - 1), config.vocab_size, (batch, length), generator=gen)
