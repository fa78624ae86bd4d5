"""fxcompress.bench.compare: what it measures and what it must not touch (no timing assertions)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import fxcompress
from fxcompress.bench import agreement, compare, serialized_bytes
from fxcompress.errors import InputError
from fxcompress.examples.digits import accuracy, load_digits_data, pretrained_digits_cnn


@pytest.fixture(scope="module")
def digits():
    return load_digits_data(0), pretrained_digits_cnn(0)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_identical_models_agree_perfectly(digits) -> None:
    data, model = digits
    x = data.test_x[:16]
    c = compare(model, copy.deepcopy(model), x, threads=(1,), min_run_time=0.02, rounds=2)
    assert c.agreement.sqnr_db == math.inf
    assert c.agreement.max_abs_error == 0.0
    assert c.agreement.top1_agreement == 1.0
    assert c.original.parameters == c.compressed.parameters == sum(p.numel() for p in model.parameters())
    assert c.original.serialized_bytes == c.compressed.serialized_bytes == serialized_bytes(model)
    assert c.original.macs == c.compressed.macs > 0
    d = c.to_dict()
    assert set(d) == {"threads", "original", "compressed", "speedup", "agreement", "warnings"}
    assert set(d["original"]) == {"parameters", "macs", "serialized_bytes", "latency", "metric",
                                  "compiled_latency"}
    assert set(d["original"]["latency"]["1"]) == {"threads", "median", "iqr", "blocks"}
    assert d["original"]["latency"]["1"]["median"] > 0 and set(d["speedup"]) == {"1"}
    json.dumps(d)  # plain data throughout


def test_fused_model_comparison_with_task_metric(digits) -> None:
    data, model = digits
    x = data.test_x[:16]
    fused = fxcompress.run(model, ["fuse_conv_bn", "eliminate_dead_nodes"], (x,)).model
    c = compare(model, fused, (x,), eval_fn=lambda m: accuracy(m, data.test_x, data.test_y), threads=())
    assert c.agreement.sqnr_db > 80 and c.agreement.top1_agreement == 1.0
    assert c.compressed.parameters < c.original.parameters  # the BatchNorm affine parameters are gone
    assert c.compressed.serialized_bytes < c.original.serialized_bytes
    assert c.compressed.macs == c.original.macs  # fusion does not change the MAC count
    assert c.original.metric == c.compressed.metric == accuracy(model, data.test_x, data.test_y)
    assert c.original.latency == {} and c.to_dict()["speedup"] == {}
    text = str(c)
    for label in ("parameters", "MACs", "serialized", "task metric", "SQNR", "top-1 agreement"):
        assert label in text
    assert "latency" not in text


def test_compare_touches_neither_model_nor_the_thread_count(digits) -> None:
    data, model = digits
    x = data.test_x[:8]
    fused = fxcompress.run(model, ["fuse_conv_bn"], (x,)).model
    before = (_state(model), _state(fused), fused.code, {n.name: dict(n.meta) for n in fused.graph.nodes})
    threads = torch.get_num_threads()
    c = compare(model, fused, x, threads=(threads + 1,), min_run_time=0.02, rounds=2)
    assert torch.get_num_threads() == threads
    assert set(c.original.latency) == {threads + 1}
    for old, new in zip(before[:2], (model.state_dict(), fused.state_dict())):
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    assert fused.code == before[2]
    assert {n.name: n.meta for n in fused.graph.nodes} == before[3]
    assert not model.training and not fused.training


def test_agreement_closed_form() -> None:
    ref = torch.tensor([[3.0, 1.0], [0.0, 2.0], [1.0, 4.0]])
    out = torch.tensor([[3.0, 1.0], [2.5, 2.0], [1.0, 3.0]])  # row 1 flips its argmax
    g = agreement(ref, out)
    assert g.sqnr_db == pytest.approx(10 * math.log10(31.0 / (2.5**2 + 1.0)))
    assert g.max_abs_error == pytest.approx(2.5)
    assert g.top1_agreement == pytest.approx(2 / 3)
    # Nested outputs pool signal and noise; a feature map is not classifier-like.
    maps = agreement({"a": torch.ones(1, 2, 3, 3), "b": (torch.ones(2),)},
                     {"a": torch.ones(1, 2, 3, 3), "b": (torch.zeros(2),)})
    assert maps.sqnr_db == pytest.approx(10 * math.log10(20 / 2)) and maps.top1_agreement is None


def test_bad_input() -> None:
    model = torch.nn.Linear(4, 3).eval()
    with pytest.raises(InputError, match="differ in structure"):
        agreement(torch.ones(2, 3), (torch.ones(2, 3), torch.ones(1)))
    with pytest.raises(InputError, match=r"training mode.*call .eval\(\)"):
        compare(torch.nn.Linear(4, 3), model, torch.ones(2, 4))
    with pytest.raises(InputError, match="threads must be positive integers"):
        compare(model, model, torch.ones(2, 4), threads=(0,))
    with pytest.raises(InputError, match="must be an nn.Module"):
        compare(model, lambda x: x, torch.ones(2, 4))


def test_agreement_over_data_batches_and_a_warning_for_few_rows(digits) -> None:
    data, model = digits
    fused = fxcompress.run(model, ["fuse_conv_bn"], (data.test_x[:1],)).model
    with pytest.warns(UserWarning, match="top-1 agreement is over 1 row only"):
        one = compare(model, fused, data.test_x[:1], threads=())
    assert one.agreement.rows == 1 and one.agreement.batches == 1 and one.warnings
    batches = [(data.test_x[i:i + 64], data.test_y[i:i + 64]) for i in range(0, 256, 64)]  # labelled pairs
    many = compare(model, fused, data.test_x[:1], data=batches, threads=())
    assert many.agreement.rows == 256 and many.agreement.batches == 4 and many.agreement.top1_agreement == 1.0
    assert many.warnings == [] and "100.00% of 256 rows" in str(many)


class Collapsed(torch.nn.Module):
    """A 'compressed' model whose output collapsed to zero."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * 0


def test_a_collapsed_output_is_warned_about(digits) -> None:
    data, model = digits
    batches = list(data.test_x[:128].split(64))
    with pytest.warns(UserWarning, match=r"output #0 collapsed to a constant \(0\)"):
        c = compare(model, Collapsed(model).eval(), data.test_x[:1], data=batches, threads=())
    assert any("collapsed" in w for w in c.warnings) and "warnings:" in str(c)


class Slow(torch.nn.Module):
    """The same outputs, computed several times over."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(20):
            out = self.model(x)
        return out


def test_a_slower_compressed_model_is_warned_about(digits) -> None:
    data, model = digits
    with pytest.warns(UserWarning, match=r"the compressed model is slower than the original at 1 thread"):
        compare(model, Slow(model).eval(), data.test_x[:64], threads=(1,), min_run_time=0.05, rounds=2)


def test_inputs_that_do_not_fit_are_an_input_error_naming_the_model() -> None:
    model = torch.nn.Linear(4, 3).eval()
    with pytest.raises(InputError, match=r"compare\(\): the original model does not run on the inputs: RuntimeError"):
        compare(model, model, torch.ones(2, 5), threads=())
    with pytest.raises(InputError, match=r"compare\(\): data: calibration batch 1: input #0 is float32 \(2, 5\)"):
        compare(model, model, torch.ones(2, 4), data=[torch.ones(3, 4), torch.ones(2, 5)], threads=())


def test_compare_does_not_write_into_the_inputs() -> None:
    class Halves(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.div_(2)

    x = torch.ones(4, 3)
    compare(Halves().eval(), Halves().eval(), x, threads=(1,), min_run_time=0.01, rounds=1)
    assert torch.equal(x, torch.ones(4, 3))




def test_compare_times_compiled_models_when_asked(digits) -> None:
    data, model = digits
    fused = fxcompress.run(model, ["fuse_conv_bn"], data.test_x[:4], progress=False).model
    c = compare(model, fused, data.test_x[:4], threads=(1,), min_run_time=0.02, rounds=2, compiled=True)
    assert set(c.original.compiled_latency) == set(c.compressed.compiled_latency) == {1}
    assert c.compressed.compiled_latency[1].median > 0 and "latency compiled, 1 thread" in c.table()
    assert c.to_dict()["compressed"]["compiled_latency"]["1"]["blocks"] >= 1
