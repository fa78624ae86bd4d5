"""The ONNX form of a weight-only embedding table (:class:`~fxcompress.quant.lowered_embedding.WeightOnlyEmbedding`).

The table stays in the file as its stored codes (int8 rows, or 4/2-bit codes packed in
uint8 bytes) with one float32 scale (and, below 8 bits, one uint8 zero point) per row and
group of columns. A lookup is written as standard operators on the gathered rows only, as
fxcompress's own kernel computes it: ``Gather`` of the code rows and of their scales (and
zero points), the unpacking of packed codes (``BitShift`` / ``BitwiseAnd`` on uint8), ``Cast``
to float32, ``Sub`` of the zero point, ``Mul`` by the scale. Each output value is therefore
``(code - zero_point) * scale`` in float32, one rounding, as
:func:`fxcompress.oplib.impl.weight_only_embedding` computes it: onnxruntime's output equals
ours bit for bit (tests/test_onnx_transformers.py).

Why not ``DequantizeLinear``: its per-axis form takes one 1-D scale per axis of a constant,
so it would dequantize the whole table on every call (onnxruntime does not fold it); its
blocked form (opset 21) has no int2 type and is not in the opset torch's exporter writes by
default. The ``Gather`` form touches only the rows looked up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.quant.lowered_embedding import WeightOnlyEmbedding

__all__ = ["OnnxWeightOnlyEmbedding"]


class OnnxWeightOnlyEmbedding(nn.Module):
    """``Gather`` of the code rows, their per-group scales (and zero points), unpack, dequantize."""

    def __init__(self, m: WeightOnlyEmbedding) -> None:
        super().__init__()
        self.bits, self.embedding_dim = m.bits, m.embedding_dim
        self.groups = m.scale.shape[1]
        self.register_buffer("weight", m.weight.detach().clone())
        self.register_buffer("scale", m.scale.detach().float().clone())
        self.register_buffer("zero_point", None if m.zero_point is None else m.zero_point.detach().clone())
        per = 8 // m.bits
        # uint8 shifts and mask: ONNX BitShift and BitwiseAnd take uint8 as they are.
        self.register_buffer("shifts", (torch.arange(per, dtype=torch.uint8) * m.bits))
        self.register_buffer("mask", torch.tensor((1 << m.bits) - 1, dtype=torch.uint8))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(indices, self.weight)  # Gather: (..., stored bytes)
        if self.bits == 8:
            codes = rows.float()
        else:
            codes = torch.bitwise_and(torch.bitwise_right_shift(rows.unsqueeze(-1), self.shifts), self.mask)
            codes = codes.flatten(-2)[..., : self.embedding_dim].float()
        codes = codes.unflatten(-1, (self.groups, self.embedding_dim // self.groups))
        if self.zero_point is not None:
            codes = codes - F.embedding(indices, self.zero_point).float().unsqueeze(-1)
        return (codes * F.embedding(indices, self.scale).unsqueeze(-1)).flatten(-2)
