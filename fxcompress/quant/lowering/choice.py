"""Measured choices for ``lower(only_if_faster=True)``: per layer, the fastest way to compute it here.

Each quantized conv/linear with its fused chain has up to three ways to run, all within the
arithmetic contract (:mod:`fxcompress.quant.contract`):

``int8``
    the lowered module computing the whole chain (residual ``sum`` and post-op fused).
``separate add``
    for a conv with a fused residual: the int8 conv with a float32 output, then the add
    and the activation as float ops and one quantization. Numerically the same as the
    fused ``sum`` (the residual is dequantized exactly and added with one float32
    rounding, as the kernel does), and faster where oneDNN's fused-sum kernel is slow
    (measured on Intel AMX: ~500 us a call against ~310 us plain).
``float``
    the float layer with the dequantized weight, its input dequantized and its output
    quantized where its neighbours are integer: what keeping it float really costs.

Each is timed on this CPU at the layer's traced shapes (random inputs of the right dtypes,
``torch.utils.benchmark`` medians at the caller's thread count, the ways interleaved over
:data:`ROUNDS` rounds and each keeping its best median, so a burst of load on a shared
machine does not decide for one of them); ``int8`` is kept unless
another is faster by more than :data:`MARGIN` (int8 also makes the model smaller), and
``separate add`` is preferred to ``float`` on ties for the same reason. Timings are memoised
per process by layer configuration and shape, so repeated blocks are timed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.quant.lowered import Dequantize, LoweredModule, QuantConvNd, Quantize
from fxcompress.quant.lowering.timing import best_medians

__all__ = ["MARGIN", "Candidates", "Choice", "choose"]

#: How much faster (as a fraction) another way must be for ``int8`` to be replaced.
MARGIN = 0.1
#: Interleaved timing rounds per layer; each way keeps its best median.
ROUNDS = 3
# Seconds of timing per candidate: enough for a stable median of one layer.
_MIN_RUN_TIME = 0.02
_memo: dict[str, float] = {}


@dataclass(frozen=True)
class Candidates:
    """One layer's ways to run, with what timing them needs.

    ``input_shape``/``output_shape`` are the traced shapes; ``input_qparams`` the uint8
    input's; ``output_qparams`` the uint8 output's (None: the chain ends in float);
    ``residual`` is "uint8", "float" or None; ``post_op`` the chain's activation (kernel
    name) applied by the float ways before their quantization; ``input_padding`` a zero pad
    (``F.pad`` spec) the int8 ways apply to their codes and the float way to its input.
    """

    int8: LoweredModule
    float_module: nn.Module
    separate: QuantConvNd | None
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    input_qparams: tuple[float, int]
    output_qparams: tuple[float, int] | None
    residual: str | None
    residual_qparams: tuple[float, int] | None
    post_op: str
    post_op_args: tuple[float, ...]
    input_padding: tuple[int, ...] = ()

    def key(self) -> str:
        return repr((type(self.int8).__name__, self.int8.config(), tuple(self.int8.weight.shape),
                     self.input_shape, self.output_shape, self.output_qparams is None, self.residual,
                     self.post_op, self.input_padding, torch.get_num_threads()))


@dataclass(frozen=True)
class Choice:
    """The way chosen (``"int8"``, ``"separate add"`` or ``"float"``), the times behind it
    (microseconds), and a sentence for the report."""

    way: str
    times_us: dict[str, float]

    @property
    def reason(self) -> str:
        times = ", ".join(f"{k} {v:.0f} us" for k, v in self.times_us.items())
        return f"{self.way} is fastest here ({times}; {torch.get_num_threads()} threads)"


def _codes(shape: tuple[int, ...]) -> torch.Tensor:
    codes = torch.randint(0, 256, shape, dtype=torch.uint8)
    return codes.contiguous(memory_format=torch.channels_last) if len(shape) == 4 else codes


def _floats(shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.randn(shape)
    return x.contiguous(memory_format=torch.channels_last) if len(shape) == 4 else x


def _finish(c: Candidates) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a float way does after its layer: activation and quantization (one Quantize),
    or the activation alone for a float output."""
    if c.output_qparams is not None:
        return Quantize.from_qparams(*c.output_qparams, activation=c.post_op, activation_args=c.post_op_args)
    from fxcompress.quant.uint8 import apply_post_op
    return lambda y: apply_post_op(y, c.post_op, c.post_op_args)


def _ways(c: Candidates) -> dict[str, Callable[[], Any]]:
    x = _codes(c.input_shape)
    r_float = _floats(c.output_shape) if c.residual else None
    r_codes = _codes(c.output_shape) if c.residual == "uint8" else None
    int8_args = (x,) if c.residual is None else (x, r_codes if c.residual == "uint8" else r_float)
    dequantize = Dequantize.from_qparams(*c.input_qparams)
    finish = _finish(c)
    ways: dict[str, Callable[[], Any]] = {"int8": lambda: c.int8(*int8_args)}
    if c.separate is not None:
        r_dequantize = Dequantize.from_qparams(*c.residual_qparams) if c.residual == "uint8" else None
        add_input = (lambda: r_dequantize(r_codes)) if r_dequantize is not None else (lambda: r_float)
        ways["separate add"] = lambda: finish(c.separate(x) + add_input())
    add = (lambda y: y + r_float) if c.residual else (lambda y: y)
    pad = (lambda v: F.pad(v, c.input_padding)) if c.input_padding else (lambda v: v)
    ways["float"] = lambda: finish(add(c.float_module(pad(dequantize(x)))))
    return ways


def choose(c: Candidates) -> Choice:
    """Time the candidates (memoised by configuration and shape) and pick one."""
    key = c.key()
    ways = _ways(c)
    if not all(f"{key}|{way}" in _memo for way in ways):
        timed = best_medians(ways, ROUNDS, _MIN_RUN_TIME)
        _memo.update({f"{key}|{way}": seconds for way, seconds in timed.items()})
    times = {way: _memo[f"{key}|{way}"] * 1e6 for way in ways}
    best = "int8"
    for way in ("separate add", "float"):  # in order of preference after int8
        if way in times and times[way] < (1 - MARGIN) * times[best]:
            best = way
    return Choice(best, times)
