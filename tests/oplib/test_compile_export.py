"""Lowered models under torch.compile and torch.export, and the operator library on its own.

Compiled and exported programs call the same torch.ops.fxcompress operators as the eager
model, so on one machine their outputs are bit for bit the eager lowered model's (x86 and
reference backends both: each op picks the same kernel or reference path). A program saved
with torch.export loads and runs in a fresh process that imports torch and
fxcompress.oplib only. The zoo models (resnet18, mobilenet_v2, efficientnet_b0) compile in
20-60 s each here: they are marked slow; benchmarks/deploy.py times them.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fxcompress
from fxcompress import zoo
from fxcompress.examples import digits
from fxcompress.quant.spec import portable_weight_spec


def _static(backend: str = "x86") -> list:
    return fxcompress.recipes.int8_static(weights=portable_weight_spec(), backend=backend, only_if_faster=False)


@pytest.fixture(scope="module")
def lowered_resnet() -> tuple[torch.fx.GraphModule, torch.Tensor]:
    data = digits.load_digits_data()
    batches = [(data.train_x[i:i + 32], data.train_y[i:i + 32]) for i in range(0, 96, 32)]
    result = fxcompress.run(digits.pretrained_digits_resnet(), _static(), data.test_x[:4], calibration_data=batches,
                            progress=False)
    return result.model, data.test_x[:24]


def _run_fresh(code: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def test_the_operator_library_imports_nothing_else_of_fxcompress() -> None:
    (loaded,) = _run_fresh("""
        import sys, torch
        import fxcompress.oplib
        assert hasattr(torch.ops.fxcompress, "qconv")
        print(sorted(m for m in sys.modules if m.startswith("fxcompress") and m != "fxcompress"
                     and not m.startswith("fxcompress.oplib")))
    """)
    assert loaded == "[]"


def test_compiled_lowered_model_equals_eager_bit_for_bit(lowered_resnet) -> None:
    model, x = lowered_resnet
    torch._dynamo.reset()
    compiled = torch.compile(model)
    assert torch.equal(compiled(x), model(x))
    assert torch.equal(compiled(x[:5]), model(x[:5]))  # another batch size: recompiled or dynamic, same numbers


def test_exported_program_loads_and_runs_with_the_operator_library_only(lowered_resnet, tmp_path: Path) -> None:
    model, x = lowered_resnet
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "model.pt2")
    torch.save({"x": x, "y": model(x), "y5": model(x[:5])}, tmp_path / "io.pt")
    lines = _run_fresh(f"""
        import sys, torch
        import fxcompress.oplib
        program = torch.export.load({str(tmp_path / "model.pt2")!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        run = program.module()
        print(torch.equal(run(io["x"]), io["y"]), torch.equal(run(io["x"][:5]), io["y5"]))
        print(sorted(m for m in sys.modules if m.startswith("fxcompress") and m != "fxcompress"
                     and not m.startswith("fxcompress.oplib")))
    """)
    assert lines == ["True True", "[]"]


def test_pruned_int8_mobilenet_loaded_from_its_artifact_exports(tmp_path: Path) -> None:
    """The case issue 15 reported (GuardOnDataDependentSymNode before the operator library)."""
    x = zoo.example_input("mobilenet_v2", batch=2, reduced=True)
    calibration = [zoo.example_input("mobilenet_v2", batch=2, reduced=True, seed=s) for s in (1, 2)]
    pipeline = [("prune_channels", {"ratio": 0.25}), "eliminate_dead_nodes", *_static()]
    result = fxcompress.run(zoo.build("mobilenet_v2"), pipeline, x, calibration_data=calibration, progress=False)
    fxcompress.save(result, tmp_path / "m.fxc")
    loaded = fxcompress.load(tmp_path / "m.fxc")
    program = torch.export.export(loaded, (x,))
    assert torch.equal(program.module()(x), loaded(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
@pytest.mark.parametrize("backend", ["x86", "reference"])
def test_zoo_lowered_models_compile_and_export_bit_for_bit(name: str, backend: str, tmp_path: Path) -> None:
    x = zoo.example_input(name, batch=2, reduced=True)
    calibration = [zoo.example_input(name, batch=2, reduced=True, seed=s) for s in (1, 2)]
    model = fxcompress.run(zoo.build(name), _static(backend), x, calibration_data=calibration, tolerance=1e-3,
                           progress=False).model
    eager = model(x)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(model)(x), eager)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "m.pt2")
    assert torch.equal(torch.export.load(tmp_path / "m.pt2").module()(x), eager)
