"""The pass registry: built-ins by file name and loaded lazily, third-party passes through
entry points, register() conflicts, and passes made from plain functions."""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import fx, nn

import fxcompress
from fxcompress import registry
from fxcompress.errors import ConfigError, PassError
from fxcompress.pass_base import Pass, PassContext, PassResult, function_pass
from fxcompress.registry import ENTRY_POINT_GROUP, available_passes, get_pass, register

PASSES_DIR = Path(__file__).resolve().parents[1] / "passes"
BUILTINS = sorted(p.stem for p in PASSES_DIR.glob("*.py") if not p.stem.startswith("_"))


@pytest.fixture
def private_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test disappear after it."""
    monkeypatch.setattr(registry, "_registered", dict(registry._registered))


def test_the_issue_builtins_exist():
    assert {"fuse_conv_bn", "eliminate_dead_nodes"} <= set(BUILTINS)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_pass_name_equals_its_file_name(name):
    cls = get_pass(name)
    assert cls.name == name
    assert cls.__module__ == f"fxcompress.passes.{name}"
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    assert cls.doc(), f"pass {name} has no docstring"
    assert name in available_passes()


def test_builtins_load_lazily():
    name = BUILTINS[0]
    code = textwrap.dedent(f"""
        import sys
        import fxcompress
        loaded = lambda: sorted(m for m in sys.modules if m.startswith("fxcompress.passes."))
        assert {name!r} in fxcompress.available_passes()
        assert loaded() == [], loaded()
        fxcompress.get_pass({name!r})
        assert loaded() == ["fxcompress.passes.{name}"], loaded()
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _install_plugin(root: Path, dist: str, module: str, source: str, entry_points: dict[str, str]) -> None:
    """A minimal installed distribution: a module and a dist-info with entry_points.txt."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}")


PLUGIN_SOURCE = """
    from dataclasses import dataclass
    from fxcompress.pass_base import Pass, PassResult

    @dataclass(frozen=True)
    class HalveNothing(Pass):
        '''Counts the nodes of the graph; changes nothing.'''

        name = "plugin_count_nodes"
        exact = True

        def __call__(self, gm, ctx):
            return PassResult(gm, False, {"nodes": len(gm.graph.nodes)})

    class NotAPass:
        name = "plugin_not_a_pass"
"""


def test_entry_point_passes_are_found_and_run(tmp_path, monkeypatch, private_registry):
    _install_plugin(tmp_path, "fxc_demo_plugin", "fxc_demo_plugin_mod", PLUGIN_SOURCE, {
        "plugin_count_nodes": "fxc_demo_plugin_mod:HalveNothing",
        "plugin_wrong_name": "fxc_demo_plugin_mod:HalveNothing",
        "plugin_not_a_pass": "fxc_demo_plugin_mod:NotAPass",
        "plugin_missing": "fxc_demo_no_such_module:Thing",
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert {"plugin_count_nodes", "plugin_missing"} <= set(available_passes())
    assert "fxc_demo_plugin_mod" not in sys.modules  # listing names imports nothing
    cls = get_pass("plugin_count_nodes")
    assert cls.__name__ == "HalveNothing" and get_pass("plugin_count_nodes") is cls
    result = fxcompress.run(nn.Linear(3, 2), ["plugin_count_nodes"], torch.randn(1, 3), check="full",
                            progress=False)
    # x, linear, output: capture raised the root's functional F.linear to an nn.Linear module
    assert result.report.rows[0].stats == {"nodes": 3}
    with pytest.raises(ConfigError, match="names a pass called 'plugin_count_nodes'"):
        get_pass("plugin_wrong_name")
    with pytest.raises(ConfigError, match="expected a Pass subclass"):
        get_pass("plugin_not_a_pass")
    with pytest.raises(ConfigError, match="cannot be loaded: ModuleNotFoundError"):
        get_pass("plugin_missing")


def test_register_refuses_a_name_an_entry_point_owns(tmp_path, monkeypatch, private_registry):
    _install_plugin(tmp_path, "fxc_demo_owner", "fxc_demo_owner_mod", PLUGIN_SOURCE,
                    {"plugin_count_nodes": "fxc_demo_owner_mod:HalveNothing"})
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()

    @dataclass(frozen=True)
    class Impostor(Pass):
        name = "plugin_count_nodes"

    with pytest.raises(ConfigError, match="taken by the entry point fxc_demo_owner_mod:HalveNothing"):
        register(Impostor)


@dataclass(frozen=True)
class First(Pass):
    """A registered test pass."""

    name = "registry_test_first"


def test_register_conflicts(private_registry):
    assert register(First) is First
    assert register(First) is First  # the same class again: a no-op

    @dataclass(frozen=True)
    class Second(Pass):
        name = "registry_test_first"

    with pytest.raises(ConfigError, match=r"taken by .*First; choose another name"):
        register(Second)

    @dataclass(frozen=True)
    class Shadow(Pass):
        name = BUILTINS[0]

    with pytest.raises(ConfigError, match=f"taken by the built-in pass fxcompress.passes.{BUILTINS[0]}"):
        register(Shadow)

    @dataclass(frozen=True)
    class Camel(Pass):
        name = "CamelCase"

    with pytest.raises(ConfigError, match="snake_case"):
        register(Camel)
    with pytest.raises(ConfigError, match="expected a Pass subclass"):
        register(object)
    assert get_pass("registry_test_first") is First


def test_unknown_pass_lists_close_matches():
    with pytest.raises(ConfigError, match=r"unknown pass 'fuse_conv_b' \(did you mean 'fuse_conv_bn'\?\)"):
        get_pass("fuse_conv_b")
    with pytest.raises(ConfigError, match="a pass name is a str"):
        get_pass(3)


# -- function passes ------------------------------------------------------------------
def relu_to_gelu(gm: fx.GraphModule, ctx: PassContext, *, approximate: str = "none", limit: int = -1):
    """Replaces ReLU modules by GELU (a deliberately output-changing rewrite)."""
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.ReLU) and count != limit:
            owner, _, attr = node.target.rpartition(".")
            setattr(gm.get_submodule(owner), attr, nn.GELU(approximate=approximate))
            count += 1
    return PassResult(gm, count > 0, {"replaced": count})


def test_function_pass_options_are_its_keyword_only_parameters():
    cls = function_pass("swap_relu", requires=("fuse_conv_bn",), eval_only=True)(relu_to_gelu)
    assert issubclass(cls, Pass) and cls.name == "swap_relu" and cls.__name__ == "SwapRelu"
    assert {n: f.default for n, f in cls.option_fields().items()} == {"approximate": "none", "limit": -1}
    assert (cls.requires, cls.exact, cls.eval_only) == (("fuse_conv_bn",), False, True)
    assert cls.doc() == "Replaces ReLU modules by GELU (a deliberately output-changing rewrite)."
    assert cls(approximate="tanh").options() == {"approximate": "tanh", "limit": -1}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cls().limit = 3


def test_function_pass_runs_and_its_options_are_type_checked():
    cls = function_pass()(relu_to_gelu)
    assert cls.name == "relu_to_gelu"
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU())
    result = fxcompress.run(model, [(cls, {"approximate": "tanh", "limit": 1})], torch.randn(2, 3),
                            check="full", progress=False)
    assert result.report.rows[0].stats == {"replaced": 1}
    assert [type(m).__name__ for m in result.model.children()] == ["Linear", "GELU", "Linear", "ReLU"]
    with pytest.raises(ConfigError, match=r"option 'limit' must be int, got str"):
        fxcompress.run(model, [(cls, {"limit": "one"})], torch.randn(2, 3))
    with pytest.raises(ConfigError, match=r"has no option 'limt' \(did you mean 'limit'\?\); valid options: "
                                          r"approximate, limit"):
        fxcompress.run(model, [(cls, {"limt": 1})], torch.randn(2, 3))


@function_pass
def drop_nothing(gm: fx.GraphModule, ctx: PassContext, *, touch: bool = False) -> fx.GraphModule:
    """Returns the graph; with touch=True appends a harmless unused node."""
    if touch:
        with gm.graph.inserting_before(next(iter(gm.graph.find_nodes(op="output")))):
            gm.graph.call_function(torch.zeros, (1,))
    return gm


def test_bare_decorator_and_modified_computed_from_the_graph():
    assert drop_nothing.name == "drop_nothing" and list(drop_nothing.option_fields()) == ["touch"]
    gm = fxcompress.trace(nn.Linear(2, 2), torch.randn(1, 2))
    assert drop_nothing()(gm, PassContext()).modified is False
    assert drop_nothing(touch=True)(gm, PassContext()).modified is True


def test_function_pass_returning_nothing_is_a_pass_error():
    @function_pass("forgets_to_return")
    def forgets_to_return(gm, ctx):
        gm.graph.lint()

    with pytest.raises(PassError, match="must return a GraphModule or a PassResult, got NoneType"):
        fxcompress.run(nn.Linear(2, 2), [forgets_to_return()], torch.randn(1, 2), progress=False)


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda gm, ctx, limit=3: gm, "options are keyword-only"),
        (lambda gm: gm, "options are keyword-only"),
        (lambda gm, ctx, *, limit: gm, "option 'limit' needs a default"),
        (lambda gm, ctx, *, names=[]: gm, "mutable default"),  # noqa: B006 - the point of the test
    ],
)
def test_malformed_function_passes(fn, match):
    with pytest.raises(ConfigError, match=match):
        function_pass("malformed")(fn)


def test_function_pass_name_must_be_snake_case():
    with pytest.raises(ConfigError, match="snake_case"):
        function_pass("NotSnake")(relu_to_gelu)


def _defined_again() -> type[Pass]:
    """The class a notebook cell defines each time it runs: same module, same qualified name."""

    @dataclass(frozen=True)
    class Cell(Pass):
        """A pass defined in a notebook cell."""

        name = "registry_test_cell"

    return Cell


def test_a_class_defined_again_at_the_same_place_replaces_the_registered_one(private_registry):
    first, again = _defined_again(), _defined_again()
    assert first is not again and register(first) is first
    assert register(again) is again and get_pass("registry_test_cell") is again


def test_replace_and_unregister(private_registry):
    assert register(First) is First

    @dataclass(frozen=True)
    class Better(Pass):
        name = "registry_test_first"

    with pytest.raises(ConfigError, match=r"choose another name, or replace it: register\(cls, replace=True\)"):
        register(Better)
    assert register(Better, replace=True) is Better and get_pass("registry_test_first") is Better
    assert register(replace=True)(First) is First  # the decorator form
    assert fxcompress.registry.unregister("registry_test_first") is First
    with pytest.raises(ConfigError, match="unknown pass 'registry_test_first'"):
        get_pass("registry_test_first")
    with pytest.raises(ConfigError, match="no registered pass is called 'registry_test_first'"):
        fxcompress.registry.unregister("registry_test_first")
    get_pass(BUILTINS[0])
    with pytest.raises(ConfigError, match=f"pass '{BUILTINS[0]}' is built in; only passes registered"):
        fxcompress.registry.unregister(BUILTINS[0])

    @dataclass(frozen=True)
    class Shadow(Pass):
        name = BUILTINS[0]

    with pytest.raises(ConfigError, match="taken by the built-in pass"):
        register(Shadow, replace=True)
