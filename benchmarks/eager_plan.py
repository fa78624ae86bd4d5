"""What eager plans save: lowered int8 models with each conv's remembered kernel call, and without.

Eagerly, each lowered conv replays the kernel call it chose for its last input shape while its
state is unchanged (``fxcompress.quant.eager_plan``); inside ``eager_plan.disabled()`` it chooses
through the operator on every call (qparams read, cache lookup, preconditions), as it did before
plans. This script times the same lowered model both ways, interleaved, 1 thread, batch 1 (224 px
photo crops), next to the fp32 model it came from, and checks the outputs are the same bit for bit.

Usage: ``python benchmarks/eager_plan.py [--models resnet18 mobilenet_v2 efficientnet_b0 convnext_tiny]``
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import fxcompress
from _common import markdown_table, weights_for_this_cpu, write_section
from fxcompress import recipes
from fxcompress.quant.eager_plan import disabled
from fxcompress.quant.lowered import QuantConvNd
from vs_torch_ao import prepare
from vs_torch_ao_latency import best_medians

ROUNDS = 5


class WithoutPlans(nn.Module):
    """``model`` run inside ``eager_plan.disabled()`` (the same modules, kernels and caches)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with disabled():
            return self.model(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "efficientnet_b0",
                                                        "convnext_tiny"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    label, weights = weights_for_this_cpu()
    rows = []
    for name in args.models:
        setup = prepare(name)
        x = setup.calibration[0][:1]
        lowered = fxcompress.run(setup.model, recipes.int8_static(weights=weights, only_if_faster=False), x,
                                 calibration_data=setup.calibration, progress=False).model
        convs = sum(isinstance(m, QuantConvNd) for m in lowered.modules())
        without = WithoutPlans(lowered)
        with torch.inference_mode():
            same = all(torch.equal(lowered(b), without(b)) for b in setup.evaluation)
        times = best_medians({"plans": lowered, "without": without, "fp32": setup.model}, x, ROUNDS)
        rows.append([name, convs, "yes" if same else "NO", f"{times['plans'] * 1e3:.2f}",
                     f"{times['without'] * 1e3:.2f}", f"{times['plans'] / times['without']:.3f}",
                     f"{times['fp32'] * 1e3:.2f}", f"{times['plans'] / times['fp32']:.3f}",
                     f"{times['without'] / times['fp32']:.3f}"])
        print(rows[-1], flush=True)
    table = markdown_table(rows, ["model", "int8 convs", "same outputs (eval photos)", "with plans (ms)",
                                  "without (ms)", "with / without", "fp32 (ms)", "int8 / fp32, plans",
                                  "int8 / fp32, without"])
    print(table)
    write_section("eager_plan", "Eager plans: what remembering each conv's kernel call saves", f"""
`recipes.int8_static(only_if_faster=False)` with {label} weights on torchvision models (realistic
random weights, BatchNorm re-estimated on photo crops), eager, 1 thread, batch 1, best of {ROUNDS}
interleaved rounds of `torch.utils.benchmark` medians: the lowered model as it runs (each conv
replays the kernel call it chose, `fxcompress.quant.eager_plan`) against the same model inside
`eager_plan.disabled()` (the kernel chosen through the operator on every call), and the fp32 model.
*same outputs*: bit for bit on the evaluation photos. What plans cannot remove: the module calls
themselves, the GraphModule's attribute walks, and the float ops between int8 layers (convnext_tiny's
layer norms, efficientnet_b0's squeeze-excitation gates), which is what separates eager from a
compiled program (see the deployment section).

{table}
""")


if __name__ == "__main__":
    main()
