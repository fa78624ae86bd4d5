"""quantize_dynamic: linears and the projections inside nn.MultiheadAttention become dynamic int8."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxcompress
from fxcompress import artifact, recipes
from fxcompress.errors import ConfigError
from fxcompress.quant.isa import int8_arithmetic
from fxcompress.quant.kernels import onednn_int8_support
from fxcompress.quant.lowered import DynamicQuantLinear
from fxcompress.quant.lowered_attention import QuantMultiheadAttention
from fxcompress.verify import stage_of

from _transformers import small_bert, small_vit, vit_input


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def called(gm: fx.GraphModule, cls: type) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), cls)]


@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_bert_style_encoder_every_linear_dynamic(granularity: str) -> None:
    model, ids = small_bert()
    expected = model(ids)
    result = fxcompress.run(model, [("quantize_dynamic", {"granularity": granularity})], (ids,))
    gm, row = result.model, result.report.rows[0]
    assert row.modified and row.stats["linear"] == 12 and row.stats["float_nodes"] == {}
    # each layer's query, key and value read one value: fused, 3 + 1 + 2 calls become 1 + 1 + 2
    assert not called(gm, nn.Linear) and len(called(gm, DynamicQuantLinear)) == 8
    assert list(row.stats["fused"]) == ["layers.0.attention.query_key_value", "layers.1.attention.query_key_value"]
    assert stage_of(gm) == "lowered"
    assert all(m.granularity == granularity for m in gm.modules() if isinstance(m, DynamicQuantLinear))
    out = gm(ids)
    assert out.dtype == torch.float32 and cosine(expected, out) >= 0.99
    assert row.after.state_bytes < 0.5 * result.report.before.state_bytes  # embeddings stay float


def test_vit_attention_projections_are_quantized() -> None:
    model, x = small_vit(), vit_input()
    expected = model(x)
    result = fxcompress.run(model, ["quantize_dynamic"], (x,))
    gm, stats = result.model, result.report.rows[0].stats
    assert stats["attention"] == 2 and stats["linear"] == 5  # 2 x (MLP in, MLP out) + head
    assert not called(gm, nn.MultiheadAttention) and len(called(gm, QuantMultiheadAttention)) == 2
    mha = next(m for m in gm.modules() if isinstance(m, QuantMultiheadAttention))
    assert isinstance(mha.in_proj, DynamicQuantLinear) and mha.in_proj.weight.dtype == torch.int8
    assert cosine(expected, gm(x)) >= 0.99
    assert "bits=8" in repr(mha) and "backend=x86" in repr(mha)


def test_scope_and_unsupported_attention_stay_float() -> None:
    class CrossAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, kdim=16, vdim=16, batch_first=True)
            self.proj = nn.Linear(32, 32)
            self.head = nn.Linear(32, 4)

        def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
            y, _ = self.attn(x, memory, memory, need_weights=False)
            return self.head(self.proj(y))

    model = CrossAttention().eval()
    inputs = (torch.randn(2, 5, 32), torch.randn(2, 7, 16))
    expected = model(*inputs)
    result = fxcompress.run(model, [("quantize_dynamic", {"skip": ["head"]})], inputs)
    gm, stats = result.model, result.report.rows[0].stats
    assert stats["linear"] == 1 and stats["attention"] == 0
    assert "kdim/vdim" in stats["float_nodes"]["attn"]
    assert isinstance(gm.head, nn.Linear) and isinstance(gm.proj, DynamicQuantLinear)
    assert cosine(expected, gm(*inputs)) >= 0.99


def test_nothing_to_quantize_is_not_modified() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    result = fxcompress.run(model, ["quantize_dynamic"], (torch.randn(1, 3, 8, 8),))
    assert not result.report.rows[0].modified and result.report.rows[0].stats["linear"] == 0


def test_reference_backend_reports_fallbacks_and_agrees_with_x86() -> None:
    model, ids = small_bert()
    x86 = fxcompress.run(model, [("quantize_dynamic", {"granularity": "per_tensor"})], (ids,))
    ref = fxcompress.run(model, [("quantize_dynamic", {"granularity": "per_tensor"})], (ids,),
                         backend="reference")
    fallbacks = ref.report.rows[0].stats["fallbacks"]
    assert len(fallbacks) == 12 and "reference" in fallbacks[0]["reason"]
    x86_fallbacks = x86.report.rows[0].stats["fallbacks"]
    if int8_arithmetic().exact_products:
        assert x86_fallbacks == []
    else:  # AVX2-class int8 dot products could overflow with 8-bit weights: reported, exact reference
        assert len(x86_fallbacks) == 12 and all("could overflow" in f["reason"] for f in x86_fallbacks)
    assert cosine(x86.model(ids), ref.model(ids)) >= 0.9999


def test_recipe_and_artifact_round_trip(tmp_path) -> None:
    model, x = small_vit(), vit_input()
    result = fxcompress.run(model, recipes.int8_dynamic(), (x,))
    expected = result.model(x)
    path = tmp_path / "vit.fxc"
    artifact.save(result, path)
    loaded = artifact.load(path)
    assert torch.equal(loaded(x), expected)


@pytest.mark.parametrize("options, message", [
    ({"bits": 4}, "bits=4"),
    ({"ops": ("conv",)}, "no dynamic int8 conv"),
    ({"granularity": "per_channel"}, "granularity"),
    ({"backend": "cuda"}, "backend"),
])
def test_bad_options(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        fxcompress.run(nn.Linear(4, 4), [("quantize_dynamic", options)], (torch.randn(2, 4),))


def test_unknown_run_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="backend"):
        fxcompress.run(nn.Linear(4, 4), ["quantize_dynamic"], (torch.randn(2, 4),), backend="tpu")


class WithEncoder(nn.Module):
    """Linears the graph reaches around an nn.TransformerEncoder it keeps whole."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 1)
        self.out = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.enc(self.inp(x)))


@pytest.mark.parametrize("pass_name", ["quantize_dynamic", "quantize_weights"])
def test_linears_inside_a_module_kept_whole_are_reported_float(pass_name: str) -> None:
    options = {"group_size": 16} if pass_name == "quantize_weights" else {}
    result = fxcompress.run(WithEncoder().eval(), [(pass_name, options)], torch.randn(2, 5, 16),
                            leaf_modules=[nn.TransformerEncoder])
    stats = result.report.rows[0].stats
    assert stats["linear"] == 2
    assert stats["float_nodes"] == {"enc": "TransformerEncoder is kept whole (one graph node): its 3 linear layers "
                                           "inside (layers.0.self_attn, layers.0.linear1, layers.0.linear2) stay float"}
    assert any("MACs leave out node 'enc'" in note for note in result.report.notes)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_token"])
def test_an_empty_batch_runs_through_a_dynamic_linear(granularity: str) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    gm = fxcompress.run(model, [("quantize_dynamic", {"granularity": granularity})], torch.randn(2, 8)).model
    assert gm(torch.randn(0, 8)).shape == (0, 4) and gm(torch.randn(3, 0, 8)).shape == (3, 0, 4)


def test_seven_bit_weights_stay_within_63_and_take_the_kernels_where_eight_bit_ones_may_not() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    x = torch.randn(4, 64)
    result = fxcompress.run(model, [("quantize_dynamic", {"bits": 7})], x, check="full", progress=False)
    layers = [m for m in result.model.modules() if isinstance(m, DynamicQuantLinear)]
    assert len(layers) == 2 and all(int(m.weight.abs().max()) == 63 for m in layers)
    assert not result.report.rows[0].stats["fallbacks"] or not onednn_int8_support()
    torch.testing.assert_close(result.model(x), model(x), rtol=0.1, atol=0.05)
