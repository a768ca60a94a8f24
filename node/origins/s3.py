"""S3 origins: metadata through s3fs, bytes through presigned ranged GETs.

s3fs honours the standard AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION) and the storage options configured per prefix.
Each ranged GET carries ``If-Match: <ETag>``, so an object overwritten mid-read
fails with 412 instead of mixing versions. The data path streams each block
to its sink. Presigned URLs carry signatures: they never leave this
module, and messages name the canonical ``s3://`` URL only.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from node.origins.generic import FsspecBackend
from node.origins.ranged_http import RangedHTTPClient
from node.origins.ref import ObjectRef
from node.sinks import Sink
from node.urls import OriginURL

PRESIGN_SECONDS = 3600
PRESIGN_REUSE_SECONDS = 1800


class S3Backend(FsspecBackend):
    def __init__(self, options: dict[str, Any], client: RangedHTTPClient) -> None:
        # Presign with SigV4: SigV2 URLs are refused by most S3 implementations now.
        # Retries are cachefs's (retry: in the config), so botocore makes one attempt.
        config_kwargs = {
            "signature_version": "s3v4",
            "retries": {"total_max_attempts": 1, "mode": "standard"},
            **(options.get("config_kwargs") or {}),
        }
        # A private instance: its settings must not leak into s3fs users in-process.
        super().__init__(
            "s3", {**options, "config_kwargs": config_kwargs, "skip_instance_cache": True}
        )
        self.fs.retries = 1  # s3fs's own retry loop, likewise
        self._client = client
        self._signed: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def _ref(self, url: OriginURL, info: dict[str, Any]) -> ObjectRef:
        etag = info.get("ETag") or info.get("etag")
        version = f"etag:{etag}" if etag else f"size:{info.get('size')}:{info.get('LastModified')}"
        return ObjectRef(url=url, version=version, size=int(info["size"] or 0), etag=etag)

    def _presigned(self, path: str) -> str:
        now = time.monotonic()
        with self._lock:
            cached = self._signed.get(path)
            if cached and now - cached[0] < PRESIGN_REUSE_SECONDS:
                return cached[1]
        signed = self.fs.sign(path, expiration=PRESIGN_SECONDS)
        with self._lock:
            self._signed[path] = (now, signed)
        return signed

    def read(self, ref: ObjectRef, start: int, end: int, sink: Sink) -> None:
        if ref.etag is None:
            super().read(ref, start, end, sink)
            return
        self._client.get_range(
            self._presigned(ref.url.path),
            start,
            end,
            sink,
            label=ref.canonical,
            headers={"If-Match": ref.etag},
            pinned=ref.version,
        )
