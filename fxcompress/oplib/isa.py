"""Which integer arithmetic this process's oneDNN int8 kernels implement.

oneDNN picks its kernels for the best instruction set the CPU has, capped by the
environment variable ``ONEDNN_MAX_CPU_ISA`` (read once, when oneDNN first runs: a
process can lower its ISA, never raise it). The u8 x s8 dot product at the heart of the
int8 conv and linear differs between them:

* **AVX512-VNNI, AVX-VNNI, AMX** multiply and accumulate in 32 bits: exact for every
  uint8 activation and int8 weight.
* **AVX2, and AVX512 without VNNI**, multiply byte pairs (``vpmaddubsw``) and add each
  pair into a *saturating* signed 16-bit lane. With activations in [0, 255], a pair
  ``x1 * w1 + x2 * w2`` of one output channel overflows only if two same-sign weights of
  that channel sum to more than 128 in magnitude (255 * 128 = 32640 fits, 255 * 129
  does not); it then clips, and the output is wrong by up to tens of thousands of
  accumulator units (measured here: 99.97% of a 3x3 conv's outputs off with random
  full-range weights). Weights of at most 7 bits (|w| <= 64) can never overflow.

:func:`int8_arithmetic` finds out which case holds by running the kernels once on the
worst case (all activations 255, all weights 127) and comparing with the exact sum,
rather than trusting CPU flags, so a capped ISA is seen as it really runs.
:func:`pair_overflow` says whether given weights can overflow a saturating pair.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Int8Arithmetic", "int8_arithmetic", "expected_isa", "pair_overflow", "PAIR_LIMIT"]

#: The largest sum of two same-sign weight magnitudes a saturating pair always holds.
PAIR_LIMIT = 128
# oneDNN's x86 ISA names, lowest first, with the /proc/cpuinfo flags each needs.
_ISAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("SSE41", ("sse4_1",)),
    ("AVX", ("avx",)),
    ("AVX2", ("avx2",)),
    ("AVX2_VNNI", ("avx2", "avx_vnni")),
    ("AVX512_CORE", ("avx512f", "avx512bw", "avx512vl", "avx512dq")),
    ("AVX512_CORE_VNNI", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")),
    ("AVX512_CORE_BF16", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16")),
    ("AVX512_CORE_AMX", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
                         "amx_tile", "amx_int8")),
)
_CAP_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


@dataclass(frozen=True)
class Int8Arithmetic:
    """How this process's oneDNN int8 kernels compute.

    ``isa`` is the instruction set oneDNN is expected to use (CPU flags capped by
    ``ONEDNN_MAX_CPU_ISA``; informative, for reports); ``exact_products`` is measured:
    False when u8 x s8 products pass through saturating 16-bit pair sums.
    """

    isa: str
    exact_products: bool

    def describe(self) -> str:
        how = "exact 32-bit accumulation" if self.exact_products else "saturating 16-bit pair sums"
        return f"{self.isa} ({how})"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def expected_isa() -> str:
    """The oneDNN ISA name this CPU supports, capped by ``ONEDNN_MAX_CPU_ISA`` when set.

    "unknown" where the CPU flags cannot be read (not Linux) or the machine is not x86.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "unknown"
    flags = _cpu_flags()
    names = [name for name, _ in _ISAS]
    best = next((name for name, needed in reversed(_ISAS) if all(f in flags for f in needed)), None)
    if best is None:
        return "unknown"
    cap = next((os.environ[v].strip().upper() for v in _CAP_VARIABLES if os.environ.get(v)), None)
    if cap in names and names.index(cap) < names.index(best):
        return cap
    return best


def _probe_conv(channels: int, kernel: int, groups: int) -> bool:
    """One worst-case conv: all activations 255, all weights 127; is the sum exact?"""
    x = torch.full((1, channels, kernel + 2, kernel + 2), 255, dtype=torch.uint8)
    x = x.contiguous(memory_format=torch.channels_last)
    out = 16
    w = torch.full((out, channels // groups, kernel, kernel), 127, dtype=torch.int8)
    w_scale = torch.ones(out)
    geometry = ([1, 1], [0, 0], [1, 1], groups)
    packed = torch.ops.onednn.qconv_prepack(w, w_scale, 1.0, 0, *geometry, list(x.shape))
    y = torch.ops.onednn.qconv_pointwise.default(
        x, 1.0, 0, packed, w_scale, torch.zeros(out, dtype=torch.int64), None, *geometry,
        1.0, 0, torch.float32, "none", [], "")
    return bool((y == 255 * 127 * (channels // groups) * kernel * kernel).all())


def _probe_linear(features: int) -> bool:
    w = torch.full((16, features), 127, dtype=torch.int8)
    packed = torch.ops.onednn.qlinear_prepack(w, None)
    x = torch.full((2, features), 255, dtype=torch.uint8)
    y = torch.ops.onednn.qlinear_pointwise.default(
        x, 1.0, 0, packed, torch.ones(16), torch.zeros(16, dtype=torch.int64), None, 1.0, 0,
        torch.float32, "none", [], "")
    return bool((y == 255 * 127 * features).all())


@functools.lru_cache(maxsize=None)
def int8_arithmetic() -> Int8Arithmetic:
    """The measured arithmetic of this process's oneDNN int8 kernels (memoised).

    Probes a 1x1, a 3x3, a 3-channel 7x7 (a network's first conv), a depthwise conv and
    a linear, each of whose exact results fit float32; the products are exact only if
    every probe is. Call only where the oneDNN int8 ops exist (see
    :func:`fxcompress.oplib.kernels.onednn_int8_support`).
    """
    with torch.inference_mode():
        exact = (_probe_conv(64, 1, 1) and _probe_conv(64, 3, 1) and _probe_conv(3, 7, 1)
                 and _probe_conv(16, 3, 16) and _probe_linear(64))
    return Int8Arithmetic(expected_isa(), exact)


def pair_overflow(weight: torch.Tensor) -> tuple[int, int, int] | None:
    """Whether integer ``weight`` (output channels first) can overflow a saturating pair.

    None when no two same-sign weights of any output channel sum to more than
    :data:`PAIR_LIMIT` in magnitude; else ``(channel, a, b)`` for the worst channel and
    its two largest same-sign magnitudes.
    """
    rows = weight.detach().reshape(weight.shape[0], -1).to(torch.int32)
    if rows.shape[1] < 2:
        return None
    worst_value, worst = -1, None
    for side in (rows.clamp(min=0), (-rows).clamp(min=0)):
        top = side.topk(2, dim=1).values
        sums = top.sum(dim=1)
        channel = int(sums.argmax())
        if int(sums[channel]) > worst_value:
            worst_value = int(sums[channel])
            worst = (channel, int(top[channel, 0]), int(top[channel, 1]))
    return worst if worst_value > PAIR_LIMIT else None
