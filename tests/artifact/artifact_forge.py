"""What an attacker who knows the format can do: rewrite members consistently.

``forge`` edits members and then recomputes everything a checker without a
key could compare against: member hashes in the manifest, the manifest digest
in the zip comment, the CRCs and the canonical zip layout.  Tests use it to
show which edits a key is needed to catch, and to plant payloads that get past
the integrity layer so that the decoding layer is what is tested.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any, Callable

from fxcompress.artifact import core, zipio

__all__ = ["read_members", "write_members", "forge", "canonical"]


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def read_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist()}


def write_members(path: Path, members: dict[str, bytes]) -> None:
    """Write a canonical archive whose comment matches ``manifest.json``."""
    digest = hashlib.sha256(members[core.MANIFEST]).hexdigest()
    with open(path, "wb") as f:
        zipio.write(f, members, core._MAGIC + digest.encode())


def forge(
    path: Path,
    *,
    graph: Callable[[dict], None] | None = None,
    weights: Callable[[bytes], bytes] | None = None,
    manifest: Callable[[dict], None] | None = None,
) -> None:
    """Apply the edits in place and make every hash and CRC agree with them."""
    members = read_members(path)
    if graph is not None:
        doc = json.loads(members[core.GRAPH])
        graph(doc)
        members[core.GRAPH] = canonical(doc)
    if weights is not None:
        members[core.WEIGHTS] = weights(members[core.WEIGHTS])
    m = json.loads(members[core.MANIFEST])
    for name in (core.GRAPH, core.WEIGHTS):
        m["members"][name] = {"sha256": hashlib.sha256(members[name]).hexdigest(), "bytes": len(members[name])}
    if manifest is not None:
        manifest(m)
    members[core.MANIFEST] = canonical(m)
    write_members(path, members)
