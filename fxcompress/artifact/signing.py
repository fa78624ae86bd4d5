"""Ed25519 keys and signatures for artifacts.

The signature covers the exact bytes of ``manifest.json``; the manifest in turn
holds the SHA-256 of every other member, so one signature covers the artifact.
The manifest's ``signature`` block names the algorithm and carries the raw
public key, and the 64-byte signature is the ``manifest.sig`` member.  Ed25519
is deterministic, so signed saves stay byte-identical.

A key argument is a PEM file path or a ``cryptography`` key object; files are
the unencrypted PKCS#8 private key and SubjectPublicKeyInfo public key that
:func:`generate_keypair` writes (``openssl genpkey -algorithm ed25519`` makes
compatible ones).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Union

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fxcompress.errors import ArtifactError, ConfigError

__all__ = ["ALGORITHM", "KeyArg", "generate_keypair", "private_key", "public_key", "raw", "fingerprint", "sign", "verify"]

ALGORITHM = "ed25519"
KeyArg = Union[str, os.PathLike, Ed25519PrivateKey, Ed25519PublicKey]
_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def generate_keypair(private_path: str | os.PathLike, public_path: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Write a new Ed25519 key pair as PEM files and return the public key's fingerprint.

    The private key file is created with mode 0600.  Existing files are
    replaced only with ``overwrite=True`` (else ``ArtifactError``, nothing written).
    The two paths must name two files (else ``ArtifactError``: the public key
    would overwrite the private one); a file-system failure is an
    ``ArtifactError`` naming the file.
    """
    for name, p in (("private_path", private_path), ("public_path", public_path)):
        if not isinstance(p, (str, os.PathLike)) or isinstance(p, bytes):
            raise ArtifactError(f"generate_keypair(): {name} must be a file path, got {type(p).__name__} {p!r}")
    paths = [Path(private_path), Path(public_path)]
    if paths[0].resolve() == paths[1].resolve() or (
            paths[0].exists() and paths[1].exists() and os.path.samefile(*paths)):
        raise ArtifactError(f"the private and public key paths name the same file ({paths[0]}): the public key "
                            f"would overwrite the private one; give two different files")
    for p in paths:
        if p.exists() and not overwrite:
            raise ArtifactError(f"{p} exists; pass overwrite=True to replace it")
        if not p.parent.is_dir():
            raise ArtifactError(f"cannot write {p}: directory {p.parent} does not exist")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for path, data, mode in ((paths[0], private_pem, 0o600), (paths[1], public_pem, 0o644)):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)  # an existing file keeps its old mode otherwise
                f.write(data)
        except OSError as exc:
            raise ArtifactError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return fingerprint(key.public_key())


def _read(path: Any, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {str(path)!r}: {exc.strerror or exc}") from exc


def _load_pem(key: Any, what: str, load: Callable[[bytes], Any], expected: type, fix: str) -> Any:
    """The key of type ``expected`` read by ``load`` from the PEM file ``key`` (a path); a
    ``ConfigError`` saying what is wrong and ``fix`` otherwise."""
    if not isinstance(key, (str, os.PathLike)):
        raise ConfigError(f"the {what} must be a PEM file path or an {expected.__name__}, "
                          f"not {type(key).__qualname__}")
    try:
        loaded = load(_read(key, f"{what} file"))
    except TypeError as exc:  # an encrypted private key
        raise ConfigError(f"{what} file {str(key)!r} is encrypted; use an unencrypted key (generate_keypair)") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{str(key)!r} is not a readable PEM {what} ({exc}); {fix}") from exc
    if not isinstance(loaded, expected):
        raise ConfigError(f"{what} file {str(key)!r} holds a {type(loaded).__name__}; artifacts use Ed25519")
    return loaded


def private_key(key: KeyArg) -> Ed25519PrivateKey:
    """The signing key from a PEM path or key object; ``ConfigError`` if it is not one."""
    if isinstance(key, Ed25519PrivateKey):
        return key
    return _load_pem(key, "private key", lambda data: serialization.load_pem_private_key(data, password=None),
                     Ed25519PrivateKey, "create one with fxcompress.artifact.generate_keypair or `fxcompress keygen`")


def public_key(key: KeyArg) -> Ed25519PublicKey:
    """The verifying key from a PEM path or key object (a private key gives its public half)."""
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key()
    return _load_pem(key, "public key", serialization.load_pem_public_key, Ed25519PublicKey,
                     "pass the public key file that generate_keypair (or `fxcompress keygen`) wrote")


def raw(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of a public key."""
    return key.public_bytes(*_RAW)


def fingerprint(key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, hex: how messages name a key."""
    return hashlib.sha256(raw(key)).hexdigest()


def sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    """The 64-byte Ed25519 signature of ``message`` (deterministic)."""
    return key.sign(message)


def verify(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is ``key``'s signature of ``message``."""
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True
