"""docs/guarantees.md names real tests: every file and every test function it cites exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "guarantees.md"
# `tests/x.py::test_a`, `::test_b` (same file as the reference before it), or a whole file `tests/x.py`
REFERENCE = re.compile(r"`((?:tests/[\w/]+\.py)?)(?:::(\w+))?`")


def test_every_cited_test_exists() -> None:
    cited: list[tuple[str, str | None]] = []
    for line in PAGE.read_text().splitlines():
        current = None
        for path, name in REFERENCE.findall(line):
            if not path and not name:
                continue
            current = path or current
            assert current is not None, f"'::{name}' before any file on: {line[:80]}"
            cited.append((current, name or None))
    assert len(cited) > 40
    for path, name in cited:
        source = (ROOT / path).read_text()
        if name is not None:
            assert re.search(rf"^def {name}\(", source, re.M), f"{path}::{name} does not exist"


def test_the_page_is_linked_from_the_index_and_the_readme() -> None:
    assert "(guarantees.md)" in (ROOT / "docs" / "index.md").read_text()
    assert "(docs/guarantees.md)" in (ROOT / "README.md").read_text()
