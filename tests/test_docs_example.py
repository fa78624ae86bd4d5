"""The code in the docs runs: the worked pass of docs/pass_authoring.md and the README example.

The code blocks are read from the markdown files themselves, so the docs
cannot drift from what works.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from fxcompress import available_passes, registry
from fxcompress.report import Report

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    """The fenced ```python blocks of a markdown file, in order."""
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


@pytest.fixture(scope="module")
def authoring_doc() -> Iterator[dict[str, Any]]:
    """Execute docs/pass_authoring.md: the first block as the module file merge_linear.py
    (imported by the later blocks), the others in one namespace, as a reader would."""
    pass_file, *rest = python_blocks(ROOT / "docs" / "pass_authoring.md")
    module = types.ModuleType("merge_linear")
    module.__file__ = "merge_linear.py"
    with pytest.MonkeyPatch.context() as mp:
        # The doc's registration and module disappear afterwards, as in tests/test_registry.py.
        mp.setattr(registry, "_registered", dict(registry._registered))
        mp.setitem(sys.modules, "merge_linear", module)  # dataclasses and typing resolve names here
        exec(compile(pass_file, "merge_linear.py", "exec"), module.__dict__)
        namespace: dict[str, Any] = {"__name__": "pass_authoring_doc"}
        for i, block in enumerate(rest):
            exec(compile(block, f"docs/pass_authoring.md[block {i + 2}]", "exec"), namespace)
        yield namespace


def test_doc_pass_is_registered_under_its_name(authoring_doc: dict[str, Any]) -> None:
    assert "merge_linear" in available_passes()
    assert authoring_doc["result"].report.rows[1].name == "merge_linear"


def doc_tests(namespace: dict[str, Any]) -> list[Callable[[], None]]:
    return [v for k, v in namespace.items() if k.startswith("test_") and callable(v)]


def test_doc_tests_exist_and_pass(authoring_doc: dict[str, Any]) -> None:
    tests = doc_tests(authoring_doc)
    assert len(tests) >= 4
    for test in tests:
        test()


def test_readme_example_runs(capsys: pytest.CaptureFixture) -> None:
    (example,) = python_blocks(ROOT / "README.md")
    assert len(example.strip().splitlines()) <= 10
    namespace: dict[str, Any] = {"__name__": "readme"}
    exec(compile(example, "README.md", "exec"), namespace)
    assert isinstance(namespace["result"].report, Report)
    assert "fuse_conv_bn" in capsys.readouterr().out
