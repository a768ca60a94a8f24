"""A tiny authoritative DNS server on loopback UDP, for the dns membership source.

It answers A and AAAA questions for the names in its table (built with dnspython's
message functions, so the bytes on the wire are real DNS), NXDOMAIN for any other
name, and can be told to answer SERVFAIL or nothing at all (a dead resolver).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

ANSWER = "answer"
SERVFAIL = "servfail"
SILENT = "silent"  # drop every query: the client times out


class DnsServer:
    """``with DnsServer() as server``: ``server.address`` is ``127.0.0.1:<port>``."""

    def __init__(self, ttl: int = 1) -> None:
        self.ttl = ttl
        self.mode = ANSWER
        self.queries: list[tuple[str, str]] = []  # (name, type) of every query received
        self._records: dict[dns.name.Name, dict[str, list[str]]] = {}
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.port = self._sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)

    def __enter__(self) -> DnsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()

    def set(self, name: str, a: Iterable[str] = (), aaaa: Iterable[str] = ()) -> None:
        """``name`` exists with these addresses (none: it exists without addresses)."""
        with self._lock:
            self._records[_absolute(name)] = {"A": list(a), "AAAA": list(aaaa)}

    def remove(self, name: str) -> None:
        """``name`` no longer exists: NXDOMAIN."""
        with self._lock:
            self._records.pop(_absolute(name), None)

    def count(self, name: str) -> int:
        """Queries received for ``name``."""
        wanted = _absolute(name).to_text()
        with self._lock:
            return sum(1 for qname, _ in self.queries if qname == wanted)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue  # not DNS: ignore, as a server would
            reply = self._answer(query)
            if reply is not None:
                self._sock.sendto(reply.to_wire(), peer)

    def _answer(self, query: dns.message.Message) -> dns.message.Message | None:
        question = query.question[0]
        with self._lock:
            self.queries.append((question.name.to_text(), dns.rdatatype.to_text(question.rdtype)))
            mode = self.mode
            records = self._records.get(question.name)
        if mode == SILENT:
            return None
        response = dns.message.make_response(query)
        if mode == SERVFAIL:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        response.flags |= dns.flags.AA
        if records is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        kind = dns.rdatatype.to_text(question.rdtype)
        addresses = records.get(kind) or []
        if addresses:
            response.answer.append(
                dns.rrset.from_text_list(question.name, self.ttl, "IN", kind, addresses)
            )
        return response


def _absolute(name: str) -> dns.name.Name:
    return dns.name.from_text(name)  # relative to the root: "a.b" is "a.b."
