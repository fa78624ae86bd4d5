"""A ``GraphModule`` as data (``graph.json``) plus tensors, and back, without pickle.

``encode`` returns the JSON document and the tensors to put in
``weights.safetensors``; ``decode`` rebuilds a ``GraphModule`` from them:
a fresh ``torch.fx.Graph`` whose targets come from the allow-lists
(:mod:`.allowlist`, :mod:`.modules`), leaves rebuilt from their configs, then
``GraphModule(root, graph)``, which generates the code.  What is kept: every
node (op, name, target, args, kwargs), the leaves the graph calls, the tensors
its ``get_attr`` nodes read (parameters, buffers, plain tensor attributes, with
their kind), tensors shared between places (stored once, shared again on load),
each tensor's memory layout when it is a permutation (channels-last), and every
module's training flag.  What is not: node ``meta``, type annotations other than
``torch.Tensor``/``int``/``float``/``bool``/``str``, hooks,
and attributes the graph does not reach (as with ``GraphModule(gm, gm.graph)``).

The JSON document::

    {"class_name": "ResNet", "codegen": null | {"orig_args": [...], "in_spec": str, "out_spec": str},
     "nodes": [{"op", "name", "target", "type", "args", "kwargs": [[key, value], ...]}, ...],
     "modules": {path: description}, "tensors": {path: {"key", "kind"[, "requires_grad"]}},
     "layouts": {key: permutation}, "training": [paths in training mode]}
"""

from __future__ import annotations

import keyword
import re
from typing import Any

import torch
from torch import nn
from torch.fx.graph import CodeGen, _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

from fxcompress.artifact import allowlist, modules, values
from fxcompress.errors import ArtifactError

__all__ = ["encode", "decode"]

_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLACEHOLDER = re.compile(r"\*{0,2}[A-Za-z_][A-Za-z0-9_]*")
_COMPONENT = re.compile(r"[A-Za-z0-9_-]+")  # RegNet names blocks "block1-0"
_KINDS = ("parameter", "buffer", "buffer_np", "attr")
_DOC_KEYS = {"class_name", "codegen", "nodes", "modules", "tensors", "layouts", "training"}
# Type annotations worth keeping (they appear in the generated code); others are dropped.
_TYPES = {"torch.Tensor": torch.Tensor, "int": int, "float": float, "bool": bool, "str": str}
_reserved: frozenset[str] = frozenset()


def _check_path(path: Any, where: str) -> str:
    """Reject attribute paths that could name something other than a child or tensor."""
    global _reserved
    if not _reserved:  # names a path component must not shadow: methods, properties, fields
        _reserved = frozenset(dir(nn.Module())) | frozenset(dir(torch.fx.GraphModule)) | {"graph", "meta", "code"}
    parts = path.split(".") if isinstance(path, str) else [""]
    bad = [p for p in parts if not _COMPONENT.fullmatch(p) or p.startswith("__") or p in _reserved]
    if bad:
        raise ArtifactError(f"{where}: attribute path {path!r} has an unusable component {bad[0]!r}")
    return path


def _under(path: str, prefixes: set[str]) -> str | None:
    parts = path.split(".")
    for i in range(1, len(parts)):
        if ".".join(parts[:i]) in prefixes:
            return ".".join(parts[:i])
    return None


def _tensor_kind(owner: nn.Module, field: str, tensor: Any, target: str) -> str:
    if not isinstance(tensor, torch.Tensor):
        raise ArtifactError(
            f"get_attr {target!r} is a {type(tensor).__qualname__}; artifacts store tensors and modules only"
        )
    if field in owner._parameters:
        return "parameter"
    if field in owner._buffers:
        return "buffer_np" if field in owner._non_persistent_buffers_set else "buffer"
    return "attr"


def _storable(path: str, t: torch.Tensor) -> None:
    if type(t) not in (torch.Tensor, nn.Parameter, getattr(nn, "Buffer", torch.Tensor)):
        raise ArtifactError(f"tensor {path!r} is a {type(t).__qualname__}; only plain tensors can be stored")
    if t.layout != torch.strided or t.is_mkldnn or t.is_quantized or t.is_meta or t.is_nested:
        raise ArtifactError(
            f"tensor {path!r} ({t.layout}, {t.dtype}, {t.device}) is not a plain dense tensor with data: "
            "keep plain int8/float tensors as state and rebuild opaque (prepacked) copies in from_config"
        )


def _layout(t: torch.Tensor) -> tuple[torch.Tensor, list[int] | None]:
    """The tensor to store and the permutation that restores ``t``'s strides, if any."""
    if t.is_contiguous() or t.dim() < 2:
        return t.contiguous(), None
    perm = sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.shape[d]))
    stored = t.permute(perm)
    if stored.is_contiguous():  # dense in another dimension order, e.g. channels-last
        return stored, perm
    return t.contiguous(), None  # overlapping or gapped views come back contiguous


def encode(gm: torch.fx.GraphModule) -> tuple[dict, dict[str, torch.Tensor]]:
    """Describe ``gm``; raise ``ArtifactError`` naming the first thing that cannot be stored."""
    class_name = type(gm).__name__
    if not _NAME.fullmatch(class_name) or keyword.iskeyword(class_name):
        class_name = "GraphModule"
    graph = gm.graph
    codegen = None
    if isinstance(graph._codegen, _PyTreeCodeGen):
        info = graph._codegen.pytree_info
        codegen = {
            "orig_args": list(info.orig_args),
            "in_spec": pytree.treespec_dumps(info.in_spec) if info.in_spec is not None else None,
            "out_spec": pytree.treespec_dumps(info.out_spec) if info.out_spec is not None else None,
        }
    elif type(graph._codegen) is not CodeGen:
        raise ArtifactError(f"graph uses {type(graph._codegen).__qualname__} code generation, which artifacts cannot store")

    leaves = {n.target for n in graph.nodes if n.op == "call_module"}
    roots = {t for t in leaves if _under(t, leaves) is None}
    descriptions = {}
    for path in sorted(roots):
        descriptions[_check_path(path, f"call_module {path!r}")] = modules.describe(path, gm.get_submodule(path))

    entries: dict[str, tuple[torch.Tensor, str]] = {}
    for path in sorted(roots):
        for key, t in gm.get_submodule(path).state_dict(keep_vars=True).items():
            entries[f"{path}.{key}"] = (t, "parameter" if isinstance(t, nn.Parameter) else "buffer")
    for node in graph.nodes:
        if node.op == "get_attr" and _under(node.target, roots) is None:
            owner_path, _, field = _check_path(node.target, f"get_attr {node.name!r}").rpartition(".")
            owner = gm.get_submodule(owner_path)
            tensor = getattr(owner, field)
            entries[node.target] = (tensor, _tensor_kind(owner, field, tensor, node.target))
        elif node.op == "get_attr" and node.target not in entries:
            raise ArtifactError(f"get_attr {node.target!r} reads inside a leaf module but not from its state_dict")

    tensors, weights, layouts = _dedupe(entries)
    nodes = [_encode_node(n) for n in graph.nodes]
    training = sorted(
        p for p, m in gm.named_modules()
        if m.training and (p == "" or p in roots or _under(p, roots) is not None or _is_prefix(p, entries, roots))
    )
    doc = {"class_name": class_name, "codegen": codegen, "nodes": nodes, "modules": descriptions,
           "tensors": tensors, "layouts": layouts, "training": training}
    return doc, weights


def _is_prefix(path: str, entries: dict, roots: set[str]) -> bool:
    return any(k.startswith(path + ".") for k in (*entries, *roots))


def _dedupe(entries: dict[str, tuple[torch.Tensor, str]]) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """Store each distinct tensor once; copies only where views overlap without being equal."""
    groups: dict[tuple, list[str]] = {}
    for path in sorted(entries):
        t = entries[path][0]
        _storable(path, t)
        ident = ("empty", id(t)) if t.numel() == 0 else (
            t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        groups.setdefault(ident, []).append(path)
    storages: dict[int, int] = {}
    for ident in groups:
        storages[ident[0]] = storages.get(ident[0], 0) + 1
    table, weights, layouts = {}, {}, {}
    for ident, paths in groups.items():
        key, t = paths[0], entries[paths[0]][0].detach()
        if storages[ident[0]] > 1:  # another stored tensor overlaps this storage: give it its own
            t = t.clone()
        weights[key], perm = _layout(t)
        if perm is not None:
            layouts[key] = perm
        for path in paths:
            tensor, kind = entries[path]
            table[path] = {"key": key, "kind": kind}
            if kind == "parameter":
                table[path]["requires_grad"] = bool(tensor.requires_grad)
    return table, weights, layouts


def _encode_node(node: torch.fx.Node) -> dict:
    where = f"node {node.name!r}"
    target: Any = node.target
    if node.op == "placeholder" and not _PLACEHOLDER.fullmatch(str(target)):
        raise ArtifactError(f"{where}: placeholder name {target!r} is not an identifier")
    if node.op == "call_function":
        target = allowlist.function_name(node.target)
        _check_getattr(target, node.args, where)
    elif node.op == "call_method":
        target = allowlist.check_method(node.target)
    kwargs = [[k, values.encode(v, where, lambda n: n.name)] for k, v in node.kwargs.items()]
    type_name = next((n for n, t in _TYPES.items() if node.type is t), None)
    return {"op": node.op, "name": node.name, "target": target, "type": type_name,
            "args": values.encode(tuple(node.args), where, lambda n: n.name), "kwargs": kwargs}


def _check_getattr(target: str, args: Any, where: str) -> None:
    """``getattr`` may only read a constant public attribute (``x.shape``, not ``x.__class__``)."""
    if target == "builtins.getattr" and not (
        len(args) == 2 and isinstance(args[1], str) and _NAME.fullmatch(args[1]) and not args[1].startswith("_")
    ):
        raise ArtifactError(f"{where}: getattr must read a constant public attribute name, got {args[1:]!r}")


def decode(doc: Any, weights: dict[str, torch.Tensor]) -> torch.fx.GraphModule:
    """Rebuild the ``GraphModule``; raise ``ArtifactError`` for any malformed part."""
    if not isinstance(doc, dict) or set(doc) != _DOC_KEYS:
        raise ArtifactError(f"malformed artifact: graph.json must have exactly the keys {sorted(_DOC_KEYS)}")
    class_name = doc["class_name"]
    if not isinstance(class_name, str) or not _NAME.fullmatch(class_name) or keyword.iskeyword(class_name):
        raise ArtifactError(f"malformed artifact: class name {class_name!r}")
    tensors = _decode_tensors(doc["tensors"], doc["layouts"], weights)

    root = nn.Module()
    module_docs = doc["modules"]
    if not isinstance(module_docs, dict):
        raise ArtifactError("malformed artifact: 'modules' is not an object")
    roots = set(module_docs)
    states: dict[str, dict[str, torch.Tensor]] = {path: {} for path in roots}
    for path, (tensor, _) in tensors.items():
        leaf = _under(path, roots)
        if leaf is not None:
            states[leaf][path[len(leaf) + 1 :]] = tensor
    for path in sorted(roots):
        _check_path(path, "malformed artifact: module")
        if _under(path, roots) is not None:
            raise ArtifactError(f"malformed artifact: module {path!r} lies inside another stored module")
        _install(root, path, modules.build(path, module_docs[path], states[path]))
    for path, (tensor, kind) in tensors.items():
        if _under(path, roots) is None:
            owner_path, _, field = _check_path(path, "malformed artifact: tensor").rpartition(".")
            owner = _install(root, owner_path, None)
            if kind == "parameter":
                owner.register_parameter(field, tensor)
            else:  # plain attributes are made plain again after GraphModule() turned them into buffers
                owner.register_buffer(field, tensor, persistent=kind != "buffer_np")

    graph = _decode_graph(doc["nodes"], root, tensors)
    if doc["codegen"] is not None:
        graph.set_codegen(_PyTreeCodeGen(_decode_pytree(doc["codegen"])))
    try:
        graph.lint()
        gm = torch.fx.GraphModule(root, graph, class_name=class_name)
    except ArtifactError:
        raise
    except Exception as exc:
        raise ArtifactError(f"malformed artifact: the stored graph does not form a GraphModule: {exc}") from exc
    for path, (tensor, kind) in tensors.items():
        if kind == "attr" and _under(path, roots) is None:
            owner_path, _, field = path.rpartition(".")
            owner = gm.get_submodule(owner_path)
            del owner._buffers[field]
            setattr(owner, field, tensor)
    _set_training(gm, doc["training"])
    return gm


def _install(root: nn.Module, path: str, module: nn.Module | None) -> nn.Module:
    """Put ``module`` at ``path`` (creating plain parents); with None, return the module there."""
    node = root
    parts = path.split(".") if path else []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        child = node._modules.get(part)
        if last and module is not None:
            if child is not None or hasattr(node, part):
                raise ArtifactError(f"malformed artifact: {path!r} is defined twice")
            node.add_module(part, module)
            return module
        if child is None:
            if hasattr(node, part):
                raise ArtifactError(f"malformed artifact: {path!r} passes through a tensor")
            child = nn.Module()
            node.add_module(part, child)
        node = child
    return node


def _decode_tensors(table: Any, layouts: Any, weights: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, str]]:
    if not isinstance(table, dict) or not isinstance(layouts, dict):
        raise ArtifactError("malformed artifact: 'tensors' and 'layouts' must be objects")
    base = {}
    for key, t in weights.items():
        perm = layouts.get(key)
        if perm is not None:
            if sorted(perm) != list(range(t.dim())) if isinstance(perm, list) else True:
                raise ArtifactError(f"malformed artifact: layout of {key!r} is not a permutation")
            t = t.permute([perm.index(d) for d in range(t.dim())])
        base[key] = t
    if set(layouts) - set(weights):
        raise ArtifactError(f"malformed artifact: layouts for missing tensors {sorted(set(layouts) - set(weights))}")
    out, params, used = {}, {}, set()
    for path, entry in table.items():
        if not isinstance(entry, dict) or entry.get("key") not in base or entry.get("kind") not in _KINDS:
            raise ArtifactError(f"malformed artifact: tensor entry {path!r}: {entry!r}")
        key, kind = entry["key"], entry["kind"]
        used.add(key)
        if kind == "parameter":
            grad = entry.get("requires_grad")
            if not isinstance(grad, bool) or set(entry) != {"key", "kind", "requires_grad"}:
                raise ArtifactError(f"malformed artifact: parameter entry {path!r}: {entry!r}")
            if (key, grad) not in params:  # one Parameter per stored tensor: tied weights stay tied
                params[key, grad] = nn.Parameter(base[key], requires_grad=grad)
            out[path] = (params[key, grad], kind)
        else:
            if set(entry) != {"key", "kind"}:
                raise ArtifactError(f"malformed artifact: tensor entry {path!r}: {entry!r}")
            out[path] = (base[key], kind)
    if used != set(base):
        raise ArtifactError(f"malformed artifact: stored tensors nobody uses: {sorted(set(base) - used)}")
    return out


def _decode_graph(node_docs: Any, root: nn.Module, tensors: dict) -> torch.fx.Graph:
    if not isinstance(node_docs, list) or not node_docs:
        raise ArtifactError("malformed artifact: 'nodes' must be a non-empty list")
    graph = torch.fx.Graph()
    nodes: dict[str, torch.fx.Node] = {}
    for i, nd in enumerate(node_docs):
        if not isinstance(nd, dict) or set(nd) != {"op", "name", "target", "type", "args", "kwargs"}:
            raise ArtifactError(f"malformed artifact: node #{i} is not a node record")
        op, name, target = nd["op"], nd["name"], nd["target"]
        if op not in _OPS or not isinstance(name, str) or not _NAME.fullmatch(name) or name in nodes:
            raise ArtifactError(f"malformed artifact: node #{i} has op {op!r} and name {name!r}")
        if nd["type"] is not None and nd["type"] not in _TYPES:
            raise ArtifactError(f"malformed artifact: node {name!r} has type {nd['type']!r}")
        if (op == "output") != (i == len(node_docs) - 1):
            raise ArtifactError("malformed artifact: the graph must end with its only output node")
        where = f"node {name!r}"
        args = values.decode(nd["args"], where, nodes)
        kw = nd["kwargs"]
        if not isinstance(args, tuple) or not isinstance(kw, list) or not all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and _NAME.fullmatch(p[0]) for p in kw
        ):
            raise ArtifactError(f"malformed artifact: {where} has malformed args or kwargs")
        kwargs = {k: values.decode(v, where, nodes) for k, v in kw}
        if op == "placeholder" and not (isinstance(target, str) and _PLACEHOLDER.fullmatch(target)):
            raise ArtifactError(f"malformed artifact: {where} has placeholder target {target!r}")
        elif op == "call_function":
            _check_getattr(target, args, where)
            target = allowlist.resolve_function(target)
        elif op == "call_method":
            target = allowlist.check_method(target)
        elif op in ("get_attr", "call_module"):
            _check_target(op, target, root, tensors, where)
        elif op == "output" and target != "output":
            raise ArtifactError(f"malformed artifact: {where} has target {target!r}")
        node = graph.create_node(op, target, args, kwargs, name=name, type_expr=_TYPES.get(nd["type"]))
        if node.name != name:
            raise ArtifactError(f"malformed artifact: node name {name!r} is reserved")
        nodes[name] = node
    return graph


def _check_target(op: str, target: Any, root: nn.Module, tensors: dict, where: str) -> None:
    if not isinstance(target, str):
        raise ArtifactError(f"malformed artifact: {where} has target {target!r}")
    try:
        found = root.get_submodule(target) if op == "call_module" else None
    except AttributeError:
        found = None
    if op == "call_module" and found is None:
        raise ArtifactError(f"malformed artifact: {where} calls module {target!r}, which the artifact lacks")
    if op == "get_attr" and target not in tensors:
        raise ArtifactError(f"malformed artifact: {where} reads {target!r}, which the artifact lacks")


def _decode_pytree(cg: Any) -> _PyTreeInfo:
    try:
        if set(cg) != {"orig_args", "in_spec", "out_spec"} or not all(
            isinstance(a, str) and _PLACEHOLDER.fullmatch(a) for a in cg["orig_args"]
        ):
            raise ValueError("bad keys or argument names")
        specs = [pytree.treespec_loads(s) if s is not None else None for s in (cg["in_spec"], cg["out_spec"])]
    except Exception as exc:
        raise ArtifactError(f"malformed artifact: pytree calling convention: {exc}") from exc
    return _PyTreeInfo(list(cg["orig_args"]), specs[0], specs[1])


def _set_training(gm: torch.fx.GraphModule, paths: Any) -> None:
    named = dict(gm.named_modules())
    if not isinstance(paths, list) or any(p not in named for p in paths):
        raise ArtifactError("malformed artifact: 'training' lists modules the artifact lacks")
    for module in named.values():
        module.training = False
    for path in paths:
        named[path].training = True
