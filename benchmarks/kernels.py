"""Micro-benchmark of fxcompress's integer kernels against torch.ao and float (fp32, bf16).

Prints tables (medians from ``torch.utils.benchmark``, microseconds per call; each
candidate is timed in several interleaved rounds and the best median is kept, because
shared machines are noisy):

1. static int8 conv layers of resnet/mobilenet: ``QuantConv2d`` vs torch.ao's quantized
   conv (the peer; torch.ao appears only in benchmarks) vs fp32 vs bf16 convs;
2. uint8 ops between convs: max pool, global average pool, residual add;
3. dynamic int8 linear: per token (int8 rows, oneDNN qlinear) vs per tensor (oneDNN qlinear);
4. weight-only linear: int4/int8 kernels and the dequantize reference vs fp32/bf16;
5. activation quantize/dequantize.

Usage: ``python benchmarks/kernels.py [--threads 1] [--quick]``.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.benchmark as tb
from tabulate import tabulate
from torch import nn

from fxcompress.quant.lowered import (
    DynamicQuantLinear, QuantAdaptiveAvgPool2d, QuantAdd, QuantConv2d, QuantMaxPool2d,
    WeightOnlyLinear,
)
from fxcompress.quant.kernels import int4pack_mm, int4pack_scales_and_zeros, int4pack_weight, int8pack_mm
from fxcompress.quant.qparams import unpack_int
from fxcompress.quant.uint8 import dequantize_uint8, max_pool2d_uint8, quantize_uint8

warnings.filterwarnings("ignore")  # torch.ao's quantized-dtype deprecation warnings

# (name, in, out, kernel, stride, groups, H): layers of resnet18/50 and mobilenet_v2.
CONV_SHAPES = [
    ("r18 stem 7x7 s2", 3, 64, 7, 2, 1, 224),
    ("r18 layer1 3x3", 64, 64, 3, 1, 1, 56),
    ("r18 layer3 3x3", 256, 256, 3, 1, 1, 14),
    ("r18 layer4 3x3", 512, 512, 3, 1, 1, 7),
    ("r50 1x1 expand", 64, 256, 1, 1, 1, 56),
    ("mbv2 dw 3x3 s2", 144, 144, 3, 2, 144, 56),
    ("mbv2 1x1 project", 960, 160, 1, 1, 1, 7),
]
LINEAR_SHAPES = [(768, 3072), (3072, 768)]


class Timing:
    """Best-of-rounds median timing of several candidates, interleaved round by round."""

    def __init__(self, rounds: int, min_run_time: float) -> None:
        self.rounds, self.min_run_time = rounds, min_run_time

    def __call__(self, fns: dict[str, Callable[[], object]]) -> dict[str, float]:
        best = {name: float("inf") for name in fns}
        for _ in range(self.rounds):
            for name, fn in fns.items():
                fn()  # warm-up: packing, caches
                t = tb.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=self.min_run_time)
                best[name] = min(best[name], t.median * 1e6)
        return best


def _ao_conv(conv: nn.Conv2d, w_scale: torch.Tensor, x_scale: float, x_zp: int,
             out_scale: float, out_zp: int, relu: bool) -> nn.Module:
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq

    cls = nniq.ConvReLU2d if relu else nnq.Conv2d
    m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, groups=conv.groups)
    qw = torch.quantize_per_channel(conv.weight.detach(), w_scale.double(),
                                    torch.zeros(conv.out_channels, dtype=torch.long), 0, torch.qint8)
    m.set_weight_bias(qw, conv.bias.detach())
    m.scale, m.zero_point = out_scale, out_zp
    return m


def bench_convs(timing: Timing, batches: list[int]) -> list[list[object]]:
    torch.backends.quantized.engine = "x86"
    rows = []
    for batch in batches:
        for name, cin, cout, k, stride, groups, h in CONV_SHAPES:
            conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups).eval()
            w_scale = conv.weight.detach().abs().amax(dim=(1, 2, 3)) / 127
            x = torch.randn(batch, cin, h, h).relu_().contiguous(memory_format=torch.channels_last)
            xs, xzp, os_, ozp = float(x.max()) / 255, 0, 0.02, 0
            ours = QuantConv2d.from_float(conv, w_scale, xs, xzp, os_, ozp, post_op="relu")
            qx = quantize_uint8(x, xs, xzp)
            ao = _ao_conv(conv, w_scale, xs, xzp, os_, ozp, relu=True)
            ao_x = torch.quantize_per_tensor(x, xs, xzp, torch.quint8)
            conv_cl = conv.to(memory_format=torch.channels_last)
            conv_bf = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups).eval().bfloat16().to(
                memory_format=torch.channels_last)
            x_bf = x.bfloat16()
            with torch.no_grad():
                t = timing({"ours": lambda: ours(qx), "torch.ao": lambda: ao(ao_x),
                            "fp32": lambda: F.relu(conv_cl(x)), "bf16": lambda: F.relu(conv_bf(x_bf))})
            rows.append([batch, name, t["ours"], t["torch.ao"], t["ours"] / t["torch.ao"], t["fp32"],
                         t["bf16"], t["fp32"] / t["ours"]])
    return rows


def bench_between(timing: Timing, batches: list[int]) -> list[list[object]]:
    rows = []
    for batch in batches:
        x = torch.randint(0, 256, (batch, 64, 112, 112), dtype=torch.uint8).contiguous(
            memory_format=torch.channels_last)
        ao_x = torch._make_per_tensor_quantized_tensor(x, 0.05, 10)
        pool = QuantMaxPool2d(3, 2, 1)
        t = timing({
            "ours (quantized::max_pool2d)": lambda: pool(x),
            "k*k torch.maximum views": lambda: max_pool2d_uint8(x, (3, 3), (2, 2), (1, 1), use_kernel=False),
            "aten uint8 max_pool2d (NCHW)": lambda: F.max_pool2d(x.contiguous(), 3, 2, 1),
            "torch.ao": lambda: F.max_pool2d(ao_x, 3, 2, 1)})
        rows += [[batch, "max_pool 3x3 s2, 64x112x112", k, v] for k, v in t.items()]

        for c, h in ((512, 7), (1280, 7), (2048, 7)):
            x = torch.randint(0, 256, (batch, c, h, h), dtype=torch.uint8).contiguous(
                memory_format=torch.channels_last)
            ao_x = torch._make_per_tensor_quantized_tensor(x, 0.05, 10)
            gap = QuantAdaptiveAvgPool2d.from_float(nn.AdaptiveAvgPool2d(1), 0.05, 10, 0.04, 5)
            ref = QuantAdaptiveAvgPool2d(1, backend="reference")
            ref.load_state_dict(gap.state_dict())
            t = timing({"ours (depthwise conv)": lambda: gap(x), "reference (float round trip)": lambda: ref(x),
                        "torch.ao": lambda: F.adaptive_avg_pool2d(ao_x, 1)})
            rows += [[batch, f"global avg pool {c}x{h}x{h}", k, v] for k, v in t.items()]

        for c, h in ((64, 56), (256, 14), (24, 56)):
            a, b = (torch.randint(0, 256, (batch, c, h, h), dtype=torch.uint8).contiguous(
                memory_format=torch.channels_last) for _ in range(2))
            add = QuantAdd.from_qparams((0.05, 120), (0.07, 130), (0.1, 128))
            ref = QuantAdd(backend="reference")
            ref.load_state_dict(add.state_dict())
            qa, qb = (torch._make_per_tensor_quantized_tensor(t_, 0.05, 120) for t_ in (a, b))
            t = timing({"ours (depthwise conv + sum)": lambda: add(a, b),
                        "reference (float round trip)": lambda: ref(a, b),
                        "torch.ao": lambda: torch.ops.quantized.add(qa, qb, 0.1, 128)})
            rows += [[batch, f"add {c}x{h}x{h}", k, v] for k, v in t.items()]
    return rows


def bench_dynamic(timing: Timing, row_counts: list[int]) -> list[list[object]]:
    rows = []
    for k, n in LINEAR_SHAPES:
        lin = nn.Linear(k, n).eval()
        tok = DynamicQuantLinear.from_float(lin, granularity="per_token")
        ten = DynamicQuantLinear.from_float(lin, granularity="per_tensor")
        lin_bf = nn.Linear(k, n).eval().bfloat16()
        for m in row_counts:
            x = torch.randn(m, k)
            x_bf = x.bfloat16()
            with torch.no_grad():
                t = timing({"per_token": lambda: tok(x), "per_tensor": lambda: ten(x),
                            "fp32": lambda: lin(x), "bf16": lambda: lin_bf(x_bf)})
            rows.append([f"[{m},{k}]x[{k},{n}]", t["per_token"], t["per_tensor"], t["fp32"], t["bf16"]])
    return rows


def bench_weight_only(timing: Timing, row_counts: list[int]) -> list[list[object]]:
    """Kernels called directly (whatever the module's row limit) vs the dequantize reference."""
    rows = []
    for k, n in LINEAR_SHAPES:
        lin = nn.Linear(k, n, bias=False).eval()
        lin_bf = nn.Linear(k, n, bias=False).eval().bfloat16()
        w4 = WeightOnlyLinear.from_float(lin, 4, 128, backend="reference")
        w4_uncached = WeightOnlyLinear.from_float(lin, 4, 128, cache_dequantized=False,
                                                  backend="reference")
        w8 = WeightOnlyLinear.from_float(lin, 8, None, backend="reference")
        packed4 = int4pack_weight(unpack_int(w4.weight, 4, (n, k), signed=False))
        sz4 = int4pack_scales_and_zeros(w4.scale, w4.zero_point)
        s8 = w8.scale[:, 0].bfloat16()
        for m in row_counts:
            x = torch.randn(m, k)
            x_bf = x.bfloat16()
            with torch.no_grad():
                t = timing({
                    "int4 kernel": lambda: int4pack_mm(x.bfloat16(), packed4, 128, sz4).float(),
                    "int4 dequant+bf16": lambda: w4(x),
                    "int4 dequant per call": lambda: w4_uncached(x),
                    "int8 kernel": lambda: int8pack_mm(x.bfloat16(), w8.weight, s8).float(),
                    "int8 dequant+bf16": lambda: w8(x),
                    "fp32": lambda: lin(x), "bf16": lambda: lin_bf(x_bf)})
            rows.append([f"[{m},{k}]x[{k},{n}]", *t.values()])
    return rows


def bench_qdq(timing: Timing, batches: list[int]) -> list[list[object]]:
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, 224, 224)
        q = quantize_uint8(x, 0.02, 128)
        t = timing({"quantize": lambda: quantize_uint8(x, 0.02, 128),
                    "dequantize": lambda: dequantize_uint8(q, 0.02, 128),
                    "torch.quantize_per_tensor (ao dtype)": lambda: torch.quantize_per_tensor(
                        x, 0.02, 128, torch.quint8)})
        rows += [[batch, "3x224x224", name, v] for name, v in t.items()]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, batch 1 only")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    timing = Timing(rounds=1 if args.quick else 3, min_run_time=0.1 if args.quick else 0.2)
    batches = [1] if args.quick else [1, 32]
    fmt = dict(tablefmt="github", floatfmt=".1f")
    print(f"threads={args.threads}; microseconds per call (best median of interleaved rounds)\n")
    print(tabulate(bench_convs(timing, batches), headers=[
        "batch", "conv", "ours", "torch.ao", "ours/ao", "fp32", "bf16", "fp32/ours"], **fmt), "\n")
    print(tabulate(bench_between(timing, batches), headers=["batch", "op", "variant", "us"], **fmt), "\n")
    row_counts = [1, 197] if args.quick else [1, 16, 197, 1024]
    print(tabulate(bench_dynamic(timing, row_counts), headers=[
        "dynamic linear", "per_token", "per_tensor", "fp32", "bf16"], **fmt), "\n")
    wo_rows = [1, 64] if args.quick else [1, 16, 64, 197]
    print(tabulate(bench_weight_only(timing, wo_rows), headers=[
        "weight-only", "int4 kernel", "int4 dequant+bf16", "int4 dequant per call", "int8 kernel",
        "int8 dequant+bf16", "fp32", "bf16"], **fmt), "\n")
    print(tabulate(bench_qdq(timing, batches), headers=["batch", "tensor", "op", "us"], **fmt))


if __name__ == "__main__":
    main()
