"""S3 origins: HEAD and presigning through botocore, bytes through presigned GETs.

botocore honours the standard AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION, web identity, instance profiles) and takes the
storage options configured per prefix, in s3fs's spelling (``key``, ``secret``,
``token``, ``anon``, ``profile``, ``endpoint_url``, ``client_kwargs``,
``config_kwargs``). A plain botocore client starts in a fraction of the time s3fs
and aiobotocore take to import, which a one-shot ``cachefs prefetch`` pays;
s3fs is loaded only to list a prefix (each object listed is then HEADed, for its
checksum: see ``digests.py``). Each ranged GET carries
``If-Match: <ETag>``, so an object overwritten mid-read fails with 412 instead of
mixing versions. Presigned URLs carry signatures: they never leave this module,
and messages name the canonical ``s3://`` URL only.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from cachefs.errors import TransientOriginError
from cachefs.node.origins.digests import s3_digest
from cachefs.node.origins.errors import error_for_status, missing_credentials, origin_error
from cachefs.node.origins.ranged_http import RangedHTTPClient
from cachefs.node.origins.ref import ObjectRef
from cachefs.node.sinks import Sink
from cachefs.urls import OriginURL

PRESIGN_SECONDS = 3600
HEADS_IN_FLIGHT = 16  # a listed prefix's objects are HEADed this many at a time
PRESIGN_REUSE_SECONDS = 1800
_CLIENT_KWARGS = ("endpoint_url", "region_name", "verify", "use_ssl")
T = TypeVar("T")


class S3Backend:
    def __init__(self, options: dict[str, Any], client: RangedHTTPClient) -> None:
        self._options = dict(options)
        self._http = client
        self._clients: dict[str | None, Any] = {}  # per region; None: the configured one
        self._bucket_regions: dict[str, str] = {}
        self._signed: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()
        self._listing: Any = None

    # -- botocore ----------------------------------------------------------------

    def _client(self, bucket: str) -> Any:
        region = self._bucket_regions.get(bucket)
        with self._lock:
            made = self._clients.get(region)
            if made is None:
                made = self._clients[region] = self._make_client(region)
            return made

    def _make_client(self, region: str | None) -> Any:
        import botocore.session
        from botocore import UNSIGNED
        from botocore.config import Config

        options = self._options
        session = botocore.session.Session(profile=options.get("profile"))
        config = {
            # SigV4 (SigV2 URLs are refused by most S3 implementations now); one
            # attempt per call: retries are cachefs's (retry: in the config).
            "signature_version": UNSIGNED if options.get("anon") else "s3v4",
            "retries": {"total_max_attempts": 1, "mode": "standard"},
            **(options.get("config_kwargs") or {}),
        }
        kwargs = {
            k: v for k, v in (options.get("client_kwargs") or {}).items() if k in _CLIENT_KWARGS
        }
        if options.get("endpoint_url"):
            kwargs["endpoint_url"] = options["endpoint_url"]
        if region is not None:
            kwargs["region_name"] = region
        return session.create_client(
            "s3",
            aws_access_key_id=options.get("key"),
            aws_secret_access_key=options.get("secret"),
            aws_session_token=options.get("token"),
            config=Config(**config),
            **kwargs,
        )

    def _call(self, url: OriginURL, bucket: str, method: str, **params: Any) -> Any:
        """One botocore call; a bucket in another region is asked again there."""
        from botocore.exceptions import BotoCoreError, ClientError

        for _attempt in range(2):
            try:
                return getattr(self._client(bucket), method)(Bucket=bucket, **params)
            except ClientError as exc:
                headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
                region = headers.get("x-amz-bucket-region")
                if region and self._bucket_regions.get(bucket) != region:
                    self._bucket_regions[bucket] = region
                    continue
                raise answer_error(exc, url) from None
            except BotoCoreError as exc:
                raise sdk_error(exc, url) from exc
        raise AssertionError("unreachable")

    # -- the backend ---------------------------------------------------------------

    def stat(self, url: OriginURL) -> ObjectRef:
        bucket, key = _split(url)
        if not key:
            raise IsADirectoryError(errno.EISDIR, f"{url} is a bucket; name an object in it")
        try:
            # ChecksumMode: the answer carries the object's full checksum, if it has one.
            head = self._call(url, bucket, "head_object", Key=key, ChecksumMode="ENABLED")
        except FileNotFoundError:
            listing = self._call(
                url, bucket, "list_objects_v2", Prefix=key.rstrip("/") + "/", MaxKeys=1
            )
            if listing.get("KeyCount"):
                raise IsADirectoryError(
                    errno.EISDIR, f"{url} is a directory; name an object in it"
                ) from None
            raise
        headers = head.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        if headers.get("x-amz-bucket-region"):  # presign for the bucket's own region
            self._bucket_regions.setdefault(bucket, headers["x-amz-bucket-region"])
        etag = quoted_etag(head.get("ETag"))
        size = int(head.get("ContentLength") or 0)
        version = f"etag:{etag}" if etag else f"size:{size}:{head.get('LastModified')}"
        return ObjectRef(url=url, version=version, size=size, etag=etag, digest=s3_digest(head))

    def list(self, url: OriginURL) -> list[ObjectRef]:
        """Every object under ``url``, as a HEAD of each states it: a listing names no
        checksum values, and the HEAD's is the object's digest. A missing bucket is an
        error here (FileNotFoundError naming it), not an empty listing."""
        fs = self._lister().fs
        found = _listing(url, lambda: fs.find(url.path, detail=True))
        listed = [
            url.child(path)
            for path, info in sorted(found.items())
            if info.get("type", "file") == "file"
        ]
        with ThreadPoolExecutor(max(1, min(HEADS_IN_FLIGHT, len(listed)))) as pool:
            return [ref for ref in pool.map(self._stat_listed, listed) if ref is not None]

    def _stat_listed(self, url: OriginURL) -> ObjectRef | None:
        try:
            return self.stat(url)
        except (FileNotFoundError, IsADirectoryError):
            return None  # deleted since it was listed

    def ls(self, url: OriginURL) -> list[dict[str, Any]]:
        lister = self._lister()
        return _listing(url, lambda: lister.ls(url))

    def _lister(self) -> Any:
        """s3fs, for listings only (its ETags match HEAD's, so versions agree)."""
        from cachefs.node.origins.generic import FsspecBackend

        with self._lock:
            if self._listing is None:
                options = {
                    **self._options,
                    "config_kwargs": {
                        "retries": {"total_max_attempts": 1, "mode": "standard"},
                        **(self._options.get("config_kwargs") or {}),
                    },
                    "skip_instance_cache": True,  # its settings must not leak in-process
                }
                self._listing = FsspecBackend("s3", options)
                self._listing.fs.retries = 1  # s3fs's own retry loop: cachefs retries
            return self._listing

    def _presigned(self, url: OriginURL) -> str:
        now = time.monotonic()
        with self._lock:
            cached = self._signed.get(url.path)
            if cached and now - cached[0] < PRESIGN_REUSE_SECONDS:
                return cached[1]
        from botocore.exceptions import BotoCoreError

        bucket, key = _split(url)
        try:
            signed = self._client(bucket).generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=PRESIGN_SECONDS
            )
        except BotoCoreError as exc:
            raise sdk_error(exc, url) from exc
        with self._lock:
            self._signed[url.path] = (now, signed)
        return signed

    def read(self, ref: ObjectRef, start: int, end: int, sink: Sink) -> None:
        headers = {"If-Match": ref.etag} if ref.etag else {}
        self._http.get_range(
            self._presigned(ref.url),
            start,
            end,
            sink,
            label=ref.canonical,
            headers=headers,
            pinned=ref.version,
        )


def answer_error(exc: Any, url: OriginURL) -> Exception:
    """An S3 answer (a botocore ``ClientError``) through the one table (errors.py)."""
    response = exc.response
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    code = str(response.get("Error", {}).get("Code", ""))
    body = f"<Code>{code}</Code>".encode() if code.isalpha() else b""
    return error_for_status(status or 500, url.canonical, body, headers=headers)


def sdk_error(exc: Exception, url: OriginURL) -> Exception:
    """A failure before any answer: credentials that are missing are final (a retry
    cannot find them; the message says where they go), the rest (connection refused,
    timeouts) transient. The SDK's own text stays in the cause, not the message."""
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError, ProfileNotFound

    kwargs = getattr(exc, "kwargs", {})
    if isinstance(exc, NoCredentialsError):
        return missing_credentials(url.canonical)
    if isinstance(exc, PartialCredentialsError):
        lacks = f"{kwargs.get('provider', 'a provider')} lacks {kwargs.get('cred_var', 'a part')}"
        return missing_credentials(url.canonical, f"only part of them ({lacks}) were found")
    if isinstance(exc, ProfileNotFound):
        return missing_credentials(
            url.canonical,
            f"the AWS profile {kwargs.get('profile', '')!r} (AWS_PROFILE or the profile "
            "option) is not configured",
        )
    return TransientOriginError(
        f"{url.canonical}: request to the origin failed ({type(exc).__name__})"
    )


def _listing(url: OriginURL, fn: Callable[[], T]) -> T:
    """``fn`` (an s3fs listing) with its errors as the botocore calls' are: s3fs
    raises the SDK's exceptions bare and its answers as builtins with the server's
    text, which name neither the URL nor what to do."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn()
    except Exception as exc:
        answer = exc if isinstance(exc, ClientError) else exc.__cause__
        if isinstance(answer, ClientError):
            raise answer_error(answer, url) from exc
        if isinstance(exc, BotoCoreError):
            raise sdk_error(exc, url) from exc
        if isinstance(exc, OSError):
            raise origin_error(exc, url.canonical) from exc
        raise


def _split(url: OriginURL) -> tuple[str, str]:
    bucket, _, key = url.path.partition("/")
    return bucket, key


def quoted_etag(etag: str | None) -> str | None:
    """An ETag in one spelling, quoted as HEAD answers it.

    Some S3 servers (rclone's) quote it in HEAD answers but not in listings; the
    version must not depend on which one a node asked, or a prefetched object would
    look like another version to every later stat.
    """
    if not etag:
        return None
    etag = etag.strip()
    if etag.startswith('"') or etag.startswith('W/"'):
        return etag
    return f'"{etag}"'
