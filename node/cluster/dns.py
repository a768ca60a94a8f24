"""Membership from DNS: the A and AAAA records of a headless Service, re-resolved.

A headless Service (``clusterIP: None``) answers its name with one address per ready
pod, so re-resolving it every few seconds follows nodes as they come and go. A name
that does not exist (NXDOMAIN) or has no addresses means no members; a timeout or a
server failure keeps the last list, so a flaky resolver never empties the cluster.
"""

from __future__ import annotations

import ipaddress
import logging
import threading

import dns.exception
import dns.rdatatype
import dns.resolver

from cachefs.node.cluster.membership import Membership

log = logging.getLogger("cachefs.cluster.dns")

DEFAULT_DNS_PORT = 53


def parse_resolver(address: str) -> tuple[str, int]:
    """``ip``, ``ip:port``, ``[v6]`` or ``[v6]:port`` -> (ip, port); ValueError if not."""
    text = address.strip()
    host, port = text, DEFAULT_DNS_PORT
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"resolver {address!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"resolver {address!r} is not [ip]:port")
            port = _port(address, rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _port(address, port_text)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"resolver {address!r}: {host!r} is not an IP address") from None
    return str(ip), port


def _port(address: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"resolver {address!r}: bad port {text!r}")
    return int(text)


def format_member(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Unavailable(Exception):
    """DNS did not give an answer (timeout, SERVFAIL, refused): keep the last list."""


class DnsMembership(Membership):
    """The addresses of ``name`` (A and AAAA), each with ``port``, every ``interval`` s.

    ``resolver`` is a name server's address (``ip``, ``ip:port`` or ``[v6]:port``);
    without it the system's resolver configuration (``/etc/resolv.conf``, with its
    search domains) is used. ``timeout`` bounds one resolution. Both record types
    must answer for a new list: if either fails, the last list stays.
    """

    def __init__(
        self,
        name: str,
        port: int,
        resolver: str | None = None,
        interval: float = 10.0,
        timeout: float = 5.0,
    ) -> None:
        super().__init__()
        if not name:
            raise ValueError("dns membership needs a name")
        if not 0 < port < 65536:
            raise ValueError(f"dns membership: bad port {port}")
        if interval <= 0:
            raise ValueError(f"dns membership: interval must be positive, not {interval}")
        self.name = name
        self.port = port
        self.interval = interval
        if resolver:
            ip, resolver_port = parse_resolver(resolver)
            self._resolver = dns.resolver.Resolver(configure=False)
            self._resolver.nameservers = [ip]
            self._resolver.port = resolver_port
        else:
            self._resolver = dns.resolver.Resolver()
        self._resolver.lifetime = timeout
        self._resolver.timeout = min(timeout, 2.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unavailable = False  # in a streak of failed resolutions
        self._empty: str | None = None  # why the last answer had no addresses
        self.resolutions = 0  # resolutions that got an answer (addresses or none)
        self.failures = 0  # resolutions that got no answer (the list was kept)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self.refresh()
        self._thread = threading.Thread(
            target=self._run, name="cachefs-dns-membership", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except Exception:  # never let the thread die: the next round tries again
                log.exception("dns membership: resolving %s failed", self.name)

    def refresh(self) -> None:
        """Resolve the name once and apply the answer (or keep the list on failure)."""
        try:
            hosts = self._resolve()
        except _Unavailable as e:
            self.failures += 1
            if not self._unavailable:
                self._unavailable = True
                log.warning(
                    "dns membership: no answer for %s (%s); keeping %d members",
                    self.name,
                    e,
                    len(self.members()),
                )
            return
        if self._unavailable:
            self._unavailable = False
            log.info("dns membership: %s answers again", self.name)
        self.resolutions += 1
        if self._stop.is_set():
            return
        self._set(format_member(host, self.port) for host in hosts)

    def _resolve(self) -> list[str]:
        hosts: list[str] = []
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                answer = self._resolver.resolve(
                    self.name, rdtype, search=True, raise_on_no_answer=False
                )
            except dns.resolver.NXDOMAIN:
                self._note_empty("does not exist (NXDOMAIN)")
                return []
            except dns.resolver.YXDOMAIN as e:
                raise _Unavailable("name too long after search domains") from e
            except dns.resolver.NoNameservers as e:
                raise _Unavailable("every name server failed (SERVFAIL or refused)") from e
            except dns.exception.Timeout as e:
                raise _Unavailable("timed out") from e
            except dns.exception.DNSException as e:
                raise _Unavailable(type(e).__name__) from e
            hosts.extend(rdata.address for rdata in answer.rrset or ())
        self._note_empty(None if hosts else "has no addresses")
        return hosts

    def _note_empty(self, reason: str | None) -> None:
        """Warn once each time the name starts answering with no addresses."""
        if reason != self._empty:
            if reason is not None:
                log.warning("dns membership: %s %s: no members", self.name, reason)
            else:
                log.info("dns membership: %s has addresses again", self.name)
            self._empty = reason
