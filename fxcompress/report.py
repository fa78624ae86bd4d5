"""The report of a pipeline run: one row per pass and a before/after summary.

``str(report)`` renders tables with tabulate; :meth:`Report.to_dict`,
:meth:`Report.to_json` and :meth:`Report.to_markdown` give the same content
for machines and docs.  Figures are measured on the graph after each pass,
never copied from what a pass claims.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tabulate import tabulate
from torch import fx

__all__ = ["Snapshot", "PassRow", "Report", "snapshot", "state_bytes", "weight_count", "human", "ratio"]

_NON_WEIGHT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _unique_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State tensors, each storage counted once (tied weights are not double counted)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def _weights_and_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """(weight elements, state bytes) from one walk over the state (it is O(modules), not free)."""
    params = {id(p) for p in module.parameters()}
    weights = nbytes = 0
    for name, t in _unique_state(module).items():
        nbytes += t.numel() * t.element_size()
        leaf = name.rpartition(".")[2]
        if id(t) in params or (leaf.endswith(("weight", "bias")) and leaf not in _NON_WEIGHT_BUFFERS):
            weights += t.numel()
    return weights, nbytes


def state_bytes(module: torch.nn.Module) -> int:
    """Bytes of the state dict's tensors (what a safetensors file holds, headers aside)."""
    return _weights_and_bytes(module)[1]


def weight_count(module: torch.nn.Module) -> int:
    """Number of weight elements: parameters plus the weight/bias buffers of lowered modules
    (e.g. int8 weights).  Norm statistics and quantization scales/zero points are not weights."""
    return _weights_and_bytes(module)[0]


@dataclass(frozen=True)
class Snapshot:
    """Size figures of one graph."""

    nodes: int
    parameters: int
    state_bytes: int
    macs: int


def snapshot(gm: fx.GraphModule) -> Snapshot:
    """Measure a shape-annotated graph (MACs need ``tensor_meta``)."""
    from .macs import count_macs

    weights, nbytes = _weights_and_bytes(gm)
    return Snapshot(len(gm.graph.nodes), weights, nbytes, count_macs(gm))


@dataclass
class PassRow:
    """What one pass did: its figures afterwards, its time and its own stats."""

    name: str
    options: dict[str, Any]
    after: Snapshot
    seconds: float
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


def human(n: float, unit: str = "") -> str:
    """A count with an SI suffix, 4 significant digits: ``human(12_374_000) == "12.37M"``."""
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{suffix}{unit}"
        n /= 1000
    return f"{n:.4g}P{unit}"


# The table shows this many entries of a dict or list stat (to_dict() and to_json() keep them all),
# and wraps the stats column at this width, so that one pass's stats stay readable.
_STAT_ITEMS = 4
_STATS_WIDTH = 100


def _few(items: list[str]) -> list[str]:
    extra = len(items) - _STAT_ITEMS
    return items if extra <= 0 else items[:_STAT_ITEMS] + [f"... {extra} more"]


def _stat(key: str, value: Any) -> str:
    """One stat for the table: ``key=value``, a dict inline as ``key(k=v, ...)``; long ones shortened."""
    if isinstance(value, dict):
        return f"{key}(" + ", ".join(_few([f"{k}={v}" for k, v in value.items()])) + ")"
    if isinstance(value, (list, tuple)) and len(value) > _STAT_ITEMS:
        return f"{key}=[" + ", ".join(_few([str(v) for v in value])) + "]"
    return f"{key}={value}"


def _number(value: Any) -> Any:
    """A metric for the summary: floats to 4 significant digits, anything else as it is."""
    return f"{value:.4g}" if isinstance(value, float) else value


def ratio(after: float, before: float) -> str:
    """``after / before`` as ``"0.256x"`` (``"-"`` when ``before`` is 0)."""
    return f"{after / before:.3f}x" if before else "-"


@dataclass
class Report:
    """Per-pass rows plus the figures before the first pass.

    ``notes`` carries what a user must not miss: fallbacks taken, warnings.
    """

    before: Snapshot
    rows: list[PassRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def after(self) -> Snapshot:
        return self.rows[-1].after if self.rows else self.before

    def to_dict(self) -> dict[str, Any]:
        return {
            "before": asdict(self.before),
            "after": asdict(self.after),
            "passes": [asdict(r) for r in self.rows],
            "notes": list(self.notes),
            "metrics": dict(self.metrics),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def _pass_table(self, wrap: bool) -> tuple[list[list[Any]], list[str]]:
        headers = ["pass", "modified", "nodes", "parameters", "state", "MACs", "time", "stats"]
        rows = [["(input)", "", self.before.nodes, human(self.before.parameters),
                 human(self.before.state_bytes, "B"), human(self.before.macs), "", ""]]
        for r in self.rows:
            stats = ", ".join(_stat(k, v) for k, v in r.stats.items() if k != "notes" and v != {})
            if wrap:
                stats = textwrap.fill(stats, _STATS_WIDTH, break_long_words=False, break_on_hyphens=False)
            rows.append([r.name, "yes" if r.modified else "no", r.after.nodes, human(r.after.parameters),
                         human(r.after.state_bytes, "B"), human(r.after.macs), f"{r.seconds:.3f}s", stats])
        return rows, headers

    def _summary_table(self) -> tuple[list[list[Any]], list[str]]:
        b, a = self.before, self.after
        # Counts as strings with separators: tabulate would print a column that mixes
        # them with the task metric's floats in scientific notation.
        rows = [[k, f"{getattr(b, k):,}", f"{getattr(a, k):,}", ratio(getattr(a, k), getattr(b, k))]
                for k in ("nodes", "parameters", "state_bytes", "macs")]
        # change: after/before for the counts ("0.256x"), after - before for a metric ("+0.01").
        rows += [[k, _number(v.get("before", "")), _number(v.get("after", "")), v.get("change", "")]
                 for k, v in self.metrics.items() if isinstance(v, dict)]
        return rows, ["", "before", "after", "change"]

    def _render(self, fmt: str) -> str:
        # Markdown cells cannot hold line breaks: only the text table wraps its stats.
        passes = tabulate(*self._pass_table(wrap=fmt != "github"), tablefmt=fmt)
        # No number parsing in the summary: tabulate would reformat "11,689,512" as 1.16895e+07.
        summary = tabulate(*self._summary_table(), tablefmt=fmt, disable_numparse=True,
                           colalign=("left", "right", "right", "right"))
        parts = [passes, summary]
        if self.notes:
            parts.append("\n".join(f"- {n}" for n in self.notes))
        return "\n\n".join(parts)

    def to_markdown(self) -> str:
        return self._render("github")

    def __str__(self) -> str:
        return self._render("simple")
