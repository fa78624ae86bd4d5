"""What the lowered model's NaN/Inf input check costs: latency with the guard against without.

A lowered int8 model quantizes each graph input once (``Quantize`` with ``guard``): before that
it sums the input and raises ``InputError`` naming the input when the sum is not finite, because
int8 codes cannot hold NaN (without the check a NaN image gives finite, plausible logits). This
script times the same lowered models with the check and with it switched off (``guard = ""`` on
a copy), interleaved, 1 thread, at batch 1 and 32 (224 px photo crops), and checks the guard
fires on a NaN input.

Usage: ``python benchmarks/nan_guard.py [--models resnet18 mobilenet_v2]``
"""

from __future__ import annotations

import argparse
import copy

import torch

import fxcompress
from _common import markdown_table, weights_for_this_cpu, write_section
from fxcompress import recipes
from fxcompress.errors import InputError
from fxcompress.quant.lowered import Quantize
from vs_torch_ao import prepare
from vs_torch_ao_latency import best_medians

ROUNDS = 3


def unguarded(model: torch.nn.Module) -> torch.nn.Module:
    copied = copy.deepcopy(model)
    for m in copied.modules():
        if isinstance(m, Quantize):
            m.guard = ""
    return copied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    args = parser.parse_args()
    torch.set_num_threads(1)
    label, weights = weights_for_this_cpu()
    rows = []
    for name in args.models:
        setup = prepare(name)
        for batch in args.batches:
            x = torch.cat(setup.calibration)[:batch]
            lowered = fxcompress.run(setup.model, recipes.int8_static(weights=weights), x,
                                     calibration_data=setup.calibration, progress=False).model
            guards = sum(1 for m in lowered.modules() if isinstance(m, Quantize) and m.guard)
            try:
                lowered(torch.full_like(x, float("nan")))
                fires = "no"
            except InputError:
                fires = "yes"
            times = best_medians({"guarded": lowered, "unguarded": unguarded(lowered)}, x, ROUNDS)
            rows.append([name, batch, guards, fires, f"{times['guarded'] * 1e3:.2f}", f"{times['unguarded'] * 1e3:.2f}",
                         f"{times['guarded'] / times['unguarded']:.3f}"])
            print(rows[-1], flush=True)
    table = markdown_table(rows, ["model", "batch", "guarded inputs", "NaN input refused", "with check (ms)",
                                  "without (ms)", "ratio"])
    print(table)
    write_section("nan_guard", "The lowered model's NaN/Inf input check: its cost", f"""
`recipes.int8_static()` with {label} weights on torchvision models (realistic random weights,
BatchNorm re-estimated on photo crops), 1 thread, best of {ROUNDS} interleaved rounds of
`torch.utils.benchmark` medians: the lowered model as built (each graph input's `Quantize` sums its
input and raises `InputError` on NaN/Inf) against a copy with the check switched off.

{table}
""")


if __name__ == "__main__":
    main()
