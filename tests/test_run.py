"""fxcompress.run: the caller's model is never mutated (nn.Module or GraphModule), the
pipeline is validated before any work, the result carries pipeline and report, and the
default check level comes from FXCOMPRESS_CHECK."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import fx, nn

import fxcompress
from fxcompress import zoo
from fxcompress.api import CHECK_ENV, state_hash
from fxcompress.errors import ConfigError, PassError
from fxcompress.pass_base import Pass, PassResult

torch.set_num_threads(1)


@dataclass(frozen=True)
class Vandal(Pass):
    """Mutates everything it can reach on the graph it is given, in place."""

    name = "tr_vandal"

    def __call__(self, gm, ctx):
        with torch.no_grad():
            for p in gm.parameters():
                p.mul_(0.5)
            for b in gm.buffers():
                if b.is_floating_point():
                    b.add_(1.0)
        for m in gm.modules():
            m.training = not m.training
            m.fxc_tag = "vandalised"
        first = next(n for n in gm.graph.nodes if n.op == "call_module")
        gm.add_submodule("extra", nn.Identity())
        with gm.graph.inserting_after(first):
            extra = gm.graph.call_module("extra", (first,))
        first.replace_all_uses_with(extra, delete_user_cb=lambda user: user is not extra)
        extra.meta = dict(first.meta)
        for n in gm.graph.nodes:
            n.meta.setdefault("fxcompress", {})["tag"] = "vandalised"
            stack = n.meta.get("nn_module_stack")
            if stack:
                stack["vandal"] = ("vandal", nn.Identity)
        return PassResult(gm, True)


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Everything run() must leave as it was: state, structure, flags, node metadata."""
    out: dict[str, Any] = {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "modules": [(n, id(m), type(m), m.training, hasattr(m, "fxc_tag")) for n, m in model.named_modules()],
        "repr": repr(model),
    }
    if isinstance(model, fx.GraphModule):
        out["code"] = model.code
        out["meta"] = {n.name: {k: repr(v) for k, v in n.meta.items()} for n in model.graph.nodes}
        out["gm_meta"] = repr(model.meta)
    return out


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k
    for key in before.keys() - {"state"}:
        assert before[key] == after[key], key


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return zoo.build("resnet18")


X = zoo.example_input("resnet18", reduced=True)
PIPELINE = ["fuse_conv_bn", "eliminate_dead_nodes", Vandal()]


def test_run_never_mutates_a_torchvision_model(resnet18):
    before = fingerprint(resnet18)
    expected = resnet18(X)
    result = fxcompress.run(resnet18, PIPELINE, X, check="full", progress=False)
    assert_same(before, fingerprint(resnet18))
    torch.testing.assert_close(resnet18(X), expected)
    assert result.model.get_submodule("extra") is not None


def test_run_never_mutates_a_model_in_training_mode(resnet18):
    model = zoo.build("resnet18").train()
    model.layer2.eval()  # mixed flags must survive too
    before = fingerprint(model)
    fxcompress.run(model, [Vandal()], X, check="full", progress=False)
    assert_same(before, fingerprint(model))


def test_run_never_mutates_a_graph_module(resnet18):
    gm = fxcompress.trace(resnet18, X)
    gm.meta["note"] = {"kept": True}
    for n in gm.graph.nodes:
        n.meta["fxcompress"] = {"tag": "original"}
    before = fingerprint(gm)
    result = fxcompress.run(gm, PIPELINE, X, check="full", progress=False)
    assert_same(before, fingerprint(gm))
    assert result.model is not gm
    assert all(n.meta["fxcompress"]["tag"] == "vandalised" for n in result.model.graph.nodes)


def test_result_pipeline_and_report_rows(resnet18):
    result = fxcompress.run(resnet18, ["fuse_conv_bn", ("eliminate_dead_nodes", {"scope": ["layer1", "fc"]})], X,
                            check="full", progress=False)
    assert result.pipeline == [{"name": "fuse_conv_bn", "options": {}},
                               {"name": "eliminate_dead_nodes", "options": {}, "scope": ["layer1", "fc"]}]
    fuse, dce = result.report.rows
    assert (fuse.name, fuse.modified, fuse.stats["fused"]) == ("fuse_conv_bn", True, 20)
    assert fuse.after.nodes == result.report.before.nodes - 20
    assert fuse.after.parameters < result.report.before.parameters
    assert fuse.after.macs == result.report.before.macs
    assert dce.name == "eliminate_dead_nodes" and result.report.after == dce.after
    assert result.source_state_hash == state_hash(resnet18)
    torch.testing.assert_close(result.model(X), resnet18(X), rtol=1e-4, atol=1e-4)


def test_task_metric_is_measured_before_and_after():
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    x = torch.randn(5, 4)
    calls = []

    def eval_fn(m: nn.Module) -> float:
        calls.append(isinstance(m, fx.GraphModule))
        return float(m(x).argmax(1).eq(0).float().mean())

    result = fxcompress.run(model, [], x, eval_fn=eval_fn, check="full", progress=False)
    metric = result.report.metrics["task metric"]
    assert calls == [True, True] and metric["before"] == metric["after"] and metric["change"] == "+0"


class Untraceable(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


@dataclass(frozen=True)
class NeedsEarlier(Pass):
    """Requires a pass that is not in the pipeline."""

    name = "tr_needs_earlier"
    requires = ("fuse_conv_bn",)

    def __call__(self, gm, ctx):
        return PassResult(gm, False)


def test_the_pipeline_is_validated_before_tracing_and_evaluating():
    with pytest.raises(ConfigError, match="unknown pass"):
        fxcompress.run(Untraceable(), ["no_such_pass"], torch.randn(2))
    calls = []
    with pytest.raises(ConfigError, match="requires"):
        fxcompress.run(nn.Linear(2, 2), [NeedsEarlier()], torch.randn(1, 2), eval_fn=lambda m: calls.append(m) or 0.0)
    assert calls == []


def test_run_rejects_what_is_not_a_module():
    with pytest.raises(ConfigError, match="takes an nn.Module or GraphModule"):
        fxcompress.run(lambda x: x, [], torch.randn(2))


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, mask=None):
        y = self.lin(x)
        return y if mask is None else y * mask


def test_keyword_example_inputs():
    model, x = Masked(), torch.randn(2, 4)
    result = fxcompress.run(model, [], {"x": x}, check="full", progress=False)
    torch.testing.assert_close(result.model(x), model(x))
    mask = torch.ones(2, 4)
    result = fxcompress.run(model, [], {"x": x, "mask": mask}, check="full", progress=False)
    torch.testing.assert_close(result.model(x, mask), model(x, mask))


# -- the default check level ------------------------------------------------------------------
@dataclass(frozen=True)
class NarrowOutput(Pass):
    """Changes the output shape: caught from check="shapes" up."""

    name = "tr_narrow_output"

    def __call__(self, gm, ctx):
        out = gm.graph.find_nodes(op="output")[0]
        with gm.graph.inserting_before(out):
            out.args = (gm.graph.call_method("narrow", (out.args[0], 1, 0, 1)),)
        return PassResult(gm, True)


@dataclass(frozen=True)
class ClaimsExact(Pass):
    """Changes values while claiming to be exact: caught only by check="full"."""

    name = "tr_claims_exact"
    exact = True

    def __call__(self, gm, ctx):
        with torch.no_grad():
            next(gm.parameters()).mul_(2.0)
        return PassResult(gm, True)


def _caught(pass_: Pass, **kwargs: Any) -> bool:
    try:
        fxcompress.run(nn.Linear(3, 2), [pass_], torch.randn(2, 3), progress=False, **kwargs)
    except PassError:
        return True
    return False


def test_check_level_comes_from_the_environment_when_not_given(monkeypatch):
    monkeypatch.delenv(CHECK_ENV, raising=False)
    assert _caught(NarrowOutput(), check=None) and not _caught(ClaimsExact(), check=None)  # "shapes"
    monkeypatch.setenv(CHECK_ENV, "none")
    assert not _caught(NarrowOutput(), check=None)
    assert _caught(NarrowOutput(), check="shapes")  # an explicit level wins
    monkeypatch.setenv(CHECK_ENV, "full")
    assert _caught(ClaimsExact(), check=None)
    monkeypatch.setenv(CHECK_ENV, "fast")
    with pytest.raises(ConfigError, match=f"environment variable {CHECK_ENV}='fast' is not a check level"):
        _caught(NarrowOutput(), check=None)
    with pytest.raises(ConfigError, match="check must be one of"):
        _caught(NarrowOutput(), check="fast")


@dataclass(frozen=True)
class SeesGc(Pass):
    """Reports whether the cyclic garbage collector runs during the pass."""

    name = "tr_sees_gc"

    def __call__(self, gm, ctx):
        return PassResult(gm, False, {"gc": gc.isenabled()})


@pytest.mark.parametrize("enabled", [True, False])
def test_gc_is_paused_around_graph_work_only_and_restored(enabled):
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        result = fxcompress.run(nn.Linear(3, 2), [SeesGc()], torch.randn(1, 3), check="full", progress=False)
        assert result.report.rows[0].stats["gc"] is enabled  # passes run as the caller had it
        assert gc.isenabled() is enabled
        with pytest.raises(PassError):
            fxcompress.run(nn.Linear(3, 2), [NarrowOutput()], torch.randn(1, 3), check="full", progress=False)
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
