"""Named recipes and recipe files (fxcompress.recipes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import fxcompress
from fxcompress import recipes
from fxcompress.errors import ConfigError
from fxcompress.recipe_file import load_recipe
from fxcompress.recipes import get_recipe

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "recipes" / "resnet18_fuse.toml"


def _names(entries: list) -> list[str]:
    return [e if isinstance(e, str) else e[0] for e in entries]


def _options(entries: list, name: str) -> dict:
    found = [e[1] for e in entries if isinstance(e, tuple) and e[0] == name]
    return found[0] if found else {}


# -- named recipes ---------------------------------------------------------------


def test_available_recipes_are_the_documented_ones() -> None:
    assert recipes.available_recipes() == sorted(
        ["fusion_only", "int8_static", "int8_qat", "int8_dynamic", "int4_weight_only", "prune_then_int8"])


def test_fusion_only_runs_and_matches_the_model(rel_err) -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so fusion changes the weights
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 32, 32)
    result = fxcompress.run(model, get_recipe("fusion_only"), (x,))
    assert [r.name for r in result.report.rows] == ["fuse_conv_bn", "eliminate_dead_nodes"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    with torch.no_grad():
        assert rel_err(model(x), result.model(x)) < 1e-5


def test_int8_static_order_and_options() -> None:
    entries = recipes.int8_static(num_batches=4, backend="reference", skip=["fc"])
    assert _names(entries) == ["fuse_conv_bn", "insert_observers", "calibrate", "fold_fake_quant",
                               "lower", "eliminate_dead_nodes"]
    assert _options(entries, "calibrate") == {"num_batches": 4}
    assert _options(entries, "lower") == {"backend": "reference"}
    assert _options(entries, "insert_observers") == {"skip": ["fc"]}
    assert _options(recipes.int8_static(if_slower="keep_float"), "lower") == {"only_if_faster": True,
                                                                          "if_slower": "keep_float"}
    # Left out, options keep the passes' own defaults: plain names, no empty dicts.
    assert recipes.int8_static()[1:3] == ["insert_observers", "calibrate"]
    built = recipes.int8_static(for_onnxruntime=True, skip=["fc"])
    assert _options(built, "insert_observers") == {"skip": ["fc"], "residual_adds": "separate", "post_ops": "tables"}
    assert _options(built, "fold_fake_quant") == {"int32_bias": True}


def test_int8_qat_trains_fake_quant_before_folding() -> None:
    names = _names(recipes.int8_qat(steps=50, lr=1e-3))
    assert names.index("calibrate") < names.index("to_fake_quant") < names.index("finetune") \
        < names.index("fold_fake_quant") < names.index("lower")
    assert _options(recipes.int8_qat(steps=50, lr=1e-3), "finetune") == {"steps": 50, "lr": 1e-3}
    assert "finetune" not in _names(recipes.int8_qat(steps=0))


def test_weight_only_dynamic_and_pruning_recipes() -> None:
    assert _options(recipes.int4_weight_only(64), "quantize_weights") == {"bits": 4, "group_size": 64}
    assert _options(recipes.int8_dynamic(), "quantize_dynamic") == {"bits": 8, "ops": ["linear"]}
    pruned = get_recipe("prune_then_int8", ratio=0.3, round_to=8, backend="reference")
    assert _names(pruned)[:2] == ["prune_channels", "fuse_conv_bn"]  # prune before BN is folded
    assert _options(pruned, "prune_channels") == {"ratio": 0.3, "round_to": 8}
    assert _options(pruned, "lower") == {"backend": "reference"}


def test_unknown_recipe_suggests_close_matches() -> None:
    with pytest.raises(ConfigError, match=r"unknown recipe 'int8_statc'.*did you mean 'int8_static'"):
        get_recipe("int8_statc")


def test_unknown_recipe_option_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"recipe 'int4_weight_only'.*group_size"):
        get_recipe("int4_weight_only", groupsize=32)


# -- recipe files -----------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


_HEADER = """
[model]
factory = "torchvision.models:resnet18"
kwargs = { num_classes = 10 }

[[inputs]]
shape = [1, 3, 32, 32]
"""


def test_documented_example_recipe_runs(rel_err) -> None:
    spec = load_recipe(EXAMPLE)
    assert spec.factory == "torchvision.models:resnet18"
    assert spec.passes == ["fuse_conv_bn", "eliminate_dead_nodes"]
    assert spec.run_options["check"] == "full"
    result = spec.run()
    model = spec.build_model()
    (x,) = spec.example_inputs()
    assert x.shape == (1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(model(x), result.model(x)) < 1e-5
    assert result.pipeline == [{"name": "fuse_conv_bn", "options": {}},
                               {"name": "eliminate_dead_nodes", "options": {}}]


def test_pass_options_scope_and_named_recipes_map_to_run_entries(tmp_path: Path) -> None:
    path = _write(tmp_path, _HEADER + """
[[passes]]
name = "fuse_conv_bn"
scope = ["layer1.*"]
skip = ["layer1.0"]

[[passes]]
recipe = "fusion_only"
""")
    spec = load_recipe(path)
    assert spec.passes == [("fuse_conv_bn", {"scope": ["layer1.*"], "skip": ["layer1.0"]}),
                           "fuse_conv_bn", "eliminate_dead_nodes"]
    assert spec.eval_mode and not spec.build_model().training


def test_named_integer_inputs_become_keyword_inputs(tmp_path: Path) -> None:
    path = _write(tmp_path, """
[model]
factory = "torch.nn:Identity"
[[inputs]]
name = "input"
shape = [2, 5]
dtype = "int64"
high = 30
""")
    spec = load_recipe(path)
    inputs = spec.example_inputs()
    assert set(inputs) == {"input"} and inputs["input"].dtype == torch.int64
    assert 0 <= int(inputs["input"].min()) and int(inputs["input"].max()) < 30
    assert torch.equal(inputs["input"], load_recipe(path).example_inputs()["input"])  # seeded


def test_calibration_sources(tmp_path: Path) -> None:
    spec = load_recipe(_write(tmp_path, _HEADER + "[calibration]\nbatches = 3\nbatch_size = 4\n"))
    batches = spec.calibration_data()
    assert len(batches) == 3 and all(b.shape == (4, 3, 32, 32) for b in batches)
    digits = load_recipe(_write(tmp_path, _HEADER + '[calibration]\nsource = "digits"\nbatches = 2\n'))
    batches = digits.calibration_data()
    assert len(batches) == 2 and all(b.shape == (8, 1, 8, 8) for b in batches)
    assert load_recipe(_write(tmp_path, _HEADER)).calibration_data() is None


def test_leaf_modules_resolve_import_references_when_the_recipe_runs(tmp_path: Path) -> None:
    spec = load_recipe(_write(tmp_path, _HEADER + '[run]\nleaf_modules = ["torch.nn:ReLU", "layer4.*"]\n'))
    assert spec.run_options["leaf_modules"] == ["torch.nn:ReLU", "layer4.*"]  # loading imports nothing
    assert spec.resolved_run_options()["leaf_modules"] == [nn.ReLU, "layer4.*"]
    typo = load_recipe(_write(tmp_path, _HEADER + '[run]\nleaf_modules = ["torch.nn:ReLu"]\n'))
    with pytest.raises(ConfigError, match=r"has no attribute 'ReLu'.*did you mean 'ReLU'"):
        typo.resolved_run_options()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[model\n", r"is not valid TOML"),
        (_HEADER + "[pases]\n", r"unknown key 'pases' in the top level \(did you mean 'passes'\?\)"),
        ('[[inputs]]\nshape = [1]\n', r"missing the \[model\] table"),
        ('[model]\nfactory = "torchvision.models.resnet18"\n[[inputs]]\nshape = [1]\n',
         r"model.factory must be 'pkg.module:callable'"),
        ('[model]\nfactory = "torch.nn:Identity"\n', r"at least one \[\[inputs\]\] table"),
        ('[model]\nfactory = "torch.nn:Identity"\n[inputs]\nshape = [1]\n', r"at least one \[\[inputs\]\]"),
        ('[model]\nfactory = "torch.nn:Identity"\n[[inputs]]\nshape = [1, 0]\n', r"inputs\[0\].shape"),
        ('[model]\nfactory = "torch.nn:Identity"\n[[inputs]]\nshape = [1]\ndtype = "float33"\n',
         r"inputs\[0\].dtype 'float33' is not a torch dtype"),
        (_HEADER + '[run]\nchek = "full"\n', r"unknown key 'chek' in \[run\] \(did you mean 'check'\?\)"),
        (_HEADER + '[run]\nseed = "0"\n', r"run.seed must be an integer"),
        (_HEADER + '[run]\ntolerance = true\n', r"run.tolerance must be a number"),
        (_HEADER + '[calibration]\nsource = "imagenet"\n', r"calibration.source must be one of"),
        (_HEADER + '[calibration]\nbatches = "4"\n', r"calibration.batches must be an integer"),
        (_HEADER + '[[passes]]\nname = "fuse_conv_bm"\n', r"unknown pass 'fuse_conv_bm'.*did you mean 'fuse_conv_bn'"),
        (_HEADER + '[[passes]]\nname = "fuse_conv_bn"\nratio = 0.5\n', r"pass 'fuse_conv_bn' has no option 'ratio'"),
        (_HEADER + '[[passes]]\nname = "fuse_conv_bn"\nrecipe = "fusion_only"\n', r"exactly one of `name`"),
        (_HEADER + '[[passes]]\nrecipe = "int4_weight_only"\nbits = 3\n', r"passes\[0\]: recipe 'int4_weight_only'"),
        (_HEADER + '[run]\nleaf_modules = ["torch.nn:Re Lu"]\n', r"run.leaf_modules must be 'pkg.module:callable'"),
        (_HEADER + '[run]\nloss_fn = "cross_entropy"\n', r"run.loss_fn must be 'pkg.module:callable'"),
        (_HEADER + '[calibration]\nsource = "my.data:batches"\nbatches = 2\n', r"calibration.batches applies to"),
        (_HEADER + '[calibration]\nlabels = true\n', r"calibration.labels applies to the 'digits' source"),
    ],
)
def test_bad_recipe_files_name_file_key_and_remedy(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_recipe(path)
    assert str(path) in str(info.value)


def test_missing_file_and_bad_factory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.toml")
    spec = load_recipe(_write(tmp_path, '[model]\nfactory = "no_such_pkg.mod:f"\n[[inputs]]\nshape = [1]\n'))
    with pytest.raises(ConfigError, match=r"cannot import 'no_such_pkg.mod'"):
        spec.build_model()
    spec = load_recipe(_write(tmp_path, '[model]\nfactory = "torch.nn:Linear"\nkwargs = { features = 3 }\n'
                                        '[[inputs]]\nshape = [1]\n'))
    with pytest.raises(ConfigError, match=r"rejected kwargs \{'features': 3\}"):
        spec.build_model()
    spec = load_recipe(_write(tmp_path, '[model]\nfactory = "fxcompress.examples.bert:bert_inputs"\n'
                                        'kwargs = { batch = 1, length = 2 }\n[[inputs]]\nshape = [1]\n'))
    with pytest.raises(ConfigError, match="returned Tensor, not an nn.Module"):
        spec.build_model()
