"""Nothing in an artifact is ever executed: planted pickles, forged graph entries.

Every forged artifact here is made consistent (hashes, digest, CRCs updated) so
that it passes the integrity layer: what is tested is that decoding never runs
anything the file names, only what the allow-lists hold.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Callable

import pytest
import safetensors.torch
import torch
from torch import fx

from fxcompress import artifact
from fxcompress.errors import ArtifactError, FxCompressError

from artifact_forge import forge, read_members, write_members


class _Payload:
    """Unpickling this creates a file: the proof that a pickle would have run."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.target}",)


@pytest.fixture
def payload(tmp_path: Path) -> tuple[bytes, Path]:
    """(pickle bytes, the file unpickling them creates); proven live on a control file."""
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()
    target = tmp_path / "pwned"
    return pickle.dumps(_Payload(target)), target


@pytest.fixture
def path(tmp_path: Path, mlp: fx.GraphModule) -> Path:
    p = tmp_path / "a.fxc"
    artifact.save(mlp, p)
    return p


def test_pickle_as_extra_member(path: Path, payload: tuple[bytes, Path]) -> None:
    write_members(path, {**read_members(path), "data.pkl": payload[0]})
    with pytest.raises(FxCompressError, match="data.pkl"):
        artifact.load(path)
    assert not payload[1].exists()


def test_pickle_in_safetensors_metadata(path: Path, payload: tuple[bytes, Path]) -> None:
    def plant(weights: bytes) -> bytes:
        tensors = safetensors.torch.load(weights)
        return safetensors.torch.save(tensors, metadata={"format": "pt", "pickle": payload[0].decode("latin-1")})

    forge(path, weights=plant)
    artifact.load(path)  # the metadata is never interpreted
    assert not payload[1].exists()


@pytest.mark.parametrize("member", ["graph.json", "weights.safetensors"])
def test_pickle_replacing_a_member(path: Path, payload: tuple[bytes, Path], member: str) -> None:
    if member == "graph.json":
        forge(path, graph=lambda doc: (doc.clear(), doc.update(pickle=payload[0].decode("latin-1"))))
    else:
        forge(path, weights=lambda _: payload[0])
    with pytest.raises(ArtifactError, match="malformed"):
        artifact.load(path)
    assert not payload[1].exists()


def _first(doc: dict, op: str) -> dict:
    return next(n for n in doc["nodes"] if n["op"] == op)


def test_pickle_as_a_string_constant_stays_a_string(path: Path, payload: tuple[bytes, Path], mlp: fx.GraphModule) -> None:
    text = payload[0].decode("latin-1") + "'); import os; os.system('touch pwned"
    forge(path, graph=lambda doc: _first(doc, "placeholder").update(args={"t": "tuple", "v": [text]}))
    loaded = artifact.load(path)  # a default value of the input: data, whatever it spells
    assert next(iter(loaded.graph.nodes)).args == (text,)
    x = torch.randn(2, 6)
    assert torch.equal(loaded(x), mlp(x))
    assert not payload[1].exists()


def _tensor_at(doc: dict, path: str) -> None:
    """Declare an existing stored tensor at ``path`` and read it there."""
    doc["tensors"][path] = {"key": next(iter(doc["tensors"].values()))["key"], "kind": "buffer"}
    _first(doc, "call_module").update(op="get_attr", target=path, args={"t": "tuple", "v": []})


# Forged graph entries: each names something that must not be reachable.
FORGERIES: dict[str, Callable[[dict, str], None]] = {
    "function_os_system": lambda doc, p: _first(doc, "call_module").update(op="call_function", target="os.system"),
    "function_builtins_eval": lambda doc, p: _first(doc, "call_module").update(op="call_function", target="builtins.eval"),
    "function_operator_call": lambda doc, p: _first(doc, "call_module").update(op="call_function", target="operator.call"),
    "function_torch_load": lambda doc, p: _first(doc, "call_module").update(op="call_function", target="torch.load"),
    "op_from_file": lambda doc, p: _first(doc, "call_module").update(op="call_function", target="torch.ops.aten.from_file.default"),
    "method_reduce": lambda doc, p: _first(doc, "call_module").update(op="call_method", target="__reduce__"),
    "method_register_hook": lambda doc, p: _first(doc, "call_module").update(op="call_method", target="register_hook"),
    "getattr_dunder": lambda doc, p: _first(doc, "call_module").update(
        op="call_function", target="builtins.getattr", args={"t": "tuple", "v": [{"t": "node", "v": "input_1"}, "__class__"]}),
    "module_type_pickle": lambda doc, p: next(iter(doc["modules"].values())).update(type="pickle.loads"),
    "module_type_os": lambda doc, p: next(iter(doc["modules"].values())).update(type="os.system"),
    "get_attr_dunder": lambda doc, p: _first(doc, "call_module").update(op="get_attr", target="__class__.__init__"),
    "target_code_injection": lambda doc, p: _first(doc, "call_module").update(
        op="get_attr", target='x"),__import__("os").system("touch pwned"),("'),
    "tensor_path_injection": lambda doc, p: _tensor_at(doc, 'w"),__import__("os").system("touch pwned"),("'),
    "tensor_path_dunder": lambda doc, p: _tensor_at(doc, "__dict__"),
    "tensor_path_shadowing_forward": lambda doc, p: _tensor_at(doc, "forward"),
    "module_path_dunder": lambda doc, p: doc["modules"].update({"__class__": next(iter(doc["modules"].values()))}),
    "node_name_injection": lambda doc, p: _first(doc, "call_module").update(name="x = os.system('touch pwned'); y"),
    "class_name_injection": lambda doc, p: doc.update(class_name="A:\n import os"),
    "placeholder_injection": lambda doc, p: _first(doc, "placeholder").update(target="x=__import__('os')"),
    "value_tag_pickle": lambda doc, p: _first(doc, "call_module").update(args={"t": "pickle", "v": p}),
    "dtype_not_a_dtype": lambda doc, p: _first(doc, "call_module").update(args={"t": "dtype", "v": "load"}),
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_forged_graph_entry_is_refused_and_runs_nothing(path: Path, payload: tuple[bytes, Path], forgery: str,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a 'touch pwned' that ran would land here
    forge(path, graph=lambda doc: FORGERIES[forgery](doc, payload[0].decode("latin-1")))
    assert json.loads(read_members(path)["graph.json"])  # the forgery is in the file
    with pytest.raises(ArtifactError):
        artifact.load(path)
    assert not payload[1].exists() and not (tmp_path / "pwned").exists()
