"""Join the sections in ``docs/benchmarks/*.md`` into ``docs/benchmarks.md`` with an index.

Each benchmark script writes its own section (see ``_common.write_section``);
this script runs last (``make bench`` does so) and can be rerun alone at any
time: it only reads the sections and writes one file.
"""

from __future__ import annotations

import re
from pathlib import Path

from _common import ROOT, SECTIONS

OUT = ROOT / "docs" / "benchmarks.md"

_INTRO = """# Benchmarks

Every table below is written by a script in `benchmarks/` (named in its section);
`make bench` reruns them all and then this page.  Figures depend on the machine:
each section says where it was measured.
"""


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def assemble(sections: Path = SECTIONS, out: Path = OUT) -> Path:
    """Write ``out`` from the section files, sorted by name; returns its path."""
    parts, index = [], []
    for path in sorted(sections.glob("*.md")):
        text = path.read_text().strip()
        first = text.splitlines()[0] if text else ""
        title = first[3:] if first.startswith("## ") else path.stem
        index.append(f"- [{title}](#{_anchor(title)})")
        parts.append(text)
    body = "\n".join(index) if index else "_No benchmark has been run yet._"
    out.write_text(_INTRO + "\n" + body + "\n\n" + "\n\n".join(parts) + ("\n" if parts else ""))
    return out


if __name__ == "__main__":
    print(f"wrote {assemble().relative_to(ROOT)}")
