"""A uint8 activation computed as a 256-entry table of codes.

An elementwise activation between two quantizations (``QDQ(act(QDQ(x)))``) has 256 possible
inputs: its output codes are a table, computed once from the folded graph's own float ops
(dequantize, the activation as torch computes it, the quantization the lowering would run),
so the lowered model gives the folded graph's codes for every input code, on every CPU and in
every runtime that can index a table (ONNX ``GatherElements``: onnxruntime computes it exactly). The
models built for onnxruntime (``insert_observers(post_ops="tables")``) run SiLU, hardswish,
GELU, tanh, leaky ReLU and sigmoid this way between convs onnxruntime fuses into
``QLinearConv``, which fuses only clamps.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from fxcompress.errors import InputError
from fxcompress.oplib.arith import lookup
from fxcompress.quant.fusion import TABLE_ACTIVATIONS
from fxcompress.quant.kernels import Support
from fxcompress.quant.lowered_base import LoweredModule, check_post_op, run_op, summarize

__all__ = ["QuantTable"]


class QuantTable(LoweredModule):
    """uint8 -> uint8: ``quantize(activation(dequantize(x)))`` looked up in a table of 256 codes.

    ``table[c]`` is what the lowering's :class:`~fxcompress.quant.lowered.Dequantize` followed
    by a :class:`~fxcompress.quant.lowered.Quantize` applying ``activation`` computes for code
    ``c`` (torch's op, the folded graph's rounding), so the module equals that pair exactly;
    ``from_activation`` builds it, :meth:`rebuild_table` recomputes it after a qparams edit.
    Any shape; a channels-last 4-D input gives a channels-last output.
    """

    def __init__(self, *, activation: str = "none", activation_args: Sequence[float] = (),
                 backend: str = "x86") -> None:
        super().__init__(backend)
        self.activation = activation
        self.activation_args = check_post_op(activation, activation_args, TABLE_ACTIVATIONS)
        self.register_qparams("input")
        self.register_qparams("output")
        self.register_buffer("table", torch.arange(256, dtype=torch.uint8))

    @classmethod
    def from_activation(cls, activation: str, activation_args: Sequence[float], input_qparams: tuple[float, int],
                        output_qparams: tuple[float, int], *, backend: str = "x86") -> QuantTable:
        """The table of ``activation`` (a post-op name: ``swish``, ``hardswish``, ``gelu``, ...,
        or ``sigmoid``: :data:`~fxcompress.quant.fusion.TABLE_ACTIVATIONS`)
        from codes on ``input_qparams`` to codes on ``output_qparams``."""
        m = cls(activation=activation, activation_args=activation_args, backend=backend)
        m.set_qparams("input", *input_qparams)
        m.set_qparams("output", *output_qparams)
        m.rebuild_table()
        return m

    def rebuild_table(self) -> None:
        """Recompute ``table`` from the qparams and the activation (the reference ops)."""
        codes = torch.arange(256, dtype=torch.uint8)
        values = run_op("dequantize", codes, self.input_scale, self.input_zero_point)
        table = run_op("quantize", values, self.output_scale, self.output_zero_point, self.activation,
                       self.activation_args, "")
        with torch.no_grad():
            self.table.copy_(table)

    def config(self) -> dict[str, Any]:
        return {"activation": self.activation, "activation_args": list(self.activation_args),
                "backend": self.backend}

    def kernel_support(self, input_shape: Sequence[int]) -> Support:
        """Always: both backends run the same gather (there is no oneDNN kernel to choose)."""
        return Support(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise InputError(f"QuantTable expects uint8 activations (quantized upstream), got {x.dtype}")
        return lookup(self.table, x)

    def extra_repr(self) -> str:
        args = f"{tuple(self.activation_args)}, " if self.activation_args else ""
        return (f"activation={self.activation}, {args}bits=8, in=({summarize(self.input_scale)}, "
                f"{int(self.input_zero_point)}), out=({summarize(self.output_scale)}, {int(self.output_zero_point)}), "
                f"backend={self.backend}")

