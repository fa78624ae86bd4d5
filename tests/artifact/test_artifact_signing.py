"""Keys, signatures, and the container seen by ordinary zip tools."""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import fx

from fxcompress import artifact
from fxcompress.errors import ArtifactError, IntegrityError

from artifact_forge import read_members


def test_generate_keypair_writes_pem_files_and_refuses_to_overwrite(tmp_path: Path) -> None:
    private, public = tmp_path / "k", tmp_path / "k.pub"
    fingerprint = artifact.generate_keypair(private, public)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(private.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert len(fingerprint) == 64
    before = private.read_bytes()
    with pytest.raises(ArtifactError, match="overwrite=True"):
        artifact.generate_keypair(private, public)
    assert private.read_bytes() == before
    assert artifact.generate_keypair(private, public, overwrite=True) != fingerprint


def test_signed_artifact_loads_with_its_key_as_path_or_object(mlp: fx.GraphModule, keys: tuple[Path, Path],
                                                              tmp_path: Path) -> None:
    artifact.save(mlp, tmp_path / "s.fxc", key=keys[0])
    manifest = artifact.verify(tmp_path / "s.fxc", public_key=keys[1])
    assert manifest["signature"]["algorithm"] == "ed25519"
    assert len(read_members(tmp_path / "s.fxc")["manifest.sig"]) == 64
    private = serialization.load_pem_private_key(keys[0].read_bytes(), password=None)
    x = torch.randn(3, 6)
    for public in (keys[1], private.public_key(), private):  # a private key stands for its public half
        loaded = artifact.load(tmp_path / "s.fxc", public_key=public)
        assert torch.equal(loaded(x), mlp(x))
    assert loaded.meta["fxcompress_artifact"]["signed_by"] is not None
    artifact.save(mlp, tmp_path / "o.fxc", key=private)  # a key object signs the same bytes
    assert (tmp_path / "o.fxc").read_bytes() == (tmp_path / "s.fxc").read_bytes()


def test_unsigned_artifact_is_refused_when_a_key_is_given(mlp: fx.GraphModule, keys: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    artifact.save(mlp, tmp_path / "u.fxc")
    assert artifact.verify(tmp_path / "u.fxc")["signature"] is None
    with pytest.raises(IntegrityError, match="not signed"):
        artifact.verify(tmp_path / "u.fxc", public_key=keys[1])


def test_artifact_is_an_ordinary_stored_zip(mlp: fx.GraphModule, keys: tuple[Path, Path], tmp_path: Path) -> None:
    artifact.save(mlp, tmp_path / "s.fxc", key=keys[0])
    with zipfile.ZipFile(tmp_path / "s.fxc") as z:
        assert z.testzip() is None
        infos = z.infolist()
    assert [i.filename for i in infos] == ["graph.json", "manifest.json", "manifest.sig", "weights.safetensors"]
    assert {(i.compress_type, i.date_time) for i in infos} == {(zipfile.ZIP_STORED, (1980, 1, 1, 0, 0, 0))}


@pytest.mark.parametrize("same", ["identical", "relative", "symlink"])
def test_keypair_paths_naming_one_file_are_refused_before_anything_is_written(same: str, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    private = tmp_path / "key.pem"
    public = {"identical": private, "relative": Path("key.pem"), "symlink": tmp_path / "link.pem"}[same]
    if same == "symlink":
        private.write_bytes(b"old")
        public.symlink_to(private)
    with pytest.raises(ArtifactError, match="name the same file"):
        artifact.generate_keypair(private, public, overwrite=True)
    assert not private.exists() or private.read_bytes() == b"old"
