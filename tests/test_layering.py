"""The layering the design promises, read from the sources.

* The modules of ``fxcompress/`` and ``passes/`` import each other one way: no import
  cycle, counting imports inside functions and under ``TYPE_CHECKING`` (a cycle hidden
  in a lazy import is still two modules that each need the other).
* Only :mod:`fxcompress.ops` (and the front ends, ``capture.py``, ``capture_export.py`` and ``raising.py``,
  which make the graphs it describes) decides what a node means: no other module
  compares a node's ``target`` with a torch callable or an op name, looks a target up
  in a table of its own, reads a target's ``__name__``, or tests a module's type
  against an ``nn`` class (``type(m) is nn.Conv2d``, ``isinstance(m, nn.Linear)``).
  Passes ask :func:`fxcompress.ops.describe` instead.

Both checks parse the sources (nothing is imported), so they see every file, and they
list every offender with its place.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"fxcompress": ROOT / "fxcompress", "fxcompress.passes": ROOT / "passes"}

# Modules allowed to match torch targets and classes: the semantics layer and the front ends.
# capture_export is the torch.export front end: it maps ATen operators to their torch forms.
SEMANTICS = ("fxcompress.ops", "fxcompress.capture", "fxcompress.capture_export", "fxcompress.raising")

# (module, enclosing function or class) -> why its type test against an nn class is not a
# decision about what a node means.  Every entry says why.
_ARGUMENT_CHECK = ("a lowered module's constructor validating the type of the float module it is given "
                   "(an API argument check with its own LoweringError, not a reading of a graph node)")
ALLOWED: dict[tuple[str, str], str] = {
    ("fxcompress.prune.reconstruct", "pruned_consumers"):
        "the least-squares refit is the algebra of nn.Linear (y = W x + b) itself; it reads modules, not graph nodes",
    ("fxcompress.prune.reconstruct", "reconstruct_consumers"):
        "checks a user-named path is an nn.Linear, the one layer type whose weight and bias the refit solves for",
    ("fxcompress.shapes", "_target_name"):
        "names a node's target in a shape-propagation error message; decides nothing about it",
    ("fxcompress.examples.bert", "BertStyleEncoder.__init__"):
        "a model definition initialising its own layers (BERT's init), not reading a graph",
    # The lowered modules' constructors check the float module they are built from.
    ("fxcompress.quant.lowered", "QuantLinear.from_float"): _ARGUMENT_CHECK,
    ("fxcompress.quant.lowered_attention", "QuantMultiheadAttention.from_float"): _ARGUMENT_CHECK,
    ("fxcompress.quant.lowered_conv", "QuantConvNd.from_float"): _ARGUMENT_CHECK,
    ("fxcompress.quant.lowered_linear", "DynamicQuantLinear.from_float"): _ARGUMENT_CHECK,
    ("fxcompress.quant.lowered_linear", "WeightOnlyLinear.from_float"): _ARGUMENT_CHECK,
    ("fxcompress.quant.lowered_pool", "QuantMaxPool2d.from_float"): _ARGUMENT_CHECK,
    ("fxcompress.quant.lowered_embedding", "WeightOnlyEmbedding.from_float"): _ARGUMENT_CHECK,
    ("fxcompress.quant.lowered_weight_only_conv", "WeightOnlyConv.from_float"): _ARGUMENT_CHECK,
}

# nn names that say "a module" or "a tensor", not what a module computes.
_GENERIC_NN = {"Module", "ModuleDict", "ModuleList", "Sequential", "Parameter", "Buffer", "ParameterList",
               "ParameterDict"}


def _modules() -> dict[str, Path]:
    """Every module of the two packages, by dotted name."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _package_of(name: str) -> str:
    path = MODULES[name]
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = _package_of(module).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, tree: ast.AST) -> set[str]:
    """The modules of ours that ``module`` imports (a name imported from a package counts as
    its submodule when there is one of that name, else as the package)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            name = name.replace("passes.", "fxcompress.passes.", 1) if name.startswith("passes.") else name
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def test_no_import_cycles() -> None:
    graph = nx.DiGraph()
    for name, path in MODULES.items():
        graph.add_node(name)
        graph.add_edges_from((name, dep) for dep in _imports(name, ast.parse(path.read_text(), str(path))))
    # A strongly connected component of more than one module holds every cycle among them.
    tangles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    cycles = [" -> ".join([a for a, _ in nx.find_cycle(graph.subgraph(c))] + [nx.find_cycle(graph.subgraph(c))[0][0]])
              for c in tangles]
    assert not tangles, "import cycles (one per tangle of modules):\n" + "\n".join(sorted(cycles))


# -- op matching outside the semantics layer ------------------------------------------------
@dataclass
class _Scope:
    """What names mean in one module: aliases of torch namespaces, names imported from them,
    and module-level constants that hold torch references or op names."""

    namespaces: set[str]  # torch, nn, F, operator, builtins aliases
    nn_aliases: set[str]  # names that are torch.nn
    imported_torch: set[str]  # from torch.nn import Conv2d; from operator import getitem
    imported_nn: set[str]  # names imported from torch.nn
    constants: set[str]  # module-level names bound to tables of torch references or op names
    nn_tables: set[str]  # module-level names bound to tables of nn classes


_TORCH_ROOTS = ("torch", "operator", "builtins")
_BUILTIN_CALLABLES = {"getattr", "setattr", "len", "abs", "max", "min", "sum", "round", "pow", "divmod"}


def _scope(tree: ast.Module) -> _Scope:
    s = _Scope(set(), set(), set(), set(), set(), set())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in _TORCH_ROOTS:
                    s.namespaces.add((a.asname or a.name).split(".")[0])
                    if a.name == "torch.nn" and a.asname:
                        s.nn_aliases.add(a.asname)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module \
                and node.module.split(".")[0] in _TORCH_ROOTS:
            for a in node.names:
                name = a.asname or a.name
                full = f"{node.module}.{a.name}"
                if full in ("torch.nn", "torch.nn.functional") or node.module == "torch" and a.name in ("nn",):
                    s.namespaces.add(name)
                    if full == "torch.nn":
                        s.nn_aliases.add(name)
                elif full == "torch.fx" or node.module.startswith("torch.fx") or a.name[:1].isupper() \
                        and not node.module.startswith("torch.nn"):
                    continue  # fx types, dtypes, Tensor: data types, not ops
                else:
                    s.imported_torch.add(name)
                    if node.module.startswith("torch.nn"):
                        s.imported_nn.add(name)
    for stmt in tree.body:
        targets: list[ast.expr] = []
        if isinstance(stmt, ast.Assign):
            targets, value = stmt.targets, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets, value = [stmt.target], stmt.value
        else:
            continue
        if isinstance(value, (ast.Dict, ast.Set, ast.Tuple, ast.List, ast.Call, ast.DictComp, ast.SetComp)) \
                and any(_torch_ref(s, n) or isinstance(n, ast.Constant) and isinstance(n.value, str)
                        for n in ast.walk(value)):
            s.constants.update(t.id for t in targets if isinstance(t, ast.Name))
            if _nn_class(s, value):
                s.nn_tables.update(t.id for t in targets if isinstance(t, ast.Name))
    return s


def _root(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _torch_ref(s: _Scope, node: ast.AST) -> bool:
    """A reference to a torch / operator callable or class (``F.relu``, ``torch.add``, ``nn.Conv2d``)."""
    if isinstance(node, ast.Attribute):
        if not isinstance(node.value, (ast.Name, ast.Attribute)):
            return False
        root = _root(node)
        if root not in s.namespaces:
            return False
        chain = ast.unparse(node)
        return not any(part in chain for part in (".fx.", "torch.Tensor", "torch.dtype", "torch.Size",
                                                   "torch.float", "torch.int", "torch.uint", "torch.bool",
                                                   "torch.bfloat", "torch.device", "torch.finfo", "torch.iinfo"))
    return isinstance(node, ast.Name) and node.id in s.imported_torch


def _nn_class(s: _Scope, node: ast.AST) -> bool:
    """A reference to an ``nn`` class other than the generic containers."""
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and isinstance(n.value, (ast.Name, ast.Attribute)):
            chain = ast.unparse(n)
            head, _, last = chain.rpartition(".")
            nn_chain = head in s.nn_aliases or head.startswith(tuple(f"{a}." for a in s.nn_aliases)) \
                or head == "torch.nn" or head.startswith("torch.nn.")
            if nn_chain and last not in _GENERIC_NN and "functional" not in head and last[:1] in "_ABCDEFGHIJKLMNOPQRSTUVWXYZ":
                return True
        elif isinstance(n, ast.Name) and n.id in s.imported_nn and n.id not in _GENERIC_NN:
            return True
    return False


def _is_target(node: ast.AST) -> bool:
    """``x.target`` or ``str(x.target)`` (not ``self.target``: a pass option of that name)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "str" and node.args:
        node = node.args[0]
    return isinstance(node, ast.Attribute) and node.attr == "target" \
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")


def _is_type_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "type"


def _matches_target(s: _Scope, other: ast.AST) -> bool:
    """Whether comparing a target with ``other`` decides what the node is."""
    for n in ast.walk(other):
        if _torch_ref(s, n) or isinstance(n, ast.Name) and (n.id in s.constants or n.id in _BUILTIN_CALLABLES):
            return True
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            return True  # a method or function name
    return False


class _Finder(ast.NodeVisitor):
    def __init__(self, module: str, s: _Scope) -> None:
        self.module, self.s = module, s
        self.where: list[str] = []
        self.found: list[tuple[str, int, str]] = []  # (enclosing, line, what)

    def _add(self, node: ast.AST, what: str) -> None:
        self.found.append((".".join(self.where) or "<module>", node.lineno, what))

    def visit_Module(self, node: ast.Module) -> None:
        for stmt in node.body:
            names = [t.id for t in getattr(stmt, "targets", [getattr(stmt, "target", None)]) if isinstance(t, ast.Name)]
            if any(n in self.s.nn_tables for n in names):
                self._add(stmt, f"a table of nn classes: {', '.join(names)}")
        self.generic_visit(node)

    def _scoped(self, node: ast.AST) -> None:
        self.where.append(node.name)  # type: ignore[attr-defined]
        self.generic_visit(node)
        self.where.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def visit_Compare(self, node: ast.Compare) -> None:
        operands = [node.left, *node.comparators]
        for a, b in zip(operands, operands[1:]):
            for x, y in ((a, b), (b, a)):
                if _is_target(x) and _matches_target(self.s, y):
                    self._add(node, f"target compared: {ast.unparse(node)}")
                elif _is_type_call(x) and _nn_class(self.s, y):
                    self._add(node, f"module type compared: {ast.unparse(node)}")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else None
        if name in ("isinstance", "issubclass") and len(node.args) == 2 and self._nn_types(node.args[1]):
            self._add(node, f"module type tested: {ast.unparse(node)}")
        if name == "getattr" and node.args and _is_target(node.args[0]) and len(node.args) > 1 \
                and isinstance(node.args[1], ast.Constant) and node.args[1].value in ("__name__", "__module__",
                                                                                      "__qualname__"):
            self._add(node, f"target named: {ast.unparse(node)}")
        if isinstance(func, ast.Attribute) and func.attr == "get" and node.args and _is_target(node.args[0]) \
                and isinstance(func.value, ast.Name) and func.value.id in self.s.constants:
            self._add(node, f"target looked up: {ast.unparse(node)}")
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in ("__name__", "__qualname__") and _is_target(node.value):
            self._add(node, f"target named: {ast.unparse(node)}")
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if _is_target(node.slice) and isinstance(node.value, ast.Name) and node.value.id in self.s.constants:
            self._add(node, f"target looked up: {ast.unparse(node)}")
        self.generic_visit(node)

    def _nn_types(self, arg: ast.AST) -> bool:
        return _nn_class(self.s, arg) or isinstance(arg, ast.Name) and arg.id in self.s.nn_tables


def _findings() -> list[tuple[str, str, str]]:
    """(module, enclosing function or class, "path:line (where): what") for every match found."""
    out = []
    for module, path in MODULES.items():
        if module in SEMANTICS or module.startswith(tuple(f"{m}." for m in SEMANTICS)):
            continue
        tree = ast.parse(path.read_text(), str(path))
        finder = _Finder(module, _scope(tree))
        finder.visit(tree)
        rel = path.relative_to(ROOT)
        out += [(module, where, f"{rel}:{line} ({where}): {what}") for where, line, what in finder.found]
    return out


def test_allow_list_entries_say_why() -> None:
    for key, reason in ALLOWED.items():
        assert key[0] in MODULES and len(reason.split()) >= 4, (key, reason)


def test_allow_list_has_no_stale_entries() -> None:
    """An entry whose place no longer matches anything goes (the fix it waited for has landed)."""
    used = {(module, where) for module, where, _ in _findings()}
    assert not set(ALLOWED) - used, f"stale allow-list entries: {sorted(set(ALLOWED) - used)}"


def test_no_op_matching_outside_ops() -> None:
    offenders = [text for module, where, text in _findings() if (module, where) not in ALLOWED]
    assert not offenders, (f"{len(offenders)} places decide what a node means outside fxcompress.ops "
                           f"(ask ops.describe, or add an allow-list entry saying why):\n" + "\n".join(offenders))


def test_the_finder_sees_each_form() -> None:
    """The checks above can fail: each form of op matching is found in a sample module."""
    sample = '''
import operator
import torch
import torch.nn.functional as F
from torch import nn
_TABLE = {F.relu: 1}
_NAMES = ("view", "reshape")
_CONVS = (nn.Conv1d, nn.Conv2d)
def f(node, m):
    a = node.target is operator.getitem
    b = node.target in (torch.add, F.relu)
    c = str(node.target) in _NAMES
    d = type(m) is nn.Linear
    e = isinstance(m, nn.Linear)
    g = _TABLE.get(node.target)
    h = getattr(node.target, "__name__", "")
    i = isinstance(m, _CONVS)
    j = node.target == "size"
    k = isinstance(m, nn.Module) or node.target == other.target or self.target == "latency"
'''
    tree = ast.parse(sample)
    s = _scope(tree)
    finder = _Finder("sample", s)
    finder.visit(tree)
    lines = sorted({line for _, line, _ in finder.found})
    assert lines == [8, *range(10, 19)], finder.found
