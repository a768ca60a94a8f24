"""A throttled TCP proxy: object storage's per-connection limits in front of a local server.

    python bench/throttle.py --upstream 127.0.0.1:PORT [--rate 50MB] [--delay 0.03]

Object storage serves each connection at a bounded rate (tens of MB/s) after a
first-byte latency of tens of milliseconds; a server on loopback does neither. This
proxy puts both in front of one: every byte the upstream sends back goes through it,
and on each connection

* the first byte of each response is held until ``delay`` seconds after the request
  that asked for it arrived (a request is the client's first bytes since the
  previous response began: HTTP/1.1 without pipelining, as S3 clients speak it);
* the response is then paced to ``rate`` bytes per second, measured from its first
  byte (each chunk is sent, then the proxy sleeps until the bytes sent so far are
  due; a connection that fell behind catches up by at most ``slack`` seconds).

Requests pass unthrottled. The proxy counts the bytes in each direction: ``down``
(upstream to clients: the origin's egress) and ``up``, and the responses it delayed.

Each connection gets two threads. With ``splice`` (the default on Linux) bytes move
socket to pipe to socket inside the kernel and never enter Python; otherwise they
are copied through a preallocated buffer. The socket calls and sleeps release the
GIL, so one process keeps many connections going.

Run as a script, it prints ``{"address": "HOST:PORT"}`` and then answers lines on
stdin: ``stats`` prints the counters as one JSON line, ``reset`` prints and zeroes
them; end of input stops it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

CHUNK = 256 * 1024  # the most one read moves: 5 ms of a 50 MB/s connection
SLACK = 0.02  # seconds of lag a paced connection may make up at once
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


@dataclass
class Counters:
    down: int = 0  # bytes upstream -> clients
    up: int = 0  # bytes clients -> upstream
    connections: int = 0
    responses: int = 0  # responses whose first byte was held for ``delay``
    active: int = 0  # connections open now
    peak_active: int = 0  # the most open at once since the last reset


class ThrottledProxy:
    """Listens on ``host:port`` (0: any free port) and forwards to ``upstream``."""

    def __init__(
        self,
        upstream: tuple[str, int],
        rate: float = 50e6,
        delay: float = 0.03,
        host: str = "127.0.0.1",
        port: int = 0,
        chunk: int = CHUNK,
        splice: bool | None = None,
    ) -> None:
        """``rate`` in bytes per second per connection (0: unpaced); ``delay`` in seconds."""
        self.upstream = upstream
        self.rate = float(rate)
        self.delay = float(delay)
        self.chunk = chunk
        self.splice = hasattr(os, "splice") if splice is None else splice
        self.counters = Counters()
        self._lock = threading.Lock()
        self._listener = socket.create_server((host, port), backlog=1024)
        self.address = "{}:{}".format(*self._listener.getsockname()[:2])
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ThrottledProxy:
        self._thread = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    def stats(self, reset: bool = False) -> dict[str, int]:
        with self._lock:
            snapshot = asdict(self.counters)
            if reset:
                active = self.counters.active
                self.counters = Counters(active=active, peak_active=active)
        return snapshot

    def _count(self, field: str, n: int) -> None:
        with self._lock:
            setattr(self.counters, field, getattr(self.counters, field) + n)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.counters.connections += 1
                self.counters.active += 1
                self.counters.peak_active = max(self.counters.peak_active, self.counters.active)
            _Connection(self, client, upstream).start()


class _Connection:
    """One client connection and its upstream connection: two pumping threads."""

    def __init__(self, proxy: ThrottledProxy, client: socket.socket, upstream: socket.socket):
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self._lock = threading.Lock()
        self._request_at: float | None = None  # a request waits for its response's first byte
        self._open = 2

    def start(self) -> None:
        for target, name in ((self._up, "proxy-up"), (self._down, "proxy-down")):
            threading.Thread(target=self._run, args=(target,), name=name, daemon=True).start()

    def _run(self, pump: Callable[[], None]) -> None:
        try:
            pump()
        except OSError:
            pass
        finally:
            for sock in (self.client, self.upstream):  # the other side sees EOF
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._open -= 1
                last = self._open == 0
            if last:
                self.client.close()
                self.upstream.close()
                with self.proxy._lock:
                    self.proxy.counters.active -= 1

    def _up(self) -> None:
        """Client -> upstream, unpaced; notes when each request arrives."""
        mover = _mover(self.proxy, self.client, self.upstream)
        try:
            while True:
                n = mover.pull()
                if not n:
                    return
                with self._lock:
                    if self._request_at is None:
                        self._request_at = time.monotonic()
                mover.push(n)
                self.proxy._count("up", n)
        finally:
            mover.close()

    def _down(self) -> None:
        """Upstream -> client: each response's first byte delayed, then paced."""
        proxy = self.proxy
        mover = _mover(proxy, self.upstream, self.client)
        began, sent = time.monotonic(), 0
        try:
            while True:
                n = mover.pull()
                if not n:
                    return
                with self._lock:
                    asked, self._request_at = self._request_at, None
                if asked is not None:  # the first bytes of a response
                    wait = asked + proxy.delay - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    began, sent = time.monotonic(), 0
                    proxy._count("responses", 1)
                mover.push(n)
                proxy._count("down", n)
                if proxy.rate > 0:
                    sent += n
                    due = began + sent / proxy.rate
                    now = time.monotonic()
                    if due > now:
                        time.sleep(due - now)
                    elif now - due > SLACK:  # fell behind: make up at most SLACK
                        began = now - SLACK - sent / proxy.rate
        finally:
            mover.close()


class _Copy:
    """Moves bytes through a user-space buffer."""

    def __init__(self, chunk: int, src: socket.socket, dst: socket.socket) -> None:
        self.view = memoryview(bytearray(chunk))
        self.src, self.dst = src, dst

    def pull(self) -> int:
        return self.src.recv_into(self.view)

    def push(self, n: int) -> None:
        self.dst.sendall(self.view[:n])

    def close(self) -> None:
        pass


class _Splice:
    """Moves bytes socket -> pipe -> socket in the kernel (Linux ``splice``)."""

    def __init__(self, chunk: int, src: socket.socket, dst: socket.socket) -> None:
        self.read_end, self.write_end = os.pipe()
        with contextlib.suppress(OSError):  # beyond pipe-max-size: keep the default
            fcntl.fcntl(self.write_end, _F_SETPIPE_SZ, chunk)
        self.chunk = chunk
        self.src, self.dst = src.fileno(), dst.fileno()

    def pull(self) -> int:
        return os.splice(self.src, self.write_end, self.chunk)

    def push(self, n: int) -> None:
        while n:
            n -= os.splice(self.read_end, self.dst, n)

    def close(self) -> None:
        os.close(self.read_end)
        os.close(self.write_end)


def _mover(proxy: ThrottledProxy, src: socket.socket, dst: socket.socket) -> _Copy | _Splice:
    return (_Splice if proxy.splice else _Copy)(proxy.chunk, src, dst)


def parse_rate(text: str) -> float:
    """``50MB`` (per second, decimal units), ``400Mbit``, ``0`` (unpaced) or bytes."""
    units = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "mib": 2**20, "mbit": 1e6 / 8}
    number = text.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ/")
    unit = text[len(number) :].lower().removesuffix("/s")
    if unit not in units:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (e.g. 50MB, 400Mbit)")
    return float(number) * units[unit]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the server behind")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default any port)")
    parser.add_argument("--rate", type=parse_rate, default=50e6, help="per connection (50MB)")
    parser.add_argument("--delay", type=float, default=0.03, help="seconds to first byte (0.03)")
    parser.add_argument("--copy", action="store_true", help="copy through Python, not splice")
    args = parser.parse_args(argv)
    up_host, _, up_port = args.upstream.rpartition(":")
    host, _, port = args.listen.rpartition(":")
    proxy = ThrottledProxy(
        (up_host, int(up_port)),
        args.rate,
        args.delay,
        host,
        int(port),
        splice=False if args.copy else None,
    ).start()
    print(json.dumps({"address": proxy.address, "splice": proxy.splice}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command in ("stats", "reset"):
            print(json.dumps(proxy.stats(reset=command == "reset")), flush=True)
        elif command:
            print(json.dumps({"error": f"unknown command {command!r}"}), flush=True)
    proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
