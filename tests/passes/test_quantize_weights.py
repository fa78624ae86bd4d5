"""quantize_weights: weight-only 8/4/2-bit linears (attention projections included), packed storage."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxcompress
from fxcompress import recipes, zoo
from fxcompress.errors import ConfigError
from fxcompress.quant.lowered import WeightOnlyLinear
from fxcompress.quant.lowered_attention import QuantMultiheadAttention

from _transformers import small_bert, small_vit, vit_input

# Output cosine vs float on the tiny ViT (the BERT-style encoder is easier: its residual
# stream is dominated by the embeddings). 2-bit RTN is a size setting, not an accuracy one.
MIN_COSINE = {8: 0.999, 4: 0.95, 2: 0.2}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def modules_of(gm: fx.GraphModule, cls: type) -> list[nn.Module]:
    return [m for m in gm.modules() if isinstance(m, cls)]


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_vit_weights_shrink_and_outputs_hold(bits: int) -> None:
    model, x = small_vit(), vit_input()
    expected = model(x)
    result = fxcompress.run(model, [("quantize_weights", {"bits": bits, "group_size": 32})], (x,))
    gm, row = result.model, result.report.rows[0]
    assert row.modified and row.stats["linear"] == 5 and row.stats["attention"] == 2
    assert not modules_of(gm, nn.Linear) and not modules_of(gm, nn.MultiheadAttention)
    layers = modules_of(gm, WeightOnlyLinear)
    assert len(layers) == 9 and all(m.bits == bits for m in layers)  # 5 + 2 x (in_proj, out_proj)
    packed = layers[0].weight
    assert packed.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert packed.shape[1] == 128 * bits // 8  # two 4-bit / four 2-bit values per byte
    assert row.stats["bytes_after"] == row.after.state_bytes < row.stats["bytes_before"]
    out = gm(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert cosine(expected, out) >= MIN_COSINE[bits]


def test_fewer_bits_smaller_state() -> None:
    model, ids = small_bert()
    sizes = [fxcompress.run(model, [("quantize_weights", {"bits": b})], (ids,)).report.rows[0].after.state_bytes
             for b in (8, 4, 2)]
    assert sizes[0] > sizes[1] > sizes[2]


def test_group_that_does_not_divide_stays_float_and_none_is_per_row() -> None:
    model = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    x = torch.randn(3, 96)
    result = fxcompress.run(model, [("quantize_weights", {"group_size": 64})], (x,))
    stats = result.report.rows[0].stats
    assert stats["linear"] == 1 and "does not divide in_features 96" in stats["float_nodes"]["_0"]
    assert isinstance(result.model.get_submodule("0"), nn.Linear)
    per_row = fxcompress.run(model, [("quantize_weights", {"group_size": None})], (x,)).model
    assert [m.scale.shape for m in modules_of(per_row, WeightOnlyLinear)] == [(64, 1), (8, 1)]


def test_kernel_fallbacks_are_reported() -> None:
    model = nn.Sequential(nn.Linear(128, 64)).eval()
    x = torch.randn(2, 128)
    bf16 = fxcompress.run(model, [("quantize_weights", {"bits": 4})], (x,)).report.rows[0].stats
    assert bf16["fallbacks"] == []  # 2 rows, N % 16 == 0, K % 128 == 0: the int4 kernel runs
    fp32 = fxcompress.run(model, [("quantize_weights", {"bits": 4, "compute_dtype": "float32"})],
                          (x,)).report.rows[0].stats
    assert len(fp32["fallbacks"]) == 1 and "bfloat16" in fp32["fallbacks"][0]["reason"]
    two = fxcompress.run(model, [("quantize_weights", {"bits": 2})], (x,)).report.rows[0].stats
    assert "no 2-bit kernel" in two["fallbacks"][0]["reason"]


def test_int4_recipe_attention_uses_the_packed_projections() -> None:
    model, x = small_vit(), vit_input(batch=1)
    gm = fxcompress.run(model, recipes.int4_weight_only(group_size=64), (x,)).model
    mha = modules_of(gm, QuantMultiheadAttention)[0]
    assert isinstance(mha.in_proj, WeightOnlyLinear) and mha.in_proj.bits == 4
    assert "bits=4" in repr(mha)


@pytest.mark.parametrize("options, message", [
    ({"bits": 3}, "bits=3"),
    ({"group_size": 0}, "group_size"),
    ({"compute_dtype": "float16"}, "compute_dtype"),
    ({"backend": "arm"}, "backend"),
])
def test_bad_options(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        fxcompress.run(nn.Linear(4, 4), [("quantize_weights", options)], (torch.randn(2, 4),))


@pytest.mark.slow
def test_vit_b_16_int4_state_is_at_most_0_15_of_float() -> None:
    model = zoo.build("vit_b_16")
    x = zoo.example_input("vit_b_16", batch=1)
    result = fxcompress.run(model, [("quantize_weights", {"bits": 4, "group_size": 128})], (x,), check="shapes")
    stats = result.report.rows[0].stats
    assert stats["attention"] == 12 and stats["float_nodes"] == {}
    assert result.report.rows[0].after.state_bytes / result.report.before.state_bytes <= 0.15
