"""cast: half-precision deployment keeps the output dtypes, halves the state, mixes no dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxcompress
from fxcompress.errors import ConfigError
from fxcompress.examples.digits import DigitsResNet, load_digits_data
from fxcompress.quant.layers import ObservedLayer
from fxcompress.quant.lowered import DynamicQuantLinear
from fxcompress.quant.observers import MinMaxObserver
from fxcompress.quant.spec import default_weight_spec

from _transformers import small_bert


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def casts(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "to"]


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return load_digits_data().test_x[:16]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_digits_resnet_runs_in_half_and_returns_float32(dtype: str, digits: torch.Tensor) -> None:
    model = DigitsResNet().eval()
    expected = model(digits)
    result = fxcompress.run(model, [("cast", {"dtype": dtype})], (digits,))
    gm, row = result.model, result.report.rows[0]
    half = getattr(torch, dtype)
    assert row.modified and all(p.dtype == half for p in gm.parameters())
    assert row.after.state_bytes == pytest.approx(result.report.before.state_bytes / 2, rel=0.01)
    # One cast for the input, one back for the output: nothing else mixes dtypes.
    assert row.stats["casts_inserted"] == 2 and len(casts(gm)) == 2
    out = gm(digits)
    assert out.dtype == torch.float32 and cosine(expected, out) >= 0.999
    assert (out.argmax(1) == expected.argmax(1)).float().mean() >= 0.9


def test_tensors_created_in_float32_inside_the_graph_are_cast() -> None:
    class Offset(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.fc(x) + torch.ones_like(x, dtype=torch.float32)  # made by the model itself
            return self.fc(y), torch.softmax(y.float(), dim=-1)

    model = Offset().eval()
    x = torch.randn(4, 8)
    expected = model(x)
    gm = fxcompress.run(model, ["cast"], (x,)).model
    outputs = gm(x)
    assert [o.dtype for o in outputs] == [torch.float32, torch.float32]
    for a, b in zip(expected, outputs):
        assert cosine(a, b) >= 0.999


def test_out_of_scope_modules_keep_float32_and_get_float32_inputs() -> None:
    model, ids = small_bert()
    expected = model(ids)
    result = fxcompress.run(model, [("cast", {"skip": ["layers.1"]})], (ids,))
    gm = result.model
    assert all(p.dtype == torch.float32 for p in gm.get_submodule("layers.1").parameters())
    assert all(p.dtype == torch.bfloat16 for p in gm.get_submodule("layers.0").parameters())
    assert cosine(expected, gm(ids)) >= 0.999


def test_lowered_modules_keep_their_integer_state() -> None:
    model, ids = small_bert()
    result = fxcompress.run(model, ["quantize_dynamic", ("cast", {"dtype": "bfloat16"})], (ids,))
    layers = [m for m in result.model.modules() if isinstance(m, DynamicQuantLinear)]
    assert layers and all(m.weight.dtype == torch.int8 and m.weight_scale.dtype == torch.float32 for m in layers)
    out = result.model(ids)
    assert out.dtype == torch.float32 and cosine(model(ids), out) >= 0.99


def test_a_graph_with_observers_is_refused() -> None:
    observed = nn.Sequential(ObservedLayer(nn.Linear(4, 4), MinMaxObserver(default_weight_spec())))
    with pytest.raises(ConfigError, match="observed stage"):
        fxcompress.run(observed.eval(), ["cast"], (torch.randn(2, 4),), leaf_modules=[ObservedLayer])


def test_bad_dtype() -> None:
    with pytest.raises(ConfigError, match="dtype"):
        fxcompress.run(nn.Linear(4, 4).eval(), [("cast", {"dtype": "float8"})], (torch.randn(2, 4),))
