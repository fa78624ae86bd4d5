"""smooth_quant: exact in float, and static int8 closer to float on a BERT-style encoder with outliers."""

from __future__ import annotations

import pytest
import torch

import fxcompress
from fxcompress.errors import ConfigError
from fxcompress.examples.bert import BertConfig, BertStyleEncoder, bert_inputs

CONFIG = BertConfig(vocab_size=2000, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=256,
                    max_positions=32)
STATIC = ["insert_observers", "calibrate", "fold_fake_quant"]


def _encoder() -> BertStyleEncoder:
    model = BertStyleEncoder(CONFIG, seed=0)
    with torch.no_grad():  # trained BERTs have a few LayerNorm channels with large gains: outliers
        for norm in (m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)):
            norm.weight[[3, 17, 40]] *= 20.0
    return model


IDS = bert_inputs(2, 16, CONFIG, seed=0)
CALIBRATION = [bert_inputs(4, 16, CONFIG, seed=s) for s in range(1, 4)]
TEST = bert_inputs(8, 16, CONFIG, seed=9)


def test_exact_in_float_and_closer_to_float_after_int8(rel_err) -> None:
    model = _encoder()
    smoothed = fxcompress.run(model, ["smooth_quant"], IDS, calibration_data=CALIBRATION)  # exactness checked
    stats = smoothed.report.rows[0].stats
    assert stats["groups"] == 4 and stats["smoothed"] >= 2 and stats["mul_nodes"] == stats["smoothed"]
    assert all(a is None or 0.3 <= a <= 0.9 for a in stats["alpha"].values())
    with torch.no_grad():
        reference = model(TEST)
        plain = fxcompress.run(model, STATIC, IDS, calibration_data=CALIBRATION).model(TEST)
        smooth = fxcompress.run(model, ["smooth_quant", *STATIC], IDS, calibration_data=CALIBRATION).model(TEST)
    assert rel_err(reference, smooth) < 0.8 * rel_err(reference, plain)


def test_folds_into_a_layer_norm_read_by_the_group_alone(rel_err) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.LayerNorm(32), torch.nn.Linear(32, 16)).eval()
    with torch.no_grad():
        net[0].weight[[1, 5]] = 30.0
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    result = fxcompress.run(net, ["smooth_quant"], x[:2], calibration_data=[x])
    stats = result.report.rows[0].stats
    assert stats["into_norm"] == 1 and stats["mul_nodes"] == 0
    assert rel_err(net(x), result.model(x)) < 1e-5


def test_bad_options_and_stage() -> None:
    with pytest.raises(ConfigError, match="alphas"):
        fxcompress.run(_encoder(), [("smooth_quant", {"alphas": (1.5,)})], IDS, calibration_data=CALIBRATION)
    observed = fxcompress.run(_encoder(), ["insert_observers"], IDS).model
    with pytest.raises(ConfigError, match="before insert_observers"):
        fxcompress.run(observed, ["smooth_quant"], IDS, calibration_data=CALIBRATION)
