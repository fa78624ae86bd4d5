"""fxcompress.trace: inputs and outputs of every supported form, tensor_meta on every
tensor node, the capture options, and the errors for models and inputs that do not fit."""

from __future__ import annotations

import collections
import gc
import operator
import re

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxcompress
from fxcompress import zoo
from fxcompress.capture import propagate_shapes, record_meta
from fxcompress.errors import ConfigError, InputError, TraceError

torch.set_num_threads(1)


def _values(gm: fx.GraphModule, *args, **kwargs) -> dict[fx.Node, object]:
    """Every node's value on the inputs, from an independent interpreter."""
    values = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            values[n] = super().run_node(n)
            return values[n]

    with torch.no_grad():
        Recorder(gm).run(*args, **kwargs)
    return values


def _tensor_leaves(value: object) -> list:
    """Tensors inside a value, or TensorMetadata inside a tensor_meta, in order."""
    if isinstance(value, torch.Tensor) or (hasattr(value, "shape") and hasattr(value, "dtype")):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in _tensor_leaves(v)]
    return []


def _assert_meta_matches(gm: fx.GraphModule, *args) -> int:
    """Every node holding a tensor (or tensors) carries true tensor_meta; returns how many."""
    checked = 0
    for node, value in _values(gm, *args).items():
        assert node.meta["type"] is type(value), node.name
        tensors = _tensor_leaves(value)
        if not tensors:
            assert "tensor_meta" not in node.meta, node.name
            continue
        assert "tensor_meta" in node.meta, f"{node.name} ({node.op} {node.target}) has no tensor_meta"
        metas = _tensor_leaves(node.meta["tensor_meta"])
        assert [(tuple(m.shape), m.dtype) for m in metas] == [(tuple(t.shape), t.dtype) for t in tensors]
        checked += 1
    return checked


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.drop(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def test_tensor_input_every_tensor_node_has_true_tensor_meta():
    model, x = SmallNet().eval(), torch.randn(2, 3, 8, 8)
    gm = fxcompress.trace(model, x)
    assert _assert_meta_matches(gm, x) >= 8
    torch.testing.assert_close(gm(x), model(x))
    assert tuple(gm.graph.find_nodes(op="output")[0].meta["tensor_meta"].shape) == (2, 5)


def test_zoo_model_tensor_meta_and_outputs():
    model = zoo.build("mobilenet_v3_small")
    x = zoo.example_input("mobilenet_v3_small", reduced=True)
    gm = fxcompress.trace(model, x)
    assert _assert_meta_matches(gm, x) > 100
    torch.testing.assert_close(gm(x), model(x))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, a, b, mask=None):
        out = self.lin(a) * b
        return out if mask is None else out.masked_fill(mask, 0.0)


def test_tuple_and_dict_inputs():
    model = TwoInputs()
    a, b, mask = torch.randn(3, 4), torch.randn(3, 4), torch.rand(3, 4) > 0.5
    gm = fxcompress.trace(model, (a, b))
    torch.testing.assert_close(gm(a, b), model(a, b))
    gm = fxcompress.trace(model, {"a": a, "b": b, "mask": mask})
    torch.testing.assert_close(gm(a, b, mask), model(a, b, mask))
    _assert_meta_matches(gm, a, b, mask)
    # An argument the inputs leave out is traced at its default: `mask is None` holds.
    gm = fxcompress.trace(model, {"a": a, "b": b})
    torch.testing.assert_close(gm(a, b), model(a, b))
    assert not any(n.target == "masked_fill" for n in gm.graph.nodes)


Pair = collections.namedtuple("Pair", ["logits", "features"])


class ManyOutputs(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        y = self.lin(x)
        z = y.relu()
        if self.form == "tuple":
            return y, (z, x.sum())
        if self.form == "list":
            return [y, z]
        if self.form == "dict":
            return {"logits": y, "extra": {"relu": z}}
        return Pair(y, z)


@pytest.mark.parametrize("form", ["tuple", "list", "dict", "namedtuple"])
def test_nested_outputs_keep_their_structure(form):
    model, x = ManyOutputs(form), torch.randn(2, 4)
    gm = fxcompress.trace(model, x)
    expected, got = model(x), gm(x)
    assert type(got) is type(expected)
    torch.testing.assert_close(got, expected)
    meta = gm.graph.find_nodes(op="output")[0].meta["tensor_meta"]
    if form == "namedtuple":
        assert isinstance(meta, Pair) and tuple(meta.logits.shape) == (2, 3)
    if form == "dict":
        assert tuple(meta["extra"]["relu"].shape) == (2, 3)
    _assert_meta_matches(gm, x)


class Gate(nn.Module):
    """Data-dependent control flow: untraceable unless kept whole."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(4, 4), Gate(), nn.Linear(4, 4))

    def forward(self, x):
        return self.blocks(x)


def test_data_dependent_control_flow_names_module_line_and_remedy():
    with pytest.raises(TraceError) as info:
        fxcompress.trace(Blocks(), torch.randn(2, 4))
    msg = str(info.value)
    assert "'blocks.1' (Gate)" in msg
    assert re.search(r"test_capture\.py:\d+: if x\.sum\(\) > 0:", msg), msg
    assert "leaf_modules=['blocks.1']" in msg and "concrete_args" in msg and "autowrap" in msg


def test_trace_error_in_top_level_forward_suggests_no_leaf_module():
    with pytest.raises(TraceError) as info:
        fxcompress.trace(Gate(), torch.randn(2, 4))
    msg = str(info.value)
    assert "top-level forward" in msg and "leaf_modules" not in msg and "concrete_args" in msg
    assert gc.isenabled()  # paused while capturing, restored on failure too


@pytest.mark.parametrize("leaf", [Gate, "blocks.1", "blocks.?"])
def test_leaf_modules_by_type_and_path_pattern(leaf):
    model, x = Blocks(), torch.randn(2, 4)
    gm = fxcompress.trace(model, x, leaf_modules=[leaf])
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["blocks.0", "blocks.1", "blocks.2"]
    torch.testing.assert_close(gm(x), model(x))


def test_bad_leaf_modules_and_autowrap_are_config_errors():
    with pytest.raises(ConfigError, match="leaf_modules"):
        fxcompress.trace(Blocks(), torch.randn(2, 4), leaf_modules=[3])
    with pytest.raises(ConfigError, match="autowrap"):
        fxcompress.trace(Blocks(), torch.randn(2, 4), autowrap=["not callable"])


class Flagged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, double):
        y = self.lin(x)
        if double:
            y = y * 2
        return y


def test_concrete_args_fix_control_flow():
    model, x = Flagged(), torch.randn(2, 4)
    with pytest.raises(TraceError, match="concrete_args"):
        fxcompress.trace(model, (x, True), frontend="fx")
    gm = fxcompress.trace(model, x, concrete_args={"double": False})
    torch.testing.assert_close(gm(x), model(x, False))
    # The fixed argument keeps its name and takes the fixed value by default.
    torch.testing.assert_close(gm(x, double=False), model(x, False))
    gm = fxcompress.trace(model, {"x": x, "double": False}, concrete_args={"double": False})
    torch.testing.assert_close(gm(x), model(x, False))
    assert not any(n.target is operator.mul for n in gm.graph.nodes)


def clip_if_large(x):
    """Module-level function with control flow: kept whole by autowrap."""
    if x.abs().max() > 1:
        return x.clamp(-1, 1)
    return x


class UsesHelper(nn.Module):
    def forward(self, x):
        return clip_if_large(x * 3) + 1


def test_autowrap_records_a_function_as_one_node():
    model, x = UsesHelper(), torch.randn(2, 4)
    with pytest.raises(TraceError):
        fxcompress.trace(model, x)
    gm = fxcompress.trace(model, x, autowrap=(clip_if_large,))
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"].count(clip_if_large) == 1
    torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize(
    "inputs, pattern",
    [
        (torch.randn(2, 5, 8, 8), r"node 'conv' \(call_module conv\).*Inputs given: \[\(2, 5, 8, 8\)"),
        (torch.randint(0, 5, (2, 3, 8, 8)), r"node 'conv'.*int64"),
        ("an image", "must be a tensor, a tuple"),
        (3.0, "must be a tensor, a tuple"),
        ((torch.randn(2, 3, 8, 8), torch.randn(2)), r"takes 1 inputs \['x'\], got 2 positional"),
        ({"y": torch.randn(2, 3, 8, 8)}, r"unknown keyword inputs \['y'\]"),
        ({}, "missing example input 'x'"),
        ({0: torch.randn(2, 3, 8, 8)}, "need str keys"),
    ],
)
def test_inputs_that_do_not_fit_raise_input_error(inputs, pattern):
    with pytest.raises(InputError, match=pattern):
        fxcompress.trace(SmallNet().eval(), inputs)


def test_trace_rejects_what_is_not_a_module():
    with pytest.raises(TraceError, match="takes an nn.Module"):
        fxcompress.trace(lambda x: x, torch.randn(2))


def test_tracing_a_training_model_changes_neither_its_state_nor_the_rng():
    model, x = SmallNet().train(), torch.randn(4, 3, 8, 8)
    model.fc.eval()  # mixed modes are kept, module by module
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    gm = fxcompress.trace(model, x)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and model.bn.training and not model.fc.training
    assert gm.training and gm.get_submodule("bn").training and not gm.get_submodule("fc").training


def test_training_flags_of_created_containers_follow_the_model():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2)).eval()
    gm = fxcompress.trace(model, torch.randn(1, 4))
    assert not any(m.training for m in gm.modules())


def test_propagate_shapes_is_repeatable_in_training_mode():
    gm = fxcompress.trace(SmallNet().train(), torch.randn(4, 3, 8, 8))
    x = torch.randn(4, 3, 8, 8)
    first = propagate_shapes(gm, (x,))
    torch.testing.assert_close(propagate_shapes(gm, (x,)), first)
    assert gm.get_submodule("bn").num_batches_tracked.item() == 0


def test_graph_module_input_is_annotated_in_place_and_capture_options_refused():
    gm = fx.symbolic_trace(SmallNet().eval())
    x = torch.randn(2, 3, 8, 8)
    assert fxcompress.trace(gm, x) is gm
    _assert_meta_matches(gm, x)
    with pytest.raises(ConfigError, match="already a GraphModule"):
        fxcompress.trace(gm, x, leaf_modules=[nn.Linear])


def test_record_meta_annotates_and_clears():
    gm = fxcompress.trace(SmallNet().eval(), torch.randn(2, 3, 8, 8))
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    record_meta(node, (torch.zeros(1, 2), torch.zeros(3, dtype=torch.int8)))
    assert [tuple(m.shape) for m in node.meta["tensor_meta"]] == [(1, 2), (3,)]
    record_meta(node, 7)
    assert "tensor_meta" not in node.meta and node.meta["type"] is int


def test_recapture_keeps_fxcompress_runtime_modules_whole() -> None:
    """A compressed model wrapped again is re-captured with our modules as leaves."""
    from fxcompress.prune.attention import PrunedMultiheadAttention

    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
            self.att = PrunedMultiheadAttention.from_module(mha).eval()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.att(x, x, x, need_weights=False)[0]

    class Wrap(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) * 2

    x = torch.randn(2, 5, 16)
    inner = fxcompress.trace(Attend(), x)
    outer = fxcompress.trace(Wrap(inner), x)
    modules = [n.target for n in outer.graph.nodes if n.op == "call_module"]
    assert modules == ["inner.att"]
    torch.testing.assert_close(outer(x), inner(x) * 2)


def test_buffers_written_under_inference_mode_can_be_propagated() -> None:
    """Calibration writes observer buffers under inference_mode; re-running the graph must work."""

    class Offset(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            with torch.inference_mode():
                self.register_buffer("offset", torch.arange(3.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.offset

    gm = fxcompress.trace(Offset(), torch.zeros(3))
    assert torch.equal(propagate_shapes(gm, (torch.zeros(3),)), torch.arange(3.0))
    assert torch.equal(gm.offset, torch.arange(3.0))


class CountsCalls(nn.Module):
    """Increments a buffer on every call, in place or by reassignment."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.in_place = in_place
        self.fc = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_place:
            self.calls.add_(1)
        else:
            self.calls = self.calls + 1
        return self.fc(x) * self.calls


def test_tracing_a_forward_that_writes_a_buffer_leaves_it_unchanged_and_records_the_write() -> None:
    model, x = CountsCalls(in_place=True).eval(), torch.randn(2, 4)
    gm = fxcompress.trace(model, x)
    assert model.calls.item() == 0 and gm.calls.item() == 0
    gm(x)  # the write is in the graph, not dropped: the graph counts its calls as the model does
    assert gm.calls.item() == 1
    torch.testing.assert_close(gm(x), model.fc(x) * 2)  # second call: the count went on


def test_a_forward_that_assigns_a_buffer_is_a_trace_error_leaving_it_unchanged() -> None:
    model = CountsCalls(in_place=False).eval()
    with pytest.raises(TraceError, match=r"assigns buffer 'calls' \(self.calls = ...\).*update it in place"):
        fxcompress.trace(model, torch.randn(2, 4), frontend="fx")
    assert model.calls.item() == 0


def test_auto_captures_a_buffer_assignment_with_torch_export_which_records_the_write() -> None:
    model, x = CountsCalls(in_place=False).eval(), torch.randn(2, 4)
    gm = fxcompress.trace(model, x)
    assert gm.meta[fxcompress.capture.FRONTEND_KEY]["frontend"] == "export"
    assert "assigns buffer 'calls'" in gm.meta[fxcompress.capture.FRONTEND_KEY]["why"]
    assert model.calls.item() == 0 and gm.calls.item() == 0
    gm(x)
    assert gm.calls.item() == 1
    torch.testing.assert_close(gm(x), model.fc(x) * 2)


def test_shape_propagation_never_writes_into_its_inputs() -> None:
    class Halves(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.div_(2) + 1

    x = torch.ones(3)
    gm = fxcompress.trace(Halves(), x)
    propagate_shapes(gm, (x,))
    assert torch.equal(x, torch.ones(3))


def test_a_leaf_modules_pattern_that_matches_nothing_is_a_config_error_like_a_scope_typo() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Linear(4, 2)))
    with pytest.raises(ConfigError, match=r"leaf_modules pattern '2\.\*' matches no module of Sequential"):
        fxcompress.trace(model, torch.randn(1, 4), leaf_modules=["2.*"])
    with pytest.raises(ConfigError, match=r"leaf_modules pattern '01' matches no module of Sequential \(did you mean"):
        fxcompress.trace(model, torch.randn(1, 4), leaf_modules=["01"])
    gm = fxcompress.trace(model, torch.randn(1, 4), leaf_modules=["1.*", nn.GELU])  # a type absent is fine
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1.0", "1.1"]
