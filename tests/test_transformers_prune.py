"""Attention heads and MLP channels of exported transformers, pruned (``prune_channels``).

The same small random-init models as ``tests/test_transformers.py`` (Hugging Face BERT, DistilBERT,
GPT-2, ViT, and an ``nn.TransformerEncoder``), captured by the torch.export front end, where
attention is decomposed: q/k/v linears -> view to heads -> ``scaled_dot_product_attention`` ->
merge reshape -> output linear. 30% of heads and MLP channels go (of 4 heads, 2: the kept count
is rounded down from 2.8); the model keeps its output structure, runs at other batch sizes and
sequence lengths, and saves and loads bit-identically.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fxcompress
from fxcompress.artifact import load
from fxcompress.prune import apply_removal, build_channel_graph, silence

transformers = pytest.importorskip("transformers")

from test_transformers import MODELS, _call, _same_structure, _tensors  # noqa: E402

HEAD_DIM = 8  # every model: width 32, 4 heads
# Per model: the q/k/v projections of the first layer (one fused c_attn for GPT-2, the packed
# in_proj for the encoder), its output projection, and the first MLP layer (of 64 channels; GPT-2: 128).
LAYERS = {
    "bert": (("encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key",
              "encoder.layer.0.attention.self.value"), "encoder.layer.0.attention.output.dense",
             "encoder.layer.0.intermediate.dense"),
    "distilbert": (("transformer.layer.0.attention.q_lin", "transformer.layer.0.attention.k_lin",
                    "transformer.layer.0.attention.v_lin"), "transformer.layer.0.attention.out_lin",
                   "transformer.layer.0.ffn.lin1"),
    "gpt2": (("transformer.h.0.attn.c_attn",), "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc"),
    "vit": (("layers.0.attention.q_proj", "layers.0.attention.k_proj", "layers.0.attention.v_proj"),
            "layers.0.attention.o_proj", "layers.0.mlp.fc1"),
    "encoder": (("encoder.layers.0.self_attn.in_proj",), "encoder.layers.0.self_attn.out_proj",
                "encoder.layers.0.linear1"),
}


@pytest.mark.parametrize("name", MODELS)
def test_heads_and_mlp_channels_go_structure_kept_other_sizes_run_and_save_load_is_exact(name: str,
                                                                                         tmp_path) -> None:
    model, make = MODELS[name]()
    original = copy.deepcopy(model.state_dict())
    result = fxcompress.run(model, [("prune_channels", {"ratio": 0.3})], make(2, 8), check="full", progress=False)
    stats = result.report.rows[0].stats
    assert stats["removed_heads"] == 2 * 2  # 2 of 4 heads in each of the 2 layers
    assert not any("scaled_dot_product_attention" in reason for reason in stats["frozen"])
    qkv, out, mlp = LAYERS[name]
    pruned = result.model
    kept_heads = 2 * HEAD_DIM
    widths = [pruned.get_submodule(p).out_features for p in qkv]
    assert widths == ([3 * kept_heads] if len(qkv) == 1 else [kept_heads] * 3)
    assert pruned.get_submodule(out).in_features == kept_heads
    mlp_width = 128 if name == "gpt2" else 64
    assert pruned.get_submodule(mlp).out_features == int(mlp_width * 0.7 + 1e-9)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())  # the user's model untouched
    path = str(tmp_path / "pruned.fxc")
    result.save(path)
    loaded = load(path)
    for batch, length in ((2, 8), (3, 5), (1, 11)):
        inputs = make(batch, length)
        out_p, ref, again = _call(pruned, inputs), _call(model, inputs), _call(loaded, inputs)
        _same_structure(out_p, ref)
        _same_structure(again, out_p)
        for a, b, c in zip(_tensors(out_p), _tensors(ref), _tensors(again)):
            assert a.shape == b.shape
            assert torch.equal(a, c)  # the artifact computes what the pruned model computes, bit for bit
            assert torch.isfinite(a).all()


@pytest.mark.parametrize("name", ["bert", "gpt2", "encoder"])
def test_removing_heads_is_exact_once_their_output_columns_are_zeroed(name: str) -> None:
    """The analysis' guarantee for heads: slicing them out computes exactly what zeroing the
    output projection's columns of those heads computes (at other sizes too)."""
    model, make = MODELS[name]()
    gm = fxcompress.trace(model, make(2, 8), frontend="export")
    cg = build_channel_graph(gm)
    heads = [g for g in cg.groups if g.heads]
    assert len(heads) == 2 and all(len(g.units) == 4 and not g.frozen for g in heads)
    removed = torch.zeros(cg.n_units, dtype=torch.bool)
    for g in heads:
        removed[g.units[[0, 2]]] = True  # heads 0 and 2 of every layer
    zeroed = copy.deepcopy(gm)
    assert silence(zeroed, cg, removed) == 2 * 2 * HEAD_DIM  # columns: 2 heads of 8 in 2 layers
    sliced = copy.deepcopy(gm)
    apply_removal(sliced, build_channel_graph(sliced), removed)
    sliced.recompile()
    for batch, length in ((2, 8), (3, 5)):
        inputs = make(batch, length)
        for a, b in zip(_tensors(_call(zeroed, inputs)), _tensors(_call(sliced, inputs))):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)



class LiteralHeads(torch.nn.Module):
    """Attention written out by hand with literal sizes: ``view(b, s, 4, 8)``, ``reshape(b, s, 32)``."""

    def __init__(self, per_head_mask: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(32, 32) for _ in range(4))
        self.bias = torch.nn.Parameter(torch.randn(1, 4, 6, 6)) if per_head_mask else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, 4, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        return self.o(y.transpose(1, 2).reshape(b, s, 32))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_literal_head_counts_are_rewritten_and_a_mask_per_head_freezes_the_heads(frontend: str) -> None:
    x = torch.randn(2, 6, 32)
    result = fxcompress.run(LiteralHeads(), [("prune_channels", {"ratio": 0.5})], (x,), frontend=frontend,
                            check="full", progress=False)
    assert result.report.rows[0].stats["removed_heads"] == 2
    assert result.model.get_submodule("q").out_features == 16 and result.model.get_submodule("o").in_features == 16
    assert result.model(torch.randn(3, 6, 32)).shape == (3, 6, 32)
    frozen = fxcompress.run(LiteralHeads(per_head_mask=True), [("prune_channels", {"ratio": 0.5})], (x,),
                            frontend=frontend, progress=False).report.rows[0].stats
    assert frozen.get("removed_heads", 0) == 0
    assert any("one mask per head" in reason for reason in frozen["frozen"])


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_activation_importance_scores_every_head_and_mlp_channel_from_data(name: str) -> None:
    """On an exported transformer every head and MLP unit is reached by the data (none falls back to
    l2), padded tokens are left out, and pruning by it runs with check="full"."""
    from fxcompress.capture import trace
    from fxcompress.prune import activation_terms, unit_scores

    model, make = MODELS[name]()
    batches = [make(4, 8) for _ in range(3)]
    for b in batches:
        if "attention_mask" in b:
            b["attention_mask"][1, 5:] = 0
    gm = trace(model, make(2, 8))
    cg = build_channel_graph(gm)
    energy, reached = activation_terms(gm, cg, batches, (), make(2, 8))
    qkv, out, mlp = LAYERS[name]
    for path in (out, "encoder.layer.1.output.dense" if name == "bert" else "transformer.h.1.mlp.c_proj"):
        ps = next(p for p in cg.params.values() if p.owner == path and p.role == "in")
        assert bool(reached[ps.ids].all()) and bool((energy[ps.ids] > 0).all())
    scores = unit_scores(gm, cg, "activation", activation=(energy, reached))
    assert not torch.equal(scores, unit_scores(gm, cg, "l2"))
    if name == "bert":  # padding never counts: changing the padded tokens changes nothing
        noisy = [dict(b, input_ids=torch.where(b["attention_mask"].bool(), b["input_ids"], 7)) for b in batches]
        assert torch.equal(activation_terms(gm, cg, noisy, (), make(2, 8))[0], energy)
    result = fxcompress.run(model, [("prune_channels", {"ratio": 0.3, "importance": "activation"})], make(2, 8),
                            calibration_data=batches, check="full", progress=False)
    assert result.report.rows[0].stats["removed_heads"] == 4
