"""A damaged artifact never loads: seeded corruption campaigns over signed and unsigned artifacts.

Each mutant is one of: random bit flips anywhere in the file, a truncation, bytes appended
after the zip's end record (random, or shaped like an end record), two members' contents
swapped, or a member transplanted from another artifact (another model's weights, another
signature).  Every mutant must fail to load, and to verify, with an ``IntegrityError`` or an
``ArtifactError``: 100%, not most.  The CI campaign makes a few hundred loads in seconds; the
slow one makes several thousand.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import fx, nn

from fxcompress import artifact
from fxcompress.artifact import core, zipio
from fxcompress.errors import ArtifactError, IntegrityError

KINDS = ("flip", "truncate", "append", "append_end_record", "swap", "transplant")


def _model(seed: int) -> fx.GraphModule:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    return fx.symbolic_trace(model)


def _members(data: bytes) -> tuple[dict[str, bytes], bytes]:
    archive = zipio.parse(data)
    return {e.name: bytes(archive.data(data, e)) for e in archive.entries}, archive.comment


def _rebuilt(members: dict[str, bytes], comment: bytes) -> bytes:
    """The canonical zip of ``members`` with the original comment (the manifest digest is kept)."""
    import io

    out = io.BytesIO()
    zipio.write(out, members, comment)
    return out.getvalue()


def _mutant(kind: str, data: bytes, other: bytes, rng: random.Random) -> bytes:
    """One corruption of ``data``; ``other`` is a different valid artifact of the same kind (signed or not)."""
    if kind == "flip":
        mutated = bytearray(data)
        for pos in rng.sample(range(len(data)), rng.randint(1, 4)):
            mutated[pos] ^= 1 << rng.randrange(8)
        return bytes(mutated)
    if kind == "truncate":
        return data[:rng.randrange(len(data))]
    if kind == "append":
        return data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    if kind == "append_end_record":  # what a naive end-record search trips on
        tail = b"PK\x05\x06" + bytes(rng.randrange(256) for _ in range(rng.randint(0, 30)))
        return data + tail
    members, comment = _members(data)
    names = sorted(members)
    if kind == "swap":
        a, b = rng.sample(names, 2)
        members[a], members[b] = members[b], members[a]
        return _rebuilt(members, comment)
    if kind == "transplant":
        theirs, _ = _members(other)
        name = rng.choice(sorted(n for n in set(names) & set(theirs) if members[n] != theirs[n]))
        members[name] = theirs[name]
        return _rebuilt(members, comment)
    raise AssertionError(kind)


def _campaign(loads: int, tmp_path: Path, keys: tuple[Path, Path], seed: int) -> Counter:
    """Corrupt, load and verify ``loads`` mutants (half signed); returns the error types met."""
    private, public = keys
    sources: dict[bool, tuple[bytes, bytes]] = {}
    for signed in (False, True):
        pair = []
        for model_seed in (0, 1):
            path = tmp_path / f"source-{signed}-{model_seed}.fxc"
            artifact.save(_model(model_seed), path, key=private if signed else None)
            pair.append(path.read_bytes())
        sources[signed] = (pair[0], pair[1])
    rng = random.Random(seed)
    target = tmp_path / "mutant.fxc"
    met: Counter = Counter()
    seen: set[str] = set()
    for i in range(loads):
        signed = i % 2 == 1
        data, other = sources[signed]
        kind = KINDS[i % len(KINDS)]
        mutant = _mutant(kind, data, other, rng)
        if mutant == data:  # a swap of two identical members changes nothing: draw again
            continue
        seen.add(hashlib.sha256(mutant).hexdigest())
        target.write_bytes(mutant)
        checks: list[Callable[[], object]] = [lambda: artifact.load(target)]
        if signed:
            checks.append(lambda: artifact.load(target, public_key=public))
        checks.append(lambda: artifact.verify(target))
        for check in checks:
            try:
                check()
            except (IntegrityError, ArtifactError) as exc:
                met[type(exc).__name__] += 1
            else:
                raise AssertionError(f"mutant {i} ({kind}, {'signed' if signed else 'unsigned'}) loaded")
    # swaps and transplants have few forms (a handful of members); the other kinds are nearly all distinct
    assert len(seen) > loads * 0.6, "the campaign must try mostly distinct mutants"
    return met


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("campaign_keys")
    artifact.generate_keypair(d / "private.pem", d / "public.pem")
    return d / "private.pem", d / "public.pem"


def test_every_mutant_kind_is_refused_in_a_short_campaign(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    met = _campaign(240, tmp_path, keys, seed=0)
    assert sum(met.values()) >= 240 * 2  # every mutant loaded and verified (and loaded with the key, when signed)
    assert met["IntegrityError"] > 0


@pytest.mark.slow
def test_every_mutant_is_refused_in_a_long_campaign(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    met = _campaign(2400, tmp_path, keys, seed=1)
    assert sum(met.values()) >= 2400 * 2


def test_the_mutations_do_damage_the_file(keys: tuple[Path, Path], tmp_path: Path) -> None:
    """The campaign's mutants are corruptions, not re-encodings: each kind changes the bytes."""
    artifact.save(_model(0), tmp_path / "a.fxc")
    artifact.save(_model(1), tmp_path / "b.fxc")
    data, other = (tmp_path / "a.fxc").read_bytes(), (tmp_path / "b.fxc").read_bytes()
    rng = random.Random(0)
    for kind in KINDS:
        assert _mutant(kind, data, other, rng) != data, kind
    assert _rebuilt(*_members(data)) == data  # rebuilding without a change gives the same bytes
    assert core.MANIFEST in _members(data)[0]
