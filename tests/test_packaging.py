"""The installed package must contain every sub-package of the source tree."""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "fxcompress").rglob("__init__.py")
    }
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert config["package-dir"] == {"fxcompress.passes": "passes"}
    assert "fxcompress.passes" in listed


def test_top_level_passes_folder_is_the_passes_subpackage() -> None:
    import fxcompress.passes

    assert Path(fxcompress.passes.__path__[0]).resolve() == (ROOT / "passes").resolve()
