"""Bad input fails with a clear error before harm: paths, files, versions, keys, models."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from torch import fx, nn

from fxcompress import artifact
from fxcompress.artifact import core
from fxcompress.errors import ArtifactError, ConfigError, IntegrityError

from artifact_forge import forge


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory, mlp: fx.GraphModule) -> Path:
    path = tmp_path_factory.mktemp("good") / "mlp.fxc"
    artifact.save(mlp, path)
    return path


def _sole_file(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("content", [b"", b"hello, not an artifact\n", b"\x80\x04K\x01." * 100])
def test_file_that_is_not_an_artifact(content: bytes, tmp_path: Path) -> None:
    (tmp_path / "x.fxc").write_bytes(content)
    with pytest.raises(ArtifactError, match="not an fxcompress artifact"):
        artifact.load(tmp_path / "x.fxc")


def test_other_zip_file_is_not_an_artifact(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("data.pkl", b"payload")
    with pytest.raises(ArtifactError, match="not an fxcompress artifact"):
        artifact.load(tmp_path / "other.zip")


def test_missing_path_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="cannot read artifact"):
        artifact.load(tmp_path / "absent.fxc")
    with pytest.raises(ArtifactError, match="is a directory"):
        artifact.load(tmp_path)


@pytest.mark.parametrize("keep", [10, 100, 0.5, -1])
def test_truncated_file(good: Path, keep: float, tmp_path: Path) -> None:
    data = good.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep if keep > 0 else len(data) + keep
    (tmp_path / "t.fxc").write_bytes(data[:cut])
    with pytest.raises(IntegrityError, match="truncated"):
        artifact.load(tmp_path / "t.fxc")


def test_unknown_format_version_lists_supported_ones(good: Path, tmp_path: Path) -> None:
    path = tmp_path / "v.fxc"
    path.write_bytes(good.read_bytes())
    forge(path, manifest=lambda m: m.update(format_version=99))
    with pytest.raises(ArtifactError, match=r"format version 99.*versions \[1, 2\]"):
        artifact.load(path)


def test_wrong_public_key(good: Path, keys: tuple[Path, Path], other_keys: tuple[Path, Path], mlp: fx.GraphModule,
                          tmp_path: Path) -> None:
    artifact.save(mlp, tmp_path / "s.fxc", key=keys[0])
    with pytest.raises(IntegrityError, match="not by the given public key"):
        artifact.load(tmp_path / "s.fxc", public_key=other_keys[1])


def _write_ec_key(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


@pytest.mark.parametrize("problem", ["garbage", "empty", "truncated", "missing", "public_as_private", "ec_key", "encrypted"])
def test_bad_private_key_file_writes_nothing(problem: str, mlp: fx.GraphModule, keys: tuple[Path, Path],
                                             tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    if problem == "garbage":
        key.write_bytes(os.urandom(64))
    elif problem == "empty":
        key.write_bytes(b"")
    elif problem == "truncated":
        key.write_bytes(keys[0].read_bytes()[:40])
    elif problem == "public_as_private":
        key = keys[1]
    elif problem == "ec_key":
        _write_ec_key(key)
    elif problem == "encrypted":
        private = serialization.load_pem_private_key(keys[0].read_bytes(), password=None)
        key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.BestAvailableEncryption(b"secret")))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConfigError, match=str(key.name)):
        artifact.save(mlp, out / "m.fxc", key=key)
    assert _sole_file(out) == []


@pytest.mark.parametrize("problem", ["garbage", "private_key_file", "missing"])
def test_bad_public_key_file(problem: str, good: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    key = {"private_key_file": keys[0], "missing": tmp_path / "none.pem"}.get(problem, tmp_path / "g.pem")
    if problem == "garbage":
        key.write_bytes(b"-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError, match=key.name):
        artifact.load(good, public_key=key)


def test_key_of_the_wrong_type_object(good: Path) -> None:
    with pytest.raises(ConfigError, match="Ed25519PublicKey"):
        artifact.load(good, public_key=42)


class Blur(nn.Module):
    """A custom leaf module: it has no config the format knows."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.ones(3, 1, 3, 3) / 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.kernel, padding=1, groups=3)


class KeepBlur(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Blur) or super().is_leaf_module(m, qualname)


def test_unrepresentable_module_is_named_before_anything_is_written(good: Path, tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Sequential(nn.ReLU(), Blur()))
    gm = fx.GraphModule(model, KeepBlur().trace(model))
    target = tmp_path / "m.fxc"
    target.write_bytes(good.read_bytes())
    with pytest.raises(ArtifactError, match=r"module '1\.1' of type .*Blur cannot be stored"):
        artifact.save(gm, target, overwrite=True)
    assert target.read_bytes() == good.read_bytes()
    assert _sole_file(tmp_path) == ["m.fxc"]


def test_plain_module_asks_for_tracing(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="fxcompress.trace"):
        artifact.save(nn.Linear(2, 2), tmp_path / "m.fxc")


def test_existing_target_needs_overwrite(good: Path, mlp: fx.GraphModule, tmp_path: Path) -> None:
    target = tmp_path / "m.fxc"
    target.write_bytes(b"precious")
    with pytest.raises(ArtifactError, match="overwrite=True"):
        artifact.save(mlp, target)
    assert target.read_bytes() == b"precious"
    artifact.save(mlp, target, overwrite=True)
    assert target.read_bytes() == good.read_bytes()
    with pytest.raises(ArtifactError, match="does not exist"):
        artifact.save(mlp, tmp_path / "no" / "such" / "dir.fxc")


def test_crash_during_write_leaves_previous_artifact_and_no_temp_file(
    good: Path, mobilenet: fx.GraphModule, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "m.fxc"
    target.write_bytes(good.read_bytes())
    real_write = core.zipio.write

    def write_half_then_die(out, members, comment):  # the process is interrupted mid-file
        out.write(members["graph.json"][: len(members["graph.json"]) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(core.zipio, "write", write_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        artifact.save(mobilenet, target, overwrite=True)
    monkeypatch.setattr(core.zipio, "write", real_write)

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(core.os, "fsync", disk_full)
    with pytest.raises(ArtifactError, match=r"cannot save to .*m.fxc: No space left on device; the file there"):
        artifact.save(mobilenet, target, overwrite=True)
    assert target.read_bytes() == good.read_bytes()
    assert _sole_file(tmp_path) == ["m.fxc"]


def test_model_with_opaque_tensor_is_refused(tmp_path: Path) -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4)))
    gm.register_buffer("packed", torch.randn(4, 4).to_mkldnn())
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        gm.graph.get_attr("packed")
    gm.recompile()
    with pytest.raises(ArtifactError, match="'packed'.*not a plain dense tensor"):
        artifact.save(gm, tmp_path / "m.fxc")
    assert _sole_file(tmp_path) == []


@pytest.mark.parametrize("tail", [b"PK\x05\x06", b"PK\x05\x06" + bytes(10), b"junk" * 3, b"PK\x05\x06" + bytes(17)])
def test_bytes_appended_after_the_end_record_are_an_integrity_error(good: Path, tail: bytes, tmp_path: Path) -> None:
    damaged = tmp_path / "appended.fxc"
    damaged.write_bytes(good.read_bytes() + tail)
    for check in (artifact.load, artifact.verify):
        with pytest.raises(IntegrityError):
            check(damaged)


@pytest.mark.parametrize("path", [None, 3, b"model.fxc"])
def test_a_path_that_is_not_a_path_is_an_artifact_error(path, mlp: fx.GraphModule) -> None:
    for call in (artifact.load, artifact.verify, lambda p: artifact.save(mlp, p)):
        with pytest.raises(ArtifactError, match=r"takes a file path \(str or os.PathLike\)"):
            call(path)


def test_a_pipe_is_not_an_artifact(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    fd = os.open(tmp_path / "fifo", os.O_RDWR | os.O_NONBLOCK)  # a writer, so that opening for reading returns
    try:
        with pytest.raises(ArtifactError, match="not an fxcompress artifact|cannot read artifact"):
            artifact.load(tmp_path / "fifo")
    finally:
        os.close(fd)


def test_a_file_system_failure_on_save_is_an_artifact_error(mlp: fx.GraphModule, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def no_permission(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(core.tempfile, "mkstemp", no_permission)
    with pytest.raises(ArtifactError, match=r"cannot save to .*m.fxc: Permission denied; nothing was written"):
        artifact.save(mlp, tmp_path / "m.fxc")
    assert _sole_file(tmp_path) == []
