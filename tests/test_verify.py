"""verify.py: stages read off the graph, and each invariant reports the node that breaks it."""

from __future__ import annotations

import torch
from torch import fx, nn

import fxcompress
from fxcompress import zoo
from fxcompress.verify import register_check, stage_of, verify, _checks

torch.set_num_threads(1)


class Role(nn.Module):
    fxc_role = ""

    def forward(self, x):
        return x


class Observer(Role):
    fxc_role = "observer"


class FakeQuant(Role):
    fxc_role = "fake_quant"


class Folded(Role):
    fxc_role = "folded"


class Lowered(Role):
    fxc_role = "lowered"


class AddInto(nn.Module):
    mutates_args = (1,)

    def forward(self, x, acc):
        return acc.add_(x)


class Chain(nn.Module):
    def __init__(self, *modules: nn.Module) -> None:
        super().__init__()
        self.mods = nn.ModuleList(modules)

    def forward(self, x):
        for m in self.mods:
            x = m(x)
        return x


def graph(*modules: nn.Module) -> fx.GraphModule:
    return fxcompress.trace(Chain(nn.Linear(4, 4), *modules), torch.randn(2, 4), leaf_modules=[Role])


def test_stage_is_the_latest_role_present():
    assert stage_of(graph()) == "float"
    assert stage_of(graph(Observer())) == "observed"
    assert stage_of(graph(Observer(), FakeQuant())) == "fake_quant"
    assert stage_of(graph(Folded(), FakeQuant())) == "folded"
    assert stage_of(graph(FakeQuant(), Lowered())) == "lowered"


def test_clean_graphs_have_no_problems():
    assert verify(graph(Observer(), FakeQuant())) == ("fake_quant", [])
    assert verify(fxcompress.trace(zoo.build("resnet18"), zoo.example_input("resnet18", reduced=True))) == ("float", [])


def test_leftover_observer_or_fake_quant_after_lowering():
    stage, problems = verify(graph(Observer(), FakeQuant(), Lowered()))
    assert stage == "lowered"
    assert problems == ["node 'mods_1': module Observer (role observer) is left in a lowered graph",
                        "node 'mods_2': module FakeQuant (role fake_quant) is left in a lowered graph"]


def test_leftover_observer_after_folding():
    assert verify(graph(FakeQuant(), Folded())) == ("folded", [])
    assert verify(graph(Observer(), Folded())) == (
        "folded", ["node 'mods_1': module Observer (role observer) is left in a folded graph"])


def test_missing_targets_are_reported():
    gm = graph()
    delattr(gm.get_submodule("mods"), "0")
    assert verify(gm)[1] == ["node 'mods_0': call_module target 'mods.0' does not exist"]


def _with_add_into(victim: str, late_reader: bool) -> fx.GraphModule:
    gm = graph(nn.ReLU())
    gm.add_into = AddInto()
    nodes = {n.name: n for n in gm.graph.nodes}
    relu, out = nodes["mods_1"], gm.graph.find_nodes(op="output")[0]
    with gm.graph.inserting_before(out):
        added = gm.graph.call_module("add_into", (relu, nodes[victim]))
        if late_reader:
            out.args = (gm.graph.call_function(torch.add, (added, nodes[victim])),)
        else:
            out.args = (added,)
    gm.recompile()
    return gm


def test_in_place_writes_must_be_the_last_read_of_a_computed_value():
    assert verify(_with_add_into("mods_0", late_reader=False))[1] == []
    assert verify(_with_add_into("mods_0", late_reader=True))[1] == [
        "node 'add_into' overwrites 'mods_0' in place, which is still read by ['add']"]
    assert verify(_with_add_into("x", late_reader=False))[1] == [
        "node 'add_into' overwrites placeholder 'x' in place"]


def test_non_finite_state_is_reported():
    gm = graph()
    with torch.no_grad():
        gm.get_submodule("mods.0").bias[1] = float("nan")
    assert verify(gm)[1] == ["state 'mods.0.bias' holds NaN or Inf"]


def test_registered_checks_run_with_the_stage():
    seen = []

    def no_relu(gm: fx.GraphModule, stage: str) -> list[str]:
        seen.append(stage)
        return [f"node {n.name!r} is a ReLU" for n in gm.graph.nodes
                if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ReLU)]

    register_check(no_relu)
    try:
        assert verify(graph(nn.ReLU(), Observer())) == ("observed", ["node 'mods_1' is a ReLU"])
        assert seen == ["observed"]
    finally:
        _checks.remove(no_relu)
