"""A canonical, stored (uncompressed) zip container: one layout per member set.

Why our own writer instead of :mod:`zipfile`: an artifact must be byte-identical
across saves *and* every byte of it must be checkable.  This module writes
exactly one layout for a given ``{name: bytes}`` mapping and comment (members
sorted by name, stored, no timestamps, no extra fields, fixed attributes), and
:func:`first_difference` regenerates that layout from the parsed entries and
compares it with the file, so a changed byte *outside* member data (local
headers, central directory, end record) is always found.  Bytes *inside* member
data are covered by CRC-32 here and by SHA-256 in the manifest.

The files are ordinary zip files: ``unzip -l`` and :mod:`zipfile` read them.
Zip64 is not written: an archive whose size reaches 4 GiB is refused on save.
"""

from __future__ import annotations

import mmap
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Mapping, Union

__all__ = ["Buffer", "ZipFormatError", "Entry", "Archive", "MAX_BYTES", "write", "parse", "first_difference", "starts_like"]

# What the readers take: the whole file, in memory or memory-mapped (slicing an
# mmap copies only the slice, so large members are read once, when asked for).
Buffer = Union[bytes, memoryview, mmap.mmap]

_LOCAL_SIG = b"PK\x03\x04"
_CENTRAL_SIG = b"PK\x01\x02"
_END_SIG = b"PK\x05\x06"
_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # 30 bytes
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # 46 bytes
_END = struct.Struct("<4sHHHHIIH")  # 22 bytes
_VERSION = 20  # 2.0: stored members, no zip64
_MADE_BY = (3 << 8) | _VERSION  # "Unix" so that the mode below is honoured by unzip
_DOS_DATE = (1 << 5) | 1  # 1980-01-01, the earliest date zip can express; time 00:00
_EXTERNAL_ATTR = 0o100644 << 16  # regular file, rw-r--r--
MAX_BYTES = 0xFFFFFFFF - 1  # sizes and offsets must fit the 32-bit fields


class ZipFormatError(Exception):
    """The bytes are not a zip archive this module can read (message says where)."""


@dataclass(frozen=True)
class Entry:
    """One member as the central directory describes it."""

    name: str
    offset: int  # of the local header
    size: int
    crc: int


@dataclass(frozen=True)
class Archive:
    """The parsed central directory and end record of a zip file."""

    entries: tuple[Entry, ...]
    comment: bytes

    def data(self, buf: Buffer, entry: Entry) -> bytes | memoryview:
        """Return ``entry``'s stored bytes, located through its local header."""
        end = entry.offset + _LOCAL.size
        if end > len(buf):
            raise ZipFormatError(f"local header of {entry.name!r} lies past the end of the file")
        fields = _LOCAL.unpack(buf[entry.offset : end])
        if fields[0] != _LOCAL_SIG:
            raise ZipFormatError(f"no local header signature for {entry.name!r} at byte {entry.offset}")
        start = end + fields[9] + fields[10]
        if start + entry.size > len(buf):
            raise ZipFormatError(f"data of {entry.name!r} runs past the end of the file")
        return buf[start : start + entry.size]


def _layout(members: Mapping[str, tuple[int, int]], comment: bytes) -> list[tuple[bytes, int]]:
    """The canonical structural chunks, as ``(bytes, data_size_after)`` in file order.

    ``members`` maps name -> (size, crc).  Each local header is followed by that
    member's data; the central directory and end record close the file.
    """
    chunks: list[tuple[bytes, int]] = []
    central = bytearray()
    offset = 0
    for name in sorted(members):
        size, crc = members[name]
        raw = name.encode("ascii")
        header = _LOCAL.pack(_LOCAL_SIG, _VERSION, 0, 0, 0, _DOS_DATE, crc, size, size, len(raw), 0) + raw
        central += _CENTRAL.pack(
            _CENTRAL_SIG, _MADE_BY, _VERSION, 0, 0, 0, _DOS_DATE, crc, size, size,
            len(raw), 0, 0, 0, 0, _EXTERNAL_ATTR, offset,
        ) + raw
        chunks.append((header, size))
        offset += len(header) + size
    n = len(members)
    end = _END.pack(_END_SIG, 0, 0, n, n, len(central), offset, len(comment)) + comment
    chunks.append((bytes(central) + end, 0))
    return chunks


def write(out: BinaryIO, members: Mapping[str, bytes], comment: bytes) -> int:
    """Write the canonical archive of ``members`` to ``out``; return its size.

    Raises ``ValueError`` (before writing anything) for a non-ASCII name, more
    than 65535 members, or an archive of 4 GiB or more.
    """
    for name in members:
        if not name or not name.isascii():
            raise ValueError(f"member name {name!r} must be non-empty ASCII")
    if len(members) > 0xFFFF or len(comment) > 0xFFFF:
        raise ValueError("too many members or too long a comment for a zip without zip64")
    sizes = {name: (len(data), zlib.crc32(data)) for name, data in members.items()}
    chunks = _layout(sizes, comment)
    total = sum(len(c) + s for c, s in chunks)
    if total > MAX_BYTES:
        raise ValueError(f"the archive would be {total} bytes; artifacts of 4 GiB or more are not supported")
    for (header, _), name in zip(chunks, sorted(members)):
        out.write(header)
        out.write(members[name])
    out.write(chunks[-1][0])
    return total


def starts_like(buf: Buffer, first_name: str) -> bool:
    """Whether ``buf`` begins as a canonical archive whose first member is ``first_name``.

    Compares the bytes that do not depend on the member's content (signature,
    versions, flags, date; name length and name), as far as ``buf`` goes, so a
    truncated artifact is still recognised as one.
    """
    raw = first_name.encode("ascii")
    model = _LOCAL.pack(_LOCAL_SIG, _VERSION, 0, 0, 0, _DOS_DATE, 0, 0, 0, len(raw), 0) + raw
    constant = [*range(0, 14), *range(26, len(model))]  # skips CRC and sizes
    return len(buf) >= 4 and all(buf[i] == model[i] for i in constant if i < len(buf))


def parse(buf: Buffer) -> Archive:
    """Read the end record and central directory of ``buf`` (bounds-checked).

    This accepts any well-formed stored or deflated zip without zip64, so that
    a member added or replaced by another tool is reported by name; whether the
    layout is canonical is :func:`first_difference`'s question.
    """
    n = len(buf)
    # The end record sits within the last 22 + 65535 bytes (its comment's maximum).
    tail = bytes(buf[max(0, n - _END.size - 0xFFFF) :])
    pos = tail.rfind(_END_SIG)
    # A candidate signature too close to the end for a whole record (bytes appended after
    # the archive can hold one) is not the end record: look further back.
    while pos >= 0 and (pos + _END.size > len(tail)
                        or pos + _END.size + _END.unpack(tail[pos : pos + _END.size])[7] != len(tail)):
        pos = tail.rfind(_END_SIG, 0, pos)
    if pos < 0:
        raise ZipFormatError(f"no zip end record in the last bytes of a {n}-byte file (truncated?)")
    _, disk, cd_disk, count, total, cd_size, cd_offset, clen = _END.unpack(tail[pos : pos + _END.size])
    comment = tail[pos + _END.size : pos + _END.size + clen]
    if disk or cd_disk or count != total:
        raise ZipFormatError("multi-disk zip archives are not artifacts")
    if cd_offset + cd_size > n - len(tail) + pos:
        raise ZipFormatError("the central directory lies past the end record (truncated or corrupt)")
    entries = []
    at = cd_offset
    for _ in range(count):
        if at + _CENTRAL.size > cd_offset + cd_size:
            raise ZipFormatError(f"central directory entry at byte {at} runs past the directory")
        f = _CENTRAL.unpack(buf[at : at + _CENTRAL.size])
        if f[0] != _CENTRAL_SIG:
            raise ZipFormatError(f"no central directory signature at byte {at}")
        name_len, extra_len, comment_len = f[10], f[11], f[12]
        raw = bytes(buf[at + _CENTRAL.size : at + _CENTRAL.size + name_len])
        try:
            name = raw.decode("ascii")
        except UnicodeDecodeError:
            name = raw.decode("latin-1")
        if f[4] != 0 or f[8] != f[9]:
            raise ZipFormatError(f"member {name!r} is compressed; artifact members are stored")
        entries.append(Entry(name=name, offset=f[16], size=f[9], crc=f[7]))
        at += _CENTRAL.size + name_len + extra_len + comment_len
    return Archive(entries=tuple(entries), comment=comment)


def first_difference(buf: Buffer, archive: Archive, crcs: Mapping[str, int]) -> tuple[int, str] | None:
    """Compare ``buf`` with the canonical layout of ``archive``'s members.

    ``crcs`` maps each member to the CRC-32 of its data, computed by a caller
    that has read every member (so the data is not read a second time).  The
    layout fixes every offset, so once the headers agree with it, that data
    was read from where the canonical layout puts it.  Returns ``None`` when
    every byte outside member data agrees, else ``(offset, where)`` for the
    first differing byte.
    """
    names = sorted(e.name for e in archive.entries)
    sizes = {e.name: e.size for e in archive.entries}
    if any(not n.isascii() for n in names) or len(set(names)) != len(names) or set(crcs) != set(names):
        return 0, "member names (duplicate, non-ASCII, or not all read)"
    chunks = _layout({n: (sizes[n], crcs[n]) for n in names}, archive.comment)
    offset = 0
    for i, (chunk, data_size) in enumerate(chunks):
        got = buf[offset : offset + len(chunk)]
        if got != chunk:
            j = next((k for k in range(min(len(got), len(chunk))) if got[k] != chunk[k]), min(len(got), len(chunk)))
            where = f"local header of {names[i]!r}" if i < len(names) else "central directory or end record"
            return offset + j, where
        offset += len(chunk) + data_size
    if offset != len(buf):
        return min(offset, len(buf)), "file length (bytes after the end record or missing)"
    return None
