"""Every complete object is checked against its origin's own digest before it is handed out.

Real origins: moto's S3 server (objects put with each checksum algorithm, and
multipart uploads) and the range server (Repr-Digest, a hub's X-Linked-Etag behind
a redirect, a wrong digest). The cache is damaged as a bad disk or a hostile process
would damage it, with the block's xxh3 recomputed in the meta file so that only the
digest of the whole object can see it; the origin's GETs are counted to prove where
the reader's bytes came from.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash
from servers import RangeHTTPServer, S3Bucket, wait_for

from cachefs.client import NodeClient
from cachefs.errors import IntegrityError
from cachefs.node.config import load_config
from cachefs.node.engine import Engine
from cachefs.node.store import CachedObject
from cachefs.node.views import Views

KIB = 1024
BLOCK = 16 * KIB  # the make_engine fixture's block size
DATA = os.urandom(6 * BLOCK + 321)  # 7 blocks, the last one short
BLOCKS = 7
PATH = "/models/weights.bin"
LOOPBACK = ["127.0.0.0/8"]


def put_s3(s3: S3Bucket, key: str, data: bytes, algorithm: str | None) -> None:
    """An S3 object whose upload states a checksum (botocore's default when None)."""
    extra = {"ChecksumAlgorithm": algorithm} if algorithm else {}
    s3.server.client.put_object(Bucket=s3.name, Key=key, Body=data, **extra)


def stored(engine: Engine, url: str) -> CachedObject:
    obj = engine.store.get(engine.stat(url).id)
    assert obj is not None
    return obj


def every_block_once(gets: list, size: int = len(DATA), block: int = BLOCK) -> bool:
    expected = [(i, min(i + block, size) - 1) for i in range(0, size, block)]
    return sorted(gets) == expected


def corrupt_behind_its_checksum(directory: Path, index: int) -> None:
    """Flip a byte of block ``index`` of the object in ``directory`` and record the xxh3
    of the wrong bytes, so the block passes its own check: only the digest can tell."""
    meta = (directory / "meta").read_bytes().split(b"\n")
    header = json.loads(meta[0])
    start = index * header["block_size"]
    end = min(start + header["block_size"], header["size"])
    with open(directory / "data", "r+b") as data:
        data.seek(start)
        block = bytearray(data.read(end - start))
        block[7] ^= 0x5A
        data.seek(start)
        data.write(block)
    record = f"b {index} {xxhash.xxh3_64_intdigest(block):016x}".encode()
    meta = [record if line.startswith(f"b {index} ".encode()) else line for line in meta]
    (directory / "meta").write_bytes(b"\n".join(meta))


# -- S3 checksums ---------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["SHA256", "SHA1", "CRC32", "CRC32C", "CRC64NVME"])
def test_s3_checksums_are_verified_once_and_recorded(
    s3: S3Bucket, make_engine: Callable[..., Engine], algorithm: str
) -> None:
    """An object put with a checksum is checked against it, and a restart trusts the
    record: it reads no byte again to say so."""
    put_s3(s3, "m.bin", DATA, algorithm)
    engine = make_engine()
    engine.prefetch([s3.url("m.bin")])
    obj = stored(engine, s3.url("m.bin"))
    assert obj.verification == algorithm.lower()
    meta = obj.meta_path.read_text().splitlines()
    assert json.loads(meta[0])["digest"]["algorithm"] == algorithm.lower()
    assert meta[-1].startswith(f"v {algorithm.lower()} ")

    restarted = make_engine()
    again = restarted.store.get(obj.id)
    assert again is not None and again.verification == algorithm.lower()
    assert again.verified == set()  # recorded, not recomputed: no block was read
    s3.reset_requests()
    assert Path(restarted.open_local(s3.url("m.bin"))).read_bytes() == DATA
    assert s3.gets("m.bin") == []


def test_a_plain_put_gets_crc32_and_a_prefix_is_verified_too(
    s3: S3Bucket, make_engine: Callable[..., Engine]
) -> None:
    """botocore sends a CRC32 with a plain put; the objects of a listed prefix (whose
    listing names no checksum) are HEADed for theirs."""
    put_s3(s3, "p/a.bin", DATA, None)
    put_s3(s3, "p/b.bin", DATA[:1000], "SHA256")
    engine = make_engine()
    engine.prefetch([s3.url("p/")])
    assert stored(engine, s3.url("p/a.bin")).verification == "crc32"
    assert stored(engine, s3.url("p/b.bin")).verification == "sha256"


def _multipart(s3: S3Bucket, key: str, parts: list[bytes], algorithm: str, kind: str) -> None:
    client = s3.server.client
    upload = client.create_multipart_upload(
        Bucket=s3.name, Key=key, ChecksumAlgorithm=algorithm, ChecksumType=kind
    )
    done = []
    for number, body in enumerate(parts, 1):
        answer = client.upload_part(
            Bucket=s3.name,
            Key=key,
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=body,
            ChecksumAlgorithm=algorithm,
        )
        done.append(
            {
                "PartNumber": number,
                "ETag": answer["ETag"],
                f"Checksum{algorithm}": answer[f"Checksum{algorithm}"],
            }
        )
    client.complete_multipart_upload(
        Bucket=s3.name,
        Key=key,
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": done},
        ChecksumType=kind,
    )


def test_multipart_checksums_full_object_verified_composite_unverifiable(
    s3: S3Bucket, make_engine: Callable[..., Engine]
) -> None:
    """A multipart upload's FULL_OBJECT CRC is the object's: verified. A COMPOSITE one
    is a checksum of the parts' checksums, which needs the part boundaries: it is
    shown as unverifiable, and the object is served on its blocks' checksums."""
    parts = [os.urandom(5 * 1024 * KIB), os.urandom(3000)]  # S3's smallest part, a tail
    _multipart(s3, "full.bin", parts, "CRC64NVME", "FULL_OBJECT")
    _multipart(s3, "composite.bin", parts, "CRC32", "COMPOSITE")
    engine = make_engine(block_size="1MiB")  # moto copies the object for every GET
    for key, expected in (("full.bin", "crc64nvme"), ("composite.bin", "unverifiable")):
        assert Path(engine.open_local(s3.url(key))).read_bytes() == b"".join(parts)
        assert stored(engine, s3.url(key)).verification == expected


# -- damage only the digest can see -----------------------------------------------------


@pytest.mark.parametrize("algorithm", ["SHA256", "CRC64NVME"])  # one pass; combined CRCs
def test_corruption_behind_a_recomputed_checksum_is_caught_at_open_local(
    s3: S3Bucket, make_engine: Callable[..., Engine], algorithm: str
) -> None:
    """A block changed on disk with its xxh3 recomputed passes the block check; the
    origin's digest catches it, and the reader gets the origin's bytes."""
    put_s3(s3, "m.bin", DATA, algorithm)
    engine = make_engine()
    engine.prefetch([s3.url("m.bin")])
    corrupt_behind_its_checksum(stored(engine, s3.url("m.bin")).directory, 2)
    s3.reset_requests()

    restarted = make_engine()
    assert Path(restarted.open_local(s3.url("m.bin"))).read_bytes() == DATA
    assert every_block_once(s3.gets("m.bin"))  # the whole copy, once, from the origin
    assert stored(restarted, s3.url("m.bin")).verification == algorithm.lower()
    s3.reset_requests()
    assert Path(make_engine().open_local(s3.url("m.bin"))).read_bytes() == DATA
    assert s3.gets("m.bin") == []


def test_a_view_links_only_a_copy_that_matched_the_digest(
    s3: S3Bucket, make_engine: Callable[..., Engine]
) -> None:
    """A view (what a CSI volume mounts) is built after the holder's prefetch, whose
    end checks each object: a damaged copy is fetched again before it is linked."""
    put_s3(s3, "model/w.bin", DATA, "CRC32")
    make_engine().prefetch([s3.url("model/")])
    first = make_engine()
    corrupt_behind_its_checksum(stored(first, s3.url("model/w.bin")).directory, 4)
    s3.reset_requests()
    view = Views(make_engine()).build("csi:vol-1", [s3.url("model/")])
    assert (view.path / "w.bin").read_bytes() == DATA
    assert every_block_once(s3.gets("model/w.bin"))


def test_corruption_of_an_incomplete_object_is_caught_when_it_completes(
    s3: S3Bucket, make_engine: Callable[..., Engine]
) -> None:
    """Damage to the blocks of a partly cached object shows when the object is whole."""
    put_s3(s3, "m.bin", DATA, "CRC32C")
    engine = make_engine()
    assert engine.read(s3.url("m.bin"), 0, 3 * BLOCK) == DATA[: 3 * BLOCK]
    obj = stored(engine, s3.url("m.bin"))
    assert not obj.complete and obj.verification == "pending"
    corrupt_behind_its_checksum(obj.directory, 1)
    s3.reset_requests()

    restarted = make_engine(readahead_blocks=0)
    assert Path(restarted.open_local(s3.url("m.bin"))).read_bytes() == DATA
    gets = s3.gets("m.bin")
    assert len(gets) == BLOCKS + BLOCKS - 3  # the missing blocks, then the whole again
    assert stored(restarted, s3.url("m.bin")).verification == "crc32c"


def test_the_data_file_a_stat_hands_out_is_checked_first(
    s3: S3Bucket, start_node: Callable[..., Any], tmp_path: Path
) -> None:
    """A node's Stat hands out a complete object's file only once it matched the digest:
    a copy completed by reads and damaged behind its checksum is dropped, and the
    client's open_local gets the origin's bytes (fetched again once)."""
    put_s3(s3, "m.bin", DATA, "SHA256")
    node = start_node(tmp_path / "cache", tcp=False, metrics=False)
    client = NodeClient(node.unix_endpoint)
    assert client.read(client.stat(s3.url("m.bin")), 0, len(DATA)) == DATA  # block by block
    assert [e.verified for e in client.cached()] == ["pending"]
    directory = next((tmp_path / "cache").rglob("meta")).parent
    block = json.loads((directory / "meta").read_text().splitlines()[0])["block_size"]
    corrupt_behind_its_checksum(directory, len(DATA) // block)  # the last block
    s3.reset_requests()
    info = client.stat(s3.url("m.bin"))
    assert not info.complete and not info.local_path  # dropped, not handed out
    assert Path(client.open_local(s3.url("m.bin"))).read_bytes() == DATA
    assert every_block_once(s3.gets("m.bin"), block=block)
    assert [e.verified for e in client.cached()] == ["sha256"]
    # The node's log is read by a thread of its own: poll for the line.
    wait_for(lambda: any("does not match the origin's sha256" in line for line in node.lines))


# -- HTTP -------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha-256", "sha-512"])
def test_http_repr_digest_is_verified(
    http_origin: RangeHTTPServer, make_engine: Callable[..., Engine], algorithm: str
) -> None:
    http_origin.repr_digest = algorithm
    http_origin.put(PATH, DATA)
    engine = make_engine()
    assert Path(engine.open_local(http_origin.url(PATH))).read_bytes() == DATA
    assert stored(engine, http_origin.url(PATH)).verification == algorithm.replace("-", "")


def test_an_origin_without_a_digest_is_served_on_block_checksums(
    http_origin: RangeHTTPServer, make_engine: Callable[..., Engine]
) -> None:
    http_origin.put(PATH, DATA)
    engine = make_engine()
    assert Path(engine.open_local(http_origin.url(PATH))).read_bytes() == DATA
    assert stored(engine, http_origin.url(PATH)).verification == "blocks"


def test_an_object_cached_before_its_digest_was_known_learns_it(
    http_origin: RangeHTTPServer, make_engine: Callable[..., Engine]
) -> None:
    """A meta file without a digest (an older cache, or an object a peer asked for)
    still loads; the next stat gives it the digest, checked from the disk, no GET."""
    http_origin.put(PATH, DATA)
    make_engine().prefetch([http_origin.url(PATH)])
    http_origin.repr_digest = "sha-256"  # same bytes, same ETag: the same version
    http_origin.reset_requests()
    engine = make_engine()
    obj = engine.store.get(engine.stat(http_origin.url(PATH)).id)
    assert obj is not None and obj.verification == "pending"
    assert Path(engine.open_local(http_origin.url(PATH))).read_bytes() == DATA
    assert http_origin.gets(PATH) == [] and obj.verification == "sha256"
    assert json.loads(obj.meta_path.read_text().splitlines()[0])["digest"]["algorithm"] == (
        "sha256"
    )
    assert make_engine().store.get(obj.id).verification == "sha256"  # type: ignore[union-attr]


def test_a_wrong_digest_fails_after_exactly_one_refetch(
    http_origin: RangeHTTPServer, make_engine: Callable[..., Engine]
) -> None:
    """The origin's digest does not match its bytes: fetched twice, then an error that
    names the URL, the algorithm, both digests and what to do; nothing handed out."""
    http_origin.put(PATH, DATA)
    claimed = hashlib.sha256(b"other bytes").digest()
    wrong = f"sha-256=:{base64.b64encode(claimed).decode()}:"
    http_origin.set_headers(PATH, {"Repr-Digest": wrong})
    engine = make_engine()
    url = http_origin.url(PATH)
    with pytest.raises(IntegrityError) as raised:
        engine.open_local(url)
    message = str(raised.value)
    for fragment in (url, "sha256", claimed.hex(), hashlib.sha256(DATA).hexdigest(), "origin"):
        assert fragment in message
    gets = http_origin.gets(PATH)
    assert len(gets) == 2 * BLOCKS and every_block_once(sorted(set(gets)))
    assert not stored(engine, url).present  # the copy that failed is not kept


# -- a model hub: X-Linked-Etag on the redirect to its CDN ---------------------------


class HubFront:
    """A front server that redirects each request to ``target`` + path, naming the
    file's sha256 in X-Linked-Etag as the Hugging Face hub does for LFS files."""

    def __init__(self, target: str, sha256: str) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _redirect(self) -> None:
                self.send_response(302)
                self.send_header("Location", target + self.path)
                self.send_header("X-Linked-Etag", f'"{sha256}"')
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD = _redirect

            def log_message(self, format: str, *args: object) -> None:
                """Quiet."""

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def hub(http_origin: RangeHTTPServer) -> Iterator[Callable[[str], HubFront]]:
    fronts: list[HubFront] = []

    def make(sha256: str) -> HubFront:
        fronts.append(HubFront(http_origin.base_url, sha256))
        return fronts[-1]

    yield make
    for front in fronts:
        front.close()


def test_a_hubs_linked_etag_is_the_sha256(
    http_origin: RangeHTTPServer, hub: Callable[[str], HubFront], cache_dir: Path
) -> None:
    http_origin.put(PATH, DATA)
    right = hub(hashlib.sha256(DATA).hexdigest())
    wrong = hub(hashlib.sha256(b"other bytes").hexdigest())
    settings = {"cache_dir": str(cache_dir), "block_size": BLOCK}
    engine = Engine(load_config(overrides={**settings, "allow_redirects_to": LOOPBACK}, environ={}))
    try:
        assert Path(engine.open_local(right.url(PATH))).read_bytes() == DATA
        assert stored(engine, right.url(PATH)).verification == "sha256"
        with pytest.raises(IntegrityError, match="sha256"):
            engine.open_local(wrong.url(PATH))
    finally:
        engine.close()


# -- what users see -----------------------------------------------------------------------


def test_ls_shows_what_each_object_was_checked_against(
    s3: S3Bucket, http_origin: RangeHTTPServer, cache_dir: Path, tmp_path: Path
) -> None:
    """``cachefs ls --json`` names what each object was checked against; the human
    listing says it where the origin has a digest."""
    put_s3(s3, "m.bin", DATA, "SHA256")
    http_origin.put(PATH, DATA)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEFS_")}
    env.update(HOME=str(tmp_path), CACHEFS_BLOCK_SIZE="16KiB")

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "cachefs.cli", "--cache-dir", str(cache_dir), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    cli("prefetch", s3.url("m.bin"), http_origin.url(PATH))
    listed = {e["url"]: e["verified"] for e in map(json.loads, cli("ls", "--json").splitlines())}
    assert listed == {s3.url("m.bin"): "sha256", http_origin.url(PATH): "blocks"}
    human = cli("ls").splitlines()
    assert any(line.startswith(s3.url("m.bin")) and "verified: sha256" in line for line in human)
