"""Attention pruning: whole heads, the ViT residual stream, and the module that replaces nn.MultiheadAttention."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import fxcompress
from fxcompress import zoo
from fxcompress.capture import propagate_shapes, trace
from fxcompress.macs import macs_by_kind
from fxcompress.ops import Kind, describe
from fxcompress.passes.prune_channels import PruneChannels
from fxcompress.pass_base import PassContext
from fxcompress.prune import apply_removal, build_channel_graph, select, silence, unit_scores
from fxcompress.prune.attention import PrunedMultiheadAttention

ATTN = "encoder.layers.encoder_layer_{}.self_attention"


def _vit(seed: int = 0) -> nn.Module:
    """A small torchvision ViT (4 heads of 16, width 64, MLP 128) with realistic random weights.

    The recipe of ``fxcompress.zoo`` in short: norms get random affine
    parameters, zero-initialised tensors (class token, head, biases) are
    redrawn, and every weight row is scaled by exp(U(-0.7, 0.7)), so heads and
    channels differ in importance the way trained ones do.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                     hidden_dim=64, mlp_dim=128, num_classes=10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "encoder.ln.weight":
                p.uniform_(0.5, 1.5, generator=gen)
            elif not p.any():
                p.normal_(0.0, 0.1 if p.dim() == 1 else 0.02, generator=gen)
            if p.dim() >= 2 and name not in ("class_token", "encoder.pos_embedding"):
                p.mul_(torch.empty(p.shape[0], *[1] * (p.dim() - 1)).uniform_(-0.7, 0.7, generator=gen).exp())
    return model.eval()


@pytest.fixture(scope="module")
def vit():
    return _vit(), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _units(cg, ids: torch.Tensor) -> torch.Tensor:
    return cg.unit_of[ids.reshape(-1)]


# -- the replacement module -------------------------------------------------------------------------
MASKS = {
    "none": lambda n, h, L, S: {},
    "bool padding": lambda n, h, L, S: {"key_padding_mask": torch.arange(S).expand(n, S) >= S - 2},
    "float 2-D mask": lambda n, h, L, S: {"attn_mask": torch.randn(L, S)},
    "3-D mask + padding": lambda n, h, L, S: {"attn_mask": torch.randn(n * h, L, S) > 1.0,
                                             "key_padding_mask": torch.arange(S).expand(n, S) >= S - 1},
}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("weights", ["none", "averaged", "per head"])
def test_pruned_attention_computes_what_multihead_attention_computes(batch_first, mask, weights, rel_err):
    mha = nn.MultiheadAttention(24, 4, batch_first=batch_first, kdim=12, vdim=20).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    mine = PrunedMultiheadAttention.from_module(mha).eval()
    n, L, S = 3, 5, 7
    q, k, v = torch.randn(n, L, 24), torch.randn(n, S, 12), torch.randn(n, S, 20)
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    kwargs = {**MASKS[mask](n, 4, L, S), "need_weights": weights != "none",
              "average_attn_weights": weights == "averaged"}
    with torch.no_grad():
        expected, expected_w = mha(q, k, v, **kwargs)
        out, w = mine(q, k, v, **kwargs)
    assert rel_err(expected, out) < 1e-6
    assert (w is None) == (expected_w is None)
    if w is not None:
        assert rel_err(expected_w, w) < 1e-6


def test_pruned_attention_takes_unbatched_inputs_and_self_attention(rel_err):
    mha = nn.MultiheadAttention(16, 2).eval()
    mine = PrunedMultiheadAttention.from_module(mha).eval()
    x = torch.randn(6, 16)
    with torch.no_grad():
        assert rel_err(mha(x, x, x)[0], mine(x, x, x)[0]) < 1e-6
        assert mine(x, x, x, need_weights=False)[1] is None


def test_pruned_attention_refuses_bad_inputs():
    mine = PrunedMultiheadAttention(16, 2, 8)
    x = torch.randn(2, 5, 16)
    with pytest.raises(fxcompress.errors.InputError, match="width 16"):
        mine(x[..., :8], x, x)
    with pytest.raises(fxcompress.errors.InputError, match="is_causal=True needs attn_mask"):
        mine(x, x, x, is_causal=True)
    with pytest.raises(fxcompress.errors.InputError, match="key_padding_mask must be"):
        mine(x, x, x, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))


def test_macs_of_the_pruned_attention_follow_its_widths(vit):
    model, x = vit
    gm = trace(copy.deepcopy(model), (x,))
    before = macs_by_kind(gm)
    for i in range(2):  # the same attention in the replacement's form counts the same
        path = ATTN.format(i)
        gm.set_submodule(path, PrunedMultiheadAttention.from_module(gm.get_submodule(path)))
    assert macs_by_kind(gm) == before
    pruned = fxcompress.run(model, [("prune_channels", {"ratio": 0.5})], (x,)).model
    after = macs_by_kind(pruned)
    # widths and heads halved: scores and weighted sums x1/2, projections and MLPs x1/4; the
    # classifier (batch 2 x 10 classes) only loses half its inputs
    assert after["attention"] * 2 == before["attention"]
    assert (after["linear"] - 2 * 10 * 32) * 4 == before["linear"] - 2 * 10 * 64


# -- the channel analysis ----------------------------------------------------------------------------
def test_heads_are_units_and_the_stream_joins_class_token_and_position_embedding(vit):
    model, x = vit
    gm = trace(copy.deepcopy(model), (x,))
    cg = build_channel_graph(gm)
    rows = cg.params[(ATTN.format(0), "in_proj_weight", 0)].ids.reshape(3, 4, 16)  # q, k, v x heads x head_dim
    units = _units(cg, rows)
    for h in range(4):  # a head's q, k and v rows are one unit, and every head is its own
        assert units.reshape(3, 4, 16)[:, h].unique().numel() == 1
    assert units.unique().numel() == 4
    assert torch.equal(_units(cg, cg.params[(f"{ATTN.format(0)}.out_proj", "weight", 1)].ids),
                       units.reshape(3, 4, 16)[2].reshape(-1))
    heads = cg.groups[int(cg.group_of_unit[units[0]])]
    assert heads.heads and heads.name == f"{ATTN.format(0)} (heads)" and not heads.frozen
    stream = _units(cg, cg.params[("conv_proj", "weight", 0)].ids)
    for key in [("", "class_token", 2), ("encoder", "pos_embedding", 2),
                (f"{ATTN.format(1)}.out_proj", "weight", 0), (ATTN.format(1), "in_proj_weight", 1),
                ("encoder.layers.encoder_layer_1.mlp.3", "weight", 0), ("heads.head", "weight", 1)]:
        assert torch.equal(_units(cg, cg.params[key].ids), stream), key
    group = cg.groups[int(cg.group_of_unit[stream[0]])]
    assert group.channel_norm and not group.heads and not group.frozen
    assert set(cg.frozen_units) == set(_units(cg, cg.params[("heads.head", "weight", 0)].ids).tolist())


class _Probe(nn.Module):
    """Attention whose weights are read, one with a mask per head, and a cross-attention on fixed keys."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.read = nn.MultiheadAttention(16, 4, batch_first=True)
        self.masked = nn.MultiheadAttention(16, 4, batch_first=True)
        self.cross = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        a, w = self.read(h, h, h)
        h = h + a * w.mean()
        h = h + self.masked(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = h + self.cross(h, memory, memory, need_weights=False)[0]
        return self.head(h)


def test_heads_and_inputs_that_must_stay_are_frozen_with_their_reasons():
    x, memory, mask = torch.randn(2, 5, 8), torch.randn(2, 6, 16), torch.zeros(8, 5, 5)
    gm = trace(_Probe().eval(), (x, memory, mask))
    cg = build_channel_graph(gm)

    def reasons(path):
        heads = _units(cg, cg.params[(path, "in_proj_weight", 0)].ids)
        return {cg.frozen_units.get(int(u)) for u in heads}

    assert reasons("read") == {"multihead_attention at node read: its attention weights are used, and they "
                               "depend on every head"}
    assert reasons("masked") == {"multihead_attention at node masked: attn_mask holds one mask per head"}
    assert reasons("cross") == {None}  # its heads are free
    # the packed projection reads the query with the columns that read the fixed memory
    stream = _units(cg, cg.params[("embed", "weight", 0)].ids)
    assert {cg.frozen_units[int(u)] for u in stream} == {
        "multihead_attention at node cross: its packed projection reads query, key, value with the same "
        "columns, and some of them have fixed channels"}
    result = fxcompress.run(_Probe().eval(), [("prune_channels", {"ratio": 0.5})], (x, memory, mask))
    assert type(result.model.get_submodule("cross")) is PrunedMultiheadAttention
    assert result.model.get_submodule("cross").num_heads == 2
    assert type(result.model.get_submodule("read")) is nn.MultiheadAttention  # nothing of it changed


# -- pruning a ViT ------------------------------------------------------------------------------------
def test_vit_loses_heads_stream_and_mlp_channels(vit):
    model, x = vit
    result = fxcompress.run(model, [("prune_channels", {"ratio": 0.5})], (x,))
    gm, stats = result.model, result.report.rows[0].stats
    attn = gm.get_submodule(ATTN.format(0))
    assert type(attn) is PrunedMultiheadAttention
    assert (attn.num_heads, attn.head_dim, attn.embed_dim, attn.out_dim) == (2, 16, 32, 32)
    assert attn.q_proj.weight.shape == (32, 32) and attn.out_proj.weight.shape == (32, 32)
    assert gm.get_submodule("encoder.layers.encoder_layer_0.mlp.0").weight.shape == (64, 32)
    assert gm.get_submodule("conv_proj").out_channels == 32 and gm.class_token.shape == (1, 1, 32)
    assert gm.get_submodule("encoder").pos_embedding.shape == (1, 17, 32)
    assert gm(x).shape == model(x).shape
    node = next(n for n in gm.graph.nodes if n.target == ATTN.format(0))
    assert (describe(node, gm).kind, describe(node, gm).op) == (Kind.ATTENTION, "multihead_attention")
    assert stats["removed_heads"] == 4 and stats["frozen"] == {"model output (output shapes never change)": 10}
    assert result.report.rows[0].after.parameters < 0.3 * result.report.before.parameters
    # head_ratio sets the heads apart from the channels
    gm = fxcompress.run(model, [("prune_channels", {"ratio": 0.5, "head_ratio": 0.25})], (x,)).model
    assert gm.get_submodule(ATTN.format(1)).num_heads == 3 and gm.get_submodule(ATTN.format(1)).embed_dim == 32
    with pytest.raises(fxcompress.errors.ConfigError, match="head_ratio must be a number in"):
        PruneChannels(head_ratio=1.0)


def _kept(original: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of ``original`` that ``pruned`` kept (rows compared exactly)."""
    match = (original[:, None] == pruned[None]).flatten(2).all(dim=2)
    assert (match.sum(dim=0) == 1).all()
    return match.float().argmax(dim=0)


def test_pruned_vit_is_torchvisions_vit_on_the_kept_channels(vit, rel_err):
    """The stream passes LayerNorms (its statistics change when channels go): compare with the
    sub-network built by hand, as torchvision's own smaller ViT holding the kept slices."""
    model, x = vit
    gm = fxcompress.run(model, [("prune_channels", {"ratio": 0.5})], (x,)).model
    orig = model.state_dict()
    stream = _kept(orig["conv_proj.weight"], gm.get_submodule("conv_proj").weight)
    index: dict[str, dict[int, torch.Tensor]] = {}
    for i in range(2):
        layer = f"encoder.layers.encoder_layer_{i}"
        attn = gm.get_submodule(ATTN.format(i))
        q_rows = _kept(orig[f"{layer}.self_attention.in_proj_weight"][:64, stream], attn.q_proj.weight)
        heads = (q_rows // 16).unique()
        inner = (heads[:, None] * 16 + torch.arange(16)).reshape(-1)
        qkv = torch.cat([inner, inner + 64, inner + 128])
        hidden = _kept(orig[f"{layer}.mlp.0.weight"][:, stream], gm.get_submodule(f"{layer}.mlp.0").weight)
        index.update({f"{layer}.self_attention.in_proj_weight": {0: qkv, 1: stream},
                      f"{layer}.self_attention.in_proj_bias": {0: qkv},
                      f"{layer}.self_attention.out_proj.weight": {0: stream, 1: inner},
                      f"{layer}.mlp.0.weight": {0: hidden, 1: stream}, f"{layer}.mlp.0.bias": {0: hidden},
                      f"{layer}.mlp.3.weight": {0: stream, 1: hidden}})
    reference = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                     hidden_dim=32, mlp_dim=64, num_classes=10).eval()
    state = {}
    for name, ref in reference.state_dict().items():
        t = orig[name]
        dims = index.get(name) or {d: stream for d in range(t.dim()) if t.shape[d] == 64}
        for d, idx in dims.items():
            t = t.index_select(d, idx)
        assert t.shape == ref.shape, name
        state[name] = t
    reference.load_state_dict(state)
    with torch.no_grad():
        assert rel_err(reference(x), gm(x)) < 1e-5


def _silenced_removal(gm, x, ratio: float):
    propagate_shapes(gm, (x,), {})  # the analysis reads the shapes recorded on the graph
    cg = build_channel_graph(gm)
    removed = select(cg, unit_scores(gm, cg, "l2"), ratio=ratio) & ~cg.norm_units
    heads = sum(int(removed[g.units].sum()) for g in cg.groups if g.heads)
    silence(gm, cg, removed)
    with torch.no_grad():
        reference = gm(x)
        apply_removal(gm, cg, removed)
        gm.recompile()
        return reference, gm(x), heads


def test_removing_silenced_heads_and_channels_is_exact(vit, rel_err):
    model, x = vit
    gm = trace(copy.deepcopy(model), (x,))
    reference, pruned, heads = _silenced_removal(gm, x, 0.5)
    assert heads == 4 and rel_err(reference, pruned) < 1e-5
    assert type(gm.get_submodule(ATTN.format(0))) is PrunedMultiheadAttention
    # once more on the replacement module: its own layout is analysed the same way
    reference, pruned, heads = _silenced_removal(gm, x, 0.5)
    assert heads == 2 and rel_err(reference, pruned) < 1e-5
    assert gm.get_submodule(ATTN.format(1)).num_heads == 1


def test_pruned_vit_survives_an_artifact_round_trip(vit, tmp_path):
    model, x = vit
    result = fxcompress.run(model, [("prune_channels", {"ratio": 0.5})], (x,))
    path = tmp_path / "vit.fxc"
    fxcompress.save(result, path)
    loaded = fxcompress.load(path)
    assert type(loaded.get_submodule(ATTN.format(0))) is PrunedMultiheadAttention
    assert loaded.get_submodule(ATTN.format(0)).num_heads == 2
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))


@pytest.mark.slow
def test_vit_b_16_prunes_heads_and_stream_with_full_checks(rel_err):
    model, x = zoo.build("vit_b_16"), zoo.example_input("vit_b_16", batch=1)
    result = fxcompress.run(model, [("prune_channels", {"ratio": 0.5})], (x,))
    row = result.report.rows[0]
    attn = result.model.get_submodule(ATTN.format(11))
    assert (attn.num_heads, attn.head_dim, attn.embed_dim) == (6, 64, 384)
    assert row.stats["removed_heads"] == 72 and set(row.stats["frozen"]) == {"model output (output shapes never change)"}
    assert row.after.parameters < 0.3 * result.report.before.parameters
    assert result.model(x).shape == (1, 1000)
    gm = trace(copy.deepcopy(model), (x,))
    assert not PruneChannels(ratio=0.0)(gm, PassContext(example_args=(x,))).modified
    reference, pruned, heads = _silenced_removal(gm, x, 0.5)
    assert heads == 72 and rel_err(reference, pruned) < 1e-5
