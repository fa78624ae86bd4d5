"""The public face: `import fxcompress` is light, subpackages are attributes, and
`fxcompress.verify` is both the invariants module and the artifact check."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from torch import nn

import fxcompress

HEAVY = ("safetensors", "cryptography", "networkx", "fxcompress.artifact", "fxcompress.recipes",
         "fxcompress.bench", "fxcompress.quant", "fxcompress.prune", "fxcompress.ops", "fxcompress.macs",
         "fxcompress.train")


def test_import_is_light_and_subpackages_are_attributes() -> None:
    code = textwrap.dedent(f"""
        import sys
        import fxcompress
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
        names = ("recipes", "bench", "quant", "prune", "ops", "macs", "artifact", "zoo", "examples", "passes")
        print([type(getattr(fxcompress, n)).__name__ for n in names])
        print(fxcompress.recipes.int8_static()[0], fxcompress.macs.count_macs.__name__)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    imported, kinds, recipe = done.stdout.splitlines()
    assert imported == "[]"
    assert kinds == str(["module"] * 10)
    assert recipe == "fuse_conv_bn count_macs"


def test_unknown_attributes_still_raise_attribute_error() -> None:
    try:
        fxcompress.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no attribute 'no_such_thing'" in str(exc)
    else:
        raise AssertionError("fxcompress.no_such_thing did not raise")
    assert {"recipes", "bench", "verify_artifact", "save"} <= set(dir(fxcompress))


def test_verify_is_the_invariants_module_and_checks_an_artifact_when_called(tmp_path: Path) -> None:
    import fxcompress.verify as invariants

    assert fxcompress.verify is invariants and callable(fxcompress.verify.register_check)
    assert fxcompress.verify.stage_of(fxcompress.trace(nn.Linear(2, 2), torch.randn(1, 2))) == "float"
    result = fxcompress.run(nn.Linear(2, 2).eval(), [], torch.randn(1, 2), progress=False)
    fxcompress.save(result, tmp_path / "m.fxc")
    assert fxcompress.verify(tmp_path / "m.fxc") == fxcompress.verify_artifact(tmp_path / "m.fxc")
    assert fxcompress.verify_artifact(tmp_path / "m.fxc")["format"] == "fxcompress.artifact"
    assert isinstance(fxcompress.load(tmp_path / "m.fxc"), torch.fx.GraphModule)
