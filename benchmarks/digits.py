"""Digits top-1: float against static int8, and 4-bit weights after quantization-aware training.

Two small CNNs trained deterministically on scikit-learn's 8x8 digits
(``fxcompress.examples.digits``: the digits CNN and a small ResNet) are
compressed by each row of :data:`ROWS` and evaluated on the held-out 360
images (one image is 0.28 points).  Calibration reads the first
``CALIBRATION_BATCHES`` labelled training batches (calibrate recognises
``(inputs, target)`` pairs); QAT fine-tunes on all of them.  Targets (drop in
top-1 points against float): static int8 at most 0.5, 4-bit weights with
8-bit activations after QAT at most 1.5.  Digits is easy at 4 bits; the 2-bit rows
(no target) show what QAT recovers where static quantization loses points.

Rows are ``Row(name, pipeline, max_drop)`` entries: later work (lowering,
pruning) appends rows to :data:`ROWS`; each pipeline is run with
``fxcompress.run(model, pipeline, example, calibration_data=..., loss_fn=...)``.

Usage: ``python benchmarks/digits.py``
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from _common import markdown_table, write_section
from fxcompress.examples.digits import (
    DigitsData, accuracy, load_digits_data, pretrained_digits_cnn, pretrained_digits_resnet,
)
from fxcompress.quant import QuantSpec
from fxcompress.report import state_bytes

BATCH = 64
CALIBRATION_BATCHES = 8
QAT_STEPS = 300
QAT_LR = 1e-3
INT4_WEIGHTS = QuantSpec(bits=4, granularity="per_channel")
INT2_WEIGHTS = QuantSpec(bits=2, granularity="per_channel")  # where QAT visibly matters


@dataclass(frozen=True)
class Row:
    """One compression of the table: its pipeline and the largest allowed top-1 drop (None: shown only)."""

    name: str
    pipeline: Callable[[], list]
    max_drop: float | None = None


def _static(weights: QuantSpec | None = None) -> list:
    observe = ("insert_observers", {"weights": weights}) if weights else "insert_observers"
    return ["fuse_conv_bn", observe, ("calibrate", {"num_batches": CALIBRATION_BATCHES}), "fold_fake_quant"]


def _qat(weights: QuantSpec) -> list:
    static = _static(weights)
    return static[:3] + ["to_fake_quant", ("finetune", {"steps": QAT_STEPS, "lr": QAT_LR})] + static[3:]


ROWS: list[Row] = [
    Row("static int8 (per-channel weights, histogram activations)", _static, 0.5),
    Row("4-bit weights + 8-bit activations, static (before QAT)", lambda: _static(INT4_WEIGHTS)),
    Row(f"4-bit weights + 8-bit activations, QAT ({QAT_STEPS} steps)", lambda: _qat(INT4_WEIGHTS), 1.5),
    Row("2-bit weights + 8-bit activations, static", lambda: _static(INT2_WEIGHTS)),
    Row(f"2-bit weights + 8-bit activations, QAT ({QAT_STEPS} steps)", lambda: _qat(INT2_WEIGHTS)),
]
MODELS: dict[str, Callable[[], nn.Module]] = {
    "digits CNN": pretrained_digits_cnn,
    "digits ResNet": pretrained_digits_resnet,
}


def labelled_batches(data: DigitsData) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The training split as ``(images, labels)`` batches of :data:`BATCH`, in order."""
    return [(data.train_x[i:i + BATCH], data.train_y[i:i + BATCH]) for i in range(0, len(data.train_y), BATCH)]


def evaluate(model_name: str, factory: Callable[[], nn.Module], data: DigitsData) -> list[list]:
    """The table rows of one model: float first, then every :data:`ROWS` entry."""
    model = factory()
    pairs = labelled_batches(data)
    float_top1 = accuracy(model, data.test_x, data.test_y)
    float_bytes = state_bytes(model)
    rows = [[model_name, "float", f"{float_top1:.2f}", "", "1.00", ""]]
    for row in ROWS:
        result = fxcompress.run(model, row.pipeline(), data.train_x[:1], calibration_data=pairs,
                                loss_fn=F.cross_entropy, progress=False)
        top1 = accuracy(result.model, data.test_x, data.test_y)
        drop = float_top1 - top1
        verdict = "" if row.max_drop is None else ("met" if drop <= row.max_drop else "MISSED") + \
            f" (drop <= {row.max_drop})"
        rows.append([model_name, row.name, f"{top1:.2f}", round(top1 - float_top1, 2) + 0.0,
                     f"{state_bytes(result.model) / float_bytes:.2f}", verdict])
    return rows


def main() -> None:
    torch.set_num_threads(1)
    data = load_digits_data(0)
    rows = [r for name, factory in MODELS.items() for r in evaluate(name, factory, data)]
    headers = ["model", "compression", "top-1 %", "vs float (points)", "state bytes / float", "target"]
    table = markdown_table(rows, headers)
    print(table)
    write_section("digits", "Digits: quantized top-1", f"""
Two small CNNs trained on scikit-learn's digits (test split: 360 images, one image = 0.28
points), compressed by fxcompress and evaluated on the test split.  Static rows calibrate on
{CALIBRATION_BATCHES} batches of {BATCH} training images; the QAT row fine-tunes the fake-quantized
model for {QAT_STEPS} Adam steps at lr {QAT_LR} on the training split before folding.  Weights are
symmetric per channel, activations 8-bit affine per tensor with the histogram observer.  State
bytes include the float biases and the quantization scales.

{table}
""")


if __name__ == "__main__":
    main()
