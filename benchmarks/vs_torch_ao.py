"""fxcompress against torch.ao FX static quantization, side by side in one run.

torch.ao (``prepare_fx``/``convert_fx`` with ``get_default_qconfig_mapping("x86")``)
is the peer here and only here: fxcompress does not build on it.

Making the comparison meaningful
--------------------------------
Pretrained weights cannot be downloaded, and random-init torchvision models
have degenerate activations (the peer collapses to ~0 dB on random
mobilenet_v2).  So, for both sides alike:

1. the model comes from ``fxcompress.zoo.build`` (realistic random weights:
   every weight matters, activations stay in range);
2. its inputs are real photographs: random crops (scale, position, flip) of
   scikit-learn's two sample images, resized to 224 and normalised with the
   ImageNet mean and std, so activations have natural-image statistics;
3. its BatchNorm statistics are re-estimated on the calibration batches (the
   cumulative average of their batch statistics), so every normalised
   activation is what a trained model's would be on this data;
4. both sides then get copies of that one float model and the same
   calibration batches, and are scored on the same held-out crops: output SQNR
   against the float model, ``10 log10(|ref|^2 / |ref - out|^2)``.

Ours is the folded graph (``fuse_conv_bn -> insert_observers -> calibrate ->
fold_fake_quant``, default specs), whose outputs equal the fake-quant graph's;
the peer's is the converted int8 model.  Target: ours >= peer - 0.5 dB.

Calibration cost: resnet50, 32 images in batches of 8, 2 threads, histogram
observers; the calibrate pass (range search included) against plain float
inference of the same graph without observers (BatchNorm folded, as
calibrated) on the same batches; medians of interleaved repeats.  Target: at
most 2x.

Sections are functions of the prepared :class:`Setup` list (see
:data:`SECTIONS`), so further columns (e.g. lowered latency) can be added
next to these.

Usage: ``python benchmarks/vs_torch_ao.py [--models resnet18 ...]``
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from _common import markdown_table, write_section
from fxcompress import zoo

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0"]
STATIC = ["fuse_conv_bn", "insert_observers", "calibrate", "fold_fake_quant"]
MARGIN_DB = 0.5
CALIBRATION = (4, 8)  # batches, images per batch
EVALUATION = (2, 8)
SIZE = 224
THREADS = 2
MAX_CALIBRATION_RATIO = 2.0
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def photo_batches(count: int, batch: int, size: int = SIZE, seed: int = 0) -> list[torch.Tensor]:
    """``count`` batches of random crops of scikit-learn's sample photographs, ImageNet-normalised."""
    from sklearn.datasets import load_sample_images

    images = [torch.from_numpy(i.copy()).permute(2, 0, 1).float() / 255 for i in load_sample_images().images]
    gen = torch.Generator().manual_seed(seed)

    def draw(high: int, low: int = 0) -> int:
        return int(torch.randint(low, high, (1,), generator=gen))

    batches = []
    for _ in range(count):
        crops = []
        for _ in range(batch):
            image = images[draw(len(images))]
            side = draw(min(image.shape[1:]) + 1, size * 2 // 3)
            top, left = draw(image.shape[1] - side + 1), draw(image.shape[2] - side + 1)
            crop = F.interpolate(image[None, :, top:top + side, left:left + side], size=(size, size),
                                 mode="bilinear", antialias=True, align_corners=False)[0]
            crops.append(((crop.flip(-1) if draw(2) else crop) - _MEAN) / _STD)
        batches.append(torch.stack(crops))
    return batches


def reestimate_batchnorm(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """Set every BatchNorm's running statistics to the cumulative batch statistics of ``batches``."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        for b in batches:
            model(b)
    for bn, momentum in zip(norms, momenta):
        bn.momentum = momentum
    return model.eval()


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Output SQNR in dB, in float64."""
    ref = reference.double()
    noise = (ref - approximation.double()).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


@dataclass
class Setup:
    """One model as both sides see it, and what each side built from it."""

    name: str
    model: nn.Module
    calibration: list[torch.Tensor]
    evaluation: list[torch.Tensor]
    reference: torch.Tensor
    built: dict[str, Any] = field(default_factory=dict)

    def outputs(self, model: nn.Module) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([model(b) for b in self.evaluation])


def prepare(name: str) -> Setup:
    calibration = photo_batches(*CALIBRATION, seed=0)
    evaluation = photo_batches(*EVALUATION, seed=1)
    model = reestimate_batchnorm(zoo.build(name), calibration)
    with torch.inference_mode():
        reference = torch.cat([model(b) for b in evaluation])
    return Setup(name, model, calibration, evaluation, reference)


def build_ours(setup: Setup) -> nn.Module:
    """Our folded static-int8 graph (cached in ``setup.built["ours"]``)."""
    if "ours" not in setup.built:
        result = fxcompress.run(setup.model, STATIC, setup.calibration[0][:1],
                                calibration_data=setup.calibration, progress=False)
        setup.built["ours"] = result.model
        setup.built["ours_report"] = result.report
    return setup.built["ours"]


def build_peer(setup: Setup) -> nn.Module:
    """torch.ao FX's converted int8 model, x86 qconfig (cached in ``setup.built["peer"]``)."""
    if "peer" not in setup.built:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notices
            prepared = prepare_fx(copy.deepcopy(setup.model), get_default_qconfig_mapping("x86"),
                                  (setup.calibration[0],))
            with torch.inference_mode():
                for batch in setup.calibration:
                    prepared(batch)
            setup.built["peer"] = convert_fx(prepared)
    return setup.built["peer"]


def sqnr_section(setups: list[Setup]) -> str:
    rows = []
    for s in setups:
        ours, peer = sqnr_db(s.reference, s.outputs(build_ours(s))), sqnr_db(s.reference, s.outputs(build_peer(s)))
        verdict = "met" if ours >= peer - MARGIN_DB else "MISSED"
        rows.append([s.name, f"{ours:.2f}", f"{peer:.2f}", f"{ours - peer:+.2f}", verdict])
    table = markdown_table(rows, ["model", "fxcompress SQNR (dB)", "torch.ao FX SQNR (dB)", "difference",
                                  f"target (>= peer - {MARGIN_DB} dB)"])
    return f"""### Output SQNR against float

{CALIBRATION[0]} calibration batches of {CALIBRATION[1]} and {EVALUATION[0] * EVALUATION[1]} held-out
images at {SIZE} px.  fxcompress: default specs (8-bit symmetric per-channel weights, 8-bit affine
per-tensor activations, histogram observer); torch.ao: `get_default_qconfig_mapping("x86")`.

{table}

EfficientNet-B0 with these random weights is hard for per-tensor 8-bit activations on both sides:
its weights alone quantize to about 17 dB, but the L2-optimal histogram ranges (the default on
both sides) clip activation outliers that the rest of the network amplifies; min/max activation
ranges give it about twice the SQNR in dB (measured with this script's setup).
"""


def calibration_time_section(setups: list[Setup], repeats: int = 3) -> str:
    name = "resnet50"
    setup = next((s for s in setups if s.name == name), None) or prepare(name)
    observed = fxcompress.run(setup.model, STATIC[:2], setup.calibration[0][:1], progress=False).model
    fused = fxcompress.run(setup.model, STATIC[:1], setup.calibration[0][:1], progress=False).model

    def float_inference() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in setup.calibration:
                fused(batch)
        return time.perf_counter() - start

    def calibration() -> float:
        result = fxcompress.run(observed, ["calibrate"], setup.calibration[0][:1],
                                calibration_data=setup.calibration, progress=False, check="none")
        return result.report.rows[0].seconds

    float_inference()  # warm-up: first-call allocations
    timings: dict[str, list[float]] = {"float": [], "calibrate": []}
    for _ in range(repeats):  # interleaved, so load from elsewhere hits both alike
        timings["float"].append(float_inference())
        timings["calibrate"].append(calibration())
    f, c = statistics.median(timings["float"]), statistics.median(timings["calibrate"])
    ratio = c / f
    verdict = "met" if ratio <= MAX_CALIBRATION_RATIO else "MISSED"
    table = markdown_table([[name, f"{f:.2f}", f"{c:.2f}", f"{ratio:.2f}", verdict]],
                           ["model", "float inference (s)", "calibrate pass (s)", "ratio",
                            f"target (<= {MAX_CALIBRATION_RATIO}x)"])
    images = CALIBRATION[0] * CALIBRATION[1]
    return f"""### Calibration time

{images} images in batches of {CALIBRATION[1]} at {SIZE} px, {torch.get_num_threads()} threads; the
calibrate pass with histogram observers (histogram per batch, L2 range search once at the end)
against float inference of the same BatchNorm-folded graph without observers; medians of
{repeats} interleaved runs (wall time: on a loaded machine both sides slow down, see the load
average above).

{table}
"""


#: The sections of the page, in order: each maps the prepared setups to markdown.
SECTIONS: list[Callable[[list[Setup]], str]] = [sqnr_section, calibration_time_section]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    setups = [prepare(name) for name in args.models]
    parts = []
    for section in SECTIONS:
        parts.append(section(setups))
        print(parts[-1], flush=True)
    body = "\n".join(parts)
    write_section("vs_torch_ao", "fxcompress vs torch.ao FX", f"""
torch.ao FX static quantization (`prepare_fx`/`convert_fx`, x86 qconfig) is the peer, used in this
benchmark only.  Both sides get the same float model and the same batches: a realistic-weights zoo
model whose BatchNorm statistics are re-estimated on the calibration batches, fed random crops of
real photographs (scikit-learn's sample images, ImageNet-normalised).  Random-init weights on noise
would make both sides' figures meaningless (the peer reaches ~0 dB on random mobilenet_v2).

{body}
""")


if __name__ == "__main__":
    main()
