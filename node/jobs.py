"""Prefetch jobs run inside the node, and their progress as ``JobStatus`` snapshots.

A client starts a job and watches it (``WatchJob``); the job runs on in the node if
the client goes away, and ``cachefs status`` lists it. Embedded mode runs the same
prefetch inline and reports the same snapshots (``status_of_progress``).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from cachefs.node.engine import Engine, Manifest, PrefetchResult, Progress

from cachefs.api import JobStatus

if TYPE_CHECKING:
    from cachefs.node.cluster.peers import Peers

log = logging.getLogger("cachefs.jobs")
_FINISHED_KEPT = 100
WATCH_INTERVAL = 0.5


def status_of_progress(
    job_id: str, sources: Sequence[str], pin: str | None, progress: Progress
) -> JobStatus:
    return JobStatus(
        id=job_id,
        state="running",
        sources=tuple(sources),
        pin_holder=pin,
        bytes_total=progress.bytes_total,
        bytes_done=progress.bytes_done,
        objects_total=progress.objects_total,
        objects_done=progress.objects_done,
        fetched_bytes=progress.fetched_bytes,
        peer_bytes=progress.peer_bytes,
        seconds=progress.elapsed,
    )


def status_of_result(job_id: str, sources: Sequence[str], result: PrefetchResult) -> JobStatus:
    return JobStatus(
        id=job_id,
        state="succeeded",
        sources=tuple(sources),
        pin_holder=result.pinned_by,
        bytes_total=result.bytes,
        bytes_done=result.bytes,
        objects_total=result.objects,
        objects_done=result.objects,
        fetched_bytes=result.fetched_bytes,
        peer_bytes=result.peer_bytes,
        cached_before=result.cached_before,
        evicted_during=result.evicted_during,
        seconds=result.seconds,
    )


class Job:
    """One prefetch running in the node; watchers wait on its changes."""

    def __init__(self, job_id: str, sources: Sequence[str], pin: str | None) -> None:
        self.id = job_id
        self._status = JobStatus(job_id, "running", tuple(sources), pin)
        self._changed = threading.Condition()

    @property
    def status(self) -> JobStatus:
        with self._changed:
            return self._status

    def update(self, status: JobStatus) -> None:
        with self._changed:
            if not self._status.finished:  # a late progress report never revives a job
                self._status = status
            self._changed.notify_all()

    def _differs(self, seen: JobStatus | None) -> bool:
        return self._status is not seen

    def watch(self, still_wanted: Callable[[], bool]) -> Iterator[JobStatus]:
        """Each new status until the job ends, or until the watcher stops wanting them."""
        last: JobStatus | None = None
        while True:
            with self._changed:
                self._changed.wait_for(functools.partial(self._differs, last), WATCH_INTERVAL)
                status = self._status
            if status is not last:
                last = status
                yield status
            if status.finished or not still_wanted():
                return


class JobRegistry:
    """The node's prefetch jobs: running ones and the last finished ones."""

    def __init__(self, engine: Engine, peers: Peers | None = None) -> None:
        self._engine = engine
        self._peers = peers
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def start(
        self,
        sources: Sequence[str],
        pin: str | None,
        tier: str | None,
        manifest: Manifest | None = None,
        cluster: bool = False,
    ) -> Job:
        """Run a prefetch of ``sources`` (or of exactly ``manifest``), on this node or,
        with ``cluster``, on every member."""
        if cluster and self._peers is None:
            raise ValueError(
                "this node has no cluster: configure cluster.membership (or cachefs node "
                "--peers) to prefetch onto every node"
            )
        job = Job(uuid.uuid4().hex[:16], sources, pin)
        with self._lock:
            self._jobs[job.id] = job
            self._forget_old()
        context = contextvars.copy_context()  # the job's log lines carry the request id
        thread = threading.Thread(
            target=context.run,
            args=(self._run, job, sources, pin, tier, manifest, cluster),
            name=f"job-{job.id}",
            daemon=True,
        )
        thread.start()
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise FileNotFoundError(
                f"no job {job_id!r} on this node (finished jobs are kept for the last "
                f"{_FINISHED_KEPT} only)"
            )
        return job

    def jobs(self) -> list[JobStatus]:
        with self._lock:
            return [job.status for job in self._jobs.values()]

    def shutdown(self) -> None:
        """End every running job's watchers: the node is going away."""
        for job in list(self._jobs.values()):
            if not job.status.finished:
                job.update(
                    dataclasses.replace(
                        job.status,
                        state="cancelled",
                        error="the node is shutting down; run the prefetch again (blocks "
                        "already fetched stay cached)",
                        error_kind="NodeUnavailableError",
                    )
                )

    def _run(
        self,
        job: Job,
        sources: Sequence[str],
        pin: str | None,
        tier: str | None,
        manifest: Manifest | None,
        cluster: bool,
    ) -> None:
        def on_progress(progress: Progress) -> None:
            job.update(status_of_progress(job.id, sources, pin, progress))

        try:
            if cluster:
                from cachefs.node.cluster.prefetch import run_cluster_prefetch

                assert self._peers is not None
                final = run_cluster_prefetch(
                    self._engine,
                    self._peers,
                    manifest or self._engine.resolve(sources),
                    pin,
                    tier,
                    job.update,
                    job.id,
                )
                job.update(final)
                return
            if manifest is not None:
                result = self._engine.prefetch_manifest(
                    manifest, pin=pin, tier=tier, progress=on_progress
                )
            else:
                result = self._engine.prefetch(sources, pin=pin, tier=tier, progress=on_progress)
        except Exception as exc:
            from cachefs.rpc_errors import kind_of, message_of  # grpc: the daemon's import

            log.warning("job %s failed: %s", job.id, message_of(exc))
            job.update(
                dataclasses.replace(
                    job.status, state="failed", error=message_of(exc), error_kind=kind_of(exc)
                )
            )
            return
        job.update(status_of_result(job.id, sources, result))
        log.info(
            "job %s done: %d bytes, %d from the origin, %d from peers",
            job.id,
            result.bytes,
            result.fetched_bytes,
            result.peer_bytes,
        )

    def _forget_old(self) -> None:
        finished = [job_id for job_id, job in self._jobs.items() if job.status.finished]
        for job_id in finished[: max(0, len(finished) - _FINISHED_KEPT)]:
            del self._jobs[job_id]
