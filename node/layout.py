"""Where things live under a tier root, and the per-object metadata file.

```
<root>/FORMAT                          {"format": 1}: the cache format this root holds
<root>/v1/objects/<id[:2]>/<id>/data   sparse file, the object's full size
<root>/v1/objects/<id[:2]>/<id>/meta   header line (JSON), then one line per present block,
                                       and a line when the whole object matched its digest
<root>/v1/views/<name>/...             hard links to complete data files (views)
<root>/v1/pins/<hash>.json             the objects one holder pins
<root>/v1/trash/...                    retired object directories, removed on start
```

A root written by another cache format (its ``FORMAT`` file, or a ``v<N>`` directory
of another number) is refused, never read or rewritten: ``check_format``. A root
without ``FORMAT`` but with ``v1`` is format 1, written before the file existed.
The meta file is append-only while an object fills: a block line is written only
after the block's bytes are, so a crash leaves at worst a torn last line, which the
parser ignores. Names on disk are hashes, so no origin key can name a path.

The header may carry the origin's digest of the whole object (``digest``: algorithm
and hex value; meta files written before it existed have none and load as such).
Once the complete object matched it, a ``v <algorithm> <binding>`` line is
appended; the binding is an xxh3 over the block records it vouches for, so a restart
trusts it only while the blocks on record are exactly those that were verified.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import xxhash

FORMAT = 1
PAGE = 4096
DIR_MODE = 0o755
FILE_MODE = 0o644


@dataclass(frozen=True)
class Digest:
    """An origin's own checksum of a whole object: what a complete copy must match.

    ``algorithm`` in lower case (``crc64nvme``, ``sha256``; ``crc32-composite`` for
    a checksum of parts, which cannot be checked against the bytes alone); ``value``
    in lower-case hex of the checksum's bytes (big-endian for CRCs).
    """

    algorithm: str
    value: str


@dataclass(frozen=True)
class ObjectHeader:
    """What identifies an object, how it is cut into blocks, and its origin's digest."""

    id: str
    url: str
    version: str
    size: int
    block_size: int
    digest: Digest | None = None

    @property
    def block_count(self) -> int:
        return -(-self.size // self.block_size)

    def block_span(self, index: int) -> tuple[int, int]:
        """Byte range [start, end) of block ``index``."""
        start = index * self.block_size
        return start, min(start + self.block_size, self.size)

    def footprint(self) -> int:
        """Bytes charged to a tier when the object is complete (pages, plus metadata)."""
        full, last = divmod(self.size, self.block_size)
        return full * round_up(self.block_size) + round_up(last) + PAGE


def round_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


FORMAT_FILE = "FORMAT"


def check_format(root: Path) -> None:
    """Refuse a root another cache format wrote (ValueError says what to do); mark
    this one as ours."""
    marker = root / FORMAT_FILE
    try:
        found: object = json.loads(marker.read_bytes()).get("format")
    except FileNotFoundError:
        numbers = [
            int(p.name[1:])
            for p in root.iterdir()
            if p.is_dir() and p.name[:1] == "v" and p.name[1:].isdigit()
        ]
        found = max(numbers, default=FORMAT)
    except (ValueError, AttributeError):
        found = "unreadable"
    if found != FORMAT:
        raise ValueError(
            f"cache directory {root} holds cache format {found}, and this cachefs reads "
            f"format {FORMAT}: run the cachefs release that wrote it, point the tier at "
            "another directory, or empty this one (cached objects are fetched again)"
        )
    if not marker.exists():
        write_file_atomic(marker, (json.dumps({"format": FORMAT}) + "\n").encode())


def objects_dir(root: Path) -> Path:
    return root / "v1" / "objects"


def object_dir(root: Path, object_id: str) -> Path:
    return objects_dir(root) / object_id[:2] / object_id


def trash_dir(root: Path) -> Path:
    return root / "v1" / "trash"


def pins_dir(root: Path) -> Path:
    return root / "v1" / "pins"


def views_dir(root: Path) -> Path:
    return root / "v1" / "views"


def encode_header(header: ObjectHeader) -> bytes:
    fields = asdict(header)
    if header.digest is None:  # as before digests: older readers still load the file
        del fields["digest"]
    return (json.dumps({"format": FORMAT, **fields}, sort_keys=True) + "\n").encode()


def encode_block(index: int, checksum: int) -> bytes:
    return f"b {index} {checksum:016x}\n".encode()


def encode_verified(algorithm: str, blocks: dict[int, int]) -> bytes:
    """The record that the object made of ``blocks`` matched its ``algorithm`` digest;
    it binds itself to their records by an xxh3 over them."""
    records = b"".join(encode_block(i, c) for i, c in sorted(blocks.items()))
    return f"v {algorithm} {xxhash.xxh3_64_intdigest(records):016x}\n".encode()


def verified_record(raw: bytes, header: ObjectHeader, blocks: dict[int, int]) -> bool:
    """Whether a meta file records that exactly ``blocks`` matched the header's digest."""
    if header.digest is None or len(blocks) != header.block_count:
        return False
    expected = encode_verified(header.digest.algorithm, blocks).rstrip(b"\n")
    return expected in raw.split(b"\n")[1:-1]  # whole lines only: the last may be torn


def parse_meta(raw: bytes) -> tuple[ObjectHeader, dict[int, int]]:
    """Header and recorded blocks of a meta file. Raises ValueError if the header is bad.

    Torn or malformed block lines (a crash mid-append) are skipped: their blocks
    count as missing and are fetched again.
    """
    first, _, rest = raw.partition(b"\n")
    if not _:
        raise ValueError("meta header is incomplete")
    fields = json.loads(first)
    if fields.pop("format", None) != FORMAT:
        raise ValueError("unknown meta format")
    digest = fields.pop("digest", None)
    header = ObjectHeader(**fields, digest=None if digest is None else Digest(**digest))
    blocks: dict[int, int] = {}
    lines = rest.split(b"\n")
    for line in lines[:-1]:  # the last piece has no newline: torn or empty
        parts = line.split(b" ")
        if len(parts) != 3 or parts[0] != b"b" or len(parts[2]) != 16:
            continue
        try:
            index, checksum = int(parts[1]), int(parts[2], 16)
        except ValueError:
            continue
        if 0 <= index < header.block_count:
            blocks[index] = checksum
    return header, blocks


def write_file_atomic(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a temporary name and a rename."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    os.replace(tmp, path)


def make_parents(path: Path) -> None:
    """Create the missing parents of ``path`` 0755, whatever the umask."""
    for parent in reversed(path.parents):
        try:
            parent.mkdir()
        except FileExistsError:
            continue
        os.chmod(parent, DIR_MODE)
