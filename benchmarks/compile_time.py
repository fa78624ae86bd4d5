"""Compile time scales linearly: capture + full checks + fusion + dead-node elimination.

Synthetic residual nets of about 1k, 4k and 16k graph nodes (conv-BN-ReLU
blocks with a dropout and a residual add, 4 channels, 4x4 inputs, so the
arithmetic is negligible and the figures are the compiler's own cost) go
through ``fxcompress.run(model, ["fuse_conv_bn", "eliminate_dead_nodes"],
check="full")``: deep copy, tracing, shape propagation, both passes, and the
checks after each pass.  The median of 5 runs per size gives the time per
node; the target is a per-node time at 16k of at most 1.5x that at 1k.  When
the target is missed, the script profiles the largest net and prints the hot
spots (file:function).

Usage: ``python benchmarks/compile_time.py [--runs 5] [--sizes 1000 4000 16000]``
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch
from torch import nn

import fxcompress
from _common import markdown_table, write_section

PASSES = ["fuse_conv_bn", "eliminate_dead_nodes"]
NODES_PER_BLOCK = 8  # conv, bn, relu, conv, bn, dropout, add, relu
TARGET_RATIO = 1.5


class Block(nn.Module):
    """conv-BN-ReLU, conv-BN, dropout, residual add, ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.drop(self.bn2(self.conv2(y)))
        return torch.relu(x + y)


def synthetic_net(nodes: int, channels: int = 4, seed: int = 0) -> nn.Sequential:
    """A residual net whose traced graph has about ``nodes`` nodes, in eval mode.

    BatchNorm statistics and affine parameters are random (so fusion really
    changes weights), and each residual branch is scaled by 1/sqrt(blocks) so
    that activations stay finite through thousands of blocks.
    """
    blocks = max(1, (nodes - 6) // NODES_PER_BLOCK)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), *(Block(channels) for _ in range(blocks)),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(channels, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(channels, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(channels, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(channels, generator=gen) * 0.1)
        for block in net:
            if isinstance(block, Block):
                block.bn2.weight.div_(blocks ** 0.5)
    return net.eval()


def compile_once(model: nn.Module, x: torch.Tensor) -> tuple[float, fxcompress.Result]:
    start = time.perf_counter()
    result = fxcompress.run(model, PASSES, (x,), check="full", progress=False)
    return time.perf_counter() - start, result


def measure(nodes: int, runs: int) -> dict:
    model = synthetic_net(nodes)
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.isfinite(model(x)).all(), "synthetic net overflowed"
    start = time.perf_counter()
    gm = fxcompress.trace(model, (x,))
    trace_s = time.perf_counter() - start
    times, result = [], None
    for _ in range(runs):
        seconds, result = compile_once(model, x)
        times.append(seconds)
    graph_nodes = len(gm.graph.nodes)
    median = statistics.median(times)
    return {
        "nodes": graph_nodes,
        "median": median,
        "per_node_us": 1e6 * median / graph_nodes,
        "trace": trace_s,
        "passes": {r.name: r.seconds for r in result.report.rows},
        "after": result.report.after.nodes,
        "model": model,
        "x": x,
    }


def profile(model: nn.Module, x: torch.Tensor, top: int = 25) -> str:
    """cProfile of one compile: the functions with the most own time, as text."""
    prof = cProfile.Profile()
    prof.enable()
    compile_once(model, x)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    args = parser.parse_args()
    torch.set_num_threads(1)  # the arithmetic is negligible; one thread keeps timings steady

    # Warm-up: imports, lazily loaded passes and first-call paths are not per-node costs.
    compile_once(synthetic_net(200), torch.randn(1, 3, 4, 4))
    results = [measure(n, args.runs) for n in args.sizes]
    base = results[0]["per_node_us"]
    rows = [[r["nodes"], r["after"], f"{r['trace']:.2f}", f"{r['median']:.2f}",
             f"{r['passes']['fuse_conv_bn']:.2f}", f"{r['passes']['eliminate_dead_nodes']:.2f}",
             f"{r['per_node_us']:.0f}", f"{r['per_node_us'] / base:.2f}x"] for r in results]
    headers = ["nodes", "nodes after", "trace alone (s)", f"run(), median of {args.runs} (s)",
               "fuse_conv_bn (s)", "eliminate_dead_nodes (s)", "per node (µs)", "per node vs smallest"]
    table = markdown_table(rows, headers)
    ratio = results[-1]["per_node_us"] / base
    verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
    summary = (f"Per-node time at {results[-1]['nodes']} nodes / at {results[0]['nodes']} nodes: "
               f"**{ratio:.2f}x** (target ≤ {TARGET_RATIO}x: {verdict}).")
    print(table + "\n\n" + summary)
    body = (f"`fxcompress.run(model, {PASSES}, check=\"full\")` on synthetic residual nets "
            f"(conv-BN-ReLU blocks with dropout and residual adds, 4 channels, 4x4 inputs, one thread): "
            f"deep copy, capture, shape propagation, both passes and the full checks after each.\n\n"
            f"{table}\n\n{summary}\n")
    if ratio > TARGET_RATIO:
        hot = profile(results[-1]["model"], results[-1]["x"])
        print(hot)
        body += f"\nHot spots at {results[-1]['nodes']} nodes (cProfile, by own time):\n\n```\n{hot}\n```\n"
    path = write_section("compile_time", "Compile time", body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
