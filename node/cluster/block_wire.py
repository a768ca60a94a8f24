"""The block request between nodes, as both sides write and read it (HTTP/1.1).

GET /v1/block?url=...&version=...&size=...&etag=...&block_size=...&fill=1&forwarded=1
Range: bytes=START-END         one block: START is a multiple of block_size
Authorization: Bearer <cluster token>

206, Content-Range, cachefs-checksum: <xxh3-64 of the block, 16 hex digits>
an error: its status, cachefs-error: <exception class>, the message as the body
"""

from __future__ import annotations

from urllib.parse import urlencode

PATH = "/v1/block"
CHECKSUM_HEADER = "cachefs-checksum"


def block_query(
    url: str, version: str, size: int, etag: str, block_size: int, fill: bool, forwarded: bool
) -> str:
    """The query string naming one object version, cut in ``block_size`` blocks."""
    return urlencode(
        {
            "url": url,
            "version": version,
            "size": size,
            "etag": etag,
            "block_size": block_size,
            "fill": "1" if fill else "0",
            "forwarded": "1" if forwarded else "0",
        }
    )
