"""reconstruct_consumers: refitting pruned consumer linears to the original model's outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertModel

import fxcompress
from fxcompress.errors import ConfigError, InputError
from fxcompress.prune.reconstruct import pruned_consumers, reconstruct_consumers


def _bert() -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32)
    return BertModel(cfg).eval()


def _batch(seed: int, n: int = 8, t: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[: n // 2, t - 3:] = 0  # some padding, which the fit must ignore
    return {"input_ids": torch.randint(0, 64, (n, t), generator=g), "attention_mask": mask}


def _error(model, reference, batch) -> float:
    with torch.no_grad():
        out = model(**batch).last_hidden_state
        ref = reference(**batch).last_hidden_state
    keep = batch["attention_mask"].bool()
    return (out - ref)[keep].pow(2).mean().item()


@pytest.fixture(scope="module")
def pruned_bert():
    model = _bert()
    pruned = fxcompress.run(model, [("prune_channels", {"ratio": 0.5})], _batch(0, n=2),
                            check="none", progress=False).model
    return model, pruned


def test_reconstruction_reduces_held_out_error(pruned_bert):
    model, pruned = pruned_bert
    calibration = [_batch(s) for s in range(1, 9)]
    held_out = _batch(100)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned_state = {k: v.clone() for k, v in pruned.state_dict().items()}
    paths = pruned_consumers(pruned, model)
    assert paths and all(p.endswith("output.dense") for p in paths)
    rebuilt = reconstruct_consumers(pruned, model, calibration)
    assert _error(rebuilt, model, held_out) < 0.8 * _error(pruned, model, held_out)
    # shapes unchanged, only the consumers' parameters moved; neither input model was changed
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in pruned_state.items()}
    changed = {k for k, v in rebuilt.state_dict().items() if not torch.equal(v, pruned_state[k])}
    assert changed and all(k.rsplit(".", 1)[0] in paths for k in changed)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, pruned_state[k]) for k, v in pruned.state_dict().items())


def test_padding_is_not_fitted(pruned_bert):
    """Changing what padded positions hold changes nothing: they never enter the normal equations."""
    model, pruned = pruned_bert
    calibration = [_batch(s) for s in range(1, 5)]
    noisy = copy.deepcopy(calibration)
    for b in noisy:
        b["input_ids"][b["attention_mask"] == 0] = 63
    a = reconstruct_consumers(pruned, model, calibration)
    b = reconstruct_consumers(pruned, model, noisy)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=k)


def test_bad_input(pruned_bert):
    model, pruned = pruned_bert
    with pytest.raises(ConfigError, match="ridge"):
        reconstruct_consumers(pruned, model, [_batch(1)], ridge=0)
    with pytest.raises(ConfigError, match="no nn.Linear"):
        reconstruct_consumers(model, copy.deepcopy(model), [_batch(1)])
    with pytest.raises(ConfigError, match="embeddings"):
        reconstruct_consumers(pruned, model, [_batch(1)], modules=["embeddings"])
    with pytest.raises(InputError, match="empty"):
        reconstruct_consumers(pruned, model, [])
