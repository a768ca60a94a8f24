"""The node's unix socket, which knows who is on each connection.

gRPC's Python server cannot tell who connected to a unix socket (it reads no
``SO_PEERCRED``). So the node listens on the socket itself: for each connection it
asks the kernel for the peer's pid, uid and gid, opens a loopback connection to the
node's own gRPC listener, records "this loopback source port is that process", and
only then relays bytes both ways, in the kernel (``splice`` through a pipe, no copy
into Python). The servicer behind the loopback listener looks up each call's source
port (``caller_at``); a connection to that listener that did not come through the
socket has no record and is refused.

The socket's file mode and group still decide who may connect at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("cachefs.node")

_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SPLICE_CHUNK = 1024 * 1024
_BACKLOG = 128


@dataclass(frozen=True)
class PeerCredentials:
    """What the kernel says of the process that connected."""

    pid: int
    uid: int
    gid: int


class LocalSocket:
    """Accepts on ``path`` and relays each connection to ``target`` (host, port)."""

    def __init__(self, path: Path, target: tuple[str, int]) -> None:
        self.path = path
        self._target = target
        self._peers: dict[int, PeerCredentials] = {}  # loopback source port -> peer
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        previous = os.umask(0o177)  # no moment in which others may connect
        try:
            self._listener.bind(str(path))
        finally:
            os.umask(previous)
        self._listener.listen(_BACKLOG)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="local-socket", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop accepting; relays in flight end when either side closes."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    def caller_at(self, port: int) -> PeerCredentials | None:
        """The process whose connection the relay makes from loopback ``port``."""
        with self._lock:
            return self._peers.get(port)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                self._relay(client)
            except OSError as exc:
                log.warning("a local connection could not be relayed: %s", exc)
                client.close()

    def _relay(self, client: socket.socket) -> None:
        raw = client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
        peer = PeerCredentials(*_CREDENTIALS.unpack(raw))
        upstream = socket.create_connection(self._target)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        port = upstream.getsockname()[1]
        with self._lock:
            self._peers[port] = peer  # before the first byte: no call can come sooner
        done = threading.Barrier(2, action=lambda: self._finish(port, client, upstream))
        for source, sink, name in ((client, upstream, "in"), (upstream, client, "out")):
            threading.Thread(
                target=_pump, args=(source, sink, done), name=f"local-{port}-{name}", daemon=True
            ).start()

    def _finish(self, port: int, client: socket.socket, upstream: socket.socket) -> None:
        """Both directions ended: forget the port before it can be reused, then close."""
        with self._lock:
            self._peers.pop(port, None)
        client.close()
        upstream.close()


def _pump(source: socket.socket, sink: socket.socket, done: threading.Barrier) -> None:
    """Move bytes from ``source`` to ``sink`` in the kernel until ``source`` ends."""
    read_end, write_end = os.pipe()
    try:
        while True:
            moved = os.splice(source.fileno(), write_end, _SPLICE_CHUNK)
            if moved == 0:
                break
            while moved:
                moved -= os.splice(read_end, sink.fileno(), moved)
    except OSError:
        pass  # either side went away: end both directions
    finally:
        os.close(read_end)
        os.close(write_end)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            source.shutdown(socket.SHUT_RD)
        with contextlib.suppress(threading.BrokenBarrierError):
            done.wait()
