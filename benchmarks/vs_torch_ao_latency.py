"""Lowered int8 latency, size and fidelity against torch.ao FX int8, fp32 and bf16, side by side.

Same setup as ``benchmarks/vs_torch_ao.py`` (whose helpers it uses): realistic-weights zoo
models with BatchNorm re-estimated on random crops of real photographs, both sides
calibrated on the same batches. Per model:

- **ours**: ``fuse_conv_bn -> insert_observers -> calibrate -> fold_fake_quant -> lower ->
  eliminate_dead_nodes`` (x86 backend);
- **torch.ao**: ``prepare_fx``/``convert_fx`` with the x86 qconfig (the peer, used here only);
- **fp32**: the float model with BatchNorm folded (``fuse_conv_bn``);
- **bf16**: that model after the ``cast`` pass (bfloat16 weights and activations).

Latency: medians from ``torch.utils.benchmark`` (``blocked_autorange``), at 1 and 2 threads,
batch 1 and 32 (224 px photos); the candidates are timed in interleaved rounds and each
keeps its best median, because the machine is shared. Targets: ours / torch.ao <= 1.10;
lowered state bytes / float <= 0.27; lowered vs folded (fake-quant) SQNR >= 35 dB on
held-out photos. A missed latency target is profiled (``torch.profiler``, both sides, the
top operators by self time) so the page says what limits it.

Usage: ``python benchmarks/vs_torch_ao_latency.py [--models ...] [--threads 1 2]
[--batches 1 32] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
import torch.utils.benchmark as tb
from torch import nn
from torch.profiler import ProfilerActivity, profile

import fxcompress
from _common import markdown_table, write_section
from fxcompress.examples.digits import accuracy, load_digits_data, pretrained_digits_cnn
from fxcompress.quant.lowering.chains import EXACT_POST_OPS
from fxcompress.report import state_bytes
from vs_torch_ao import MODELS, STATIC, Setup, build_ours, build_peer, photo_batches, prepare, sqnr_db

MAX_LATENCY_RATIO = 1.10
MAX_SIZE_RATIO = 0.27
MIN_SQNR_DB = 35.0


def build_variants(setup: Setup) -> dict[str, nn.Module]:
    """The four models compared: ours (lowered), torch.ao, fp32 (BN folded), bf16."""
    example = setup.calibration[0][:1]
    folded = build_ours(setup)
    result = fxcompress.run(folded, ["lower", "eliminate_dead_nodes"], example, progress=False)
    lowered, setup.built["lower_stats"] = result.model, result.report.rows[0].stats
    fused = fxcompress.run(setup.model, ["fuse_conv_bn"], example, progress=False).model
    bf16 = fxcompress.run(fused, [("cast", {"dtype": "bfloat16"})], example, progress=False).model
    return {"ours": lowered, "torch.ao": build_peer(setup), "fp32": fused, "bf16": bf16}


def build_peer_reference(setup: Setup) -> nn.Module:
    """torch.ao's reference quantized model (quantize-dequantize around float ops): the peer's
    own counterpart of our folded graph, to measure how faithfully its int8 model follows it."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_to_reference_fx, prepare_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(setup.model), get_default_qconfig_mapping("x86"), (setup.calibration[0],))
        with torch.inference_mode():
            for batch in setup.calibration:
                prepared(batch)
        return convert_to_reference_fx(prepared)


def best_medians(models: dict[str, nn.Module], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Seconds per call: the best of ``rounds`` interleaved medians per model."""
    best = dict.fromkeys(models, float("inf"))
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in models.values():
            model(x)  # kernels pack and caches fill on the first call
        for _ in range(rounds):
            for name, model in models.items():
                timer = tb.Timer("model(x)", globals={"model": model, "x": x})
                best[name] = min(best[name], timer.blocked_autorange(min_run_time=0.5).median)
    return best


def top_ops(model: nn.Module, x: torch.Tensor, rows: int = 6) -> list[tuple[str, float]]:
    """The operators with the most self CPU time per call (microseconds)."""
    calls = 5
    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                model(x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / calls) for e in events[:rows]]


def latency_section(setups: list[Setup], variants: dict[str, dict[str, nn.Module]], threads: list[int],
                    batches: list[int], rounds: int) -> tuple[str, list[str]]:
    rows, misses = [], []
    inputs = {b: photo_batches(1, b, seed=2)[0] for b in batches}
    for t in threads:
        torch.set_num_threads(t)
        for b in batches:
            for s in setups:
                times = best_medians(variants[s.name], inputs[b], rounds)
                ratio = times["ours"] / times["torch.ao"]
                verdict = "met" if ratio <= MAX_LATENCY_RATIO else "MISSED"
                rows.append([s.name, t, b, *(f"{times[k] * 1e3:.2f}" for k in ("ours", "torch.ao", "fp32", "bf16")),
                             f"{ratio:.2f}", verdict, f"{times['fp32'] / times['ours']:.1f}x",
                             f"{times['bf16'] / times['ours']:.1f}x"])
                print(rows[-1], flush=True)
                if verdict == "MISSED":
                    misses.append(profile_miss(s.name, variants[s.name], inputs[b], t, b))
    table = markdown_table(rows, ["model", "threads", "batch", "ours (ms)", "torch.ao (ms)", "fp32 (ms)",
                                  "bf16 (ms)", "ours / torch.ao", f"target (<= {MAX_LATENCY_RATIO})",
                                  "speedup vs fp32", "speedup vs bf16"])
    return table, misses


def profile_miss(name: str, models: dict[str, nn.Module], x: torch.Tensor, threads: int, batch: int) -> str:
    ours, peer = top_ops(models["ours"], x), top_ops(models["torch.ao"], x)
    lines = [f"- {name}, {threads} threads, batch {batch}:"]
    for label, ops in (("ours", ours), ("torch.ao", peer)):
        lines.append(f"  - {label}: " + ", ".join(f"`{k}` {us / 1e3:.2f} ms" for k, us in ops))
    return "\n".join(lines)


def size_and_fidelity_section(setups: list[Setup], variants: dict[str, dict[str, nn.Module]]) -> str:
    rows = []
    for s in setups:
        ours, peer = variants[s.name]["ours"], variants[s.name]["torch.ao"]
        size = state_bytes(ours) / state_bytes(s.model)
        folded, lowered, converted = s.outputs(build_ours(s)), s.outputs(ours), s.outputs(peer)
        fidelity = sqnr_db(folded, lowered)
        rows.append([s.name, f"{size:.3f}", "met" if size <= MAX_SIZE_RATIO else "MISSED",
                     f"{fidelity:.1f}", "met" if fidelity >= MIN_SQNR_DB else "MISSED",
                     f"{sqnr_db(s.outputs(build_peer_reference(s)), converted):.1f}",
                     f"{sqnr_db(s.reference, lowered):.1f}", f"{sqnr_db(s.reference, converted):.1f}"])
    return markdown_table(rows, ["model", "state bytes lowered / float", f"target (<= {MAX_SIZE_RATIO})",
                                 "SQNR lowered vs folded (dB)", f"target (>= {MIN_SQNR_DB:.0f})",
                                 "torch.ao: int8 vs its reference model (dB)", "SQNR lowered vs float (dB)",
                                 "SQNR torch.ao vs float (dB)"])


def digits_section() -> str:
    """The trained digits CNN: lowered accuracy against the fake-quant (folded) accuracy."""
    data = load_digits_data()
    model = pretrained_digits_cnn()
    calibration = [data.train_x[i:i + 64] for i in range(0, 512, 64)]
    folded = fxcompress.run(model, STATIC, data.test_x[:8], calibration_data=calibration, progress=False).model
    lowered = fxcompress.run(folded, ["lower", "eliminate_dead_nodes"], data.test_x[:8], progress=False).model
    with torch.inference_mode():
        accs = [accuracy(m, data.test_x, data.test_y) for m in (model, folded, lowered)]
        fidelity = sqnr_db(folded(data.test_x), lowered(data.test_x))
    gap = abs(accs[2] - accs[1])
    return markdown_table([[*(f"{a:.2f}" for a in accs), f"{gap:.2f}", "met" if gap <= 0.2 else "MISSED",
                            f"{fidelity:.1f}", "met" if fidelity >= MIN_SQNR_DB else "MISSED"]],
                          ["float top-1 (%)", "fake-quant (folded) top-1 (%)", "lowered top-1 (%)",
                           "|lowered - fake-quant|", "target (<= 0.2)", "SQNR lowered vs folded (dB)",
                           f"target (>= {MIN_SQNR_DB:.0f})"])


def approximate_section(setups: list[Setup], variants: dict[str, dict[str, nn.Module]], rounds: int) -> str:
    """``lower(approximate_post_ops=True)`` where it changes the model (SiLU/hardswish fused):
    latency against the exact default and torch.ao, 1 thread, and fidelity to the folded graph."""
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for s in setups:
        example = s.calibration[0][:1]
        approx = fxcompress.run(build_ours(s), [("lower", {"approximate_post_ops": True}), "eliminate_dead_nodes"],
                                example, progress=False)
        if not any(getattr(m, "post_op", "none") not in EXACT_POST_OPS + ("none",) for m in approx.model.modules()):
            continue  # no approximated activation to fuse: the same model
        fidelity = sqnr_db(s.outputs(build_ours(s)), s.outputs(approx.model))
        for b in (1, 32):
            x = photo_batches(1, b, seed=2)[0]
            times = best_medians({"exact": variants[s.name]["ours"], "approximate": approx.model,
                                  "torch.ao": variants[s.name]["torch.ao"]}, x, rounds)
            rows.append([s.name, b, f"{times['exact'] * 1e3:.2f}", f"{times['approximate'] * 1e3:.2f}",
                         f"{times['torch.ao'] * 1e3:.2f}", f"{times['exact'] / times['torch.ao']:.2f}",
                         f"{times['approximate'] / times['torch.ao']:.2f}", f"{fidelity:.1f}"])
            print(rows[-1], flush=True)
    torch.set_num_threads(threads)
    if not rows:
        return "No model here has an approximated activation to fuse."
    return markdown_table(rows, ["model", "batch", "exact (ms)", "approximate (ms)", "torch.ao (ms)",
                                 "exact / torch.ao", "approximate / torch.ao",
                                 "approximate: SQNR vs folded (dB)"])


def lowering_notes(setups: list[Setup]) -> str:
    """What the lower pass reported per model: int8 op counts, float boundaries, fallbacks."""
    rows = []
    for s in setups:
        stats = s.built["lower_stats"]
        rows.append([s.name, ", ".join(f"{n} {k}" for k, n in sorted(stats["int8_ops"].items())),
                     len(stats["float_nodes"]), stats["quantize"], stats["dequantize"], len(stats["fallbacks"])])
    return markdown_table(rows, ["model", "int8 ops", "layers not int8", "quantize points", "dequantize points",
                                 "reference fallbacks"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(max(args.threads))
    setups = [prepare(name) for name in args.models]
    variants = {s.name: build_variants(s) for s in setups}
    fidelity = size_and_fidelity_section(setups, variants)
    digits = digits_section()
    notes = lowering_notes(setups)
    print(fidelity, digits, notes, sep="\n\n", flush=True)
    latency, misses = latency_section(setups, variants, args.threads, args.batches, args.rounds)
    print(latency)
    approximate = approximate_section(setups, variants, args.rounds)
    print(approximate)
    profiled = ("\nMissed latency targets, profiled (self CPU time per call of the top operators):\n\n"
                + "\n".join(misses)) if misses else ""
    body = f"""
Our lowered static int8 model (`recipes.int8_static()`: fold, `lower`, `eliminate_dead_nodes`) against
torch.ao FX's converted int8 model (x86 qconfig; the peer, used in benchmarks only), the float model
(BatchNorm folded) and its bfloat16 cast. Setup as in the torch.ao section: zoo weights, BatchNorm
statistics re-estimated on photo crops, the same calibration batches for both sides.

### Latency

Medians of `torch.utils.benchmark` (best of {args.rounds} interleaved rounds), 224 px photos.

{latency}
{profiled}

By default `lower` fuses only the activations oneDNN computes exactly as torch does (ReLU,
ReLU6/hardtanh, leaky ReLU), so the lowered model stays bit for bit the folded graph; SiLU runs
with torch's op between a float32-output conv and the quantization (inside the `Quantize`, or as a
float op where its output is read in float). With `approximate_post_ops=True` SiLU and hardswish
are fused into the kernels too (1 thread):

{approximate}

### Size and fidelity

State bytes of the lowered model against the float model's; SQNR of the lowered model against the
folded fake-quant graph (what lowering must preserve; `inf` = bit for bit) and against float,
beside torch.ao's. The folded graph computes as the int8 kernels do (exact integer accumulation,
the kernels' float32 rescaling and rounding order, 16-bit activation scales; see docs/lowering.md),
so nothing lands a code off at a rounding tie. These random-weight models are very sensitive to
one-code perturbations (the last two columns: what 8-bit quantization itself costs them against
float, on both sides), which is what a float-computed reference suffers: the peer's int8 model
against its own reference model (quantize-dequantize around float ops, `convert_to_reference_fx`)
is the column beside ours.

{fidelity}

The trained digits CNN (`fxcompress.examples.digits`, 8 calibration batches of 64 training images,
the 360 test images):

{digits}

### What was lowered

{notes}
"""
    write_section("vs_torch_ao_latency", "Lowered int8 vs torch.ao FX, fp32 and bf16", body)


if __name__ == "__main__":
    main()
