"""Transformers through ONNX: a BERT-style encoder captured by the torch.export front end,
quantized (dynamic int8, weight-only int4 / int8 tables), exported with ``export_onnx`` and run
by onnxruntime.

Small random-init Hugging Face ``BertModel`` configs (no download). Checked: the file passes
``onnx.checker``; its token inputs keep symbolic batch and sequence dimensions and another
batch size and sequence length (with padding in the mask) run; the mean-pooled sentence
embeddings of onnxruntime's output match ours (cosine >= 0.999, and elementwise close); the
weight-only embedding's ONNX form equals the module bit for bit; bad inputs are clear errors
and leave no file.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.errors import ExportError
from fxcompress.quant.isa import int8_arithmetic
from fxcompress.quant.lowered_embedding import WeightOnlyEmbedding

transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


# onnxruntime's u8s8 MatMulInteger sums product pairs in saturating 16-bit lanes on AVX2-only
# CPUs (docs/deployment.md): there the elementwise checks need the portable 7-bit weights.
LINEAR_BITS = 8 if int8_arithmetic().exact_products else 7


def _tokens(batch: int, length: int, padded: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch * 100 + length)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padded:
        mask[0, length - padded:] = 0  # the first sentence is shorter: padding, as a tokenizer writes it
    return {"input_ids": torch.randint(0, 128, (batch, length), generator=gen), "attention_mask": mask}


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    return transformers.BertModel(config).eval()


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).float()
    return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


def _compare(model: nn.Module, session, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(min cosine of mean-pooled embeddings, max abs difference of last_hidden_state)."""
    with torch.no_grad():
        ours = model(**batch).last_hidden_state
    names = [o.name for o in session.get_outputs()]
    theirs = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in batch.items()})[names.index(
        "last_hidden_state")])
    cos = F.cosine_similarity(_pooled(ours, batch["attention_mask"]), _pooled(theirs, batch["attention_mask"]))
    return cos.min().item(), (ours - theirs).abs().max().item()


def _dims(path) -> dict[str, list]:
    graph = onnx.load(str(path)).graph
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}


@pytest.mark.parametrize("granularity", ["per_tensor", "per_token"])
def test_dynamic_int8_bert_runs_in_onnxruntime_like_ours(bert, granularity, tmp_path):
    example = _tokens(2, 7)
    result = fxcompress.run(bert, [("quantize_dynamic", {"granularity": granularity, "bits": LINEAR_BITS}),
                                   ("quantize_weights", {"bits": 8, "group_size": None, "embeddings": True})],
                            example, progress=False)
    path = fxcompress.export_onnx(result, tmp_path / "bert.onnx", example_inputs=example)
    onnx.checker.check_model(str(path), full_check=True)
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    # per layer: query/key/value fused into one, then 3 more linears; and the pooler; all int8
    assert ops["MatMulInteger"] == 9
    assert ops["MatMul"] == 4 and ops["Gemm"] == 0  # the float ones: attention's two products per layer
    if granularity == "per_tensor":
        assert ops["DynamicQuantizeLinear"] > 0
    dims = _dims(path)
    for name in ("input_ids", "attention_mask"):
        assert all(isinstance(d, str) for d in dims[name]), dims  # batch and sequence symbolic
    assert isinstance(dims["last_hidden_state"][1], str) and dims["last_hidden_state"][2] == 32
    assert "pooler_output" in dims
    session = _session(path)
    for batch in (example, _tokens(3, 11, padded=4), _tokens(1, 19, padded=0)):
        cosine, diff = _compare(result.model, session, batch)
        assert cosine >= 0.999, (batch["input_ids"].shape, cosine)
        assert diff < 1e-3, (batch["input_ids"].shape, diff)


def test_int4_weight_only_bert_is_matmulnbits(bert, tmp_path):
    example = _tokens(2, 7)
    result = fxcompress.run(bert, [("quantize_weights", {"bits": 4, "group_size": 16}),
                                   ("quantize_weights", {"bits": 4, "group_size": 16, "embeddings": True})],
                            example, progress=False)
    path = fxcompress.export_onnx(result, tmp_path / "int4.onnx", example_inputs=example)
    ops = Counter((n.domain, n.op_type) for n in onnx.load(str(path)).graph.node)
    assert ops[("com.microsoft", "MatMulNBits")] == 13
    cosine, diff = _compare(result.model, _session(path), _tokens(3, 9, padded=2))
    assert cosine >= 0.999 and diff < 1e-3, (cosine, diff)


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 8), (2, 16)])
def test_weight_only_embedding_equals_ours_bit_for_bit(bits, group_size, tmp_path):
    torch.manual_seed(bits)
    table = WeightOnlyEmbedding.from_float(nn.Embedding(50, 48), bits=bits, group_size=group_size)

    class Lookup(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = table

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.table(ids)

    model = Lookup().eval()
    ids = torch.randint(0, 50, (2, 5))
    path = fxcompress.export_onnx(model, tmp_path / "table.onnx", example_inputs=(ids,))
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["Gather"] >= 2  # codes and scales gathered by row: the table itself is never dequantized
    other = torch.randint(0, 50, (4, 5))  # another batch size (a plain module: only the batch is symbolic)
    out = _session(path).run(None, {"ids": other.numpy()})[0]
    assert torch.equal(torch.from_numpy(out), table(other))


def test_example_inputs_must_fit_forward(bert, tmp_path):
    result = fxcompress.run(bert, ["quantize_dynamic"], _tokens(2, 7), progress=False)
    with pytest.raises(ExportError, match=r"example_inputs \(keywords input_idz\) do not fit .*forward\(input_ids, attention_mask\)"):
        fxcompress.export_onnx(result, tmp_path / "x.onnx", example_inputs={"input_idz": torch.zeros(2, 7).long()})
    assert not list(tmp_path.iterdir())


def test_an_operator_without_onnx_form_is_named(tmp_path):
    class Median(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.kthvalue(self.proj(x), 2, dim=-1).values

    with pytest.raises(ExportError, match=r"node %kthvalue of Median calls aten\.kthvalue\.default, which torch's "
                                          r"ONNX exporter cannot translate.*nothing was written"):
        fxcompress.export_onnx(Median(), tmp_path / "m.onnx", example_inputs=(torch.randn(2, 8),))
    assert not list(tmp_path.iterdir())


def test_weight_only_int4_with_odd_groups_names_the_module(bert, tmp_path):
    result = fxcompress.run(bert, [("quantize_weights", {"bits": 4, "group_size": 8})], _tokens(2, 7),
                            progress=False)
    with pytest.raises(ExportError, match=r"module 'encoder\.layer\.0\..*' \(WeightOnlyLinear\) has no ONNX "
                                          r"mapping: MatMulNBits needs .* at least 16 .*group_size=32, 64 or 128"):
        fxcompress.export_onnx(result, tmp_path / "g8.onnx", example_inputs=_tokens(2, 7))
    assert not list(tmp_path.iterdir())


def test_a_saved_encoder_artifact_exports_with_its_recorded_inputs(bert, tmp_path):
    from fxcompress.artifact import load

    result = fxcompress.run(bert, [("quantize_dynamic", {"granularity": "per_token", "bits": LINEAR_BITS})],
                            _tokens(2, 7), progress=False)
    result.save(str(tmp_path / "bert.fxc"))
    loaded = load(str(tmp_path / "bert.fxc"))
    path = fxcompress.export_onnx(loaded, tmp_path / "bert.onnx")  # no example_inputs: the artifact's record
    dims = _dims(path)
    assert all(isinstance(d, str) for d in dims["input_ids"]), dims
    cosine, diff = _compare(loaded, _session(path), _tokens(3, 12, padded=5))
    assert cosine >= 0.999 and diff < 1e-3, (cosine, diff)
