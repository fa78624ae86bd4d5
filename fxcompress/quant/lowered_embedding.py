"""A weight-only quantized embedding: the table stored in 8, 4 or 2 bits, rows gathered then dequantized.

An embedding table is often the largest tensor of a text model (all-MiniLM-L6-v2: 30522 x 384
floats, 52% of its bytes), and it multiplies nothing: a lookup copies rows. So it takes the
weight-only treatment of :class:`~fxcompress.quant.lowered_linear.WeightOnlyLinear` (the same
codes, groups, scales and zero points along the row) and a gather that unpacks only the rows
it returns (``torch.ops.fxcompress.weight_only_embedding``). The output is float32, as
``nn.Embedding``'s is.

The class registers itself with the artifact format (as every lowered module) and with
:mod:`fxcompress.macs` (one dequantizing multiply per output element, kind ``"other"``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from fxcompress import macs
from fxcompress.errors import ConfigError, InputError, LoweringError
from fxcompress.ops import tensor_shape
from fxcompress.quant.lowered_base import LoweredModule, run_op, summarize
from fxcompress.quant.qparams import pack_int, unpack_int

__all__ = ["WeightOnlyEmbedding", "quantize_rows"]


def quantize_rows(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(codes, scale, zero_point)`` of a 2-D float ``w``, per group of ``group`` columns of each row:
    8-bit symmetric absmax (int8 codes, no zero point), 4/2-bit min/max including 0 (unsigned codes
    packed along the row, uint8 zero points). The arithmetic of ``WeightOnlyLinear.from_float``."""
    n, k = w.shape
    grouped = w.detach().float().view(n, k // group, group)
    if bits == 8:
        scale = grouped.abs().amax(dim=-1).clamp_min(1e-12) / 127.0
        codes = torch.round(grouped / scale[..., None]).clamp_(-127, 127).view(n, k).to(torch.int8)
        return codes, scale, None
    qmax = (1 << bits) - 1
    lo, hi = grouped.amin(dim=-1).clamp(max=0.0), grouped.amax(dim=-1).clamp(min=0.0)
    scale = ((hi - lo) / qmax).clamp_min(1e-12)  # the range holds 0: zero is exact
    zp = torch.round(-lo / scale).clamp_(0, qmax)
    codes = (torch.round(grouped / scale[..., None]) + zp[..., None]).clamp_(0, qmax)
    return pack_int(codes.view(n, k).to(torch.uint8), bits), scale, zp.to(torch.uint8)


class WeightOnlyEmbedding(LoweredModule):
    """``nn.Embedding`` with its table in ``bits`` (8, 4 or 2) and one scale per ``group_size`` columns.

    Guarantees: ``forward(indices)`` equals ``F.embedding(indices, dequantized_weight())`` bit for
    bit (the same dequantizing arithmetic on the rows gathered); the state holds the packed codes,
    scales and zero points only.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, bits: int = 8, group_size: int | None = None,
                 padding_idx: int | None = None, backend: str = "x86") -> None:
        super().__init__(backend)
        if bits not in (8, 4, 2):
            raise ConfigError(f"weight-only embeddings support bits 8, 4 or 2, got {bits!r}")
        group = embedding_dim if group_size is None else min(int(group_size), embedding_dim)
        if group < 1 or embedding_dim % group:
            raise ConfigError(f"group_size must divide embedding_dim={embedding_dim}, got {group_size!r}")
        self.num_embeddings, self.embedding_dim, self.bits = num_embeddings, embedding_dim, bits
        self.group_size, self.padding_idx = group, padding_idx
        if bits == 8:
            self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        else:
            self.register_buffer("weight", torch.zeros(num_embeddings, -(-embedding_dim * bits // 8),
                                                       dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(num_embeddings, embedding_dim // group))
        self.register_buffer("zero_point", None if bits == 8 else
                             torch.zeros(num_embeddings, embedding_dim // group, dtype=torch.uint8))

    @classmethod
    def from_float(cls, embedding: nn.Embedding, bits: int = 8, group_size: int | None = None, *,
                   backend: str = "x86") -> WeightOnlyEmbedding:
        """Quantize ``embedding``'s table row by row (see :func:`quantize_rows`)."""
        if not isinstance(embedding, nn.Embedding):
            raise LoweringError(f"WeightOnlyEmbedding.from_float needs an nn.Embedding, got {type(embedding).__name__}")
        if embedding.max_norm is not None:
            raise LoweringError("WeightOnlyEmbedding cannot renormalise rows (max_norm): keep this embedding float")
        m = cls(embedding.num_embeddings, embedding.embedding_dim, bits=bits, group_size=group_size,
                padding_idx=embedding.padding_idx, backend=backend)
        codes, scale, zp = quantize_rows(embedding.weight, bits, m.group_size)
        m.weight.copy_(codes)
        m.scale.copy_(scale)
        if zp is not None:
            m.zero_point.copy_(zp)
        return m

    def config(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "bits": self.bits,
                "group_size": self.group_size, "padding_idx": self.padding_idx, "backend": self.backend}

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 ``(num_embeddings, embedding_dim)`` table the stored codes represent."""
        n, k, g = self.num_embeddings, self.embedding_dim, self.group_size
        if self.bits == 8:
            w = self.weight.to(torch.float32).view(n, k // g, g)
        else:
            codes = unpack_int(self.weight, self.bits, (n, k), signed=False).to(torch.float32).view(n, k // g, g)
            w = codes.sub_(self.zero_point.to(torch.float32)[..., None])
        return w.mul_(self.scale[..., None]).view(n, k)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if indices.is_floating_point() or indices.dtype == torch.bool:
            raise InputError(f"WeightOnlyEmbedding expects integer indices, got {indices.dtype}")
        return run_op("weight_only_embedding", indices, self.weight, self.scale, self.zero_point, self.bits,
                      self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}, "
                f"scale={summarize(self.scale)}, backend={self.backend}")


def _count_embedding(gm: fx.GraphModule, node: fx.Node) -> dict[str, int]:
    """One dequantizing multiply per output element (a float ``nn.Embedding`` counts none)."""
    shape = tensor_shape(node) or ()
    count = 1
    for d in shape:
        count *= d
    return {"other": count}


macs.register_module(WeightOnlyEmbedding, _count_embedding)
