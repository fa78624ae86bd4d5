"""save / load / verify: the artifact container, its manifest, integrity and atomic writes.

Load order, and why: the zip's end record and central directory are parsed
(bounds-checked) -> ``manifest.json`` is checked against the SHA-256 in the zip
comment, then parsed -> its format version is checked (before anything that
depends on the version) -> the member set must be exactly the expected one ->
the signature is checked -> every member's CRC-32 and SHA-256 -> every byte
outside member data must equal the canonical layout.  Only then is
``graph.json`` decoded and the weights read, with safetensors, so nothing from
a damaged or tampered file is ever interpreted beyond JSON and zip headers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import mmap
import importlib.metadata
import json
import math
import os
import platform
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import safetensors.torch
import torch

from fxcompress.artifact import graph_codec, signing, zipio
from fxcompress.errors import ArtifactError, IntegrityError

__all__ = ["FORMAT_VERSION", "SUPPORTED_VERSIONS", "MEMBERS", "save", "load", "verify", "check_target",
           "lineage_step"]

FORMAT = "fxcompress.artifact"
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
MANIFEST, GRAPH, WEIGHTS, SIGNATURE = "manifest.json", "graph.json", "weights.safetensors", "manifest.sig"
MEMBERS = (GRAPH, MANIFEST, SIGNATURE, WEIGHTS)
_MAGIC = b"fxcompress-artifact manifest-sha256:"
_META_KEY = "fxcompress_artifact"  # gm.meta entry of a loaded model; survives deepcopy
_HISTORY_KEY = "fxcompress_history"  # fxcompress.manager.HISTORY_KEY: the passes run on a graph
_FRONTEND_KEY = "fxcompress_frontend"  # fxcompress.capture.FRONTEND_KEY: the front end that captured it
_MANIFEST_KEYS_V1 = {"format", "format_version", "versions", "members", "model", "pipeline",
                     "source_state_sha256", "report", "parent", "extra", "signature"}
# Version 2 adds the lineage (earlier steps, oldest first), the passes run so far (so a
# loaded model can continue a pipeline whose passes require earlier ones) and the graph
# inputs' shapes and dtypes (what exporters need to know about the model's inputs).
_MANIFEST_KEYS = {1: _MANIFEST_KEYS_V1, 2: _MANIFEST_KEYS_V1 | {"history", "passes_run", "inputs"}}


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _jsonable(obj: Any) -> Any:
    """Informational data (report, pipeline options) as JSON; unknown types become ``str``."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # e.g. a QuantSpec option
        return _jsonable(dataclasses.asdict(obj))
    return str(obj)


def _pipeline(entries: Any) -> list | None:
    if entries is None:
        return None
    out = []
    for e in entries:
        if isinstance(e, str):
            out.append({"name": e, "options": {}})
        elif isinstance(e, (tuple, list)) and len(e) == 2:
            out.append({"name": str(e[0]), "options": _jsonable(e[1])})
        elif isinstance(e, dict):
            out.append(_jsonable(e))
        else:
            raise ArtifactError(f"pipeline entry {e!r} is not a name, (name, options) or dict")
    return out


def _input_specs(gm: torch.fx.GraphModule) -> list[dict] | None:
    """Name, shape and dtype of each graph input, where shape propagation recorded them."""
    specs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            return None
        specs.append({"name": node.target, "shape": [int(d) for d in meta.shape],
                      "dtype": str(meta.dtype).removeprefix("torch.")})
    return specs


def lineage_step(manifest: dict, digest: str) -> dict:
    """What the lineage of a model saved from this artifact records about it: its id, passes,
    pipeline, when and with what it was made, and whether it was signed."""
    report = manifest.get("report") or {}
    return {"id": digest, "pipeline": manifest.get("pipeline"), "passes_run": manifest.get("passes_run"),
            "versions": manifest.get("versions"), "before": report.get("before"), "after": report.get("after"),
            "signed_by": (manifest.get("signature") or {}).get("public_key")}


def _fxcompress_version() -> str:
    version = getattr(sys.modules.get("fxcompress"), "__version__", None)
    if version:
        return str(version)
    try:
        return importlib.metadata.version("fxcompress")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _unpack(obj: Any) -> tuple[torch.fx.GraphModule, Any, Any, Any]:
    """(model, report dict, pipeline, source hash) from a GraphModule or a run() Result."""
    if isinstance(obj, torch.fx.GraphModule):
        return obj, None, None, None
    gm = getattr(obj, "model", None)
    if not isinstance(gm, torch.fx.GraphModule):
        hint = " Capture it first with fxcompress.trace(model, example_inputs)." if isinstance(obj, torch.nn.Module) else ""
        raise ArtifactError(f"save() takes a torch.fx.GraphModule or a Result with .model, not {type(obj).__qualname__}.{hint}")
    report = getattr(obj, "report", None)
    report = _jsonable(report.to_dict()) if report is not None else None
    source = getattr(obj, "source_state_hash", None) or None
    return gm, report, _pipeline(getattr(obj, "pipeline", None)), source


def save(
    result_or_model: Any,
    path: str | os.PathLike,
    *,
    key: signing.KeyArg | None = None,
    overwrite: bool = False,
    manifest_extra: dict | None = None,
) -> str:
    """Write an artifact of a ``GraphModule`` (or a ``Result``) to ``path``; return its id.

    Guarantees: everything that can fail for a reason in the model or the
    arguments (an unrepresentable module, an unreadable key, an existing
    ``path`` without ``overwrite=True``) raises before anything is written;
    the file appears at ``path`` atomically (temporary sibling, fsync, rename,
    directory fsync), and a failure while writing leaves ``path`` as it was and
    no temporary file; the same model, arguments and environment give a
    byte-identical file.  With ``key`` (PEM path or ``Ed25519PrivateKey``) the
    manifest is signed.  The id is the manifest's SHA-256, which an artifact
    saved from a model loaded from this one records as its ``parent``.
    """
    gm, report, pipeline, source = _unpack(result_or_model)
    path = check_target(path, overwrite)
    signer = signing.private_key(key) if key is not None else None
    try:
        extra = json.loads(_canonical(manifest_extra)) if manifest_extra is not None else None
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"manifest_extra must be JSON data (finite numbers, str keys): {exc}") from exc
    doc, weights = graph_codec.encode(gm)
    try:
        weights_bytes = safetensors.torch.save(weights)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ArtifactError(f"safetensors cannot store the model's tensors: {exc}") from exc
    members = {GRAPH: _canonical(doc), WEIGHTS: weights_bytes}
    params = {id(p): p for p in gm.parameters()}
    loaded_from = getattr(gm, "meta", {}).get(_META_KEY, {})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": {"fxcompress": _fxcompress_version(), "torch": torch.__version__, "python": platform.python_version()},
        "members": {n: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for n, b in members.items()},
        "model": {"class_name": doc["class_name"], "nodes": len(doc["nodes"]), "tensors": len(weights),
                  "parameters": sum(p.numel() for p in params.values()),
                  "tensor_bytes": sum(t.numel() * t.element_size() for t in weights.values()),
                  # which front end captured the graph (fxcompress.capture.FRONTEND_KEY), and why
                  "frontend": _jsonable(getattr(gm, "meta", {}).get(_FRONTEND_KEY))},
        "pipeline": pipeline,
        "source_state_sha256": source,
        "report": report,
        "parent": loaded_from.get("manifest_sha256"),
        "history": _jsonable(loaded_from.get("history", [])),
        "passes_run": _jsonable(list(getattr(gm, "meta", {}).get(_HISTORY_KEY, []))),
        "inputs": _input_specs(gm) or _jsonable(loaded_from.get("inputs")),
        "extra": extra,
        "signature": None if signer is None else {
            "algorithm": signing.ALGORITHM, "public_key": signing.raw(signer.public_key()).hex()},
    }
    manifest_bytes = _canonical(manifest)
    members[MANIFEST] = manifest_bytes
    if signer is not None:
        members[SIGNATURE] = signing.sign(signer, manifest_bytes)
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    _atomic_write(path, lambda f: zipio.write(f, members, _MAGIC + digest.encode()), overwrite)
    return digest


def _path(path: Any, what: str) -> Path:
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        raise ArtifactError(f"{what}() takes a file path (str or os.PathLike), got {type(path).__name__} {path!r}")
    return Path(path)


def check_target(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """``path`` as a ``Path`` if :func:`save` may write there, else ``ArtifactError``.

    Callers that do expensive work before saving (the command line runs a
    whole pipeline) ask first.
    """
    path = _path(path, "save")
    _check_target(path, overwrite)
    return path


def _check_target(path: Path, overwrite: bool) -> None:
    if not path.parent.is_dir():
        raise ArtifactError(f"cannot save to {path}: directory {path.parent} does not exist")
    if path.is_dir():
        raise ArtifactError(f"cannot save to {path}: it is a directory")
    if path.exists() and not overwrite:
        raise ArtifactError(f"{path} exists; pass overwrite=True to replace it")


def _atomic_write(path: Path, write: Callable[[BinaryIO], object], overwrite: bool) -> None:
    """Write through a temporary sibling, fsync, and rename; clean up on any failure.

    A failure of the file system (no space, no permission, an I/O error) is an
    ``ArtifactError`` naming the path; ``path`` is then as it was.
    """
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ArtifactError(f"cannot save to {path}: {exc.strerror or exc}; nothing was written") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                write(f)
            except ValueError as exc:  # zipio's size limits
                raise ArtifactError(f"cannot save to {path}: {exc}") from exc
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:  # link() never replaces: a file that appeared meanwhile is kept
                os.link(tmp, path)
            except FileExistsError:
                raise ArtifactError(f"{path} appeared while saving; pass overwrite=True to replace it") from None
            except OSError:  # no hard links on this file system
                if path.exists():
                    raise ArtifactError(f"{path} appeared while saving; pass overwrite=True to replace it") from None
                os.replace(tmp, path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise ArtifactError(f"cannot save to {path}: {exc.strerror or exc}; the file there (if any) is "
                            f"unchanged") from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; some platforms cannot open directories, which is fine."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _json(data: bytes, member: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"malformed artifact: member {member!r} is not valid JSON: {exc}") from exc


def _member(buf: zipio.Buffer, archive: zipio.Archive, name: str, where: str) -> bytes:
    entry = next(e for e in archive.entries if e.name == name)
    try:
        data = bytes(archive.data(buf, entry))
    except zipio.ZipFormatError as exc:
        raise IntegrityError(f"{where}: member {name!r} is damaged: {exc}") from exc
    if zlib.crc32(data) != entry.crc:
        raise IntegrityError(f"{where}: member {name!r} is corrupt: its CRC-32 does not match the zip directory")
    return data


def _check(buf: zipio.Buffer, where: str, public_key: Any) -> tuple[dict, str, dict[str, bytes]]:
    """All integrity checks; returns the manifest, its SHA-256 and the checked members' bytes."""
    if not zipio.starts_like(buf, GRAPH) and _MAGIC not in bytes(buf[-(len(_MAGIC) + 64 + 22) :]):
        raise ArtifactError(f"{where} is not an fxcompress artifact (it has neither the artifact's zip header "
                            "nor its end record); artifacts are written by fxcompress.save")
    try:
        archive = zipio.parse(buf)
    except zipio.ZipFormatError as exc:
        raise IntegrityError(f"{where} is damaged or truncated: {exc}") from exc
    names = [e.name for e in archive.entries]
    for name in names:
        if names.count(name) > 1:
            raise IntegrityError(f"{where}: member {name!r} appears more than once")
    if MANIFEST not in names:
        raise IntegrityError(f"{where}: member {MANIFEST!r} is missing (members: {names})")
    manifest_bytes = _member(buf, archive, MANIFEST, where)
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    if archive.comment != _MAGIC + digest.encode():
        raise IntegrityError(f"{where}: member {MANIFEST!r} does not match the SHA-256 in the zip comment "
                             "(the manifest or the comment was changed)")
    manifest = _json(manifest_bytes, MANIFEST)
    _check_manifest(manifest, where)
    signed = manifest["signature"] is not None
    expected = {GRAPH, MANIFEST, WEIGHTS} | ({SIGNATURE} if signed else set())
    for name in sorted(set(names) - expected):
        raise IntegrityError(f"{where}: unexpected member {name!r}" + (
            " (the manifest says the artifact is unsigned)" if name == SIGNATURE else ""))
    for name in sorted(expected - set(names)):
        raise IntegrityError(f"{where}: member {name!r} is missing")
    if signed:
        _check_signature(manifest, manifest_bytes, _member(buf, archive, SIGNATURE, where), where, public_key)
    elif public_key is not None:
        raise IntegrityError(f"{where} is not signed, and a public key was given: refusing to load it")
    members = {}
    for name in (GRAPH, WEIGHTS):
        data, want = _member(buf, archive, name, where), manifest["members"][name]
        if len(data) != want["bytes"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
            raise IntegrityError(f"{where}: member {name!r} does not match its SHA-256 in the manifest")
        members[name] = data  # these exact bytes, and no later read of the file, are what load uses
    # Every member has been read above and its CRC-32 checked against the directory.
    diff = zipio.first_difference(buf, archive, {e.name: e.crc for e in archive.entries})
    if diff is not None:
        raise IntegrityError(f"{where}: byte {diff[0]} ({diff[1]}) differs from the artifact's canonical zip layout")
    return manifest, digest, members


def _check_manifest(m: Any, where: str) -> None:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ArtifactError(f"{where}: manifest.json is not an fxcompress artifact manifest")
    if m.get("format_version") not in SUPPORTED_VERSIONS:
        raise ArtifactError(f"{where} has format version {m.get('format_version')!r}; this fxcompress reads "
                            f"versions {list(SUPPORTED_VERSIONS)}: use the fxcompress version that wrote it")
    members, layout = m.get("members"), _MANIFEST_KEYS[m["format_version"]]
    if set(m) != layout or not isinstance(members, dict) or set(members) != {GRAPH, WEIGHTS} or not all(
        isinstance(e, dict) and set(e) == {"sha256", "bytes"} and isinstance(e["bytes"], int)
        and isinstance(e["sha256"], str) for e in members.values()
    ):
        raise ArtifactError(f"malformed artifact {where}: manifest.json does not have the "
                            f"version-{m['format_version']} layout")
    steps, passes = m.get("history", []), m.get("passes_run", [])
    if not (isinstance(steps, list) and all(isinstance(h, dict) for h in steps) and isinstance(passes, list)
            and all(isinstance(p, str) for p in passes)):
        raise ArtifactError(f"malformed artifact {where}: manifest.json's history or passes_run is not a list "
                            f"of steps and pass names")
    sig = m["signature"]
    if sig is not None and not (isinstance(sig, dict) and sig.get("algorithm") == signing.ALGORITHM
                                and set(sig) == {"algorithm", "public_key"} and isinstance(sig["public_key"], str)):
        raise ArtifactError(f"malformed artifact {where}: unsupported signature block {sig!r}")


def _check_signature(manifest: dict, message: bytes, signature: bytes, where: str, public_key: Any) -> None:
    try:
        embedded = signing.Ed25519PublicKey.from_public_bytes(bytes.fromhex(manifest["signature"]["public_key"]))
    except ValueError as exc:
        raise IntegrityError(f"{where}: the manifest's public key is damaged: {exc}") from exc
    if not signing.verify(embedded, signature, message):
        raise IntegrityError(f"{where}: member {SIGNATURE!r} is not a valid signature of manifest.json")
    if public_key is not None and signing.raw(public_key) != signing.raw(embedded):
        raise IntegrityError(
            f"{where} is signed by key {signing.fingerprint(embedded)[:16]}..., not by the given public key "
            f"{signing.fingerprint(public_key)[:16]}...: refusing to load it"
        )


@contextlib.contextmanager
def _mapped(path: str | os.PathLike, what: str) -> Iterator[zipio.Buffer]:
    """The file, memory-mapped: only the parts read are copied into memory."""
    path = _path(path, what)
    try:
        f = open(path, "rb")
    except IsADirectoryError:
        raise ArtifactError(f"{path} is a directory, not an fxcompress artifact") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read artifact {path}: {exc.strerror or exc}") from exc
    with f:
        if os.fstat(f.fileno()).st_size == 0:  # mmap refuses empty files
            yield b""
            return
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:  # not a regular file (a pipe, a device)
            raise ArtifactError(f"cannot read artifact {path}: {exc}; give the path of an artifact file") from exc
        with mapped:
            yield mapped


def verify(path: str | os.PathLike, *, public_key: signing.KeyArg | None = None) -> dict:
    """Check an artifact without building the model; return its manifest.

    Raises ``IntegrityError`` for any damage or tampering the format can see
    (naming the member), or when ``public_key`` is given and the artifact is
    unsigned or signed by another key; ``ArtifactError`` for a file that is not
    an artifact or has an unsupported format version.
    """
    key = signing.public_key(public_key) if public_key is not None else None
    with _mapped(path, "verify") as buf:
        manifest, _, _ = _check(buf, str(path), key)
    return manifest


def load(path: str | os.PathLike, *, public_key: signing.KeyArg | None = None) -> torch.fx.GraphModule:
    """Load an artifact as a ``GraphModule``, after every check :func:`verify` makes.

    Nothing in the file is unpickled or executed: the graph is rebuilt from
    allow-listed functions and modules, the tensors are read with safetensors.
    The loaded model's outputs are bit-identical to the saved model's, its
    training flags are restored, and ``gm.meta["fxcompress_artifact"]`` holds
    the artifact's id (``manifest_sha256``) and its lineage, so a model saved from
    it records this artifact as its ``parent`` and every earlier step in its
    ``history``; the passes run so far are restored in ``gm.meta["fxcompress_history"]``
    (a pipeline continued on the loaded model may ``require`` them).  Memory: the weights member is read once
    (hashed and parsed from the same bytes), then turned into tensors.
    """
    key = signing.public_key(public_key) if public_key is not None else None
    with _mapped(path, "load") as buf:
        manifest, digest, members = _check(buf, str(path), key)
    doc = _json(members.pop(GRAPH), GRAPH)
    try:
        weights = safetensors.torch.load(members.pop(WEIGHTS))
    except Exception as exc:  # the safetensors parser's own complaint about a forged file
        raise ArtifactError(f"malformed artifact {path}: weights.safetensors: {exc}") from exc
    gm = graph_codec.decode(doc, weights)
    gm.meta[_META_KEY] = {"manifest_sha256": digest, "format_version": manifest["format_version"],
                          "signed_by": signing.fingerprint(key) if key is not None else None,
                          "history": [*manifest.get("history", []), lineage_step(manifest, digest)],
                          "inputs": manifest.get("inputs")}
    if manifest.get("passes_run"):  # so that `requires` holds when the pipeline continues
        gm.meta[_HISTORY_KEY] = list(manifest["passes_run"])
    if isinstance(manifest.get("model"), dict) and manifest["model"].get("frontend"):
        gm.meta[_FRONTEND_KEY] = dict(manifest["model"]["frontend"])
    return gm
