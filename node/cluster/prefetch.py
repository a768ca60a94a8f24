"""A cluster prefetch: every member ends with a full copy; the origin serves each block once.

The node asked resolves the sources once and hands the same manifest (URLs,
versions, ETags) to every member, itself included, as a prefetch job of exactly
those versions: no node can see another version of a file. Each member fills every
block through its owner (rendezvous hashing), so each block is fetched from the
origin by its owner only. Progress is the sum over members; a member that fails
fails the job with its reason, and the others carry on to the end. Cancelling the
job cancels every member's share.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from cachefs.errors import JobCancelledError
from cachefs.node.cluster.peers import Peers
from cachefs.node.engine import Manifest
from cachefs.proto import cachefs_pb2 as pb
from cachefs.types import JobStatus

log = logging.getLogger("cachefs.cluster")

# This node's share: its progress reports in, its final status out.
RunHere = Callable[[Callable[[JobStatus], None]], JobStatus]


def manifest_message(manifest: Manifest) -> list[pb.ObjectInfo]:
    return [
        pb.ObjectInfo(
            url=ref.url.fetch_url,
            version=ref.version,
            size=ref.size,
            id=ref.id,
            etag=ref.etag or "",
        )
        for ref in manifest.objects
    ]


def run_cluster_prefetch(
    peers: Peers,
    manifest: Manifest,
    pin: str | None,
    tier: str | None,
    report: Callable[[JobStatus], None],
    job_id: str,
    cancelled: threading.Event,
    run_here: RunHere,
) -> JobStatus:
    """Prefetch ``manifest`` on every member (``run_here`` on this one); the summed
    final status. Once ``cancelled`` is set every member is asked to stop."""
    members = sorted({*peers.membership.members(), peers.self_address})
    latest: dict[str, JobStatus] = {}
    errors: dict[str, str] = {}
    lock = threading.Lock()
    sources = manifest.sources

    def summary(state: str) -> JobStatus:
        statuses = list(latest.values())
        done = sum(1 for s in statuses if s.finished and s.state == "succeeded")
        return JobStatus(
            id=job_id,
            state=state,
            sources=tuple(sources),
            pin_holder=pin,
            bytes_total=manifest.size * len(members),
            bytes_done=sum(s.bytes_done for s in statuses),
            objects_total=len(manifest.objects) * len(members),
            objects_done=sum(s.objects_done for s in statuses),
            fetched_bytes=sum(s.fetched_bytes for s in statuses),
            peer_bytes=sum(s.peer_bytes for s in statuses),
            cached_before=sum(s.cached_before for s in statuses),
            seconds=max((s.seconds for s in statuses), default=0.0),
            nodes_total=len(members),
            nodes_done=done,
            error="; ".join(f"node {m}: {e}" for m, e in sorted(errors.items())) or None,
            error_kind="ClusterPrefetchError" if errors else None,
        )

    def note(member: str, status: JobStatus) -> None:
        with lock:
            latest[member] = status
            report(summary("running"))

    def run_member(member: str) -> None:
        try:
            if member == peers.self_address:
                note(member, run_here(lambda s: note(member, s)))
            else:
                _run_there(peers, member, manifest, pin, tier, cancelled, lambda s: note(member, s))
        except JobCancelledError:
            pass  # the summary says cancelled
        except Exception as exc:
            with lock:
                errors[member] = str(exc) or type(exc).__name__

    threads = [
        threading.Thread(target=run_member, args=(m,), name=f"cluster-{m}", daemon=True)
        for m in members
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if cancelled.is_set():
        raise JobCancelledError(
            f"the cluster prefetch was cancelled on its {len(members)} nodes; the blocks "
            "they fetched stay cached"
        )
    with lock:
        return summary("failed" if errors else "succeeded")


def _run_there(
    peers: Peers,
    member: str,
    manifest: Manifest,
    pin: str | None,
    tier: str | None,
    cancelled: threading.Event,
    note: Callable[[JobStatus], None],
) -> None:
    client = peers.client(member)
    request = pb.PrefetchRequest(
        sources=list(manifest.sources),
        pin_holder=pin or "",
        tier=tier or "",
        objects=manifest_message(manifest),
    )
    # A member that just restarted may still be in our channel's reconnect back-off.
    started = client.start_job(request, wait_for_ready=True)
    note(started)
    finished = threading.Event()

    def relay_cancel() -> None:  # the member's share stops with the job
        while not finished.wait(0.1):
            if cancelled.is_set():
                try:
                    client.cancel(started.id)
                except Exception as exc:  # the member goes on; its status says so
                    log.warning("could not cancel job %s on %s: %s", started.id, member, exc)
                return

    threading.Thread(target=relay_cancel, name=f"cancel-{member}", daemon=True).start()
    try:
        client.wait(started.id, progress=note)
    finally:
        finished.set()
