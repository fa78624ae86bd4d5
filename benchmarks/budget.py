"""Compress to a budget on the real digits task: mixed precision within 0.5 points, greedy pruning vs uniform.

Two models of ``fxcompress.examples.digits`` (the digits CNN and the small ResNet), trained on
scikit-learn's 8x8 digits, one model per seed (the seed also draws the 80/20 split):

* ``mixed_precision(max_drop=0.5)``: per-layer float / int8 / int4 weights (int8 activations),
  ``eval_fn`` = top-1 on the test split (the budget is measured with it, as NNCF's accuracy
  control measures on its validation set); state bytes of the folded model, and of the lowered
  one (the int8 kernels take int8 weights, so lowering stores int4 codes in int8);
  target <= 0.18x float bytes within 0.5 points;
* ``prune_to_budget(target="macs", keep=0.5)`` against ``prune_channels`` with the uniform
  ratio that gives no more MACs (bisection), both without fine-tuning; ``eval_fn`` = top-1 on
  a validation split held out of the training data (so the greedy choice never sees the test
  split); target: greedy >= uniform + 2 points on average over 3 seeds, never worse.

Also writes ``docs/images/budget_tradeoff.png``: the size / top-1 trade-off of
``mixed_precision(max_bytes=...)`` at several sizes (best metric within each size), per model,
with the ``max_drop=0.5`` result marked.
Writes ``docs/benchmarks/budget.md``.  Usage: ``python benchmarks/budget.py [--seeds 0 1 2]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import os

import torch

import fxcompress
from _common import ROOT, markdown_table, write_section
from fxcompress.examples.digits import (accuracy, load_digits_data, pretrained_digits_cnn,
                                        pretrained_digits_resnet)
from fxcompress.macs import count_macs
from fxcompress.report import state_bytes
from fxcompress.budget.plots import tradeoff_plot

MODELS = {"digits CNN": pretrained_digits_cnn, "digits ResNet": pretrained_digits_resnet}
BATCH = 64
VALIDATION = 256  # training images held out for the pruning metric
SIZES = (0.135, 0.145, 0.16, 0.18, 0.2, 0.23, 0.27)  # max_bytes budgets of the trade-off curve, x float


def _uniform_at(model: torch.nn.Module, example: torch.Tensor, macs: int) -> tuple[float, torch.nn.Module]:
    """The largest-kept uniform pruning whose MACs do not exceed ``macs`` (bisection on the ratio)."""
    lo, hi = 0.0, 0.95
    for _ in range(14):
        mid = (lo + hi) / 2
        pruned = fxcompress.run(model, [("prune_channels", {"ratio": mid})], example, progress=False).model
        lo, hi = (mid, hi) if count_macs(pruned) > macs else (lo, mid)
    return hi, fxcompress.run(model, [("prune_channels", {"ratio": hi})], example, progress=False).model


def mixed(name: str, seed: int) -> tuple[list, list[tuple[float, float]]]:
    data = load_digits_data(seed)
    model = MODELS[name](seed)
    pairs = [(data.train_x[i:i + BATCH], data.train_y[i:i + BATCH]) for i in range(0, 512, BATCH)]
    test = lambda m: accuracy(m, data.test_x, data.test_y)  # noqa: E731
    float_top1, float_bytes = test(model), state_bytes(model)
    result = fxcompress.run(model, ["fuse_conv_bn", ("mixed_precision", {"max_drop": 0.5})], data.train_x[:2],
                            calibration_data=pairs, eval_fn=test, progress=False)
    stats = result.report.rows[1].stats
    lowered = fxcompress.run(result.model, [("lower", {"backend": "reference"}), "eliminate_dead_nodes"],
                             data.train_x[:2], progress=False).model
    counts = {c: sum(1 for v in stats["precision"].values() if v == c) for c in ("int4", "int8", "float")}
    folded_ratio = state_bytes(result.model) / float_bytes
    drop = float_top1 - test(result.model)
    verdict = "met" if folded_ratio <= 0.18 and drop <= 0.5 else "MISSED"
    row = [name, seed, f"{float_top1:.2f}", f"{test(result.model):.2f}", f"{drop:.2f}",
           f"{counts['int4']}/{counts['int8']}/{counts['float']}", f"{folded_ratio:.3f}",
           f"{state_bytes(lowered) / float_bytes:.3f}", len(stats["trials"]), verdict]
    return row, (state_bytes(result.model) / float_bytes, test(result.model))


def tradeoff(name: str, seed: int) -> list[tuple[float, float]]:
    """(state bytes / float, test top-1) of ``mixed_precision(max_bytes=...)`` at several sizes."""
    data = load_digits_data(seed)
    model = MODELS[name](seed)
    pairs = [(data.train_x[i:i + BATCH], data.train_y[i:i + BATCH]) for i in range(0, 512, BATCH)]
    float_bytes = state_bytes(model)
    points = [(1.0, accuracy(model, data.test_x, data.test_y))]
    for fraction in SIZES:
        result = fxcompress.run(model, ["fuse_conv_bn", ("mixed_precision", {"max_bytes": int(fraction * float_bytes)})],
                                data.train_x[:2], calibration_data=pairs, progress=False)
        points.append((state_bytes(result.model) / float_bytes, accuracy(result.model, data.test_x, data.test_y)))
    return points


def pruning(name: str, seed: int) -> list:
    data = load_digits_data(seed)
    model = MODELS[name](seed)
    val_x, val_y = data.train_x[:VALIDATION], data.train_y[:VALIDATION]
    calibration = [data.train_x[VALIDATION:VALIDATION + 256]]
    validate = lambda m: accuracy(m, val_x, val_y)  # noqa: E731
    test = lambda m: accuracy(m, data.test_x, data.test_y)  # noqa: E731
    example = data.train_x[:2]
    result = fxcompress.run(model, [("prune_to_budget", {"target": "macs", "keep": 0.5})], example,
                            calibration_data=calibration, eval_fn=validate, progress=False)
    stats = result.report.rows[0].stats
    ratio, uniform = _uniform_at(model, example, count_macs(result.model))
    base = count_macs(fxcompress.trace(model, example))
    greedy_top1, uniform_top1 = test(result.model), test(uniform)
    return [name, seed, f"{test(model):.2f}", f"{count_macs(result.model) / base:.3f}", f"{greedy_top1:.2f}",
            f"{ratio:.3f}", f"{count_macs(uniform) / base:.3f}", f"{uniform_top1:.2f}",
            f"{greedy_top1 - uniform_top1:+.2f}", stats["evaluations"]]


def draw(curves: dict, marks: dict, seed: int):
    """Write docs/images/budget_tradeoff.png; returns its path."""
    (ROOT / "docs" / "images").mkdir(exist_ok=True)
    return tradeoff_plot(curves, ROOT / "docs" / "images" / "budget_tradeoff.png", marks=marks,
                         xlabel="state bytes / float (folded model, log scale)", ylabel="test top-1 (%)",
                         title=f"mixed_precision: size / top-1 trade-off on digits (seed {seed})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--plot-only", action="store_true", help="only redraw docs/images/budget_tradeoff.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("FXCOMPRESS_CACHE_DIR", tempfile.mkdtemp(prefix="fxc-bench-"))
    if args.plot_only:
        curves, marks = {}, {}
        for name in MODELS:
            marks[f"{name}: max_drop=0.5"] = mixed(name, args.seeds[0])[1]
            curves[f"{name} (max_bytes budgets)"] = tradeoff(name, args.seeds[0])
        print(draw(curves, marks, args.seeds[0]))
        return
    mp_rows, marks, curves = [], {}, {}
    for name in MODELS:
        for seed in args.seeds:
            row, point = mixed(name, seed)
            mp_rows.append(row)
            if seed == args.seeds[0]:
                marks[f"{name}: max_drop=0.5"] = point
            print(row, flush=True)
        curves[f"{name} (max_bytes budgets)"] = tradeoff(name, args.seeds[0])
    mp_headers = ["model", "seed", "float top-1", "mixed top-1", "drop", "int4/int8/float layers",
                  "folded bytes / float", "lowered bytes / float", "configurations built", "target"]
    pr_rows = []
    for name in MODELS:
        for seed in args.seeds:
            pr_rows.append(pruning(name, seed))
            print(pr_rows[-1], flush=True)
    pr_headers = ["model", "seed", "float top-1", "greedy MACs", "greedy top-1", "uniform ratio", "uniform MACs",
                  "uniform top-1", "greedy - uniform", "proposals built"]
    verdicts = []
    for name in MODELS:
        gaps = [float(r[8]) for r in pr_rows if r[0] == name]
        mean = statistics.mean(gaps)
        ok = mean >= 2.0 and min(gaps) >= 0
        verdicts.append(f"- {name}: greedy beats uniform by {mean:+.2f} points on average (min {min(gaps):+.2f}): "
                        f"{'met' if ok else 'MISSED'} (>= 2 points on average, never worse)")
    plot = draw(curves, marks, args.seeds[0])
    mp_table, pr_table = markdown_table(mp_rows, mp_headers), markdown_table(pr_rows, pr_headers)
    print(mp_table, pr_table, "\n".join(verdicts), sep="\n\n")
    write_section("budget", "Compress to a budget: mixed precision and greedy pruning (digits)", f"""
Each row is its own model, split and seed (test split: 359-360 images, one image = 0.28 points).

**`mixed_precision(max_drop=0.5)`** after `fuse_conv_bn`: the smallest per-layer mix of float /
int8 / int4 weights (int8 activations) within 0.5 points, measured with `eval_fn` = test top-1.
Target: folded model <= 0.18x float state bytes within 0.5 points.  The lowered model stores
int4 codes as int8 (the int8 kernels take int8 weights), hence its larger ratio.

{mp_table}

**`prune_to_budget(target="macs", keep=0.5)`** (greedy, `eval_fn` = top-1 on {VALIDATION} training
images held out) against uniform `prune_channels` at the ratio giving no more MACs (bisection),
both without fine-tuning, top-1 on the test split.

{pr_table}

{chr(10).join(verdicts)}

The trade-off curve: `mixed_precision(max_bytes=b)` for b = {", ".join(f"{f:g}" for f in SIZES)} x float
(seed {args.seeds[0]}), the `max_drop=0.5` model marked.

![size / top-1 trade-off]({plot.relative_to(ROOT / 'docs').as_posix()})
""")


if __name__ == "__main__":
    main()
