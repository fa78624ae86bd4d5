"""The result of a sensitivity analysis: entries, a table, JSON, files.

An :class:`Entry` is one single change (a layer at a precision, a group at a
pruning ratio) with what it cost: the output SQNR against the float model,
the task metric and its drop when an ``eval_fn`` was given, and what it saves
(weight bytes for quantization; parameters and MACs for pruning).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tabulate import tabulate

from ..report import human
from .files import write_atomically

__all__ = ["Entry", "Sensitivity"]


@dataclass(frozen=True)
class Entry:
    """One measured change.

    ``kind`` is "quant" (``target`` a module path, ``setting`` "int8"/"int4") or
    "prune" (``target`` a group name, ``group`` its index, ``setting`` the ratio).
    ``sqnr_db`` is the output SQNR against float (``inf``: identical); ``metric``
    and ``drop`` (baseline minus metric) are None without ``eval_fn``.  ``saved``
    counts what the change removes: ``bytes`` (weights), or ``params`` and ``macs``.
    """

    kind: str
    target: str
    setting: str | float
    sqnr_db: float
    metric: float | None = None
    drop: float | None = None
    group: int | None = None
    saved: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sqnr_db"] = _json_float(self.sqnr_db)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Entry":
        d = dict(d)
        d["sqnr_db"] = float(d["sqnr_db"])
        return cls(**d)


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


@dataclass
class Sensitivity:
    """Every entry of one analysis, in a fixed order (layers in graph order, each precision;
    then groups in graph order, each ratio), plus what they were measured against.

    ``baseline`` is the float model's metric (None without ``eval_fn``);
    ``kept_float`` lists layers no precision can take, with the reason;
    ``cached`` says whether this call was answered from the cache.
    """

    entries: list[Entry]
    baseline: float | None
    model_hash: str
    options: dict[str, Any]
    kept_float: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    cached: bool = False
    ranks: int = 1

    def quant(self, path: str, precision: str) -> Entry | None:
        """The entry of layer ``path`` at ``precision``, if measured."""
        return next((e for e in self.entries if e.kind == "quant" and e.target == path and e.setting == precision),
                    None)

    def layers(self) -> list[str]:
        """The quantizable layers, in graph order."""
        return list(dict.fromkeys(e.target for e in self.entries if e.kind == "quant"))

    def to_dict(self) -> dict[str, Any]:
        return {"model_hash": self.model_hash, "baseline": self.baseline, "options": self.options,
                "kept_float": self.kept_float, "seconds": self.seconds, "ranks": self.ranks,
                "entries": [e.to_dict() for e in self.entries]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Sensitivity":
        return cls([Entry.from_dict(e) for e in d["entries"]], d["baseline"], d["model_hash"], d["options"],
                   d.get("kept_float", {}), d.get("seconds", 0.0), False, d.get("ranks", 1))

    def rows(self) -> tuple[list[list[Any]], list[str]]:
        """Table rows and headers: one row per entry."""
        headers = ["kind", "target", "setting", "SQNR dB", "metric", "drop", "saves"]
        rows = []
        for e in self.entries:
            saves = ", ".join(human(v, "B") if k == "bytes" else f"{human(v)} {k}" for k, v in e.saved.items())
            rows.append([e.kind, e.target, e.setting, f"{e.sqnr_db:.2f}",
                         "" if e.metric is None else f"{e.metric:.4g}", "" if e.drop is None else f"{e.drop:+.4g}",
                         saves])
        return rows, headers

    def table(self, fmt: str = "simple") -> str:
        """The entries as a tabulate table (``fmt="github"`` for markdown)."""
        rows, headers = self.rows()
        return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True)

    def __str__(self) -> str:
        return self.table()

    def save(self, directory: str | os.PathLike, *, plots: bool | None = None) -> list[Path]:
        """Write ``sensitivity.md`` (table), ``sensitivity.json`` and, with matplotlib,
        ``sensitivity_layers.png`` / ``sensitivity_groups.png``; returns the paths written.

        ``plots=None`` plots when matplotlib is installed; ``True`` requires it (ImportError
        saying how to install it); ``False`` writes no plots.  Each file appears atomically.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written = [write_atomically(out / "sensitivity.md", self.table("github") + "\n"),
                   write_atomically(out / "sensitivity.json", self.to_json() + "\n")]
        if plots is not False:
            from . import plots as plotting

            if plots or plotting.available():
                written += plotting.plot(self, out)
        return written
