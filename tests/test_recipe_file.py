"""Recipe files are trusted code, loaded without importing anything, and can name the data,
loss and metric a run needs (fxcompress.recipe_file)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fxcompress.errors import ConfigError
from fxcompress.recipe_file import load_recipe

DIGITS_MODEL = """
[model]
factory = "fxcompress.examples.digits:DigitsCNN"

[[inputs]]
shape = [2, 1, 8, 8]
"""


def _write(tmp_path: Path, text: str, name: str = "recipe.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def side_effect_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module that leaves a marker file when imported, on sys.path; the marker's path."""
    marker = tmp_path / "imported"
    (tmp_path / "fxc_side_effect.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("imported")

        import torch
        from torch import nn

        Leaf = nn.ReLU

        def rotate(x):
            return x

        def batches():
            return [torch.randn(4, 1, 8, 8) for _ in range(2)]

        def loss(outputs, target):
            return torch.nn.functional.cross_entropy(outputs, target)
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("fxc_side_effect", None)


def test_loading_a_recipe_imports_nothing_it_names(tmp_path: Path, side_effect_module: Path) -> None:
    path = _write(tmp_path, """
        [model]
        factory = "fxc_side_effect:Leaf"
        [[inputs]]
        shape = [2, 4]
        [run]
        leaf_modules = ["fxc_side_effect:Leaf", "features.*"]
        autowrap = ["fxc_side_effect:rotate"]
        loss_fn = "fxc_side_effect:loss"
        eval_fn = "fxc_side_effect:rotate"
        [calibration]
        source = "fxc_side_effect:batches"
        """)
    spec = load_recipe(path)
    assert not side_effect_module.exists() and "fxc_side_effect" not in sys.modules
    assert spec.run_options["loss_fn"] == "fxc_side_effect:loss"
    options = spec.resolved_run_options()  # running the recipe imports, as a script would
    assert side_effect_module.exists() and callable(options["loss_fn"]) and options["autowrap"][0].__name__ == "rotate"


def test_a_builtin_factory_is_refused_before_it_is_called(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = _write(tmp_path, f"""
        [model]
        factory = "os:system"
        kwargs = {{ command = "touch {marker}" }}
        [[inputs]]
        shape = [1, 3]
        """)
    spec = load_recipe(path)
    with pytest.raises(ConfigError, match=r"model.factory 'os:system' is a builtin_function_or_method, not an "
                                          r"nn.Module class or a Python function.*it was not called"):
        spec.build_model()
    assert not marker.exists()


def test_a_class_factory_that_is_not_a_module_is_refused(tmp_path: Path) -> None:
    spec = load_recipe(_write(tmp_path, '[model]\nfactory = "pathlib:Path"\n[[inputs]]\nshape = [1]\n'))
    with pytest.raises(ConfigError, match="is the class Path, not an nn.Module subclass"):
        spec.build_model()


@pytest.mark.parametrize("content, match", [
    (None, r"recipe file .* is a directory; give the path of a .toml file"),
    (b"\xff\xfe[model]\n", r"is not UTF-8 text \(byte 0\)"),
])
def test_a_directory_or_a_binary_file_is_a_config_error(tmp_path: Path, content: bytes | None, match: str) -> None:
    path = tmp_path / "recipe.toml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        load_recipe(path)


def test_a_module_that_fails_to_import_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fxc_broken.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = load_recipe(_write(tmp_path, '[model]\nfactory = "fxc_broken:make"\n[[inputs]]\nshape = [1]\n'))
    with pytest.raises(ConfigError, match=r"importing 'fxc_broken' raised RuntimeError: no GPU here"):
        spec.build_model()


def test_quantization_aware_training_runs_from_a_recipe_with_named_data_and_loss(tmp_path: Path) -> None:
    path = _write(tmp_path, DIGITS_MODEL + """
        [run]
        loss_fn = "torch.nn.functional:cross_entropy"
        backend = "reference"
        progress = false

        [calibration]
        source = "digits"
        labels = true
        batches = 3
        batch_size = 16

        [[passes]]
        recipe = "int8_qat"
        steps = 3
        """)
    result = load_recipe(path).run()
    names = [row.name for row in result.report.rows]
    assert "finetune" in names and result.report.rows[names.index("finetune")].stats["steps"] == 3


def test_a_reference_source_and_metric_feed_the_run(tmp_path: Path, side_effect_module: Path) -> None:
    path = _write(tmp_path, DIGITS_MODEL + """
        [run]
        eval_fn = "fxc_side_effect:metric"
        progress = false

        [calibration]
        source = "fxc_side_effect:batches"

        [[passes]]
        recipe = "int8_static"
        backend = "reference"
        """)
    with (tmp_path / "fxc_side_effect.py").open("a") as f:
        f.write("\ndef metric(model):\n    return 0.25\n")
    result = load_recipe(path).run()
    assert result.report.metrics["task metric"]["after"] == 0.25
    assert result.report.rows[2].stats["batches"] == 2  # calibrate read the two named batches


def test_a_source_that_takes_kwargs(tmp_path: Path, side_effect_module: Path) -> None:
    with (tmp_path / "fxc_side_effect.py").open("a") as f:
        f.write("\ndef sized(n):\n    return [torch.randn(4, 1, 8, 8) for _ in range(n)]\n")
    spec = load_recipe(_write(tmp_path, DIGITS_MODEL + '[calibration]\nsource = "fxc_side_effect:sized"\n'
                                                       'kwargs = { n = 3 }\n'))
    assert len(spec.calibration_data()) == 3
    wrong = load_recipe(_write(tmp_path, DIGITS_MODEL + '[calibration]\nsource = "fxc_side_effect:sized"\n'
                                                        'kwargs = { m = 3 }\n'))
    with pytest.raises(ConfigError, match=r"calibration.source 'fxc_side_effect:sized' rejected kwargs"):
        wrong.calibration_data()


def test_named_recipes_take_scope() -> None:
    from fxcompress import recipes

    assert recipes.int8_static(scope=["layer1.*"])[1] == ("insert_observers", {"scope": ["layer1.*"]})
    assert recipes.int8_dynamic(scope="encoder")[0][1]["scope"] == ["encoder"]
    assert recipes.prune_then_int8(0.3, scope=["layer2"])[0] == ("prune_channels", {"ratio": 0.3,
                                                                                   "scope": ["layer2"]})
