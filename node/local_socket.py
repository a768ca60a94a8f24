"""The node's unix socket, which knows who is on each connection.

gRPC's Python server cannot tell who connected to a unix socket (it reads no
``SO_PEERCRED``). So the node listens on the socket itself: for each connection it
asks the kernel for the peer's pid, uid and gid, opens a connection to the node's own
gRPC listener on a private unix socket (in a directory only the node may enter) from
an abstract address of its own, records "this address is that process", and only
then relays bytes both ways, in the kernel (``splice`` through a pipe, no copy into
Python). gRPC reports each call's peer as that address; the servicer looks it up
(``caller_at``), and a connection that did not come through the relay has no record
and is refused.

The socket's file mode and group still decide who may connect at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import secrets
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("cachefs.node")

_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
_PIPE_SIZE = 1024 * 1024  # the default pipe (64 KiB) would cost 16 times the splices
_SPLICE_CHUNK = _PIPE_SIZE
_BACKLOG = 128
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


@dataclass(frozen=True)
class PeerCredentials:
    """What the kernel says of the process that connected."""

    pid: int
    uid: int
    gid: int


class LocalSocket:
    """Accepts on ``path`` and relays each connection to the unix socket ``target``."""

    def __init__(self, path: Path, target: Path) -> None:
        self.path = path
        self._target = target
        self._peers: dict[str, PeerCredentials] = {}  # gRPC peer string -> process
        # Abstract addresses no other process can guess ahead (a squatter would only
        # make one bind fail, never borrow an identity).
        self._prefix = f"cachefs-relay-{secrets.token_hex(8)}-"
        self._serial = itertools.count()
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

    def caller_at(self, peer: str) -> PeerCredentials | None:
        """The process whose connection gRPC names ``peer`` (``unix-abstract:...``)."""
        with self._lock:
            return self._peers.get(peer)

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
        name = f"{self._prefix}{next(self._serial)}"
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.bind(f"\0{name}")
            upstream.connect(str(self._target))
        except OSError:
            upstream.close()
            raise
        key = f"unix-abstract:{name}"
        with self._lock:
            self._peers[key] = peer  # before the first byte: no call can come sooner
        done = threading.Barrier(2, action=lambda: self._finish(key, client, upstream))
        for source, sink, way in ((client, upstream, "in"), (upstream, client, "out")):
            threading.Thread(
                target=_pump, args=(source, sink, done), name=f"{name}-{way}", daemon=True
            ).start()

    def connections(self) -> int:
        """Connections being relayed now."""
        with self._lock:
            return len(self._peers)

    def _finish(self, key: str, client: socket.socket, upstream: socket.socket) -> None:
        """Both directions ended: forget the connection, then close both ends."""
        with self._lock:
            self._peers.pop(key, None)
        client.close()
        upstream.close()


def _pump(source: socket.socket, sink: socket.socket, done: threading.Barrier) -> None:
    """Move bytes from ``source`` to ``sink`` in the kernel until ``source`` ends."""
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):  # a smaller pipe only costs more splices
        fcntl.fcntl(write_end, _F_SETPIPE_SZ, _PIPE_SIZE)
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
