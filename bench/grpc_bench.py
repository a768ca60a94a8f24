"""gRPC Read throughput of a cachefs node, beside a bare grpcio server, raw sockets and files.

    python bench/grpc_bench.py [--size 1GiB] [--runs 3] [--rss-size 4GiB]
                               [--transport tcp unix] [--clients 1 4] [--plot bench/grpc.png]

One run starts a real ``cachefs node`` (TCP with a token, and a unix socket), prefetches
a random object into it from a ``file://`` origin, and starts the baselines: a bare
grpcio server (sync and aio) that serves the same ``cachefs.v1.Cache`` proto from
memory, and a raw socket server that sends the same bytes over plain TCP and unix
sockets. Every reader is a fresh subprocess pinned to the client CPUs (servers to
others) that reads the whole object into a pre-faulted buffer; rows with several
clients start their timed reads together and report the aggregate. gRPC readers on
the node and on the bare servers run the same code (``NodeClient.stat`` and
``NodeClient.readinto``).
The fast path (fsspec ``open``/``cat_file`` through the node with ``local_reads``) is
timed beside reading the node's data file directly. Then the node's RSS is sampled
while one client streams ``--rss-size`` bytes. Every read is checked (xxh3-128) after
the clock stops. See bench/README.md for the columns.

The same file is also the servers and the readers (``_serve``, ``_client``,
``_stream``, ``_prefetch``: internal subcommands).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import secrets
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from origins import make_test_file, pinned
from prefetch_bench import CpuMeter, error_line, parse_size, wait_for_quiet

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
MiB = 1024 * 1024
CHUNK = MiB  # gRPC message size, as NodeClient asks the node for
GRPC_TARGET = 0.9  # cachefs gRPC vs the faster bare grpcio server
LOCAL_TARGET = 0.95  # fast path vs reading the data file directly
FLAT_RSS = 64 * MiB  # RSS growth while streaming above which it is not flat
QUIET_LOAD = 0.6
WARMUP_BYTES = 64 * MiB  # untimed read by each stream reader before its timed read
RSS_INTERVAL = 0.2
READY_TIMEOUT = 60.0
NOISY_LOAD = 0.2
_HEADER = struct.Struct("!QQ")  # raw socket request: offset, length

# --- servers (run as ``grpc_bench.py _serve KIND ...``) ---------------------------


def _load(path: Path) -> bytes:
    """The whole file in memory (what the bare servers stream)."""
    return Path(path).read_bytes()


def _grpc_options() -> list[tuple[str, Any]]:
    # As the node's (node/daemon.py): 4 MiB messages plus overhead.
    return [
        ("grpc.max_receive_message_length", 4 * MiB),
        ("grpc.max_send_message_length", 4 * MiB + 64 * 1024),
    ]


def _ranges(request: Any, size: int) -> Iterator[tuple[int, int]]:
    chunk = request.chunk_size or CHUNK
    end = size if request.length == 0 else min(size, request.offset + request.length)
    for position in range(request.offset, end, chunk):
        yield position, min(position + chunk, end)


def _announce(tcp: str, unix: str) -> None:
    print(json.dumps({"tcp": tcp, "unix": unix}), flush=True)


def serve_grpc_sync(payload: bytes, unix_path: str) -> None:
    """A bare ``grpc.server`` whose Read streams 1 MiB slices of ``payload``."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from cachefs.proto import cachefs_pb2 as pb
    from cachefs.proto import cachefs_pb2_grpc as pb_grpc

    class Bare(pb_grpc.CacheServicer):
        def Stat(self, request: Any, context: Any) -> Any:
            return pb.ObjectInfo(url=request.url, version="bare", size=len(payload), id="bare")

        def Read(self, request: Any, context: Any) -> Iterator[Any]:
            for start, end in _ranges(request, len(payload)):
                yield pb.ReadChunk(data=payload[start:end])

    server = grpc.server(ThreadPoolExecutor(16), options=_grpc_options())
    pb_grpc.add_CacheServicer_to_server(Bare(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.add_insecure_port(f"unix://{unix_path}")
    server.start()
    _announce(f"127.0.0.1:{port}", f"unix://{unix_path}")
    server.wait_for_termination()


def serve_grpc_aio(payload: bytes, unix_path: str) -> None:
    """A bare ``grpc.aio`` server whose Read is an async generator of 1 MiB slices."""
    import asyncio

    import grpc

    from cachefs.proto import cachefs_pb2 as pb
    from cachefs.proto import cachefs_pb2_grpc as pb_grpc

    class Bare(pb_grpc.CacheServicer):
        async def Stat(self, request: Any, context: Any) -> Any:  # type: ignore[override]
            return pb.ObjectInfo(url=request.url, version="bare", size=len(payload), id="bare")

        async def Read(self, request: Any, context: Any) -> Any:  # type: ignore[override]
            for start, end in _ranges(request, len(payload)):
                yield pb.ReadChunk(data=payload[start:end])

    async def main() -> None:
        server = grpc.aio.server(options=_grpc_options())
        pb_grpc.add_CacheServicer_to_server(Bare(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.add_insecure_port(f"unix://{unix_path}")
        await server.start()
        _announce(f"127.0.0.1:{port}", f"unix://{unix_path}")
        await server.wait_for_termination()

    asyncio.run(main())


def serve_socket(payload: bytes, unix_path: str) -> None:
    """Plain sockets: each request (offset, length) is answered by ``sendall`` of the bytes."""
    view = memoryview(payload)

    def handle(conn: socket.socket) -> None:
        with conn:
            while True:
                header = _recv_exact(conn, _HEADER.size)
                if header is None:
                    return
                offset, length = _HEADER.unpack(header)
                conn.sendall(view[offset : offset + length])

    def accept(listener: socket.socket) -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(unix_path)
    unix.listen(16)
    for listener in (tcp, unix):
        threading.Thread(target=accept, args=(listener,), daemon=True).start()
    _announce(f"127.0.0.1:{tcp.getsockname()[1]}", f"unix://{unix_path}")
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        more = conn.recv(n - len(data))
        if not more:
            return None
        data += more
    return data


SERVERS = {"grpc-sync": serve_grpc_sync, "grpc-aio": serve_grpc_aio, "socket": serve_socket}


def serve_main(argv: Sequence[str]) -> int:
    """Load the object, start a server, print its endpoints as JSON, serve until killed."""
    parser = argparse.ArgumentParser(prog="grpc_bench.py _serve")
    parser.add_argument("kind", choices=sorted(SERVERS))
    parser.add_argument("file", type=Path)
    parser.add_argument("unix_path")
    args = parser.parse_args(argv)
    if args.kind == "socket":  # SIGTERM is waited for, not delivered
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    SERVERS[args.kind](_load(args.file), args.unix_path)
    return 0


# --- readers (run as ``grpc_bench.py _client KIND ...``) ---------------------------


def _touch(buf: bytearray) -> None:
    """Fault in every page of ``buf`` (untimed), so that the timed read only copies."""
    page = os.sysconf("SC_PAGE_SIZE")
    buf[::page] = bytes(len(range(0, len(buf), page)))


def _prefault(size: int) -> None:
    """Touch and free ``size`` bytes, so that an allocating read gets recent pages."""
    buf = bytearray(size)
    _touch(buf)
    del buf


def _read_file_into(f: IO[bytes], view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


# Reader kinds, and the methods of _Reader that implement them.
READER_KINDS = {
    "grpc": "grpc",  # NodeClient.readinto: the node and the bare servers alike
    "socket": "socket",
    "direct-readinto": "readinto",
    "fast-open": "readinto",
    "direct-read-bytes": "bytes",
    "fast-cat": "bytes",
}


class _Reader:
    """One reader: ``prepare`` (untimed), then ``read`` (timed); ``data``: what it read."""

    def __init__(self, kind: str, target: str, url: str, size: int) -> None:
        self.kind, self.target, self.url, self.size = kind, target, url, size
        self.buf = bytearray(0)
        self.data: bytes | bytearray = b""
        self.fast: bool | None = None

    # gRPC, on the node and on the bare servers alike.
    def _grpc_prepare(self) -> None:
        from cachefs.client import NodeClient

        self.client = NodeClient(self.target)
        self.info = self.client.stat(self.url)
        if self.info.size != self.size:
            raise SystemExit(f"stat: {self.info.size} bytes, expected {self.size}")
        self.buf = bytearray(self.size)
        _touch(self.buf)
        warm = min(WARMUP_BYTES, self.size)
        self.client.readinto(self.info, 0, memoryview(self.buf)[:warm])

    def _grpc_read(self) -> None:
        self.client.readinto(self.info, 0, memoryview(self.buf))
        self.data = self.buf

    # Raw sockets: one connection, a request header, ``recv_into`` until done.
    def _socket_prepare(self) -> None:
        if self.target.startswith("unix://"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(self.target[len("unix://") :])
        else:
            host, _, port = self.target.rpartition(":")
            self.sock = socket.create_connection((host, int(port)))
        self.buf = bytearray(self.size)
        _touch(self.buf)
        self._socket_fetch(min(WARMUP_BYTES, self.size))

    def _socket_fetch(self, length: int) -> None:
        self.sock.sendall(_HEADER.pack(0, length))
        view = memoryview(self.buf)[:length]
        got = 0
        while got < length:
            n = self.sock.recv_into(view[got:])
            if not n:
                raise SystemExit(f"the socket server closed after {got} of {length} bytes")
            got += n

    def _socket_read(self) -> None:
        self._socket_fetch(self.size)
        self.data = self.buf

    # Local files: the node's data file directly, and the fast path through the node.
    def _fs(self) -> Any:
        import fsspec

        return fsspec.filesystem(
            "cachefs", endpoint=self.target, local_reads=True, skip_instance_cache=True
        )

    def _readinto_prepare(self) -> None:
        self.buf = bytearray(self.size)
        if self.kind == "fast-open":
            self.fs = self._fs()
        self._readinto_read()  # untimed: page cache, buffer, channel warm

    def _readinto_read(self) -> None:
        view = memoryview(self.buf)
        if self.kind == "direct-readinto":
            with open(self.target, "rb", buffering=0) as f:
                n = _read_file_into(f, view)
        else:
            with self.fs.open(self.url, "rb") as f:
                self.fast = isinstance(f, io.BufferedReader)  # a plain local file
                n = _read_file_into(f, view)
        self.data = view[:n]

    def _bytes_prepare(self) -> None:
        if self.kind == "fast-cat":
            self.fs = self._fs()
            info = self.fs.client.stat(self.url)
            self.fast = self.fs.client.local_path(info) is not None
        self._bytes_read()
        self.data = b""
        _prefault(self.size)  # last: the timed read allocates recently freed pages

    def _bytes_read(self) -> None:
        if self.kind == "direct-read-bytes":
            self.data = Path(self.target).read_bytes()
        else:
            self.data = self.fs.cat_file(self.url)

    def prepare(self) -> None:
        getattr(self, f"_{READER_KINDS[self.kind]}_prepare")()

    def read(self) -> None:
        getattr(self, f"_{READER_KINDS[self.kind]}_read")()


def client_main(argv: Sequence[str]) -> int:
    """Prepare, print ``{"ready": true}``, wait for a line on stdin, time one read."""
    import xxhash

    parser = argparse.ArgumentParser(prog="grpc_bench.py _client")
    parser.add_argument("kind", choices=sorted(READER_KINDS))
    parser.add_argument("target", help="endpoint, or the data file for direct reads")
    parser.add_argument("url")
    parser.add_argument("size", type=int)
    args = parser.parse_args(argv)
    reader = _Reader(args.kind, args.target, args.url, args.size)
    reader.prepare()
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()
    start = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    cpu = time.process_time()
    reader.read()
    cpu = time.process_time() - cpu
    end = time.perf_counter()
    data = memoryview(reader.data)
    print(
        json.dumps(
            {
                "start": start,
                "end": end,
                "bytes": len(data),
                "xxh3": xxhash.xxh3_128_hexdigest(data),
                "fast": reader.fast,
                "cpu": cpu,
            }
        ),
        flush=True,
    )
    return 0


def stream_main(argv: Sequence[str]) -> int:
    """Stream objects through raw ``Read`` stubs, hashing as chunks arrive (RSS section)."""
    import grpc
    import xxhash

    from cachefs.auth import metadata, read_token
    from cachefs.client import NodeClient
    from cachefs.proto import cachefs_pb2 as pb

    endpoint, url, repeats = argv[0], argv[1], int(argv[2])
    client = NodeClient(endpoint)
    info = client.stat(url)
    token = read_token() if not endpoint.startswith("unix://") else None
    md = metadata(token) if token else ()
    digests, total = [], 0
    start = time.perf_counter()
    for _ in range(repeats):
        hasher = xxhash.xxh3_128()
        request = pb.ReadRequest(
            url=url, version=info.version, size=info.size, offset=0, length=0, chunk_size=CHUNK
        )
        try:
            for chunk in client.stub.Read(request, timeout=3600, metadata=md):
                hasher.update(chunk.data)
                total += len(chunk.data)
        except grpc.RpcError as exc:
            raise SystemExit(f"Read: {exc.code().name}: {exc.details()}") from None
        digests.append(hasher.hexdigest())
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "bytes": total, "digests": digests}), flush=True)
    return 0


def prefetch_main(argv: Sequence[str]) -> int:
    """Prefetch URLs into the node and print each object's data file (untimed setup)."""
    from cachefs.client import NodeClient

    endpoint, urls = argv[0], argv[1:]
    client = NodeClient(endpoint)
    start = time.perf_counter()
    client.prefetch(urls)
    seconds = time.perf_counter() - start
    out = []
    for url in urls:
        info = client.stat(url)
        out.append({"url": url, "size": info.size, "path": client.local_path(info)})
    print(json.dumps({"seconds": seconds, "objects": out}), flush=True)
    return 0


# --- the benchmark ----------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One table row: which reader, against which server, how many at once."""

    name: str
    transport: str  # tcp, unix, file
    clients: int
    kind: str  # the reader's kind (see _Reader)
    server: str | None  # node, grpc-sync, grpc-aio, socket; None: no server
    subject: bool = False
    baseline: tuple[str, ...] = ()  # row names; the fastest of them (same transport, clients)

    @property
    def key(self) -> str:
        return f"{self.name} | {self.transport} | {self.clients}"


RAW = "raw socket"
BARE_SYNC = "bare grpcio (sync)"
BARE_AIO = "bare grpcio (aio)"
NODE = "cachefs node gRPC"
DIRECT_READINTO = "direct readinto"
DIRECT_READ = "direct read_bytes"
FAST_OPEN = "cachefs fast path open + readinto"
FAST_CAT = "cachefs fast path cat_file"


def stream_rows(transports: Sequence[str], clients: Sequence[int]) -> list[Row]:
    """Raw socket, bare grpcio (sync, aio) and the node, per transport and client count."""
    rows = []
    for transport in transports:
        for n in clients:
            rows += [
                Row(RAW, transport, n, "socket", "socket"),
                Row(BARE_SYNC, transport, n, "grpc", "grpc-sync", baseline=(RAW,)),
                Row(BARE_AIO, transport, n, "grpc", "grpc-aio", baseline=(RAW,)),
                Row(NODE, transport, n, "grpc", "node", True, (BARE_SYNC, BARE_AIO)),
            ]
    return rows


def local_rows(fast_transport: str) -> list[Row]:
    """Direct reads of the node's data file, each followed by its fast-path counterpart."""
    return [
        Row(DIRECT_READINTO, "file", 1, "direct-readinto", None),
        Row(FAST_OPEN, fast_transport, 1, "fast-open", "node", True, (DIRECT_READINTO,)),
        Row(DIRECT_READ, "file", 1, "direct-read-bytes", None),
        Row(FAST_CAT, fast_transport, 1, "fast-cat", "node", True, (DIRECT_READ,)),
    ]


@dataclass
class Result:
    """A row's runs."""

    row: Row
    mbps: list[float] = field(default_factory=list)  # aggregate, per run
    other_load: list[float] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)  # CPUs busy over the timed reads
    client_cpu: list[float] = field(default_factory=list)
    retries: int = 0  # runs redone because other processes disturbed them
    error: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.mbps)


@dataclass
class Server:
    """A running server subprocess and its endpoints by transport."""

    name: str
    process: subprocess.Popen[bytes]
    endpoints: dict[str, str]
    log: Path


class RssSampler:
    """Samples a process's VmRSS and RssAnon (kB) every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = RSS_INTERVAL) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int, int]] = []  # (monotonic s, VmRSS kB, RssAnon kB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[float, int, int] | None:
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        point = (
            time.monotonic(),
            int(fields["VmRSS"].split()[0]),
            int(fields.get("RssAnon", "0 kB").split()[0]),
        )
        self.samples.append(point)
        return point

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class Bench:
    """The servers, the object, and the round-robin runs over every row."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.size: int = args.size
        self.token = secrets.token_hex(16)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEFS_")}
        self.env["CACHEFS_TOKEN"] = self.token
        self.env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
        )
        self.servers: dict[str, Server] = {}
        self.source = work / "origin" / "obj.bin"
        self.digest = ""
        self.data_file: Path | None = None
        self.node_rss: RssSampler | None = None

    # -- servers -----------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as err:
            return subprocess.Popen(
                pinned(argv, self.args.server_cpus),
                env=self.env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if name != "node" else subprocess.DEVNULL,
                stderr=err,
            )

    def start_node(self) -> Server:
        log = self.work / "node.log"
        sock = self.work / "s" / "node.sock"
        argv = [
            sys.executable,
            "-m",
            "cachefs.cli",
            "node",
            "--cache-dir",
            str(self.work / "cache"),
            "--socket",
            str(sock),
            "--address",
            "127.0.0.1:0",
            "--metrics-address",
            "127.0.0.1:0",
        ]
        process = self._spawn("node", argv, log)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            for line in log.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    doc = json.loads(line)
                    if doc.get("msg") == "serving":
                        server = Server(
                            "node", process, {"tcp": doc["address"], "unix": doc["socket"]}, log
                        )
                        self.servers["node"] = server
                        return server
            if process.poll() is not None or time.monotonic() > deadline:
                _stop(process)
                raise RuntimeError(f"the node did not start: {error_line(log.read_text())}")
            time.sleep(0.05)

    def start_server(self, kind: str) -> Server:
        log = self.work / f"{kind}.log"
        unix = self.work / "s" / f"{kind}.sock"
        argv = [sys.executable, str(SCRIPT), "_serve", kind, str(self.source), str(unix)]
        process = self._spawn(kind, argv, log)
        assert process.stdout is not None
        line = _readline(process.stdout, READY_TIMEOUT)
        try:
            endpoints = json.loads(line)
        except ValueError:
            _stop(process)
            raise RuntimeError(
                f"{kind} server did not start: {error_line(log.read_text(errors='replace'))}"
            ) from None
        server = Server(kind, process, endpoints, log)
        self.servers[kind] = server
        return server

    def stop_servers(self) -> None:
        for server in self.servers.values():
            _stop(server.process)

    # -- readers -----------------------------------------------------------------

    def _reader_argv(self, row: Row) -> list[str]:
        server = self.servers[row.server] if row.server else None
        target = server.endpoints[row.transport] if server else str(self.data_file)
        return [sys.executable, str(SCRIPT), "_client", row.kind, target, self.url, str(self.size)]

    @property
    def url(self) -> str:
        return self.source.as_uri()

    def run_row(self, row: Row, run: int) -> tuple[float, float, float, float]:
        """One timed run of ``row``: aggregate MB/s, other load, server and client CPUs.

        The CPUs are the server's and the readers' CPU seconds over the timed reads
        divided by their wall time (1.0: one CPU kept busy). RuntimeError on failure.
        """
        log_dir = self.work / "logs" / f"{_slug(row.key)}-{run}"
        log_dir.mkdir(parents=True, exist_ok=True)
        server_pid = self.servers[row.server].process.pid if row.server else None
        meter = CpuMeter(server_pid)
        wall = time.perf_counter()
        procs: list[subprocess.Popen[bytes]] = []
        errs: list[Path] = []
        timer = threading.Timer(self.args.timeout, lambda: [p.kill() for p in procs])
        timer.start()
        try:
            for i in range(row.clients):
                errs.append(log_dir / f"client{i}.err")
                with errs[-1].open("wb") as err:
                    procs.append(
                        subprocess.Popen(
                            pinned(self._reader_argv(row), self.args.client_cpus),
                            env=self.env,
                            cwd=REPO,
                            stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE,
                            stderr=err,
                        )
                    )
            for proc, err in zip(procs, errs, strict=True):
                assert proc.stdout is not None
                if not proc.stdout.readline().strip():
                    proc.wait()
                    raise RuntimeError(
                        f"reader exit {proc.returncode}: "
                        f"{error_line(err.read_text(errors='replace'))}"
                    )
            server_cpu = _cpu_seconds(server_pid)
            for proc in procs:  # all ready: start the timed reads together
                assert proc.stdin is not None
                proc.stdin.write(b"go\n")
                proc.stdin.flush()
            docs = []
            for proc, err in zip(procs, errs, strict=True):
                out, _ = proc.communicate()
                if proc.returncode:
                    raise RuntimeError(
                        f"reader exit {proc.returncode}: "
                        f"{error_line(err.read_text(errors='replace'))}"
                    )
                docs.append(json.loads(out.decode().strip().splitlines()[-1]))
            server_cpu = _cpu_seconds(server_pid) - server_cpu
        finally:
            timer.cancel()
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        other = meter.other_load(time.perf_counter() - wall)
        for doc in docs:
            if doc["bytes"] != self.size or doc["xxh3"] != self.digest:
                raise RuntimeError(f"read {doc['bytes']} bytes that differ from the source")
            if doc["fast"] is False:
                raise RuntimeError("the fast path was not taken (read through gRPC)")
        seconds = max(d["end"] for d in docs) - min(d["start"] for d in docs)
        shutil.rmtree(log_dir, ignore_errors=True)
        client_cpu = sum(d["cpu"] for d in docs)
        mbps = self.size * len(docs) / 1e6 / seconds
        return mbps, other, server_cpu / seconds, client_cpu / seconds

    def run_all(self, rows: Sequence[Row]) -> list[Result]:
        """Every row ``runs`` times, round robin; a run disturbed by others is redone."""
        results = {row.key: Result(row) for row in rows}
        for run in range(self.args.runs):
            for row in rows:
                result = results[row.key]
                for attempt in range(self.args.noisy_retries + 1):
                    if result.error:
                        break
                    try:
                        mbps, other, server_cpu, client_cpu = self.run_row(row, run)
                    except (RuntimeError, ValueError, KeyError, OSError) as exc:
                        result.error = str(exc)
                        status = f"error: {exc}"
                    else:
                        status = (
                            f"{mbps:7.0f} MB/s  CPUs server {server_cpu:.2f} client "
                            f"{client_cpu:.2f}  other load {other:.2f}"
                        )
                    noisy = not result.error and other > NOISY_LOAD
                    if noisy and attempt < self.args.noisy_retries:
                        status += "  (disturbed: again)"
                    print(
                        f"  run {run + 1}/{self.args.runs} {row.name:34} {row.transport:4} "
                        f"x{row.clients}  {status}",
                        flush=True,
                    )
                    if not result.error and (not noisy or attempt == self.args.noisy_retries):
                        result.mbps.append(mbps)
                        result.other_load.append(other)
                        result.server_cpu.append(server_cpu)
                        result.client_cpu.append(client_cpu)
                        result.retries += attempt
                        break
        return list(results.values())

    def prefetch(self, endpoint: str, url: str) -> str:
        """Prefetch ``url`` into the node (untimed); the node's data file of it."""
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), "_prefetch", endpoint, url],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            timeout=self.args.timeout,
            check=False,
        )
        if proc.returncode:
            raise RuntimeError(f"prefetch failed: {error_line(proc.stderr.decode())}")
        doc = json.loads(proc.stdout.decode().strip().splitlines()[-1])
        print(f"prefetched {url} into the node in {doc['seconds']:.1f} s", flush=True)
        return str(doc["objects"][0]["path"])

    # -- RSS ---------------------------------------------------------------------

    def rss_stream(self, endpoint: str, url: str, repeats: int, expected: list[str]) -> dict:
        """Stream through the node once while sampling its RSS; the summary and samples."""
        node = self.servers["node"]
        argv = [sys.executable, str(SCRIPT), "_stream", endpoint, url, str(repeats)]
        with RssSampler(node.process.pid) as sampler:
            time.sleep(1.0)  # a second of the node at rest first
            spawned = time.monotonic()
            proc = subprocess.run(
                pinned(argv, self.args.client_cpus),
                env=self.env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=self.args.timeout,
                check=False,
            )
            exited = time.monotonic()
            time.sleep(1.0)  # and whatever the node frees after the call
        if proc.returncode:
            raise RuntimeError(f"stream exit {proc.returncode}: {error_line(proc.stderr.decode())}")
        doc = json.loads(proc.stdout.decode().strip().splitlines()[-1])
        if doc["digests"] != expected:
            raise RuntimeError("streamed bytes differ from the source")
        samples = sampler.samples
        t0 = samples[0][0]
        rss = [s[1] * 1024 for s in samples]
        anon = [s[2] * 1024 for s in samples]
        return {
            "bytes": doc["bytes"],
            "seconds": doc["seconds"],
            "start": rss[0],
            "max": max(rss),
            "end": rss[-1],
            "anon_start": anon[0],
            "anon_max": max(anon),
            "anon_end": anon[-1],
            "samples": [(round(s[0] - t0, 3), s[1] * 1024) for s in samples],
            "window": (round(spawned - t0, 3), round(exited - t0, 3)),  # the reader's life
        }


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` so far (0 for None)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _readline(stream: IO[bytes], timeout: float) -> bytes:
    """One line from ``stream``, or b"" after ``timeout`` seconds."""
    box: list[bytes] = [b""]
    thread = threading.Thread(target=lambda: box.__setitem__(0, stream.readline()), daemon=True)
    thread.start()
    thread.join(timeout)
    return box[0]


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def _human(size: int) -> str:
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor:
            return f"{size / factor:g} {unit}"
    return f"{size} B"


# --- report -----------------------------------------------------------------------


def baseline_of(result: Result, results: Sequence[Result]) -> Result | None:
    """The fastest (by median) of the row's baselines with its transport and clients."""
    row = result.row
    transports = {"file"} if row.kind.startswith("fast") else {row.transport}
    candidates = [
        r
        for r in results
        if r.row.name in row.baseline
        and r.row.transport in transports
        and r.row.clients == row.clients
        and r.mbps
        and not r.error
    ]
    return max(candidates, key=lambda r: r.median, default=None)


def _floor2(ratio: float) -> float:
    """``ratio`` cut (not rounded) to 2 decimals, so that 0.899 never reads as 0.90."""
    return math.floor(ratio * 100) / 100


def _target(row: Row) -> float | None:
    if not row.subject:
        return None
    return LOCAL_TARGET if row.kind.startswith("fast") else GRPC_TARGET


def table(results: Sequence[Result], size: int) -> tuple[str, list[str]]:
    """The markdown table and one verdict line per subject row."""
    lines = [
        "| read | transport | clients | median MB/s | best MB/s | vs baseline | target "
        "| server CPU | client CPU | max other load |",
        "|---|---|--:|--:|--:|--:|---|--:|--:|--:|",
    ]
    verdicts = []
    for r in results:
        row = r.row
        name = f"**{row.name}**" if row.subject else row.name
        if r.error or not r.mbps:
            error = (r.error or "no runs").replace("|", "\\|")
            lines.append(
                f"| {name} | {row.transport} | {row.clients} | error: {error} | | | | | | |"
            )
            if row.subject:
                verdicts.append(f"{row.name} ({row.transport}, x{row.clients}): no result.")
            continue
        base = baseline_of(r, results)
        ratio_cell, target_cell = "-", ""
        target = _target(row)
        if base is not None:
            ratio = r.median / base.median
            ratio_cell = f"{_floor2(ratio):.2f}x {base.row.name}"
            if target is not None:
                verdict = "met" if ratio >= target else "NOT met"
                target_cell = f">= {target}x: {verdict}"
                verdicts.append(
                    f"{row.name} ({row.transport}, {row.clients} client"
                    f"{'s' if row.clients > 1 else ''}): {_floor2(ratio):.2f}x {base.row.name} "
                    f"({base.median:.0f} MB/s); target >= {target}x: {verdict}."
                )
        loads = [x for x in r.other_load if x == x]
        load = f"{max(loads):.2f}" if loads else "-"
        server_cpu = f"{statistics.median(r.server_cpu):.2f}" if row.server else "-"
        lines.append(
            f"| {name} | {row.transport} | {row.clients} | {r.median:.0f} | "
            f"{max(r.mbps):.0f} | {ratio_cell} | {target_cell} | {server_cpu} | "
            f"{statistics.median(r.client_cpu):.2f} | {load} |"
        )
    loads = [x for r in results for x in r.other_load if x == x]
    if loads and max(loads) > NOISY_LOAD:
        verdicts.append(
            f"Warning: other processes kept up to {max(loads):.2f} CPUs busy during some "
            "runs; those numbers are disturbed."
        )
    return "\n".join(lines), verdicts


def rss_table(rss: dict, what: str) -> tuple[str, str]:
    growth = rss["max"] - rss["start"]
    verdict = "flat" if growth <= FLAT_RSS else "NOT flat"
    mib = 1 / MiB
    lines = [
        "| streamed | MB/s | VmRSS start MiB | max MiB | end MiB | max - start MiB "
        "| RssAnon start / max / end MiB |",
        "|---|--:|--:|--:|--:|--:|--:|",
        f"| {what} | {rss['bytes'] / 1e6 / rss['seconds']:.0f} | {rss['start'] * mib:.0f} | "
        f"{rss['max'] * mib:.0f} | {rss['end'] * mib:.0f} | {growth * mib:+.1f} | "
        f"{rss['anon_start'] * mib:.0f} / {rss['anon_max'] * mib:.0f} / "
        f"{rss['anon_end'] * mib:.0f} |",
    ]
    line = (
        f"Node RSS while streaming {_human(rss['bytes'])}: max - start = "
        f"{growth / MiB:+.1f} MiB; flat means <= {FLAT_RSS // MiB} MiB: {verdict}."
    )
    return "\n".join(lines), line


def plot(path: Path, results: Sequence[Result], rss: dict | None) -> None:
    """Median MB/s per row (best run as a tick) and, if given, the node's RSS over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.mbps and not r.error][::-1]
    height = len(ok) * 0.32 + 1.2
    panels = 2 if rss else 1
    fig, axes = plt.subplots(
        panels,
        1,
        figsize=(9, height + (2.6 if rss else 0)),
        gridspec_kw={"height_ratios": [height, 2.6] if rss else [height]},
        squeeze=False,
    )
    ax = axes[0, 0]
    labels = [f"{r.row.name} ({r.row.transport}, x{r.row.clients})" for r in ok]
    medians = [r.median for r in ok]
    colors = ["tab:orange" if r.row.subject else "tab:blue" for r in ok]
    bars = ax.barh(labels, medians, color=colors)
    for bar, r in zip(bars, ok, strict=True):
        best = max(r.mbps)
        ax.plot([best, best], [bar.get_y(), bar.get_y() + bar.get_height()], color="black")
        ax.text(
            max(best, r.median),
            bar.get_y() + bar.get_height() / 2,
            f" {r.median:.0f}",
            va="center",
            fontsize=7,
        )
    ax.set_xlabel("median MB/s (tick: best run; orange: cachefs)")
    ax.margins(x=0.08)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title("Read throughput of a cached object", fontsize=10)
    if rss:
        ax = axes[1, 0]
        t = [s[0] for s in rss["samples"]]
        mib = [s[1] / MiB for s in rss["samples"]]
        ax.axvspan(*rss["window"], color="tab:blue", alpha=0.12, label="client streaming")
        ax.plot(t, mib, color="tab:orange", label="node VmRSS")
        ax.legend(loc="lower right", fontsize=8)
        ax.set_ylim(0, max(mib) * 1.3)
        ax.set_xlabel("seconds")
        ax.set_ylabel("node VmRSS MiB")
        ax.set_title(f"Node RSS while one client streams {_human(rss['bytes'])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- command line -----------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    internal = {
        "_serve": serve_main,
        "_client": client_main,
        "_stream": stream_main,
        "_prefetch": prefetch_main,
    }
    if argv and argv[0] in internal:
        return internal[argv[0]](argv[1:])
    parser = argparse.ArgumentParser(
        description="gRPC Read throughput of a cachefs node beside a bare grpcio server, "
        "raw sockets and direct file reads; the node's RSS while streaming."
    )
    parser.add_argument(
        "--size", type=parse_size, default=parse_size("1GiB"), help="object size (default 1GiB)"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per row (default 3)")
    parser.add_argument(
        "--rss-size",
        type=parse_size,
        default=parse_size("4GiB"),
        help="bytes one client streams while the node's RSS is sampled (default 4GiB; 0: skip)",
    )
    parser.add_argument("--transport", nargs="+", choices=["tcp", "unix"], default=["tcp", "unix"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4], help="default 1 4")
    parser.add_argument("--no-aio", action="store_true", help="skip the grpc.aio bare server")
    parser.add_argument("--no-local", action="store_true", help="skip the fast-path section")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--plot", type=Path, help="where to write the plot (default: none)")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument("--server-cpus", default="0", help="taskset CPU list of the servers")
    parser.add_argument("--client-cpus", default="1", help="taskset CPU list of the readers")
    parser.add_argument(
        "--load-wait",
        type=float,
        default=600,
        help=f"seconds to wait for the 1-minute load average to fall below {QUIET_LOAD}",
    )
    parser.add_argument(
        "--noisy-retries",
        type=int,
        default=2,
        help=f"times a run is redone when other processes kept more than {NOISY_LOAD} "
        "CPUs busy during it (default 2)",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per reader")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if shutil.which("taskset") is None:
        parser.error("taskset not found (util-linux)")
    work = args.work or Path(tempfile.mkdtemp(prefix="cachefs-grpc-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "s").mkdir(exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, work)
    try:
        return _run(bench)
    finally:
        bench.stop_servers()
        if bench.node_rss is not None:
            bench.node_rss.__exit__()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(work / "cache", ignore_errors=True)


def _run(bench: Bench) -> int:
    args, work = bench.args, bench.work
    if args.load_wait > 0:  # before the setup, which loads the machine itself
        wait_for_quiet(QUIET_LOAD, args.load_wait)
    load_start = os.getloadavg()[0]
    print(f"writing {_human(args.size)} of random bytes to {bench.source}", flush=True)
    bench.digest = make_test_file(bench.source, args.size)
    node = bench.start_node()
    print(f"node: {node.endpoints}", flush=True)
    endpoint = node.endpoints["unix"]
    bench.data_file = Path(bench.prefetch(endpoint, bench.url))
    kinds = ["socket", "grpc-sync"] + ([] if args.no_aio else ["grpc-aio"])
    for kind in kinds:
        print(f"{kind} server: {bench.start_server(kind).endpoints}", flush=True)
    rows = stream_rows(args.transport, args.clients)
    if args.no_aio:
        rows = [r for r in rows if r.name != BARE_AIO]
    if not args.no_local:
        rows += local_rows("unix" if "unix" in args.transport else "tcp")
    bench.node_rss = RssSampler(node.process.pid).__enter__()
    results = bench.run_all(rows)
    bench.node_rss.__exit__()
    node_rss_runs = [s[1] * 1024 for s in bench.node_rss.samples]
    bench.node_rss = None
    rss = None
    if args.rss_size:
        rss_url, rss_repeats, rss_digest = bench.url, 0, bench.digest
        free = shutil.disk_usage(work).free
        rss_source = work / "origin" / "rss.bin"
        if args.rss_size > args.size and free > 2 * args.rss_size + 2 * 2**30:
            print(f"writing {_human(args.rss_size)} of random bytes to {rss_source}", flush=True)
            rss_digest = make_test_file(rss_source, args.rss_size)
            rss_url, rss_repeats = rss_source.as_uri(), 1
        else:  # no room for another object and its cached copy: stream this one again
            rss_repeats = max(1, -(-args.rss_size // args.size))
        if rss_url != bench.url:
            bench.prefetch(endpoint, rss_url)
        transport = args.transport[0]
        what = (
            f"{_human(args.rss_size)} object, one Read"
            if rss_repeats == 1
            else f"{_human(args.size)} object x {rss_repeats}"
        )
        print(f"streaming {what} over {transport} while sampling the node's RSS", flush=True)
        rss = bench.rss_stream(
            node.endpoints[transport], rss_url, rss_repeats, [rss_digest] * rss_repeats
        )
        rss["what"] = f"{what} ({transport})"
    load_end = os.getloadavg()[0]

    title = f"### gRPC Read throughput of a cached {_human(args.size)} object"
    body, verdicts = table(results, args.size)
    method = (
        f"{args.runs} run(s), round robin; servers on CPUs {args.server_cpus}, every reader a "
        f"fresh process on CPUs {args.client_cpus}; stream readers read "
        f"{_human(WARMUP_BYTES)} untimed, then the whole object into a pre-faulted "
        "buffer; file readers read it once untimed; rows with several clients start "
        "their reads together and count the bytes of all over the first start to the last "
        f"end; verified by xxh3-128; 1-minute load average {load_start:.2f} before the set-up, "
        f"{load_end:.2f} at the end; {sum(r.retries for r in results)} run(s) redone "
        f"because other processes kept more than {NOISY_LOAD} CPUs busy."
    )
    md = [title, "", body, "", *verdicts, "", method, ""]
    if node_rss_runs:
        md += [
            f"Node VmRSS over the throughput runs: {node_rss_runs[0] / MiB:.0f} MiB at the "
            f"start, {max(node_rss_runs) / MiB:.0f} MiB at most, "
            f"{node_rss_runs[-1] / MiB:.0f} MiB at the end.",
            "",
        ]
    if rss:
        rss_md, rss_line = rss_table(rss, rss["what"])
        md += [f"### Node RSS while streaming {_human(rss['bytes'])}", "", rss_md, "", rss_line, ""]
    text = "\n".join(md)
    print("\n" + text, flush=True)
    (args.out / "grpc.md").write_text(text)
    (args.out / "grpc.json").write_text(
        json.dumps(
            {
                "size": args.size,
                "runs": args.runs,
                "load": [load_start, load_end],
                "results": [
                    {
                        **asdict(r.row),
                        "mbps": r.mbps,
                        "other_load": r.other_load,
                        "server_cpu": r.server_cpu,
                        "client_cpu": r.client_cpu,
                        "error": r.error,
                    }
                    for r in results
                ],
                "node_rss_runs": [node_rss_runs[0], max(node_rss_runs), node_rss_runs[-1]]
                if node_rss_runs
                else None,
                "rss": rss,
            },
            indent=2,
        )
    )
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(args.plot, results, rss)
        print(f"wrote {args.plot}")
    print(f"wrote {args.out / 'grpc.md'}, {args.out / 'grpc.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
