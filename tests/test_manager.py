"""PassManager: the pipeline is validated before any work, and each check after a pass is
proven to catch a deliberately broken pass, at the check levels documented for it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import fx, nn

import fxcompress
from fxcompress.capture import propagate_shapes
from fxcompress.errors import CalibrationError, ConfigError, PassError
from fxcompress.manager import HISTORY_KEY, PassManager
from fxcompress.pass_base import Pass, PassContext, PassResult
from fxcompress.registry import register

torch.set_num_threads(1)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block1 = Block(3, 8)
        self.block2 = Block(8, 8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.block2(self.block1(x))), 1))


X = torch.randn(2, 3, 8, 8)


def run(passes, model: nn.Module | None = None, **kwargs):
    kwargs.setdefault("check", "full")
    return fxcompress.run(model if model is not None else Net().eval(), passes, X, progress=False, **kwargs)


def node(gm: fx.GraphModule, target: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.target == target)


# -- well-behaved test passes ------------------------------------------------------------
@register
@dataclass(frozen=True)
class Noop(Pass):
    """Changes nothing."""

    name = "tm_noop"
    exact = True

    def __call__(self, gm, ctx):
        return PassResult(gm, False)


@register
@dataclass(frozen=True)
class Scale(Pass):
    """Multiplies the fc weight by ``factor`` (0 < factor <= 10)."""

    name = "tm_scale"
    factor: float = 1.0
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.factor <= 10:
            raise ConfigError(f"tm_scale: factor must be in (0, 10], got {self.factor}")

    def __call__(self, gm, ctx):
        with torch.no_grad():
            gm.get_submodule("fc").weight.mul_(self.factor)
        return PassResult(gm, self.factor != 1.0, {"factor": self.factor})


@register
@dataclass(frozen=True)
class NeedsScale(Pass):
    """Requires tm_scale earlier."""

    name = "tm_needs_scale"
    requires = ("tm_scale",)

    def __call__(self, gm, ctx):
        return PassResult(gm, False)


@register
@dataclass(frozen=True)
class EvalOnly(Pass):
    """Only valid in eval mode."""

    name = "tm_eval_only"
    eval_only = True

    def __call__(self, gm, ctx):
        return PassResult(gm, False)


@register
@dataclass(frozen=True)
class RecordScope(Pass):
    """Reports the nodes in scope."""

    name = "tm_record_scope"

    def __call__(self, gm, ctx):
        return PassResult(gm, False, {"in_scope": [n.name for n in gm.graph.nodes if ctx.in_scope(n)]})


# -- validation before any work ---------------------------------------------------------
@pytest.mark.parametrize(
    "passes, match",
    [
        (["fuse_conv_bm"], r"unknown pass 'fuse_conv_bm' \(did you mean 'fuse_conv_bn'\?\)"),
        ([("tm_scale", {"factr": 2.0})],
         r"no option 'factr' \(did you mean 'factor'\?\); valid options: factor, names"),
        ([("tm_scale", {"factor": "big"})], r"option 'factor' must be float, got str 'big'"),
        ([("tm_scale", {"names": ["a", 2]})], r"option 'names' must be tuple\[str, \.\.\.\]"),
        ([Scale(names=(1,))], r"option 'names' must be tuple\[str, \.\.\.\]"),
        ([("tm_scale", {"factor": -1.0})], r"factor must be in \(0, 10\], got -1.0"),
        ([("tm_scale", {"scope": 3})], "scope must be a module-name pattern"),
        ([(Scale(), {"factor": 2.0})], "give options to the pass object itself"),
        ([3], "a pipeline entry is a pass object, a pass name or class"),
        ("tm_scale", "passes must be a list"),
    ],
)
def test_bad_pipelines_fail_at_construction(passes, match):
    with pytest.raises(ConfigError, match=match):
        PassManager(passes)


def test_bad_check_level_and_tolerance():
    for kwargs in ({"check": "everything"}, {"tolerance": -1.0}, {"tolerance": True}, {"tolerance": "1e-4"}):
        with pytest.raises(ConfigError):
            PassManager([], **kwargs)


def test_options_are_normalised():
    (step,) = PassManager([("tm_scale", {"factor": 2, "names": ["a", "b"]})]).steps
    assert step.pass_ == Scale(factor=2, names=("a", "b")) and isinstance(step.pass_.names, tuple)


def test_unmet_requires_fail_before_any_pass_runs():
    with pytest.raises(ConfigError, match=r"'tm_needs_scale' \(entry 1\) requires \['tm_scale'\].*passes so far: "
                                          r"\['tm_noop'\]"):
        run(["tm_noop", "tm_needs_scale"])
    result = run(["tm_scale", "tm_needs_scale"])
    assert [r.name for r in result.report.rows] == ["tm_scale", "tm_needs_scale"]


def test_requires_hold_across_runs_on_the_same_graph():
    first = run([("tm_scale", {"factor": 2.0})])
    assert first.model.meta[HISTORY_KEY] == ["tm_scale"]
    second = run(["tm_needs_scale"], model=first.model)
    assert second.model.meta[HISTORY_KEY] == ["tm_scale", "tm_needs_scale"]
    assert first.model.meta[HISTORY_KEY] == ["tm_scale"]  # the caller's graph is untouched


def test_scope_and_skip_patterns_must_match_a_module():
    with pytest.raises(ConfigError, match=r"scope pattern 'blok1' matches no module \(did you mean 'block1'"):
        run([("tm_record_scope", {"scope": ["blok1"]})])
    with pytest.raises(ConfigError, match=r"skip pattern 'block3\.\*' matches no module"):
        run([("tm_record_scope", {"skip": "block3.*"})])


def test_scope_and_skip_reach_the_pass():
    result = run([("tm_record_scope", {"scope": ["block*"], "skip": ["block2.bn"]}), "tm_record_scope"])
    scoped, unscoped = (r.stats["in_scope"] for r in result.report.rows)
    assert scoped == ["block1_conv", "block1_bn", "block1_relu", "block2_conv", "block2_relu"]
    assert len(unscoped) == len(result.model.graph.nodes)
    assert result.pipeline[0] == {"name": "tm_record_scope", "options": {}, "scope": ["block*"],
                                  "skip": ["block2.bn"]}


def test_eval_only_pass_refuses_a_model_in_training_mode():
    with pytest.raises(ConfigError, match=r"'tm_eval_only' \(entry 0\) is only valid in eval mode, but module "
                                          r"'\(root\)'.*call model.eval\(\) first"):
        run(["tm_eval_only"], model=Net().train())
    model = Net().eval()
    model.block2.bn.train()
    with pytest.raises(ConfigError, match="module 'block2.bn' of the model is in training mode"):
        run(["tm_eval_only"], model=model)
    assert run(["tm_eval_only"]).report.rows[0].name == "tm_eval_only"


def test_empty_pipeline_returns_an_equivalent_model():
    model = Net().eval()
    result = run([], model=model)
    assert result.report.rows == [] and result.pipeline == []
    torch.testing.assert_close(result.model(X), model(X))
    assert result.report.after == result.report.before


def test_exact_pass_on_a_training_model_with_dropout_is_not_a_false_alarm():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.Linear(8, 2)).train()
    result = fxcompress.run(model, ["tm_noop", "tm_noop"], torch.randn(6, 4), check="full", progress=False)
    assert result.model.training and result.model.get_submodule("2").num_batches_tracked.item() == 0


# -- broken passes: each check catches its own kind of corruption -----------------------
def _rewrite(fn: Callable[[fx.GraphModule, PassContext], None], annotate: bool = True):
    """A pass body that applies ``fn`` and (unless told not to) re-annotates shapes correctly,
    so that only the corruption under test is left for the manager to find."""

    def __call__(self, gm, ctx):
        fn(gm, ctx)
        gm.recompile()
        if annotate:
            propagate_shapes(gm, ctx.example_args)
        return PassResult(gm, True)

    return __call__


def _last_value(gm: fx.GraphModule) -> fx.Node:
    return gm.graph.find_nodes(op="output")[0].args[0]


def _set_output(gm: fx.GraphModule, make: Callable[[fx.Node], object]) -> None:
    out = gm.graph.find_nodes(op="output")[0]
    with gm.graph.inserting_before(out):
        out.args = (make(out.args[0]),)


def _unsorted(gm, ctx):
    node(gm, "block1.conv").prepend(node(gm, "block1.bn"))  # bn now reads conv before it exists


def _unrunnable(gm, ctx):
    gm.fc = nn.Linear(5, 4)


def _shape(gm, ctx):
    _set_output(gm, lambda v: gm.graph.call_method("narrow", (v, 1, 0, 2)))


def _dtype(gm, ctx):
    _set_output(gm, lambda v: gm.graph.call_method("double", (v,)))


def _structure(gm, ctx):
    _set_output(gm, lambda v: (v, v))


def _perturb(gm, ctx):
    with torch.no_grad():
        gm.fc.weight.mul_(1.01)


def _drop_meta(gm, ctx):
    relu = node(gm, "block1.relu")
    with gm.graph.inserting_after(relu):
        new = gm.graph.call_function(torch.relu, relu.args)
    relu.replace_all_uses_with(new)
    gm.graph.erase_node(relu)


def _stale(gm, ctx):
    gm.block1.conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)  # halves H and W; the pool hides it


class Observer(nn.Module):
    fxc_role = "observer"

    def forward(self, x):
        return x


class Lowered(nn.Module):
    fxc_role = "lowered"

    def forward(self, x):
        return x


def _leftover_observer(gm, ctx):
    gm.obs, gm.low = Observer(), Lowered()
    conv = node(gm, "block1.conv")
    with gm.graph.inserting_after(conv):
        low = gm.graph.call_module("low", (conv,))
    with gm.graph.inserting_after(low):
        obs = gm.graph.call_module("obs", (low,))
    conv.replace_all_uses_with(low, delete_user_cb=lambda user: user is not low)
    low.replace_all_uses_with(obs, delete_user_cb=lambda user: user is not obs)


class AddInto(nn.Module):
    """out = acc += x, in place: a fused residual add."""

    mutates_args = (1,)

    def forward(self, x, acc):
        return acc.add_(x)


def _mutates_a_live_input(gm, ctx):
    gm.add_into = AddInto()
    conv = node(gm, "block2.conv")
    with gm.graph.inserting_after(conv):
        gm.graph.call_module("add_into", (conv, conv))  # bn2 still reads conv afterwards


def _raises(gm, ctx):
    raise RuntimeError("boom")


BROKEN: dict[str, tuple[Callable, bool, str, str]] = {
    # name: (rewrite, annotate, lowest check level that catches it, message)
    "unsorted": (_unsorted, False, "none", "the graph does not lint: Argument 'block1_conv' of Node 'block1_bn' "
                                           "was used before it has been defined"),
    "unrunnable": (_unrunnable, False, "none", "the rewritten graph no longer runs: .*node 'fc'"),
    "raises": (_raises, False, "none", "raised RuntimeError: boom"),
    "shape": (_shape, True, "shapes", r"output structure, shapes or dtypes changed: out: "
                                      r"\(\(2, 4\), torch.float32\) -> \(\(2, 2\), torch.float32\)"),
    "dtype": (_dtype, True, "shapes", r"out: \(\(2, 4\), torch.float32\) -> \(\(2, 4\), torch.float64\)"),
    "structure": (_structure, True, "shapes", r"out: \(\(2, 4\), torch.float32\) -> \('tuple', 2\)"),
    "perturb": (_perturb, True, "full", r"an exact pass changed out by 0.0\d+ \(norm-relative; tolerance 0.001\)"),
    "drop_meta": (_drop_meta, False, "full", r"node 'relu' \(call_function .*relu.*\) has no tensor_meta"),
    "stale": (_stale, False, "full", r"node 'block1_conv' records \(\(2, 8, 8, 8\), torch.float32\) but computes "
                                     r"\(\(2, 8, 4, 4\), torch.float32\): a rewrite left stale metadata"),
    "observer": (_leftover_observer, True, "full", r"lowered-stage invariants broken: node 'obs': module Observer "
                                                   r"\(role observer\) is left in a lowered graph"),
    "mutation": (_mutates_a_live_input, True, "full", r"node 'add_into' overwrites 'block2_conv' in place, which "
                                                      r"is still read by \['block2_bn'\]"),
}
LEVELS = ("none", "shapes", "full")


def broken_pass(name: str) -> Pass:
    fn, annotate, _, _ = BROKEN[name]
    cls = dataclass(frozen=True)(type(f"Broken_{name}", (Pass,), {
        "__doc__": f"Deliberately broken: {name}.", "name": f"broken_{name}", "exact": name == "perturb",
        "__call__": _rewrite(fn, annotate), "__module__": __name__}))
    return cls()


@pytest.mark.parametrize("name", BROKEN)
def test_each_check_catches_its_broken_pass_naming_it_and_the_passes_before(name):
    with pytest.raises(PassError) as info:
        run(["tm_noop", ("tm_scale", {"factor": 2.0}), broken_pass(name)])
    message = str(info.value)
    assert message.startswith(f"pass 'broken_{name}' (after tm_noop, tm_scale) failed: "), message
    assert re.search(BROKEN[name][3], message), message


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", BROKEN)
def test_check_levels_differ_as_documented(name, level):
    caught = LEVELS.index(level) >= LEVELS.index(BROKEN[name][2])
    if caught:
        with pytest.raises(PassError, match=f"broken_{name}"):
            run([broken_pass(name)], check=level)
    else:
        run([broken_pass(name)], check=level)


def test_a_repeated_pass_is_named_once_per_run_before_the_failure():
    with pytest.raises(PassError, match=r"pass 'broken_raises' \(after tm_noop, tm_noop\) failed"):
        run(["tm_noop", "tm_noop", broken_pass("raises")])
    with pytest.raises(PassError, match=r"pass 'broken_raises' \(the first pass\) failed"):
        run([broken_pass("raises")])


def test_tolerance_bounds_exact_passes():
    assert run([broken_pass("perturb")], tolerance=0.05).report.rows[0].modified


@dataclass(frozen=True)
class NeedsData(Pass):
    """Raises the error a calibration pass raises without data."""

    name = "tm_needs_data"

    def __call__(self, gm, ctx):
        raise CalibrationError("no calibration_data: pass calibration_data= to run()")


@dataclass(frozen=True)
class ReturnsGraph(Pass):
    """Forgets to wrap its result."""

    name = "tm_returns_graph"

    def __call__(self, gm, ctx):
        return gm


def test_errors_a_pass_raises_keep_their_type_and_gain_the_pass_name():
    with pytest.raises(CalibrationError, match=r"^pass 'tm_needs_data' \(after tm_noop\): no calibration_data"):
        run(["tm_noop", NeedsData()])
    with pytest.raises(PassError, match=r"returned Net instead of a PassResult\(gm, modified, stats\)"):
        run([ReturnsGraph()])


# -- modes of added modules, pass objects re-validated, honest `modified` ----------------
@dataclass(frozen=True)
class AddsModules(Pass):
    """Replaces fc by a new Linear and adds a new container with a child: all created in training mode."""

    name = "tm_adds_modules"

    def __call__(self, gm, ctx):
        old = gm.fc
        gm.fc = nn.Linear(old.in_features, old.out_features)
        gm.fc.load_state_dict(old.state_dict())
        gm.extra = nn.ModuleDict({"inner": nn.Identity()})
        return PassResult(gm, True)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_modules_a_pass_adds_take_the_mode_of_what_they_replace_or_their_parent(mode):
    model = Net().train(mode == "train")
    gm = run([AddsModules()], model=model).model
    expected = mode == "train"
    assert gm.fc.training is expected and gm.extra.training is expected and gm.extra.inner.training is expected


def test_compression_of_an_eval_model_leaves_every_module_in_eval_mode_through_artifacts(tmp_path):
    from fxcompress import recipes

    cal = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    for passes in (recipes.int8_static(backend="reference"), ["quantize_dynamic"], ["quantize_weights"]):
        gm = run(passes, calibration_data=cal).model
        assert [name for name, m in gm.named_modules() if m.training] == [], passes
        fxcompress.save(gm, tmp_path / "m.fxc", overwrite=True)
        loaded = fxcompress.load(tmp_path / "m.fxc")
        assert not any(m.training for m in loaded.modules())
        # an eval-only pass accepts the result, and a loaded artifact compresses further
        run(["cast"], model=loaded)


def test_a_pass_object_whose_field_was_forced_past_post_init_is_refused():
    forced = Scale(factor=2.0)
    object.__setattr__(forced, "factor", 70.0)
    with pytest.raises(ConfigError, match=r"factor must be in \(0, 10\], got 70.0"):
        run([forced])
    pruning = fxcompress.get_pass("prune_channels")(ratio=0.5)
    object.__setattr__(pruning, "ratio", 7.0)
    with pytest.raises(ConfigError, match=r"ratio must be a number in \[0, 1\), got 7.0"):
        run([pruning])


@dataclass(frozen=True)
class ClaimsModified(Pass):
    """Says it modified the graph, rewrites fc's weight with the values it had."""

    name = "tm_claims_modified"

    def __call__(self, gm, ctx):
        with torch.no_grad():
            gm.fc.weight.copy_(gm.fc.weight.clone())
        return PassResult(gm, True)


def test_modified_is_kept_only_when_something_visibly_changed():
    rows = run([ClaimsModified(), ("tm_scale", {"factor": 2.0})]).report.rows
    assert [r.modified for r in rows] == [False, True]


def test_a_second_lower_reports_no_modification():
    from fxcompress import recipes

    lowered = run(recipes.int8_static(backend="reference"), calibration_data=[X]).model
    row = run([("lower", {"backend": "reference"})], model=lowered).report.rows[0]
    assert row.modified is False


@dataclass(frozen=True)
class Checked(Pass):
    """Checks its option the way every pass does: without naming itself."""

    name = "tm_checked"
    factor: float = 1.0

    def __post_init__(self) -> None:
        if self.factor <= 0:
            raise ConfigError(f"factor must be positive, got {self.factor!r}")

    def __call__(self, gm, ctx):
        raise ConfigError(f"pass {self.name!r}: the graph is not what I take; give me another")


@dataclass(frozen=True)
class CheckedMore(Checked):
    """A subclass whose check runs its parent's first."""

    name = "tm_checked_more"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.factor > 10:
            raise ConfigError(f"factor must be at most 10, got {self.factor!r}")


def test_the_machinery_names_the_pass_once_and_passes_never_do():
    # Options: named by Pass.__init_subclass__'s wrapper, built directly or through run().
    with pytest.raises(ConfigError, match=r"^pass 'tm_checked': factor must be positive, got -1$"):
        Checked(factor=-1)
    with pytest.raises(ConfigError, match=r"^pass 'tm_checked': factor must be positive, got -1$"):
        run([(Checked, {"factor": -1})])
    for factor, why in ((-1, "positive"), (11, "at most 10")):
        with pytest.raises(ConfigError, match=rf"^pass 'tm_checked_more': factor must be {why}, got {factor}$"):
            CheckedMore(factor=factor)
    # Running: the manager names it, with the passes before; a message that names the pass
    # already is not named twice.
    with pytest.raises(ConfigError) as info:
        run(["tm_noop", Checked()])
    assert str(info.value) == "pass 'tm_checked' (after tm_noop): the graph is not what I take; give me another"
