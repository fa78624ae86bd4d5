"""Helpers shared by the benchmark scripts: the environment header and the docs sections.

Every benchmark prints its tables and writes them, with a header saying where
they were measured, into ``docs/benchmarks/<name>.md``;
``benchmarks/assemble_docs.py`` joins those sections into ``docs/benchmarks.md``.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Sequence

import torch
from tabulate import tabulate

import fxcompress

__all__ = ["ROOT", "SECTIONS", "cpu_name", "int8_kernels", "environment", "weights_for_this_cpu",
           "markdown_table", "write_section"]

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ROOT / "docs" / "benchmarks"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def int8_kernels() -> str:
    """The oneDNN ISA this process's int8 kernels use and how they multiply (measured)."""
    from fxcompress.quant.isa import int8_arithmetic
    from fxcompress.quant.kernels import onednn_int8_support

    support = onednn_int8_support()
    return f"oneDNN int8 {int8_arithmetic().describe()}" if support else f"no oneDNN int8 ({support.reason})"


def environment() -> str:
    """One markdown line: versions, CPU and its int8 kernel path, cores, torch threads and the
    load when written.

    The load average says whether other work shared the machine while timing.
    """
    return (f"fxcompress {fxcompress.__version__}, torch {torch.__version__}, Python "
            f"{platform.python_version()}; {cpu_name()}, {int8_kernels()}, {os.cpu_count()} logical "
            f"cores, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")


def weights_for_this_cpu() -> tuple[str, object]:
    """``(label, QuantSpec)``: the weights whose layers run on this CPU's int8 kernels.

    8-bit (the default) where the kernels multiply exactly; 7-bit
    (``portable_weight_spec``) where they add in saturating 16-bit pairs (AVX2), on
    which 8-bit weights take the reference path (see ``docs/lowering.md``).
    """
    from fxcompress.quant.isa import int8_arithmetic
    from fxcompress.quant.kernels import onednn_int8_support
    from fxcompress.quant.spec import default_weight_spec, portable_weight_spec

    if onednn_int8_support() and not int8_arithmetic().exact_products:
        return "7-bit (portable_weight_spec)", portable_weight_spec()
    return "8-bit (default)", default_weight_spec()


def markdown_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A GitHub-flavoured markdown table."""
    return tabulate(rows, headers=list(headers), tablefmt="github")


def write_section(name: str, title: str, body: str) -> Path:
    """Write ``docs/benchmarks/<name>.md``: a level-2 title, the environment, then ``body``.

    The command that regenerates the section is named in it, so the figures
    always say where they came from.
    """
    SECTIONS.mkdir(parents=True, exist_ok=True)
    path = SECTIONS / f"{name}.md"
    text = (f"## {title}\n\n"
            f"Measured with `python benchmarks/{name}.py` on: {environment()}.\n\n"
            f"{body.strip()}\n")
    path.write_text(text)
    return path
