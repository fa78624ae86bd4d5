"""The model, data and pipeline the torchrun workers and the single-process reference share."""

from __future__ import annotations

from typing import Any

import torch

import fxcompress
from fxcompress.examples.digits import DigitsCNN, load_digits_data
from fxcompress.quant.activations import ActivationObserver

DATA = load_digits_data(0)
# 7 batches: two ranks get 4 and 3 (uneven shards), batch sizes differ too
BATCHES = [DATA.train_x[i * 24:(i + 1) * 24 + (i % 2)] for i in range(7)]
EXAMPLE = DATA.train_x[:2]
MINMAX = {"bits": 8, "signed": False, "symmetric": False, "observer": "minmax"}
HISTOGRAM = {"bits": 8, "signed": False, "symmetric": False, "observer": "histogram"}
PIPELINE = ["fuse_conv_bn", ("insert_observers", {"activations": MINMAX}), "calibrate"]
HISTOGRAM_PIPELINE = ["fuse_conv_bn", ("insert_observers", {"activations": HISTOGRAM}), "calibrate"]


def model() -> DigitsCNN:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return DigitsCNN().eval()


def qparams_of(gm: torch.nn.Module) -> dict[str, Any]:
    """Every activation observer's (scale, zero point) and min/max, exactly (as float hex strings)."""
    out = {}
    for name, m in gm.named_modules():
        if isinstance(m, ActivationObserver):
            out[name] = {"scale": m.scale.reshape(-1).tolist(), "zero_point": m.zero_point.reshape(-1).tolist(),
                         "min": m.observer.min_val.reshape(-1).tolist(), "max": m.observer.max_val.reshape(-1).tolist(),
                         "seen": int(m.observer.num_observed)}
    return out


def sensitivity_of(w: Any = None) -> list[dict[str, Any]]:
    """The sensitivity entries of the seeded model on all the batches (every rank passes all of them)."""
    result = fxcompress.sensitivity(model(), EXAMPLE, calibration_data=BATCHES[:3], quant=("int8", "int4"),
                                    prune_ratios=(0.25, 0.5), cache=False, progress=False,
                                    across_ranks=w is not None)
    return [e.to_dict() for e in result.entries]
