"""lower(if_slower=...): the whole-model speed check, and the float model kept where int8 loses.

Which way wins is a measurement on this CPU, so the tests assert what each outcome must look
like, and force the outcome only with a lowering that is slower than float on any CPU (the
reference backend accumulates in float64 and adds quantization points around every layer).
"""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import fxcompress
from fxcompress import artifact, recipes
from fxcompress.errors import ConfigError
from fxcompress.examples.digits import load_digits_data, pretrained_digits_cnn
from fxcompress.quant.lowered import LoweredModule
from fxcompress.quant.lowering.timing import float_reference

FOLD = ["fuse_conv_bn", "insert_observers", "calibrate", "fold_fake_quant"]


@pytest.fixture(scope="module")
def digits_folded() -> tuple[fx.GraphModule, torch.Tensor]:
    data = load_digits_data()
    gm = fxcompress.run(pretrained_digits_cnn(), FOLD, (data.test_x[:8],),
                        calibration_data=[data.train_x[:128]]).model
    return gm, data.test_x[:8]


def lowered_modules(gm: nn.Module) -> list[nn.Module]:
    return [m for m in gm.modules() if isinstance(m, LoweredModule)]


def test_keep_float_returns_the_float_model_when_int8_is_slower(digits_folded, tmp_path) -> None:
    gm, x = digits_folded
    result = fxcompress.run(gm, [("lower", {"backend": "reference", "if_slower": "keep_float"})], (x,))
    stats, model = result.report.rows[0].stats, result.model
    kept = stats["kept_float"]
    assert kept["lowered_ms"] > kept["float_ms"] == stats["speed"]["float_ms"]
    assert kept["discarded"]["int8_nodes"] > 0 and stats["int8_nodes"] == 0 and stats["int8_ops"] == {}
    assert lowered_modules(model) == []
    assert any("kept the float model" in note for note in stats["notes"])
    # The float model is the folded graph's float version: dequantized weights, no quantization points.
    assert torch.equal(model(x), float_reference(gm)(x))
    artifact.save(result, tmp_path / "kept.fxc")
    assert torch.equal(artifact.load(tmp_path / "kept.fxc")(x), model(x))


def test_warn_keeps_the_slower_int8_model_and_says_so(digits_folded) -> None:
    gm, x = digits_folded
    with pytest.warns(UserWarning, match="slower than its float version"):
        result = fxcompress.run(gm, [("lower", {"backend": "reference", "check_speed": True})], (x,))
    stats = result.report.rows[0].stats
    assert "kept_float" not in stats and stats["int8_nodes"] > 0 and lowered_modules(result.model)


def test_keep_float_on_x86_follows_the_measurement(digits_folded) -> None:
    # Either outcome is legitimate on some CPU; each must be consistent with its own timing.
    gm, x = digits_folded
    result = fxcompress.run(gm, recipes.int8_static(if_slower="keep_float")[-2:], (x,))
    stats = result.report.rows[0].stats
    speed = stats["speed"]
    if "kept_float" in stats:
        assert speed["float_ms"] < speed["lowered_ms"] and not lowered_modules(result.model)
    else:
        assert speed["lowered_ms"] <= speed["float_ms"] and lowered_modules(result.model)


@pytest.mark.parametrize("options, match", [
    ({"if_slower": "float"}, "if_slower must be one of"),
    ({"if_slower": "keep_float", "strict": True}, "contradict"),
])
def test_bad_if_slower_options_are_config_errors(options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        fxcompress.get_pass("lower")(**options)
