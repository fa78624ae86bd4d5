"""Dynamic int8 and weight-only quantization of transformers against fp32 and bf16.

Two models: torchvision's ``vit_b_16`` (``fxcompress.zoo`` weights: its zero-initialised
head re-drawn; MLP linears and the projections inside ``nn.MultiheadAttention``) and a
BERT-base-sized encoder written out like Hugging Face's ``BertLayer``
(:class:`fxcompress.examples.bert.BertStyleEncoder`, BERT's initialisation, sequence 128).
Variants, each one ``fxcompress.run`` pass on the traced float model:

- fp32, and bf16 (``cast``);
- ``quantize_dynamic`` per token (int8 rows, oneDNN qlinear) and per tensor (oneDNN qlinear);
- ``quantize_weights`` 8-bit (per row) and 4-bit (group 128), bf16 compute.

Latency: medians from ``torch.utils.benchmark``, best of interleaved rounds, at batch 1
and 8. Fidelity: output cosine similarity against fp32 (target >= 0.99 for dynamic int8).
Size: state bytes against fp32 (target: 4-bit weight-only vit_b_16 <= 0.15).

Usage: ``python benchmarks/dynamic.py [--threads 1] [--batches 1 8] [--rounds 2]``
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.benchmark as tb
from torch import nn

import fxcompress
from _common import markdown_table, write_section
from fxcompress import zoo
from fxcompress.examples.bert import BertStyleEncoder, bert_inputs
from fxcompress.report import state_bytes

SEQUENCE = 128
MIN_COSINE = 0.99
MAX_INT4_SIZE = 0.15
VARIANTS: dict[str, list] = {
    "fp32": [],
    "bf16": [("cast", {"dtype": "bfloat16"})],
    "dynamic int8 per token": [("quantize_dynamic", {"granularity": "per_token"})],
    "dynamic int8 per tensor": [("quantize_dynamic", {"granularity": "per_tensor"})],
    "weight-only int8": [("quantize_weights", {"bits": 8, "group_size": None})],
    "weight-only int4 g128": [("quantize_weights", {"bits": 4, "group_size": 128})],
}


def models() -> dict[str, tuple[nn.Module, Callable[[int], torch.Tensor]]]:
    """Each model with a function making its input for a batch size."""
    return {
        "vit_b_16": (zoo.build("vit_b_16"), lambda b: zoo.example_input("vit_b_16", batch=b, seed=3)),
        "bert-base-style": (BertStyleEncoder(), lambda b: bert_inputs(b, SEQUENCE, seed=3)),
    }


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def best_medians(built: dict[str, nn.Module], x: torch.Tensor, rounds: int) -> dict[str, float]:
    best = dict.fromkeys(built, float("inf"))
    with torch.inference_mode():
        for model in built.values():
            model(x)
        for _ in range(rounds):
            for name, model in built.items():
                timer = tb.Timer("model(x)", globals={"model": model, "x": x})
                best[name] = min(best[name], timer.blocked_autorange(min_run_time=0.5).median)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quality, speed = [], []
    for name, (model, make_input) in models().items():
        example = make_input(1)
        built = {v: fxcompress.run(model, passes, (example,), progress=False, check="shapes").model
                 for v, passes in VARIANTS.items()}
        float_bytes = state_bytes(built["fp32"])
        evaluation = make_input(4)
        with torch.inference_mode():
            reference = built["fp32"](evaluation)
            for v, m in built.items():
                sim, size = cosine(reference, m(evaluation)), state_bytes(m) / float_bytes
                target = ""
                if v.startswith("dynamic"):
                    target = "met" if sim >= MIN_COSINE else "MISSED"
                if name == "vit_b_16" and v == "weight-only int4 g128":
                    target = "met" if size <= MAX_INT4_SIZE else "MISSED"
                quality.append([name, v, f"{sim:.5f}", f"{size:.3f}", target])
                print(quality[-1], flush=True)
        for b in args.batches:
            times = best_medians(built, make_input(b), args.rounds)
            for v, t in times.items():
                speed.append([name, b, v, f"{t * 1e3:.1f}", f"{times['fp32'] / t:.2f}x", f"{times['bf16'] / t:.2f}x"])
                print(speed[-1], flush=True)
    q_table = markdown_table(quality, ["model", "variant", "cosine vs fp32", "state bytes / fp32",
                                       f"target (cosine >= {MIN_COSINE}; int4 vit size <= {MAX_INT4_SIZE})"])
    s_table = markdown_table(speed, ["model", "batch", "variant", "latency (ms)", "speedup vs fp32",
                                     "speedup vs bf16"])
    print(q_table, s_table, sep="\n\n")
    write_section("dynamic", "Dynamic int8 and weight-only transformers", f"""
`vit_b_16` (zoo weights; the projections inside `nn.MultiheadAttention` are quantized too) and a
BERT-base-sized encoder written out like Hugging Face's `BertLayer`
(`fxcompress.examples.bert.BertStyleEncoder`, sequence {SEQUENCE}). Each variant is one pass on the
traced float model. Cosine similarity of the outputs against fp32 on 4 held-out inputs.

### Fidelity and size

{q_table}

### Latency ({args.threads} thread{'s' if args.threads > 1 else ''})

Medians of `torch.utils.benchmark`, best of {args.rounds} interleaved rounds.

{s_table}
""")


if __name__ == "__main__":
    main()
