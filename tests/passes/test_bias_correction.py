"""bias_correction: the quantized layers' per-channel output means match float's on the data."""

from __future__ import annotations

import pytest
import torch

import fxcompress
from fxcompress.errors import ConfigError
from fxcompress.examples.digits import load_digits_data, pretrained_digits_cnn

DATA = load_digits_data(0)
BATCHES = [DATA.train_x[i * 64:(i + 1) * 64] for i in range(4)]
EXAMPLE = DATA.train_x[:2]
INT4 = {"weights": {"bits": 4, "granularity": "per_channel"}}  # a visible weight error
OBSERVED = ["fuse_conv_bn", ("insert_observers", INT4), "calibrate"]


def _mean_error(folded, reference, x) -> torch.Tensor:
    """Per output class: the mean over the data of (quantized - float) logits."""
    with torch.no_grad():
        return (folded(x) - reference(x)).mean(dim=0)


def test_removes_the_mean_error_of_the_quantized_model() -> None:
    model = pretrained_digits_cnn()
    plain = fxcompress.run(model, OBSERVED + ["fold_fake_quant"], EXAMPLE, calibration_data=BATCHES).model
    result = fxcompress.run(model, OBSERVED + ["bias_correction", "fold_fake_quant"], EXAMPLE,
                            calibration_data=BATCHES)
    stats = result.report.rows[3].stats
    assert stats["layers"] == 6 and stats["samples"] == 256 and stats["mean_abs_correction"] > 0
    x = torch.cat(BATCHES)
    before = _mean_error(plain, model, x).abs().mean()
    after = _mean_error(result.model, model, x).abs().mean()
    assert after < 0.5 * before  # on the data it corrected with
    held_out = DATA.test_x
    assert _mean_error(result.model, model, held_out).abs().mean() < _mean_error(plain, model, held_out).abs().mean()


def test_a_layer_without_bias_gets_one() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32, bias=False), torch.nn.ReLU(),
                              torch.nn.Linear(32, 10)).eval()
    result = fxcompress.run(net, ["insert_observers", "calibrate", "bias_correction"], EXAMPLE,
                            calibration_data=BATCHES)
    assert result.model.get_submodule("1").module.bias is not None
    assert net[1].bias is None  # the caller's model is untouched


def test_needs_calibrate_first_and_checks_options() -> None:
    with pytest.raises(ConfigError, match=r"requires \['calibrate'\]"):
        fxcompress.run(pretrained_digits_cnn(), ["insert_observers", "bias_correction"], EXAMPLE,
                       calibration_data=BATCHES)
    with pytest.raises(ConfigError, match="num_batches"):
        fxcompress.run(pretrained_digits_cnn(), OBSERVED + [("bias_correction", {"num_batches": 0})], EXAMPLE,
                       calibration_data=BATCHES)
