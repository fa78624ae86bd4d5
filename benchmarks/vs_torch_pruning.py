"""prune_channels against Torch-Pruning (DepGraph), side by side in one run.

For resnet18, resnet50, mobilenet_v2, densenet121 and vit_b_16 (realistic
random weights from ``fxcompress.zoo``, 224x224, one thread), both tools prune
the same channel ratio with L2 magnitude importance, the classifier's outputs
kept.  Reported side by side: parameter and MACs reductions (both counted by
``fxcompress.macs`` on a traced copy, so the counter is the same), pruned
latency (``torch.utils.benchmark`` median, batch 1, eager), and the time of the
dependency analysis alone (ours: GraphModule -> groups, tracing excluded;
theirs: ``DependencyGraph().build_dependency``, which runs the model once).
Then resnet50 at 0.5: our pruned model's speedup over the float original
(target >= 2.5x).  Attention (vit_b_16): ours removes whole heads at the channel
ratio (head_dim kept) and prunes the residual stream; TP runs with the same
settings (``num_heads``, ``prune_num_heads=True``, ``prune_head_dims=False``,
``head_pruning_ratio=ratio``) and, in a second row, with its default for
attention (head dims pruned, the number of heads kept); the notes give each
tool's resulting attention widths.  Where the reductions differ, the notes say which groups
and why (frozen groups with their reasons).  Finally the zoo table: every
model of ``--zoo`` (the CI subset at reduced resolution by default, ``all``
for the 80 at full resolution) pruned at 0.3 and 0.5 with full checks, with
parameter and MACs ratios and frozen units by reason.

Writes ``docs/benchmarks/pruning.md``.  Needs the ``bench`` extra (``pip install torch-pruning``).
Usage: ``python benchmarks/vs_torch_pruning.py [--ratio 0.5] [--models resnet18 ...] [--min-time 1.0]
[--zoo ci|all|none]``
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.utils.benchmark as benchmark
from torch import nn

import fxcompress
from _common import SECTIONS, environment, markdown_table
from fxcompress import zoo
from fxcompress.capture import trace
from fxcompress.macs import count_macs
from fxcompress.prune import build_channel_graph

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "densenet121", "vit_b_16")
SPEED_TARGET = 2.5


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _macs(model: nn.Module, x: torch.Tensor) -> int:
    return count_macs(trace(copy.deepcopy(model), (x,)))


def _latency(model: nn.Module, x: torch.Tensor, min_time: float) -> float:
    timer = benchmark.Timer("model(x)", globals={"model": model, "x": x}, num_threads=1)
    with torch.no_grad():
        return timer.blocked_autorange(min_run_time=min_time).median


def _latencies(models: list[nn.Module], x: torch.Tensor, min_time: float, rounds: int = 3) -> list[float]:
    """Medians measured in interleaved rounds, best round kept: fair on a shared, loaded machine."""
    best = [float("inf")] * len(models)
    for _ in range(rounds):
        for i, model in enumerate(models):
            best[i] = min(best[i], _latency(model, x, min_time))
    return best


def _best_of(fn, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _theirs(model: nn.Module, x: torch.Tensor, ratio: float, heads: bool = True) -> tuple[nn.Module, float]:
    """Torch-Pruning's MetaPruner at ``ratio``, L2.  With ``heads``, attention layers lose whole heads
    at the same ratio and keep their head_dim (our settings); without, TP prunes head dims instead."""
    import torch_pruning as tp

    model = copy.deepcopy(model)
    head = model.fc if hasattr(model, "fc") else model.classifier if hasattr(model, "classifier") else model.heads
    ignored = [m for m in head.modules() if isinstance(m, nn.Linear)][-1:]
    num_heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    options = {"num_heads": num_heads, "prune_num_heads": True, "prune_head_dims": False,
               "head_pruning_ratio": ratio} if num_heads and heads else {}
    analysis = _best_of(lambda: tp.DependencyGraph().build_dependency(copy.deepcopy(model), example_inputs=x))
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=ignored, **options)
    pruner.step()
    if hasattr(model, "hidden_dim"):  # torchvision's ViT reshapes with this attribute, which TP leaves stale
        model.hidden_dim = model.conv_proj.out_channels
    return model.eval(), analysis


def _attention_shape(model: nn.Module) -> str | None:
    """The widths of the first attention layer: "embed E, H heads x D" (None without attention)."""
    attn = next((m for m in model.modules() if hasattr(m, "num_heads") and hasattr(m, "head_dim")), None)
    return None if attn is None else f"embed {attn.embed_dim}, {attn.num_heads} heads x {attn.head_dim}"


def _ours(model: nn.Module, x: torch.Tensor, ratio: float) -> tuple[nn.Module, float, dict]:
    gm = trace(copy.deepcopy(model), (x,))
    analysis = _best_of(lambda: build_channel_graph(gm))
    result = fxcompress.run(model, [("prune_channels", {"ratio": ratio, "importance": "l2"})], (x,),
                            check="shapes", progress=False)
    return result.model, analysis, result.report.rows[0].stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per latency measurement")
    parser.add_argument("--zoo", choices=("ci", "all", "none"), default="ci", help="zoo table models")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, notes, speed = [], [], None
    for name in args.models:
        model = zoo.build(name)
        x = zoo.example_input(name, batch=1)
        base_params, base_macs = _params(model), _macs(model, x)
        mine, my_analysis, stats = _ours(model, x, args.ratio)
        # attention layers: TP with our settings (whole heads), then TP's own default (head dims)
        variants = [(name, True)] + ([(f"{name} (TP: head dims)", False)] if _attention_shape(model) else [])
        for label, heads in variants:
            theirs, their_analysis = _theirs(model, x, args.ratio, heads)
            p_ours, p_theirs = 1 - _params(mine) / base_params, 1 - _params(theirs) / base_params
            m_ours, m_theirs = 1 - _macs(mine, x) / base_macs, 1 - _macs(theirs, x) / base_macs
            timed = [mine, theirs] + ([model] if name == "resnet50" else [])
            t_ours, t_theirs, *t_float = _latencies(timed, x, args.min_time)
            rows.append([label, f"{p_ours:.1%}", f"{p_theirs:.1%}", f"{m_ours:.1%}", f"{m_theirs:.1%}",
                         f"{t_ours * 1e3:.1f}", f"{t_theirs * 1e3:.1f}", f"{t_ours / t_theirs:.2f}",
                         f"{my_analysis:.3f}", f"{their_analysis:.3f}"])
            notes += _notes(label, stats, _attention_shape(mine), _attention_shape(theirs),
                            abs(p_ours - p_theirs) > 0.05 or abs(m_ours - m_theirs) > 0.05)
            if t_float:
                speed = (t_float[0], t_ours, t_float[0] / t_ours)
            print(markdown_table(rows[-1:], HEADERS), flush=True)
    body = (f"Ratio {args.ratio} of the channels of every group, L2 magnitude importance, classifier "
            f"outputs kept; 224x224 inputs, batch 1, one thread; latency is the median of "
            f"`torch.utils.benchmark` (eager), best of 3 interleaved rounds.  Reductions are "
            f"1 - pruned/original; MACs counted by `fxcompress.macs` on both.  Analysis: ours is "
            f"`build_channel_graph(gm)` (tracing excluded), theirs `DependencyGraph().build_dependency` "
            f"(best of 3).\n\n" + markdown_table(rows, HEADERS) + "\n")
    if notes:
        body += "\n" + "\n".join(notes) + "\n"
    if speed is not None:
        t_float, t_ours, ratio = speed
        verdict = "met" if ratio >= SPEED_TARGET else "missed"
        body += (f"\nresnet50 at {args.ratio}: float {t_float * 1e3:.1f} ms, pruned {t_ours * 1e3:.1f} ms: "
                 f"**{ratio:.2f}x** faster (target >= {SPEED_TARGET}x: {verdict}).\n")
    if args.zoo != "none":
        body += "\n" + _zoo_table(args.zoo)
    print(body)
    SECTIONS.mkdir(parents=True, exist_ok=True)
    (SECTIONS / "pruning.md").write_text(
        f"## Channel pruning\n\nMeasured with `python benchmarks/vs_torch_pruning.py` on: {environment()}.\n\n"
        f"### Against Torch-Pruning\n\n{body.strip()}\n")


def _notes(label: str, stats: dict, ours: str | None, theirs: str | None, differ: bool) -> list[str]:
    """Why a row's reductions differ: our frozen groups, and what each tool made of attention."""
    notes = []
    if differ:
        frozen = {r: n for r, n in stats["frozen"].items() if not r.startswith("model output")}
        why = "; ".join(f"{n} units: {r}" for r, n in list(frozen.items())[:3]) or "none"
        notes.append(f"- **{label}**: reductions differ by more than 5 points. Our frozen channels: {why}.")
    if ours is not None:
        notes.append(f"- **{label}**: first attention layer after pruning: ours {ours}; TP {theirs}."
                     + (" TP 1.6 given `num_heads` with `prune_num_heads=True` leaves torchvision's "
                        "`nn.MultiheadAttention` and the residual stream it sits on whole: only the MLPs shrink."
                        if differ and ours != theirs else ""))
    return notes


def _zoo_table(which: str) -> str:
    """Every zoo model at 0.3 and 0.5 through run(check="full"): ratios and frozen units."""
    names = zoo.ci_subset() if which == "ci" else zoo.list_classifiers()
    reduced = which == "ci"
    rows = []
    for name in names:
        model = zoo.build(name)
        x = zoo.example_input(name, batch=1, reduced=reduced)
        cells = [name]
        frozen: dict[str, int] = {}
        for ratio in (0.3, 0.5):
            report = fxcompress.run(model, [("prune_channels", {"ratio": ratio})], (x,), check="full",
                                    progress=False).report
            after, before = report.rows[0].after, report.before
            cells += [f"{after.parameters / before.parameters:.3f}", f"{after.macs / before.macs:.3f}"]
            frozen = report.rows[0].stats["frozen"]
        reasons = {}
        for reason, n in frozen.items():  # node names stripped: one line per kind of reason
            key = reason.split(": ", 1)[-1]
            reasons[key] = reasons.get(key, 0) + n
        cells += [sum(frozen.values()), "; ".join(f"{n}: {r}" for r, n in reasons.items())]
        rows.append(cells)
        print(markdown_table(rows[-1:], ZOO_HEADERS), flush=True)
    where = "reduced resolution (64x64; Swin 224; Inception 128)" if reduced else "full resolution"
    return (f"### The zoo\n\nEvery model pruned with `prune_channels` (L2) at {where}, `check=\"full\"`: "
            f"parameters and MACs after / before, and the units frozen at 0.5 by reason (a unit may "
            f"have several).\n\n" + markdown_table(rows, ZOO_HEADERS) + "\n")


ZOO_HEADERS = ["model", "params @0.3", "MACs @0.3", "params @0.5", "MACs @0.5", "frozen units", "reasons"]
HEADERS = ["model", "params -% (ours)", "params -% (TP)", "MACs -% (ours)", "MACs -% (TP)",
           "latency ms (ours)", "latency ms (TP)", "ours/TP", "analysis s (ours)", "analysis s (TP)"]

if __name__ == "__main__":
    main()
