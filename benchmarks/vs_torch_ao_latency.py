"""Lowered int8 latency against torch.ao FX, torchao PT2E + inductor, fp32 and bf16; size; the contract.

Same setup as ``benchmarks/vs_torch_ao.py`` (whose helpers it uses): realistic-weights zoo
models with BatchNorm re-estimated on random crops of real photographs, both sides
calibrated on the same batches, plus torchvision's random-init resnet18 (BatchNorm
statistics 0/1) as the issue reported it. Per model:

- **ours**: ``recipes.int8_static(weights=...)`` with the weights this CPU's int8 kernels take
  (8-bit where they multiply exactly; 7-bit ``portable_weight_spec`` where they add in
  saturating 16-bit pairs, AVX2), lowered for x86 with the recipe's measured choices
  (``only_if_faster``), separately for each thread count and batch size it is timed at;
- **torch.ao**: ``prepare_fx``/``convert_fx`` with the x86 qconfig (a peer, used here only);
- **PT2E**: torchao 0.18's ``prepare_pt2e``/``convert_pt2e`` with ``X86InductorQuantizer`` and
  ``torch.compile`` (inductor, freezing), 1 thread, batch 1 (a peer, used here only);
- **fp32**: the float model with BatchNorm folded (``fuse_conv_bn``);
- **bf16**: that model after the ``cast`` pass.

Latency: medians from ``torch.utils.benchmark`` (``blocked_autorange``), the candidates
timed in interleaved rounds, each keeping its best median (the machine is shared).
Targets: ours / torch.ao <= 1.0 and ours / fp32 <= 1.0 at 1 and 2 threads, batch 1 and 32;
ours / PT2E <= 1.0 on mobilenet_v2 and convnext_tiny (reported for the others). The
arithmetic contract (``fxcompress.quant.contract``) is checked on every model: each x86
op within one code of its reference twin on held-out photos.

Usage: ``python benchmarks/vs_torch_ao_latency.py [--models ...] [--threads 1 2]
[--batches 1 32] [--rounds 3] [--pt2e-models ...]``
"""

from __future__ import annotations

import argparse
import copy
import traceback
import warnings

import torch
import torch.utils.benchmark as tb
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity, profile

import fxcompress
from _common import markdown_table, weights_for_this_cpu, write_section
from fxcompress import recipes
from fxcompress.examples.digits import accuracy, load_digits_data, pretrained_digits_cnn
from fxcompress.quant.contract import check_contract
from fxcompress.quant.spec import default_weight_spec, portable_weight_spec
from fxcompress.report import state_bytes
from vs_torch_ao import CALIBRATION, EVALUATION, MODELS, Setup, build_peer, photo_batches, prepare, sqnr_db

MAX_LATENCY_RATIO = 1.0
MAX_SIZE_RATIO = 0.27
RANDOM_INIT = "resnet18 (random init)"
PT2E_MODELS = ["mobilenet_v2", "convnext_tiny", "efficientnet_b0", "resnet18", "resnet50"]
PT2E_TARGETS = ("mobilenet_v2", "convnext_tiny")


def prepare_random_init() -> Setup:
    """torchvision's resnet18 as constructed: random weights, BatchNorm statistics 0/1."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    calibration, evaluation = photo_batches(*CALIBRATION, seed=0), photo_batches(*EVALUATION, seed=1)
    with torch.inference_mode():
        reference = torch.cat([model(b) for b in evaluation])
    return Setup(RANDOM_INIT, model, calibration, evaluation, reference)


def folded(setup: Setup, weights: object) -> nn.Module:
    """The folded graph with ``weights`` (cached per spec)."""
    key = f"folded-{weights.bits}"  # type: ignore[attr-defined]
    if key not in setup.built:
        recipe = recipes.int8_static(weights=weights)
        setup.built[key] = fxcompress.run(setup.model, recipe[:4], setup.calibration[0][:1],
                                          calibration_data=setup.calibration, progress=False).model
    return setup.built[key]



def lowered(setup: Setup, weights: object, threads: int, batch: int) -> nn.Module:
    """``recipes.int8_static``'s lowering of the folded graph, its choices timed at ``threads`` and
    ``batch`` (cached); the lower stats go to ``setup.built``."""
    key = f"lowered-{weights.bits}-{threads}-{batch}"  # type: ignore[attr-defined]
    if key not in setup.built:
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        example = photo_batches(1, batch, seed=3)[0]
        result = fxcompress.run(folded(setup, weights), recipes.int8_static(weights=weights)[4:], example,
                                progress=False)
        torch.set_num_threads(saved)
        setup.built[key] = result.model
        setup.built[f"stats-{key}"] = result.report.rows[0].stats
    return setup.built[key]


def float_variants(setup: Setup) -> dict[str, nn.Module]:
    if "fp32" not in setup.built:
        example = setup.calibration[0][:1]
        fused = fxcompress.run(setup.model, ["fuse_conv_bn"], example, progress=False).model
        setup.built["fp32"] = fused
        setup.built["bf16"] = fxcompress.run(fused, [("cast", {"dtype": "bfloat16"})], example, progress=False).model
    return {"fp32": setup.built["fp32"], "bf16": setup.built["bf16"]}


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16); elsewhere torch
    emulates it, over a minute per batch-32 resnet call, so bf16 is timed at batch 1 only."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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


def top_ops(model: nn.Module, x: torch.Tensor, rows: int = 5) -> list[tuple[str, float]]:
    """The operators with the most self CPU time per call (microseconds)."""
    calls = 5
    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                model(x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / calls) for e in events[:rows]]


def latency_section(setups: list[Setup], weights: object, threads: list[int], batches: list[int],
                    rounds: int) -> tuple[str, list[str]]:
    rows, misses = [], []
    for t in threads:
        for b in batches:
            x = photo_batches(1, b, seed=2)[0]
            for s in setups:
                torch.set_num_threads(t)
                models = {"ours": lowered(s, weights, t, b), "torch.ao": build_peer(s), **float_variants(s)}
                if b > 1 and not native_bf16():
                    del models["bf16"]
                torch.set_num_threads(t)
                times = best_medians(models, x, rounds)
                times.setdefault("bf16", float("nan"))
                vs_ao, vs_fp32 = times["ours"] / times["torch.ao"], times["ours"] / times["fp32"]
                met = vs_ao <= MAX_LATENCY_RATIO and vs_fp32 <= MAX_LATENCY_RATIO
                rows.append([s.name, t, b, *(f"{times[k] * 1e3:.2f}" for k in ("ours", "torch.ao", "fp32", "bf16")),
                             f"{vs_ao:.2f}", f"{vs_fp32:.2f}", f"{times['ours'] / times['bf16']:.2f}",
                             "met" if met else "MISSED"])
                print(rows[-1], flush=True)
                if not met:
                    ours, peer = top_ops(models["ours"], x), top_ops(models["torch.ao"], x)
                    misses.append(f"- {s.name}, {t} threads, batch {b}: ours "
                                  + ", ".join(f"`{k}` {us / 1e3:.2f} ms" for k, us in ours)
                                  + "; torch.ao " + ", ".join(f"`{k}` {us / 1e3:.2f} ms" for k, us in peer))
    table = markdown_table(rows, ["model", "threads", "batch", "ours (ms)", "torch.ao (ms)", "fp32 (ms)",
                                  "bf16 (ms)", "ours / torch.ao", "ours / fp32", "ours / bf16",
                                  f"target (both <= {MAX_LATENCY_RATIO})"])
    if not native_bf16():
        table += ("\n\nbf16 is timed at batch 1 only (nan at batch 32): this CPU has no native bfloat16 "
                  "(no AVX512-BF16 / AMX-BF16), and torch's emulation takes over a minute per batch-32 call.")
    return table, misses


def build_pt2e(setup: Setup) -> nn.Module:
    """torchao PT2E static int8 with X86InductorQuantizer, compiled with inductor (freezing)."""
    import torch._inductor.config as inductor_config
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    example = setup.calibration[0][:1]
    with torch.no_grad():
        exported = torch.export.export(copy.deepcopy(setup.model), (example,)).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        for batch in setup.calibration:  # the same images, one at a time: the export is for batch 1
            for image in batch.split(1):
                prepared(image)
        converted = convert_pt2e(prepared)
    compiled = torch.compile(converted)
    with inductor_config.patch(freezing=True), torch.inference_mode():  # compiled where it is timed
        compiled(example)
    return compiled


def compiled_frozen(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Our lowered model under ``torch.compile`` with freezing, as PT2E's: int8 layers become direct
    oneDNN calls (``fxcompress.oplib.frozen``); compiled now, in inference mode, where it is timed."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(copy.deepcopy(model))
    with inductor_config.patch(freezing=True), torch.inference_mode():
        compiled(x)
    return compiled


def pt2e_section(names: list[str], setups: dict[str, Setup], weights: object, rounds: int) -> str:
    rows = []
    torch.set_num_threads(1)
    x = photo_batches(1, 1, seed=2)[0]
    for name in names:
        s = setups[name]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peer = build_pt2e(s)
        except Exception as exc:  # the peer's failure is a result, reported as such
            message = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            rows.append([name, "-", "-", "-", "-", f"PT2E failed: {type(exc).__name__}: {message}", "-"])
            traceback.print_exc()
            continue
        ours = lowered(s, weights, 1, 1)
        times = best_medians({"ours": ours, "frozen": compiled_frozen(ours, x), "PT2E": peer}, x, rounds)
        ratio = times["ours"] / times["PT2E"]
        target = ("met" if ratio <= 1.0 else "MISSED") if name in PT2E_TARGETS else "reported"
        rows.append([name, f"{times['ours'] * 1e3:.2f}", f"{times['frozen'] * 1e3:.2f}", f"{times['PT2E'] * 1e3:.2f}",
                     f"{ratio:.2f}", target, f"{times['frozen'] / times['PT2E']:.2f}"])
        print(rows[-1], flush=True)
    return markdown_table(rows, ["model", "ours, eager (ms)", "ours, compiled with freezing (ms)",
                                 "PT2E + inductor (ms)", "ours eager / PT2E",
                                 "target (<= 1.0 on mobilenet_v2, convnext_tiny)", "ours compiled / PT2E"])


def contract_section(setups: list[Setup], weights: object) -> str:
    """Per model: the per-op contract on held-out photos, size, and SQNR against float and folded."""
    rows = []
    torch.set_num_threads(1)
    for s in setups:
        low = lowered(s, weights, 1, 1)
        report = check_contract(low, s.evaluation[0])
        differing, total = report.differing_codes()
        size = state_bytes(low) / state_bytes(s.model)
        rows.append([s.name, "holds" if report.holds else f"BROKEN ({len(report.violations)} ops)", len(report.ops),
                     f"{differing} / {total}", f"{size:.3f}", "met" if size <= MAX_SIZE_RATIO else "MISSED",
                     f"{sqnr_db(s.outputs(folded(s, weights)), s.outputs(low)):.1f}",
                     f"{sqnr_db(s.reference, s.outputs(low)):.1f}", f"{sqnr_db(s.reference, s.outputs(build_peer(s))):.1f}",
                     f"{sqnr_db(s.reference, s.outputs(folded(s, default_weight_spec()))):.1f}",
                     f"{sqnr_db(s.reference, s.outputs(folded(s, portable_weight_spec()))):.1f}"])
        print(rows[-1], flush=True)
    return markdown_table(rows, ["model", "per-op contract", "x86 ops checked", "codes differing / all",
                                 "state bytes lowered / float", f"target (<= {MAX_SIZE_RATIO})",
                                 "SQNR lowered vs folded (dB)", "SQNR lowered vs float (dB)",
                                 "SQNR torch.ao vs float (dB)", "folded 8-bit weights vs float (dB)",
                                 "folded 7-bit weights vs float (dB)"])


def lowering_notes(setups: list[Setup], weights: object, threads: list[int], batches: list[int]) -> str:
    """What the lower pass chose per model and configuration."""
    rows = []
    for s in setups:
        for t in threads:
            for b in batches:
                stats = s.built.get(f"stats-lowered-{weights.bits}-{t}-{b}")  # type: ignore[attr-defined]
                if stats is None:
                    continue
                rows.append([s.name, t, b, ", ".join(f"{n} {k}" for k, n in sorted(stats["int8_ops"].items())),
                             ", ".join(f"{n} {k}" for k, n in sorted(stats.get("choices", {}).items())),
                             stats["quantize"], stats["dequantize"], len(stats["fallbacks"])])
    return markdown_table(rows, ["model", "threads", "batch", "int8 ops", "ways chosen (layers)",
                                 "quantize points", "dequantize points", "reference fallbacks"])


def digits_section(weights: object) -> str:
    """The trained digits CNN: lowered accuracy against float and the folded (fake-quant) graph."""
    data = load_digits_data()
    model = pretrained_digits_cnn()
    calibration = [data.train_x[i:i + 64] for i in range(0, 512, 64)]
    recipe = recipes.int8_static(weights=weights)
    fold = fxcompress.run(model, recipe[:4], data.test_x[:8], calibration_data=calibration, progress=False).model
    low = fxcompress.run(fold, recipe[4:], data.test_x[:8], progress=False).model
    with torch.inference_mode():
        accs = [accuracy(m, data.test_x, data.test_y) for m in (model, fold, low)]
    report = check_contract(low, data.test_x)
    return markdown_table([[*(f"{a:.2f}" for a in accs), f"{abs(accs[2] - accs[1]):.2f}",
                            "holds" if report.holds else "BROKEN"]],
                          ["float top-1 (%)", "folded top-1 (%)", "lowered top-1 (%)", "|lowered - folded|",
                           "per-op contract"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pt2e-models", nargs="*", default=PT2E_MODELS)
    args = parser.parse_args()
    label, weights = weights_for_this_cpu()
    torch.set_num_threads(max(args.threads))
    setups = [prepare(name) for name in args.models]
    if "resnet18" in args.models:
        setups.insert(1, prepare_random_init())
    by_name = {s.name: s for s in setups}
    for name in args.pt2e_models:
        by_name.setdefault(name, prepare(name))
    contract = contract_section(setups, weights)
    digits = digits_section(weights)
    print(contract, digits, sep="\n\n", flush=True)
    latency, misses = latency_section(setups, weights, args.threads, args.batches, args.rounds)
    print(latency, flush=True)
    pt2e = pt2e_section(args.pt2e_models, by_name, weights, args.rounds) if args.pt2e_models else "Not run."
    print(pt2e, flush=True)
    notes = lowering_notes(setups, weights, args.threads, args.batches)
    profiled = ("\nMissed targets, profiled (self CPU time per call of the top operators):\n\n"
                + "\n".join(misses)) if misses else ""
    body = f"""
Our lowered static int8 model (`recipes.int8_static()`, with {label} weights: the ones this CPU's
int8 kernels take, see [lowering](lowering.md#backends-kernel-paths-by-cpu-and-fallbacks)) against
torch.ao FX's converted int8 model (x86 qconfig), torchao 0.18's PT2E flow (`X86InductorQuantizer` +
`torch.compile`), the float model (BatchNorm folded) and its bfloat16 cast; the peers are used in
benchmarks only. Setup as in the torch.ao section: zoo weights, BatchNorm statistics re-estimated on
photo crops, the same calibration batches for every side; plus torchvision's random-init resnet18.
Our model is lowered for each thread count and batch size it is timed at (the recipe times each
layer's ways to run on this CPU: `lower(only_if_faster=True)`).

### Latency

Medians of `torch.utils.benchmark` (best of {args.rounds} interleaved rounds), 224 px photos.

{latency}
{profiled}

### Against torchao PT2E + inductor

1 thread, batch 1; PT2E's model is compiled by inductor (freezing on); ours runs eagerly, and
compiled the same way (`torch.compile` with freezing: its int8 layers become direct oneDNN calls,
see [deploying](deployment.md#compiling-for-speed-freezing)).

{pt2e}

### The arithmetic contract, size and fidelity

The per-op contract (`fxcompress.quant.contract.check_contract` on 8 held-out photos, batch of 8):
every x86 op within one code of its reference twin given the same inputs. End to end, the lowered
model against its folded graph is measured, not promised: a code that rounds the other way early in
these random-weight networks can grow. The last two columns are what 8-bit and 7-bit weights cost
against float on the folded graph (7-bit weights run on every x86 CPU's kernels).

{contract}

The trained digits CNN (`fxcompress.examples.digits`, 8 calibration batches of 64 training images,
the 360 test images):

{digits}

### What was lowered

{notes}
"""
    write_section("vs_torch_ao_latency", "Lowered int8 vs torch.ao FX, torchao PT2E, fp32 and bf16", body)


if __name__ == "__main__":
    main()
