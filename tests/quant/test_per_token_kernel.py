"""The per-token dynamic linear's kernel path: oneDNN's qlinear on uint8 rows.

Exact int32 accumulation is the claim, so it is checked against integer arithmetic
(float64), on this CPU's best oneDNN path and with the ISA capped at AVX2 (a subprocess:
``ONEDNN_MAX_CPU_ISA`` is read once per process), where products go through saturating
16-bit pair sums and only weights of at most 7 bits may take the kernel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from fxcompress.oplib.arith import quantize_per_token_uint8
from fxcompress.quant.kernels import onednn_int8_support
from fxcompress.quant.lowered import DynamicQuantLinear

pytestmark = pytest.mark.skipif(not onednn_int8_support(), reason="no oneDNN int8 kernels on this machine")

# Worst cases for a saturating pair: rows whose codes are all 255 (zero point 1) and
# weights at the 7- or 8-bit limit. Printed as JSON by the subprocess.
_PROBE = r"""
import json, torch
from torch import nn
from fxcompress.oplib.arith import quantize_per_token_uint8
from fxcompress.quant.isa import int8_arithmetic
from fxcompress.quant.lowered import DynamicQuantLinear
torch.manual_seed(0)
lin = nn.Linear(64, 32)
x = torch.randn(2, 5, 64)
x[0, 0] = 3.0  # a row whose codes are all 255 (zero point 1)
found = {"exact_products": int8_arithmetic().exact_products}
for bits in (7, 8):
    qmax = (1 << (bits - 1)) - 1
    with torch.no_grad():
        lin.weight.copy_(torch.where(torch.rand(32, 64) < 0.5, 1.0, -1.0) * qmax)
        lin.weight[:, :8] = qmax  # same-sign neighbours: the largest pair sums
    m = DynamicQuantLinear.from_float(lin, torch.ones(32), granularity="per_token", token_zero_point=1)
    q, s = quantize_per_token_uint8(x, 1)
    exact = ((q.double() - 1) @ m.weight.double().t()) * s.double() + lin.bias.detach().double()
    support = m.kernel_support()
    found[bits] = {"kernel": bool(support), "reason": support.reason,
                   "error": (m(x).double() - exact).abs().max().item() / exact.abs().max().item()}
print(json.dumps(found))
"""


def _probe(cap: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    if cap:
        env["ONEDNN_MAX_CPU_ISA"] = cap
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("zero_point", [1, 20, 128, 254])
def test_per_token_kernel_is_exact_integer_arithmetic(zero_point: int) -> None:
    torch.manual_seed(1)
    lin = nn.Linear(96, 48)
    x = torch.randn(3, 7, 96) * torch.rand(3, 7, 1) * 4  # rows of very different ranges
    m = DynamicQuantLinear.from_float(lin, granularity="per_token", token_zero_point=zero_point)
    q, s = quantize_per_token_uint8(x, zero_point)
    exact = ((q.double() - zero_point) @ m.weight.double().t()) * s.double() * m.weight_scale.double() \
        + lin.bias.double()
    out = m(x)
    assert out.shape == (3, 7, 48) and out.dtype == torch.float32
    assert (out.double() - exact).abs().max().item() <= 1e-5 * exact.abs().max().item()
    no_bias = DynamicQuantLinear.from_float(nn.Linear(96, 48, bias=False), granularity="per_token")
    assert no_bias(x).shape == (3, 7, 48)


@pytest.mark.parametrize("cap", [None, "AVX2"], ids=["default", "AVX2"])
def test_per_token_kernel_runs_only_where_exact(cap: str | None) -> None:
    found = _probe(cap)
    assert found["7"]["kernel"] and found["7"]["error"] <= 1e-6, found  # 7-bit weights: every CPU
    if cap == "AVX2":  # the cap takes away VNNI and AMX on every CPU
        assert not found["exact_products"], found
    if found["exact_products"]:
        assert found["8"]["kernel"] and found["8"]["error"] <= 1e-6, found
    else:  # saturating pairs could clip 8-bit weights: the exact reference path instead, and why
        assert not found["8"]["kernel"] and "overflow" in found["8"]["reason"], found
        assert found["8"]["error"] <= 1e-6, found
