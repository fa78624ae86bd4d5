"""run()'s boundary: everything checkable is checked before any work, with an fxcompress
error naming the argument or tensor at fault, and the caller's example inputs are never
written into (fxcompress.boundary)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress import recipes
from fxcompress.errors import ConfigError, InputError, MetricError

torch.set_num_threads(1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class NormalisesInPlace(Net):
    """Divides its input by 2 in place before anything else, as some preprocessing code does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.div_(2)
        return super().forward(x)


X = torch.randn(2, 3, 8, 8)
LABELLED = [(torch.randn(2, 3, 8, 8), torch.tensor([0, 1])) for _ in range(2)]


class Evaluations(list):
    """An eval_fn that records its calls: run() calls it only once everything is validated."""

    def __call__(self, model: nn.Module) -> float:
        self.append(model)
        return 0.0


def _refused_before_any_work(match: str, passes, example=X, model: nn.Module | None = None,
                             error: type = ConfigError, **kwargs) -> None:
    calls = Evaluations()
    with pytest.raises(error, match=match):
        fxcompress.run(model if model is not None else Net().eval(), passes, example, eval_fn=calls,
                       progress=False, **kwargs)
    assert calls == [], "the error came after work had started"


# -- item 2: the example inputs are never written into ---------------------------------------
def test_a_model_that_writes_into_its_input_leaves_the_callers_tensor_as_it_was():
    model, x = NormalisesInPlace().eval(), X.clone()
    result = fxcompress.run(model, ["fuse_conv_bn", "eliminate_dead_nodes"], x, progress=False, check="full")
    assert torch.equal(x, X)
    # Every check after a pass ran on X itself (not X / 2, X / 4, ...): the exact pass was not blamed (item 10),
    # and the result computes what the model computes.
    torch.testing.assert_close(result.model(X.clone()), model(X.clone()), rtol=1e-4, atol=1e-5)


def test_keyword_and_nested_example_inputs_are_not_written_into():
    class AddsOne(nn.Module):
        def forward(self, x: torch.Tensor, extra: tuple) -> torch.Tensor:
            x.add_(1)
            extra[0].mul_(3)
            return x + extra[0]

    x, extra = torch.randn(3), (torch.randn(3),)
    saved = x.clone(), extra[0].clone()
    fxcompress.run(AddsOne(), [], {"x": x, "extra": extra}, progress=False, check="full")
    assert torch.equal(x, saved[0]) and torch.equal(extra[0], saved[1])


# -- item 10: non-finite data and weights are named by tensor -------------------------------
def test_nan_in_an_example_input_is_an_input_error_naming_it():
    x = X.clone()
    x[0, 0, 0, 0] = float("nan")
    _refused_before_any_work(r"^example input #0 holds 1 NaN of 384 values", ["fuse_conv_bn"], x, error=InputError)
    _refused_before_any_work(r"^example input 'x' holds 1 NaN", ["fuse_conv_bn"], {"x": x}, error=InputError)


@pytest.mark.parametrize("value, what", [(float("inf"), "1 Inf"), (float("nan"), "1 NaN")])
def test_non_finite_weights_are_an_input_error_naming_the_parameter(value: float, what: str):
    model = Net().eval()
    with torch.no_grad():
        model.conv.weight[0, 0, 0, 0] = value
    _refused_before_any_work(rf"^the model's parameter 'conv.weight' holds {what} of 216 values", ["fuse_conv_bn"],
                             model=model, error=InputError)


def test_nan_in_a_buffer_is_refused_but_a_minus_inf_mask_is_a_legitimate_value():
    model = Net().eval()
    model.bn.running_var[3] = float("nan")
    _refused_before_any_work(r"^the model's buffer 'bn.running_var' holds 1 NaN of 8 values", ["fuse_conv_bn"],
                             model=model, error=InputError)

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("mask", torch.tensor([0.0, float("-inf"), 0.0, 0.0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.fc(x) + self.mask, -1)

    fxcompress.run(Masked().eval(), ["fuse_conv_bn", "eliminate_dead_nodes"], torch.randn(2, 4), progress=False)


def test_minus_inf_outputs_of_an_exact_pass_are_compared_where_they_are():
    class MaskedLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x)).mean((2, 3))
            return y.masked_fill(torch.arange(4) == 1, float("-inf"))

    result = fxcompress.run(MaskedLogits().eval(), ["fuse_conv_bn"], X, progress=False, check="full")
    assert result.report.rows[0].modified


def test_an_empty_example_input_is_refused():
    _refused_before_any_work(r"^example input #0 is empty \(shape \(0, 3, 8, 8\)\)", ["fuse_conv_bn"],
                             torch.zeros(0, 3, 8, 8), error=InputError)


# -- items 12 and 13: arguments checked before any work --------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"backend": "arm"}, r"^backend must be one of \('x86', 'reference'\)"),
    ({"seed": "abc"}, r"^seed must be an int, got str 'abc'"),
    ({"seed": 1.5}, r"^seed must be an int"),
    ({"progress": "yes"}, r"^progress must be True or False"),
    ({"loss_fn": "cross_entropy"}, r"^loss_fn must be a function"),
    ({"calibration_data": 5}, r"^calibration_data must be an iterable of batches .*got int"),
    ({"calibration_data": X}, r"give \[x\] or list\(x.split\(batch_size\)\)"),
])
def test_bad_arguments_are_refused_before_any_work(kwargs, match):
    calls = Evaluations()
    with pytest.raises(ConfigError, match=match):
        fxcompress.run(Net().eval(), ["fuse_conv_bn", "quantize_dynamic"], X, eval_fn=calls, **kwargs)
    assert calls == []


def test_backend_is_checked_before_the_passes_before_the_one_that_reads_it():
    _refused_before_any_work(r"^backend must be one of", recipes.int8_static(), backend="arm",
                             calibration_data=[X])


@pytest.mark.parametrize("passes, kwargs, match", [
    (recipes.int8_qat(steps=2), {"calibration_data": LABELLED},
     r"pass 'finetune' \(entry 4\) needs loss_fn"),
    (recipes.int8_static(), {}, r"pass 'calibrate' \(entry 2\) needs calibration_data"),
    ([("prune_channels", {"importance": "taylor"})], {"calibration_data": LABELLED},
     r"pass 'prune_channels' \(entry 0\) needs loss_fn"),
    (recipes.int8_static() + ["prune_channels"], {"calibration_data": [X]},
     r"pass 'prune_channels' \(entry 6\) must run before \['insert_observers', 'fold_fake_quant', 'lower'\]"),
])
def test_what_a_pass_needs_and_where_it_may_run_is_checked_before_any_work(passes, kwargs, match):
    _refused_before_any_work(match, passes, **kwargs)


def test_a_generator_read_by_two_passes_is_refused_before_the_first_uses_it_up():
    used = []

    def batches():
        for b in LABELLED:
            used.append(b)
            yield b

    _refused_before_any_work(r"one-shot iterator \(generator\), but passes \['calibrate', 'finetune'\] each read it",
                             recipes.int8_qat(steps=2), calibration_data=batches(), loss_fn=F.cross_entropy)
    assert used == []
    # One reader may take a generator.
    fxcompress.run(Net().eval(), recipes.int8_static(backend="reference"), X, calibration_data=iter([X]),
                   progress=False)


def test_pruning_a_graph_that_is_already_quantized_is_refused_before_any_work():
    quantized = fxcompress.run(Net().eval(), ["quantize_dynamic"], X, progress=False).model
    _refused_before_any_work(r"pass 'prune_channels' \(entry 1\) runs on float graphs, but the graph is already "
                             r"lowered", ["fuse_conv_bn", "prune_channels"], model=quantized)


@pytest.mark.parametrize("value", [None, "0.9", [1.0], float("nan")])
def test_an_eval_fn_that_returns_no_number_is_a_metric_error_before_the_pipeline(value):
    ran = []

    def eval_fn(model: nn.Module):
        ran.append(len(ran))
        return value

    with pytest.raises(MetricError, match=r"eval_fn returned .* before the pipeline"):
        fxcompress.run(Net().eval(), ["fuse_conv_bn"], X, eval_fn=eval_fn, progress=False)
    assert ran == [0]


def test_a_tensor_metric_is_accepted_as_a_number():
    result = fxcompress.run(Net().eval(), ["fuse_conv_bn"], X, eval_fn=lambda m: torch.tensor(0.5), progress=False)
    assert result.report.metrics["task metric"]["after"] == 0.5
