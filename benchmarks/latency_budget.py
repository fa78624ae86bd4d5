"""``mixed_precision(max_latency=...)``: the most accurate mix of float / int8 layers within a time.

On torchvision's resnet18 and mobilenet_v2 (realistic random weights, BatchNorm re-estimated on
real photo crops, as ``benchmarks/vs_torch_ao.py`` prepares them) at 224 px, batch 1, 1 thread:
for budgets of 0.9 / 0.75 / 0.6 x the folded fp32 model's latency, the pass picks which
layers go int8 (the least sensitive per second of float time first), and the result is
lowered with ``lower(backend="x86", only_if_faster=True)``.  Reported per budget: the
layers int8, the lowered latency / fp32 latency (the two timed side by side, interleaved, at
the end), whether the budget was met by the pass's own measurement, and the output SQNR
against float on held-out crops.  The pass's chosen configuration is measured during the
pass; the side-by-side figure after it is the one to trust on a shared machine.

Usage: ``python benchmarks/latency_budget.py [--models ...] [--budgets 0.9 0.75 0.6]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import fxcompress
from _common import markdown_table, weights_for_this_cpu, write_section
from vs_torch_ao import prepare, sqnr_db
from vs_torch_ao_latency import best_medians

MODELS = ["resnet18", "mobilenet_v2"]
BUDGETS = (0.9, 0.75, 0.6)
ROUNDS = 3


def measure(name: str, budgets: tuple[float, ...]) -> list[list]:
    setup = prepare(name)
    x = setup.calibration[0][:1]
    folded = fxcompress.run(setup.model, ["fuse_conv_bn"], x, progress=False).model
    float_seconds = best_medians({"fp32": folded}, x, ROUNDS)["fp32"]
    rows, built = [], {"fp32": folded}
    for fraction in budgets:
        start = time.perf_counter()
        result = fxcompress.run(setup.model, ["fuse_conv_bn", ("mixed_precision", {"max_latency": fraction * float_seconds}),
                                              ("lower", {"backend": "x86", "only_if_faster": True}),
                                              "eliminate_dead_nodes"],
                                x, calibration_data=setup.calibration, progress=False)
        seconds = time.perf_counter() - start
        stats = result.report.rows[1].stats
        int8 = sum(1 for v in stats["precision"].values() if v == "int8")
        built[f"{fraction:g}"] = result.model
        rows.append([name, f"{fraction:g} ({fraction * float_seconds * 1e3:.1f} ms)",
                     f"{int8} / {len(stats['precision'])}", f"{stats['latency']['after'] * 1e3:.1f}",
                     "met" if stats["budget"]["met"] else "MISSED", None,
                     f"{sqnr_db(setup.reference, setup.outputs(result.model)):.1f}", len(stats["trials"]),
                     f"{seconds:.0f}"])
        print(rows[-1], flush=True)
    times = best_medians(built, x, ROUNDS)
    for row, fraction in zip(rows, budgets):
        row[5] = f"{times[f'{fraction:g}'] / times['fp32']:.2f} ({times[f'{fraction:g}'] * 1e3:.1f} vs " \
                 f"{times['fp32'] * 1e3:.1f} ms)"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("FXCOMPRESS_CACHE_DIR", tempfile.mkdtemp(prefix="fxc-bench-"))
    rows = [row for name in args.models for row in measure(name, tuple(args.budgets))]
    headers = ["model", "budget x fp32 (ms)", "int8 layers", "pass-measured ms", "budget (pass)",
               "lowered / fp32, side by side", "SQNR dB", "configurations timed", "pass seconds"]
    table = markdown_table(rows, headers)
    print(table)
    label, _ = weights_for_this_cpu()
    write_section("latency_budget", "Mixed precision to a latency budget", f"""
`mixed_precision(max_latency=f x t_fp32)` after `fuse_conv_bn`, then `lower(backend="x86",
only_if_faster=True)`, on torchvision models with realistic random weights (fidelity, not
task accuracy: no labels or pretrained weights here), BatchNorm re-estimated on real photo crops;
224 px, batch 1, 1 thread.  t_fp32 is the folded float model's median latency, measured before
the passes; int8 weights are {label} on this CPU.  "pass-measured" is the latency the pass
measured for the configuration it chose; "side by side" times every result and the fp32 model
again in {ROUNDS} interleaved rounds at the end (the figure to trust on a shared machine).  SQNR
of the outputs against float on 16 held-out crops.

{table}
""")


if __name__ == "__main__":
    main()
