"""Run in a subprocess by test_isa_paths.py, under a capped oneDNN ISA (``ONEDNN_MAX_CPU_ISA``).

Quantizes a small network that holds every kind of int8 op the lowering emits (a 3-channel
7x7 first conv, max pool, conv + fused residual sum + ReLU, depthwise, SiLU, adaptive average
pool, uint8 add, linear), with 8-bit and with 7-bit weights, lowers it for x86 (with and without
oneDNN's approximated post-ops), checks the per-op contract on real images (scikit-learn's
digits), and prints one JSON object: the measured arithmetic and, per case, whether the
contract held, the differing codes, and the fallbacks by reason.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import fxcompress
from fxcompress.quant.contract import check_contract
from fxcompress.quant.isa import int8_arithmetic
from fxcompress.quant.spec import default_weight_spec, portable_weight_spec


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 7, stride=2, padding=3)
        self.conv1, self.conv2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.side = nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2, 1)
        x = F.relu(self.conv2(F.relu(self.conv1(x))) + x)
        y = F.silu(self.pw(F.relu(self.dw(x))))
        y = F.relu(self.side(y)) + y
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def images(n: int, offset: int) -> torch.Tensor:
    digits = torch.tensor(load_digits().images[offset:offset + n], dtype=torch.float32) / 16.0
    x = F.interpolate(digits.unsqueeze(1), size=(32, 32), mode="bilinear", align_corners=False)
    return torch.cat([x, x.flip(-1), 1.0 - x], dim=1)


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = Net().eval()
    x, calibration = images(16, 0), [images(32, 100 + 32 * i) for i in range(3)]
    cases = {}
    for weights_name, weights in (("8bit", default_weight_spec()), ("7bit", portable_weight_spec())):
        passes = ["fuse_conv_bn", ("insert_observers", {"weights": weights}), "calibrate", "fold_fake_quant"]
        folded = fxcompress.run(model, passes, (x,), calibration_data=calibration, progress=False).model
        for approximate in (False, True):
            result = fxcompress.run(folded, [("lower", {"approximate_post_ops": approximate})], (x,), progress=False)
            report = check_contract(result.model, images(64, 300))
            differing, total = report.differing_codes()
            fallbacks = result.report.rows[0].stats["fallbacks"]
            cases[f"{weights_name}-{'approximate' if approximate else 'exact'}"] = {
                "holds": report.holds, "ops": len(report.ops), "differing": differing, "codes": total,
                "violations": [vars(v) | {"holds": v.holds} for v in report.violations],
                "overflow_fallbacks": sum("could overflow" in f["reason"] for f in fallbacks),
                "other_fallbacks": [f for f in fallbacks if "could overflow" not in f["reason"]],
            }
    arithmetic = int8_arithmetic()
    print(json.dumps({"isa": arithmetic.isa, "exact_products": arithmetic.exact_products, "cases": cases}))


if __name__ == "__main__":
    main()
