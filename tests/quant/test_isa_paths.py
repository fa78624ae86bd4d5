"""The per-op contract on every oneDNN kernel path this machine can run.

``ONEDNN_MAX_CPU_ISA`` caps oneDNN's instruction set for a whole process (it is read once),
so each cap runs ``isa_worker.py`` in a subprocess: the default (the best path this CPU has,
e.g. AMX on a recent Xeon), ``AVX512_CORE_VNNI`` and ``AVX2``. A cap can only lower the ISA,
so a CPU without AMX checks the lower paths only; what is claimed for AMX follows from the
contract, which every path is held to here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fxcompress.quant.kernels import onednn_int8_support

WORKER = Path(__file__).with_name("isa_worker.py")
CAPS = [None, "AVX512_CORE_VNNI", "AVX2"]
pytestmark = pytest.mark.skipif(not onednn_int8_support(), reason="no oneDNN int8 kernels on this machine")


def run_worker(cap: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    if cap is not None:
        env["ONEDNN_MAX_CPU_ISA"] = cap
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, str(WORKER)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cap", CAPS, ids=lambda c: c or "default")
def test_every_kernel_path_keeps_the_per_op_contract(cap: str | None) -> None:
    found = run_worker(cap)
    if cap == "AVX2":  # AVX2's u8 x s8 products go through saturating 16-bit pairs
        assert found["isa"] in ("AVX2", "AVX", "SSE41") and not found["exact_products"]
    for name, case in found["cases"].items():
        assert case["holds"], (found["isa"], name, case["violations"])
        assert case["ops"] >= 10, name  # the int8 ops really ran on this path
        assert case["other_fallbacks"] == [], (name, case["other_fallbacks"])
        if name.startswith("7bit") or found["exact_products"]:
            # 7-bit weights never overflow a pair, 8-bit ones only where products saturate.
            assert case["overflow_fallbacks"] == 0, name
        else:
            assert case["overflow_fallbacks"] == 7, name  # every conv and the linear
        # A sanity bound beyond the contract: codes that round the other way are rare.
        assert case["differing"] <= 0.01 * case["codes"], (name, case["differing"], case["codes"])
