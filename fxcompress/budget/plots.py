"""Plots of a sensitivity analysis (matplotlib, imported only here and only when plotting).

* ``sensitivity_layers.png``: per-layer bars, the output SQNR of each layer
  quantized alone, one bar per precision (higher is safer);
* ``sensitivity_groups.png``: per-group curves, the output SQNR (or the metric
  drop, with an ``eval_fn``) against the pruning ratio, one line per group.
"""

from __future__ import annotations

import importlib.util
import io
import math
from pathlib import Path
from typing import Any

__all__ = ["available", "require", "plot", "tradeoff_plot"]


def available() -> bool:
    """Whether matplotlib can be imported."""
    return importlib.util.find_spec("matplotlib") is not None


def require() -> Any:
    """``matplotlib.pyplot`` with the file-only Agg backend; ImportError saying how to install it."""
    if not available():
        raise ImportError("plotting needs matplotlib, which is not installed: pip install matplotlib "
                          "(or pip install 'fxcompress[bench]'), or pass plots=False")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _finite(x: float, cap: float = 80.0) -> float:
    return cap if math.isinf(x) and x > 0 else (0.0 if math.isinf(x) else min(x, cap))


def _png(fig: Any, path: Path) -> Path:
    from .files import write_atomically

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return write_atomically(path, buffer.getvalue())


def plot(result: Any, directory: Path) -> list[Path]:
    """Write the two sensitivity plots of ``result`` into ``directory``; returns their paths."""
    plt = require()
    written = []
    layers = result.layers()
    precisions = list(dict.fromkeys(e.setting for e in result.entries if e.kind == "quant"))
    if layers:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(layers) + 2), 4.2))
        width = 0.8 / max(1, len(precisions))
        for i, precision in enumerate(precisions):
            values = [_finite(e.sqnr_db) if (e := result.quant(p, precision)) else 0.0 for p in layers]
            ax.bar([x + (i - (len(precisions) - 1) / 2) * width for x in range(len(layers))], values, width,
                   label=f"{precision} weights" + (" + int8 input" if result.options.get("activations") else ""))
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=75, ha="right", fontsize=7)
        ax.set_ylabel("output SQNR vs float (dB), layer alone")
        ax.set_title("Per-layer quantization sensitivity (lower = more sensitive)")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.15)  # room for the legend above the bars
        ax.legend(fontsize=8, loc="upper right", ncol=len(precisions))
        ax.grid(axis="y", alpha=0.3)
        written.append(_png(fig, directory / "sensitivity_layers.png"))
        plt.close(fig)
    groups: dict[int, list[Any]] = {}
    for e in result.entries:
        if e.kind == "prune":
            groups.setdefault(e.group, []).append(e)
    if groups:
        use_metric = result.baseline is not None
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for entries in groups.values():
            xs = [0.0] + [float(e.setting) for e in entries]
            ys = [0.0 if use_metric else 80.0] + [e.drop if use_metric else _finite(e.sqnr_db) for e in entries]
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1, label=entries[0].target)
        ax.set_xlabel("ratio of the group's channels removed")
        ax.set_ylabel("metric drop (points)" if use_metric else "output SQNR vs float (dB; 80 = unchanged)")
        ax.set_title("Per-group pruning sensitivity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2 if len(groups) > 8 else 1, loc="best")
        written.append(_png(fig, directory / "sensitivity_groups.png"))
        plt.close(fig)
    return written


def tradeoff_plot(series: dict[str, list[tuple[float, float]]], path: Path, *, xlabel: str, ylabel: str,
                  title: str, marks: dict[str, tuple[float, float]] | None = None) -> Path:
    """A size / metric trade-off: one line per series of ``(x, y)`` points (log x axis), and the
    points of ``marks`` as large markers named in the legend."""
    plt = require()
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    for name, points in series.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=name)
    for (name, (x, y)), marker in zip((marks or {}).items(), "*DPX^v"):
        ax.scatter([x], [y], s=90, marker=marker, zorder=3, label=name, edgecolors="black", linewidths=0.5)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    written = _png(fig, path)
    plt.close(fig)
    return written
