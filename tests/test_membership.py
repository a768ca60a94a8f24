"""Membership sources against real servers: a DNS server and a Kubernetes API server.

The dns source asks a loopback DNS server (``tests/dns_server.py``) over UDP; the
kubernetes source lists and watches EndpointSlices on a loopback HTTP server that
speaks the API's list and watch protocol (``tests/k8s_api.py``). Tests change what
the servers answer and poll the source's members with a deadline.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from dns_server import ANSWER, SERVFAIL, SILENT, DnsServer
from k8s_api import KubeApiServer, endpoint_slice
from servers import wait_for

from cachefs.node.cluster.dns import DnsMembership, parse_resolver
from cachefs.node.cluster.membership import Membership
from cachefs.node.kube import KubernetesMembership, endpoint_members

NAME = "cachefs-peers.cachefs.svc.cluster.local"
NAMESPACE = "cachefs"
SERVICE = "cachefs"
SELECTOR = f"kubernetes.io/service-name={SERVICE}"
TOKEN = "cachefs-test-kube-token-93c1"


def _stops_promptly(membership: Membership, thread_name: str) -> None:
    """``stop()`` returns well before any interval or watch timeout, and its thread ends."""
    done = threading.Event()

    def stop() -> None:
        membership.stop()
        done.set()

    threading.Thread(target=stop, daemon=True).start()
    wait_for(done.is_set, timeout=5, message="stop() to return")
    assert not [t for t in threading.enumerate() if t.name == thread_name]


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


@pytest.fixture
def started() -> Iterator[Callable[[Membership], Membership]]:
    """Start a membership source; stop it after the test whatever happens."""
    sources: list[Membership] = []

    def start(source: Membership) -> Membership:
        sources.append(source)
        source.start()
        return source

    yield start
    for source in sources:
        source.stop()


# -- dns -------------------------------------------------------------------------------


def _dns(server: DnsServer, **kwargs: float) -> DnsMembership:
    options = {"interval": 0.1, "timeout": 0.2, **kwargs}
    return DnsMembership(NAME, 7070, resolver=server.address, **options)


def test_parse_resolver() -> None:
    assert parse_resolver("10.96.0.10") == ("10.96.0.10", 53)
    assert parse_resolver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_resolver("[fd00::10]:5353") == ("fd00::10", 5353)
    assert parse_resolver("[fd00::10]") == ("fd00::10", 53)
    assert parse_resolver("fd00::10") == ("fd00::10", 53)
    for bad in ("kube-dns:53", "127.0.0.1:0", "127.0.0.1:x", "[fd00::10", "[fd00::10]5"):
        with pytest.raises(ValueError):
            parse_resolver(bad)


def test_dns_initial_members(dns_server: DnsServer, started) -> None:
    dns_server.set(NAME, a=["10.0.0.2", "10.0.0.1"], aaaa=["fd00::1"])
    membership = started(_dns(dns_server))
    # start() resolved once before returning: no waiting needed.
    assert membership.ready.is_set()
    assert membership.members() == ("10.0.0.1:7070", "10.0.0.2:7070", "[fd00::1]:7070")
    assert {kind for _, kind in dns_server.queries} == {"A", "AAAA"}


def test_dns_members_follow_record_changes(dns_server: DnsServer, started) -> None:
    dns_server.set(NAME, a=["10.0.0.1", "10.0.0.2"])
    membership = started(_dns(dns_server))
    seen: list[tuple[str, ...]] = []
    membership.subscribe(seen.append)

    dns_server.set(NAME, a=["10.0.0.2", "10.0.0.3", "10.0.0.4"])
    expected = ("10.0.0.2:7070", "10.0.0.3:7070", "10.0.0.4:7070")
    wait_for(lambda: membership.members() == expected, message="the new record set")
    dns_server.set(NAME, a=["10.0.0.4"])
    wait_for(lambda: membership.members() == ("10.0.0.4:7070",), message="a shrunk set")
    assert seen == [expected, ("10.0.0.4:7070",)]  # listeners hear each change once


def test_dns_nxdomain_empties_the_list(
    dns_server: DnsServer, started, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cachefs.cluster")
    dns_server.set(NAME, a=["10.0.0.1"])
    membership = started(_dns(dns_server))
    assert membership.members() == ("10.0.0.1:7070",)

    dns_server.remove(NAME)
    wait_for(lambda: membership.members() == (), message="no members after NXDOMAIN")
    resolved = membership.resolutions
    wait_for(lambda: membership.resolutions >= resolved + 3, message="more resolutions")
    nxdomain = [r for r in caplog.records if "NXDOMAIN" in r.getMessage()]
    assert len(nxdomain) == 1  # warned once per change, not once per resolution
    assert nxdomain[0].levelno == logging.WARNING

    dns_server.set(NAME, a=[])  # the name exists but has no addresses: also empty
    wait_for(lambda: any("no addresses" in r.getMessage() for r in caplog.records))
    assert membership.members() == ()

    dns_server.set(NAME, a=["10.0.0.5"])
    wait_for(lambda: membership.members() == ("10.0.0.5:7070",), message="the name again")


def test_dns_failures_keep_the_last_list(
    dns_server: DnsServer, started, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cachefs.cluster")
    dns_server.set(NAME, a=["10.0.0.1", "10.0.0.2"])
    membership = started(_dns(dns_server))
    before = membership.members()
    assert len(before) == 2

    dns_server.mode = SILENT  # the resolver stops answering: each resolution times out
    wait_for(lambda: membership.failures >= 2, message="resolutions that timed out")
    assert membership.members() == before

    dns_server.mode = SERVFAIL
    failures = membership.failures
    wait_for(lambda: membership.failures >= failures + 2, message="SERVFAIL resolutions")
    assert membership.members() == before
    warnings = [r for r in caplog.records if "keeping 2 members" in r.getMessage()]
    assert len(warnings) == 1  # one warning for the whole failure streak

    dns_server.set(NAME, a=["10.0.0.3"])
    dns_server.mode = ANSWER
    wait_for(lambda: membership.members() == ("10.0.0.3:7070",), message="recovery")


def test_dns_start_without_an_answer(dns_server: DnsServer, started) -> None:
    dns_server.mode = SILENT
    membership = started(_dns(dns_server))
    assert not membership.ready.is_set()  # no list known: not ready
    assert membership.members() == ()
    dns_server.set(NAME, a=["10.0.0.1"])
    dns_server.mode = ANSWER
    wait_for(membership.ready.is_set, message="ready once DNS answers")
    assert membership.members() == ("10.0.0.1:7070",)


def test_dns_stop_is_prompt(dns_server: DnsServer) -> None:
    dns_server.set(NAME, a=["10.0.0.1"])
    membership = _dns(dns_server, interval=3600)
    membership.start()
    _stops_promptly(membership, "cachefs-dns-membership")


# -- kubernetes ----------------------------------------------------------------------


@pytest.fixture
def api() -> Iterator[KubeApiServer]:
    with KubeApiServer(NAMESPACE) as server:
        yield server


def _kube(api: KubeApiServer, **kwargs) -> KubernetesMembership:
    return KubernetesMembership(SERVICE, NAMESPACE, port_name="grpc", api_url=api.url, **kwargs)


def _members(membership: Membership, *expected: str) -> None:
    want = tuple(sorted(expected))
    wait_for(lambda: membership.members() == want, message=f"members {want}")


def test_endpoint_members() -> None:
    slice_ = endpoint_slice(
        "a", SERVICE, [("10.0.0.1", True), ("10.0.0.2", None), ("10.0.0.3", False)]
    )
    assert endpoint_members(slice_, "grpc") == ("10.0.0.1:7070", "10.0.0.2:7070")
    assert endpoint_members(slice_, "http") == ()  # no such port: no usable address
    v6 = endpoint_slice("b", SERVICE, [("fd00::1", True)], address_type="IPv6")
    assert endpoint_members(v6, "grpc") == ("[fd00::1]:7070",)


def test_kube_initial_list(api: KubeApiServer, started) -> None:
    api.put(endpoint_slice("cachefs-a", SERVICE, [("10.0.0.1", True), ("10.0.0.2", False)]))
    api.put(endpoint_slice("cachefs-b", SERVICE, [("10.0.1.1", None)], port=7071))
    api.put(endpoint_slice("other-a", "other", [("10.9.9.9", True)]))
    membership = started(_kube(api))
    # start() listed before returning.
    assert membership.ready.is_set()
    assert membership.members() == ("10.0.0.1:7070", "10.0.1.1:7071")

    wait_for(lambda: api.count(watch=True) >= 1, message="a watch")
    first_list, first_watch = api.requests[0], api.requests[1]
    assert not first_list["watch"]
    assert first_list["path"] == f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices"
    assert first_list["query"]["labelSelector"] == SELECTOR
    assert first_watch["watch"]
    assert first_watch["query"]["labelSelector"] == SELECTOR
    assert first_watch["query"]["resourceVersion"] == "103"  # the list's resourceVersion


def test_kube_events_apply(api: KubeApiServer, started) -> None:
    api.put(endpoint_slice("cachefs-a", SERVICE, [("10.0.0.1", True)]))
    membership = started(_kube(api))
    assert membership.members() == ("10.0.0.1:7070",)

    # ADDED: a new slice's ready endpoints join.
    api.put(endpoint_slice("cachefs-b", SERVICE, [("10.0.1.1", True), ("10.0.1.2", True)]))
    _members(membership, "10.0.0.1:7070", "10.0.1.1:7070", "10.0.1.2:7070")

    # MODIFIED: an endpoint that turns not-ready leaves.
    api.put(endpoint_slice("cachefs-b", SERVICE, [("10.0.1.1", True), ("10.0.1.2", False)]))
    _members(membership, "10.0.0.1:7070", "10.0.1.1:7070")

    # DELETED: every endpoint of the slice leaves.
    api.delete("cachefs-a")
    _members(membership, "10.0.1.1:7070")

    # Another service's slice is not ours (the selector filters it).
    api.put(endpoint_slice("other-a", "other", [("10.9.9.9", True)]))
    api.put(endpoint_slice("cachefs-c", SERVICE, [("10.0.2.1", True)]))
    _members(membership, "10.0.1.1:7070", "10.0.2.1:7070")
    assert api.count(watch=False) == 1  # all of it from one list and its watch


def test_kube_watch_that_ends_is_resumed(api: KubeApiServer, started) -> None:
    api.put(endpoint_slice("cachefs-a", SERVICE, [("10.0.0.1", True)]))
    membership = started(_kube(api))
    api.put(endpoint_slice("cachefs-b", SERVICE, [("10.0.1.1", True)]))
    _members(membership, "10.0.0.1:7070", "10.0.1.1:7070")
    wait_for(lambda: api.open_watches == 1, message="an open watch")

    api.end_watches()  # the server closes the stream
    api.put(endpoint_slice("cachefs-c", SERVICE, [("10.0.2.1", True)]))
    api.delete("cachefs-a")
    _members(membership, "10.0.1.1:7070", "10.0.2.1:7070")
    watches = [r for r in api.requests if r["watch"]]
    assert len(watches) >= 2
    # Resumed from the last event it saw, without listing again.
    assert watches[1]["query"]["resourceVersion"] == "102"
    assert api.count(watch=False) == 1

    api.end_watches()  # and again: every new watch keeps applying events
    api.put(endpoint_slice("cachefs-c", SERVICE, [("10.0.2.1", False)]))
    _members(membership, "10.0.1.1:7070")


def test_kube_gone_lists_again(api: KubeApiServer, started) -> None:
    api.put(endpoint_slice("cachefs-a", SERVICE, [("10.0.0.1", True)]))
    api.put(endpoint_slice("cachefs-b", SERVICE, [("10.0.1.1", True)]))
    membership = started(_kube(api))
    wait_for(lambda: api.open_watches == 1, message="an open watch")

    # Changes whose events are lost to compaction; the watch gets 410 Gone.
    api.put(endpoint_slice("cachefs-c", SERVICE, [("10.0.2.1", True)]), quiet=True)
    api.delete("cachefs-a", quiet=True)
    api.expire()
    _members(membership, "10.0.1.1:7070", "10.0.2.1:7070")
    assert api.count(watch=False) == 2  # the changes came from a second list

    # The watch after the new list applies events again.
    api.put(endpoint_slice("cachefs-d", SERVICE, [("10.0.3.1", True)]))
    _members(membership, "10.0.1.1:7070", "10.0.2.1:7070", "10.0.3.1:7070")


def test_kube_stop_is_prompt(api: KubeApiServer) -> None:
    api.put(endpoint_slice("cachefs-a", SERVICE, [("10.0.0.1", True)]))
    membership = _kube(api)
    membership.start()
    wait_for(lambda: api.open_watches == 1, message="an open watch")
    _stops_promptly(membership, "cachefs-kube-membership")


def test_kube_kubeconfig_and_unauthorized(
    tmp_path: Path, started, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with KubeApiServer(NAMESPACE, token=TOKEN) as api:
        api.put(endpoint_slice("cachefs-a", SERVICE, [("10.0.0.1", True)]))

        # Without credentials: refused, logged, not ready; no crash.
        anonymous = started(_kube(api))
        assert not anonymous.ready.is_set()
        assert anonymous.members() == ()
        assert any("401" in r.getMessage() for r in caplog.records)
        anonymous.stop()

        # A kubeconfig with a token: the client sends it.
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "test", "cluster": {"server": api.url}}],
                    "users": [{"name": "cachefs", "user": {"token": TOKEN}}],
                    "contexts": [
                        {"name": "test", "context": {"cluster": "test", "user": "cachefs"}}
                    ],
                    "current-context": "test",
                }
            )
        )
        membership = started(KubernetesMembership(SERVICE, NAMESPACE, kubeconfig=str(kubeconfig)))
        assert membership.members() == ("10.0.0.1:7070",)
        api.put(endpoint_slice("cachefs-b", SERVICE, [("10.0.1.1", True)]))
        _members(membership, "10.0.0.1:7070", "10.0.1.1:7070")
        membership.stop()
        assert any(r["authorized"] for r in api.requests)
    assert TOKEN not in caplog.text  # never a credential in the log
