"""Every corruption and every inconsistent edit raises IntegrityError, naming the member."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from torch import fx

from fxcompress import artifact
from fxcompress.artifact import zipio
from fxcompress.errors import IntegrityError

from artifact_forge import canonical, forge, read_members, write_members

MEMBERS = ["graph.json", "manifest.json", "manifest.sig", "weights.safetensors"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, mobilenet: fx.GraphModule, keys: tuple[Path, Path]) -> dict:
    """A signed and an unsigned artifact of mobilenet_v3_small."""
    d = tmp_path_factory.mktemp("saved")
    artifact.save(mobilenet, d / "unsigned.fxc")
    artifact.save(mobilenet, d / "signed.fxc", key=keys[0])
    return {"unsigned": d / "unsigned.fxc", "signed": d / "signed.fxc"}


def _data_spans(path: Path) -> dict[str, tuple[int, int]]:
    """Where each member's stored bytes lie in the file: name -> (start, end)."""
    with zipfile.ZipFile(path) as z:
        spans = {}
        for info in z.infolist():
            start = info.header_offset + 30 + len(info.filename)
            spans[info.filename] = (start, start + info.file_size)
        return spans


def _flipped(path: Path, offset: int, dest: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    dest.write_bytes(bytes(data))
    return dest


@pytest.mark.parametrize(
    ("which", "member"), [(w, m) for w in ("unsigned", "signed") for m in MEMBERS if (w, m) != ("unsigned", "manifest.sig")]
)
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_flipped_byte_in_member_names_the_member(saved: dict, which: str, member: str, where: str, tmp_path: Path) -> None:
    start, end = _data_spans(saved[which])[member]
    offset = {"start": start, "middle": (start + end) // 2, "end": end - 1}[where]
    broken = _flipped(saved[which], offset, tmp_path / "broken.fxc")
    with pytest.raises(IntegrityError, match=member.replace(".", r"\.")):
        artifact.load(broken)


@pytest.mark.parametrize("which", ["unsigned", "signed"])
def test_every_byte_outside_member_data_is_checked(mlp: fx.GraphModule, keys: tuple[Path, Path],
                                                   which: str, tmp_path: Path) -> None:
    path = tmp_path / "mlp.fxc"
    artifact.save(mlp, path, key=keys[0] if which == "signed" else None)
    data_bytes = set()
    for start, end in _data_spans(path).values():
        data_bytes.update(range(start, end))
    structure = [i for i in range(path.stat().st_size) if i not in data_bytes]
    assert len(structure) > 300  # headers, central directory, end record and comment
    for offset in structure:
        with pytest.raises(IntegrityError):
            artifact.verify(_flipped(path, offset, tmp_path / "broken.fxc"))


@pytest.mark.parametrize("offset", ["first", "last"])
def test_flipped_byte_in_zip_of_large_artifact(saved: dict, offset: str, tmp_path: Path) -> None:
    size = saved["signed"].stat().st_size
    broken = _flipped(saved["signed"], 0 if offset == "first" else size - 1, tmp_path / "broken.fxc")
    with pytest.raises(IntegrityError):
        artifact.load(broken)


def test_replaced_member_is_named(saved: dict, tmp_path: Path) -> None:
    members = read_members(saved["unsigned"])
    doc = json.loads(members["graph.json"])
    doc["class_name"] = "Impostor"
    members["graph.json"] = canonical(doc)
    write_members(tmp_path / "r.fxc", members)  # a consistent zip: only the manifest's hash can tell
    with pytest.raises(IntegrityError, match=r"'graph\.json' does not match its SHA-256"):
        artifact.load(tmp_path / "r.fxc")


@pytest.mark.parametrize("how", ["canonical", "zipfile_append"])
def test_extra_member_is_named(saved: dict, how: str, tmp_path: Path) -> None:
    path = tmp_path / "x.fxc"
    if how == "canonical":
        write_members(path, {**read_members(saved["unsigned"]), "notes.txt": b"hello"})
    else:
        path.write_bytes(saved["unsigned"].read_bytes())
        with zipfile.ZipFile(path, "a") as z:
            z.writestr("notes.txt", b"hello")
    with pytest.raises(IntegrityError, match=r"unexpected member 'notes\.txt'"):
        artifact.load(path)


@pytest.mark.parametrize("member", ["graph.json", "weights.safetensors", "manifest.json", "manifest.sig"])
def test_missing_member_is_named(saved: dict, member: str, tmp_path: Path) -> None:
    members = read_members(saved["signed"])
    del members[member]
    path = tmp_path / "m.fxc"
    if member == "manifest.json":
        with open(path, "wb") as f:
            zipio.write(f, members, b"")
    else:
        write_members(path, members)
    with pytest.raises(IntegrityError, match=f"member '{member}' is missing".replace(".", r"\.")):
        artifact.load(path)


def test_signature_member_in_unsigned_artifact_is_unexpected(saved: dict, tmp_path: Path) -> None:
    members = read_members(saved["unsigned"])
    write_members(tmp_path / "s.fxc", {**members, "manifest.sig": read_members(saved["signed"])["manifest.sig"]})
    with pytest.raises(IntegrityError, match=r"unexpected member 'manifest\.sig'"):
        artifact.load(tmp_path / "s.fxc")


def test_manifest_edit_without_updating_the_digest(saved: dict, tmp_path: Path) -> None:
    members = read_members(saved["unsigned"])
    manifest = json.loads(members["manifest.json"])
    manifest["pipeline"] = [{"name": "something_else", "options": {}}]
    members["manifest.json"] = canonical(manifest)
    digest = hashlib.sha256(read_members(saved["unsigned"])["manifest.json"]).hexdigest()
    with open(tmp_path / "e.fxc", "wb") as f:  # the old digest stays in the comment
        zipio.write(f, members, b"fxcompress-artifact manifest-sha256:" + digest.encode())
    with pytest.raises(IntegrityError, match=r"'manifest\.json' does not match the SHA-256 in the zip comment"):
        artifact.load(tmp_path / "e.fxc")


def test_manifest_hash_edited_but_member_not(saved: dict, tmp_path: Path) -> None:
    path = tmp_path / "h.fxc"
    path.write_bytes(saved["unsigned"].read_bytes())
    forge(path, manifest=lambda m: m["members"]["weights.safetensors"].update(sha256="0" * 64))
    with pytest.raises(IntegrityError, match=r"'weights\.safetensors' does not match its SHA-256"):
        artifact.load(path)


def test_consistent_forgery_of_unsigned_artifact_is_undetectable_without_a_key(
    saved: dict, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    # The documented limit: content and manifest edited together pass every keyless check.
    path = tmp_path / "f.fxc"
    path.write_bytes(saved["unsigned"].read_bytes())
    forge(path, graph=lambda doc: doc.update(class_name="Forged"))
    assert type(artifact.load(path)).__name__ == "Forged"
    with pytest.raises(IntegrityError, match="not signed"):  # what signing buys
        artifact.load(path, public_key=keys[1])


@pytest.mark.parametrize("edit", ["graph", "manifest", "strip_signature"])
def test_any_edit_of_a_signed_artifact_is_caught(saved: dict, keys: tuple[Path, Path], edit: str, tmp_path: Path) -> None:
    path = tmp_path / "s.fxc"
    path.write_bytes(saved["signed"].read_bytes())
    if edit == "graph":
        forge(path, graph=lambda doc: doc.update(class_name="Forged"))
    elif edit == "manifest":
        forge(path, manifest=lambda m: m.update(extra={"approved": True}))
    else:  # drop the signature and say the artifact was never signed
        forge(path, manifest=lambda m: m.update(signature=None))
        members = read_members(path)
        del members["manifest.sig"]
        write_members(path, members)
        assert artifact.verify(path)["signature"] is None  # consistent without a key...
        with pytest.raises(IntegrityError, match="not signed"):  # ...refused with one
            artifact.load(path, public_key=keys[1])
        return
    with pytest.raises(IntegrityError, match=r"'manifest\.sig' is not a valid signature"):
        artifact.load(path)
    with pytest.raises(IntegrityError):
        artifact.load(path, public_key=keys[1])


def test_resigned_by_another_key_is_refused_with_the_right_key(
    saved: dict, keys: tuple[Path, Path], other_keys: tuple[Path, Path], mobilenet: fx.GraphModule, tmp_path: Path
) -> None:
    artifact.save(mobilenet, tmp_path / "o.fxc", key=other_keys[0])
    assert artifact.load(tmp_path / "o.fxc", public_key=other_keys[1]) is not None
    with pytest.raises(IntegrityError, match="not by the given public key"):
        artifact.load(tmp_path / "o.fxc", public_key=keys[1])
