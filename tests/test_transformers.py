"""Hugging Face transformers and ``nn.TransformerEncoder`` end to end, through the torch.export front end.

Small random-init configs (no download): ``frontend="auto"`` captures each model (symbolic
tracing fails on the Hugging Face ones and keeps ``nn.TransformerEncoder`` whole, so export
is taken), the graph holds the layers as modules at their original paths, dynamic int8,
int4 weight-only and static int8 run with ``check="full"``, keep the output structure, save
and load bit-identically, and run on another batch size and sequence length.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.artifact import load
from fxcompress.capture import FRONTEND_KEY
from fxcompress.errors import ConfigError, TraceError
from fxcompress.quant.lowered_embedding import WeightOnlyEmbedding

transformers = pytest.importorskip("transformers")

Inputs = Callable[[int, int], Any]


def _ids(vocab: int, with_mask: bool = True) -> Inputs:
    def make(batch: int, length: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(batch * 100 + length)
        out = {"input_ids": torch.randint(0, vocab, (batch, length), generator=gen)}
        if with_mask:
            out["attention_mask"] = torch.ones(batch, length, dtype=torch.long)
        return out
    return make


def bert() -> tuple[nn.Module, Inputs]:
    c = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=32)
    return transformers.BertModel(c).eval(), _ids(128)


def distilbert() -> tuple[nn.Module, Inputs]:
    c = transformers.DistilBertConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                      max_position_embeddings=32)
    return transformers.DistilBertModel(c).eval(), _ids(128)


def gpt2() -> tuple[nn.Module, Inputs]:
    c = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=32, use_cache=False,
                                bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(c).eval(), _ids(128, with_mask=False)


def vit() -> tuple[nn.Module, Inputs]:
    c = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64)

    def make(batch: int, length: int) -> dict[str, torch.Tensor]:  # images: the batch varies
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))}
    return transformers.ViTModel(c).eval(), make


class EncoderModel(nn.Module):
    """An input projection, an ``nn.TransformerEncoder`` and a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(16, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)))


def encoder() -> tuple[nn.Module, Inputs]:
    return EncoderModel().eval(), lambda b, n: (torch.randn(b, n, 16, generator=torch.Generator().manual_seed(b + n)),)


MODELS = {"bert": bert, "distilbert": distilbert, "gpt2": gpt2, "vit": vit, "encoder": encoder}


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if isinstance(out, dict) else out
    return [v for v in values if isinstance(v, torch.Tensor)]


def _same_structure(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert list(a.keys()) == list(b.keys())


@pytest.mark.parametrize("name", MODELS)
def test_auto_captures_with_export_keeping_paths_structure_and_dynamic_sizes(name: str) -> None:
    model, make = MODELS[name]()
    example = make(2, 8)
    gm = fxcompress.trace(model, example)
    assert gm.meta[FRONTEND_KEY]["frontend"] == "export" and gm.meta[FRONTEND_KEY]["why"]
    paths = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    linears = {p for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    # Every linear layer is a module node at the path the user knows (packed attention projections:
    # the MultiheadAttention's in_proj), so scope/skip patterns and every pass reach it.
    assert linears <= paths | {p for p in linears if p.endswith("out_proj")} and paths
    for p in paths:
        assert isinstance(gm.get_submodule(p), (nn.Linear, nn.LayerNorm, nn.Embedding, nn.Conv2d))
    for batch, length in ((2, 8), (3, 5), (1, 11)):
        inputs = make(batch, length)
        out, ref = _call(gm, inputs), _call(model, inputs)
        _same_structure(out, ref)
        for a, b in zip(_tensors(out), _tensors(ref)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_encoder_layers_inside_transformer_encoder_are_reached_by_quantize_dynamic() -> None:
    model, make = encoder()
    result = fxcompress.run(model, ["quantize_dynamic"], make(2, 8), check="full", progress=False)
    row = result.report.rows[0]
    assert row.stats["linear"] == 2 + 2 * 4 and not row.stats["float_nodes"]  # embed, head; per layer 4
    assert "encoder.layers.0.self_attn.in_proj" in dict(result.model.named_modules())
    # fx alone keeps the encoder whole, and the pass says so instead of counting its layers as done.
    fx_only = fxcompress.run(model, ["quantize_dynamic"], make(2, 8), frontend="fx", check="full", progress=False)
    assert fx_only.report.rows[0].stats["linear"] == 2
    assert "encoder" in str(fx_only.report.rows[0].stats["float_nodes"])
    assert result.report.notes[0].startswith("captured with the export front end")


PIPELINES: dict[str, list] = {
    "dynamic_int8": ["quantize_dynamic",
                     ("quantize_weights", {"bits": 8, "group_size": None, "embeddings": True})],
    "int4_weight_only": [("quantize_weights", {"bits": 4, "group_size": 16, "embeddings": True})],
    "static_int8": ["insert_observers", "calibrate", "fold_fake_quant", ("lower", {"only_if_faster": False}),
                    "eliminate_dead_nodes"],
}
# The fast suite runs static int8 on BERT and the encoder; the other three are the slow tier.
_SLOW = {("vit", "static_int8"), ("gpt2", "static_int8"), ("distilbert", "static_int8")}
_CASES = [pytest.param(n, p, marks=[pytest.mark.slow] if (n, p) in _SLOW else [], id=f"{n}-{p}")
          for n in MODELS for p in PIPELINES]


@pytest.mark.parametrize(("name", "pipeline"), _CASES)
def test_compressed_models_keep_structure_save_load_identically_and_run_other_sizes(
        name: str, pipeline: str, tmp_path) -> None:
    model, make = MODELS[name]()
    example = make(2, 8)
    result = fxcompress.run(model, PIPELINES[pipeline], example, check="full", progress=False,
                            calibration_data=[make(2, 8), make(3, 8)])
    assert result.report.rows[-1].after.state_bytes < result.report.before.state_bytes
    path = tmp_path / "model.fxc"
    result.save(str(path))
    loaded = load(str(path))
    for batch, length in ((2, 8), (3, 5)):
        inputs = make(batch, length)
        out, ref, again = _call(result.model, inputs), _call(model, inputs), _call(loaded, inputs)
        _same_structure(out, ref)
        _same_structure(again, out)
        for a, b, c in zip(_tensors(out), _tensors(ref), _tensors(again)):
            assert torch.equal(a, c)  # the artifact computes what the saved model computes, bit for bit
            err = (a.float() - b).norm() / b.norm()
            assert err < 0.2, err  # quantized, not broken (random weights: coverage, not quality)


def test_quantize_weights_stores_embedding_tables_packed_and_gathers_exactly() -> None:
    model, make = bert()
    pipeline = [("quantize_weights", {"bits": 4, "group_size": 16, "embeddings": True})]
    result = fxcompress.run(model, pipeline, make(2, 8), check="full", progress=False)
    table = result.model.get_submodule("embeddings.word_embeddings")
    assert isinstance(table, WeightOnlyEmbedding) and table.weight.dtype == torch.uint8
    assert table.weight.shape == (128, 16)  # two 4-bit codes per byte
    ids = torch.tensor([[0, 5, 127], [3, 3, 64]])
    torch.testing.assert_close(table(ids), torch.nn.functional.embedding(ids, table.dequantized_weight()),
                               rtol=0, atol=0)
    assert result.report.rows[0].stats["embedding"] == 3


def test_gpt2_tied_embedding_and_head_each_get_their_module_and_conv1d_is_a_linear() -> None:
    model, make = gpt2()
    gm = fxcompress.trace(model, make(2, 8))
    wte, head = gm.get_submodule("transformer.wte"), gm.get_submodule("lm_head")
    assert isinstance(wte, nn.Embedding) and isinstance(head, nn.Linear) and wte.weight is head.weight
    assert isinstance(gm.get_submodule("transformer.h.0.attn.c_attn"), nn.Linear)  # HF Conv1D, raised
    pipeline = [("quantize_weights", {"bits": 8, "group_size": None, "embeddings": True})]
    result = fxcompress.run(model, pipeline, make(2, 8), check="full", progress=False)
    assert isinstance(result.model.get_submodule("transformer.wte"), WeightOnlyEmbedding)
    assert not result.report.rows[0].stats["float_nodes"]


def test_frontend_errors_and_fx_options() -> None:
    model, make = bert()
    with pytest.raises(ConfigError, match="frontend must be one of"):
        fxcompress.trace(model, make(2, 8), frontend="dynamo")
    with pytest.raises(ConfigError, match="symbolic tracing's options"):
        fxcompress.trace(model, make(2, 8), frontend="export", leaf_modules=["encoder"])
    with pytest.raises(TraceError, match="cannot trace BertModel"):
        fxcompress.trace(model, make(2, 8), frontend="fx")


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x


def test_auto_trace_error_says_why_each_front_end_failed() -> None:
    with pytest.raises(TraceError) as info:
        fxcompress.trace(DataDependent(), torch.randn(2, 3))
    message = str(info.value)
    assert "either front end" in message and "Symbolic tracing:" in message and "torch.export" in message


def test_artifacts_record_the_front_end(tmp_path) -> None:
    model, make = encoder()
    result = fxcompress.run(model, ["quantize_dynamic"], make(2, 8), progress=False)
    path = str(tmp_path / "enc.fxc")
    result.save(path)
    loaded = load(path)
    assert loaded.meta[FRONTEND_KEY]["frontend"] == "export"
    assert "TransformerEncoder" in loaded.meta[FRONTEND_KEY]["why"]
    assert result.report.notes[0].startswith("captured with the export front end")


def test_prune_channels_prunes_the_heads_and_mlp_of_an_exported_bert(tmp_path) -> None:
    model, make = bert()
    result = fxcompress.run(model, [("prune_channels", {"ratio": 0.3})], make(2, 8), check="full", progress=False)
    stats = result.report.rows[0].stats
    assert result.model.get_submodule("encoder.layer.0.intermediate.dense").out_features == 44  # 64 * 0.7
    assert result.model.get_submodule("encoder.layer.0.output.dense").in_features == 44
    # whole heads (2 of 4, head_dim 8) through scaled_dot_product_attention; the other models:
    # tests/test_transformers_prune.py
    assert stats["removed_heads"] == 4 and not any("scaled_dot_product_attention" in r for r in stats["frozen"])
    assert result.model.get_submodule("encoder.layer.0.attention.self.query").out_features == 16
    assert result.model.get_submodule("encoder.layer.0.attention.output.dense").in_features == 16
    path = str(tmp_path / "pruned.fxc")
    result.save(path)
    inputs = make(3, 5)
    out, again = _call(result.model, inputs), _call(load(path), inputs)
    _same_structure(out, _call(model, inputs))
    assert torch.equal(out.last_hidden_state, again.last_hidden_state)


WORDS = ("the cat sat on a mat dog ran in park sun is warm today we like to read books "
         "rain falls city lights are bright at night").split()


def _text_model_folder(folder) -> str:
    """A small BertModel and a word-level BERT tokenizer saved as a Hugging Face folder (no download)."""
    folder.mkdir()
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(str(folder))
    model, _ = bert()
    model.save_pretrained(str(folder))
    return str(folder)


def test_a_recipe_names_a_local_transformers_folder_and_sentences(tmp_path) -> None:
    folder = _text_model_folder(tmp_path / "model")
    recipe = tmp_path / "minilm.toml"
    recipe.write_text(f'''
[model]
factory = "transformers:AutoModel.from_pretrained"
kwargs = {{ pretrained_model_name_or_path = "{folder}", local_files_only = true }}

[text]
tokenizer = "{folder}"
sentences = ["the cat sat on a mat", "a dog ran in the park", "the sun is warm today",
             "we like to read books", "rain falls", "city lights are bright at night"]

[run]
check = "full"
frontend = "auto"

[calibration]
source = "text"
batch_size = 3

[[passes]]
name = "insert_observers"

[[passes]]
name = "calibrate"

[[passes]]
name = "fold_fake_quant"
''')
    from fxcompress.recipe_file import load_recipe

    spec = load_recipe(recipe)
    inputs = spec.example_inputs()
    assert set(inputs) >= {"input_ids", "attention_mask"} and inputs["input_ids"].shape[0] == 6
    assert [b["input_ids"].shape[0] for b in spec.calibration_data()] == [3, 3]
    result = spec.run(progress=False)
    assert result.report.notes[0].startswith("captured with the export front end")
    assert type(result.model(**inputs)).__name__.startswith("BaseModelOutput")


def test_text_table_errors_name_the_key(tmp_path) -> None:
    from fxcompress.recipe_file import load_recipe

    recipe = tmp_path / "bad.toml"
    recipe.write_text('[model]\nfactory = "m:f"\n[text]\ntokenizer = "no/such/folder"\nsentences = ["a"]\n'
                      '[[passes]]\nname = "quantize_dynamic"\n')
    with pytest.raises(ConfigError, match="text.tokenizer must name an existing local folder"):
        load_recipe(recipe)
    recipe.write_text(f'[model]\nfactory = "m:f"\n[text]\ntokenizer = "{tmp_path}"\nsentences = []\n'
                      '[[passes]]\nname = "quantize_dynamic"\n')
    with pytest.raises(ConfigError, match="text.sentences"):
        load_recipe(recipe)
    recipe.write_text('[model]\nfactory = "m:f"\n[[inputs]]\nshape = [1]\n[run]\nfrontend = "dynamo"\n'
                      '[[passes]]\nname = "quantize_dynamic"\n')
    with pytest.raises(ConfigError, match="run.frontend"):
        load_recipe(recipe)
