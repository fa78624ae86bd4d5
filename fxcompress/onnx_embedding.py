"""The ONNX form of a weight-only embedding table (:class:`~fxcompress.quant.lowered_embedding.WeightOnlyEmbedding`).

The table stays in the file as its stored codes (int8 rows, or 4/2-bit codes packed in
uint8 bytes) with one float32 scale (and, below 8 bits, one uint8 zero point) per row and
group of columns. A lookup is written as standard operators on the gathered rows only, as
fxcompress's own kernel computes it: ``Gather`` of the code rows and of their scales (and
zero points), ``Cast`` to float32, the unpacking of packed codes (``Mul`` by powers of two,
``Floor``, ``Sub``: exact on byte values), ``Sub`` of the zero point, ``Mul`` by the scale. Each output value is therefore
``(code - zero_point) * scale`` in float32, one rounding, as
:func:`fxcompress.oplib.impl.weight_only_embedding` computes it: onnxruntime's output equals
ours bit for bit (tests/test_onnx_transformers.py).

Why not ``DequantizeLinear`` on the table: its per-axis form takes one 1-D scale for the
whole constant, so it would dequantize the whole table on every call, and its blocked form
(per-group scales) needs opset 21, above the opset 18 torch's exporter writes by default.
The ``Gather`` form touches only the rows looked up and runs at opset 18.
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
        # Unpacking in float32, exact for byte values: code i of a byte b is
        # floor(b / 2**(i * bits)) mod 2**bits, with powers of two only (no rounding anywhere).
        per = 8 // m.bits
        self.register_buffer("down", torch.tensor([2.0 ** (-i * m.bits) for i in range(per)]))
        self.register_buffer("modulus", torch.tensor(float(1 << m.bits)))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(indices, self.weight)  # Gather: (..., stored bytes)
        if self.bits == 8:
            codes = rows.float()
        else:
            shifted = torch.floor(rows.float().unsqueeze(-1) * self.down)
            codes = shifted - torch.floor(shifted / self.modulus) * self.modulus
            codes = codes.flatten(-2)[..., : self.embedding_dim]
        codes = codes.unflatten(-1, (self.groups, self.embedding_dim // self.groups))
        if self.zero_point is not None:
            codes = codes - F.embedding(indices, self.zero_point).float().unsqueeze(-1)
        return (codes * F.embedding(indices, self.scale).unsqueeze(-1)).flatten(-2)
