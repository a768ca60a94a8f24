"""Prefetch jobs inside the node: each runs in its own thread and is watched by status.

A client starts a job and watches it (``WatchJob``); the job runs on in the node if
the client goes away, and ``cachefs status`` lists it. Embedded mode runs its
prefetch in the caller's thread, recorded the same way. What a job does is the
service's business (``CacheService``): the registry only runs it, keeps its latest
``JobStatus`` and turns an exception into a failed status.
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

from cachefs.errors import JobCancelledError
from cachefs.types import JobStatus

log = logging.getLogger("cachefs.jobs")
_FINISHED_KEPT = 100
_CANCEL_WAIT = 5.0  # seconds a Cancel call waits for the job to say it stopped
WATCH_INTERVAL = 0.5

# A job's work: given its id, a function to report progress and the event that says
# the job was cancelled, its final status.
Work = Callable[[str, Callable[[JobStatus], None], threading.Event], JobStatus]


class Job:
    """One prefetch running in the node; watchers wait on its changes."""

    def __init__(
        self, job_id: str, sources: Sequence[str], pin: str | None, owner: str | None = None
    ) -> None:
        self.id = job_id
        self.owner = owner  # who started it (a caller's principal): it may cancel it
        self.cancelled = threading.Event()
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

    def __init__(self) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def start(
        self, sources: Sequence[str], pin: str | None, work: Work, owner: str | None = None
    ) -> Job:
        """Run ``work`` for a prefetch of ``sources`` in a thread of its own."""
        job = self._add(sources, pin, owner)
        context = contextvars.copy_context()  # the job's log lines carry the request id
        thread = threading.Thread(
            target=context.run, args=(self._run, job, work), name=f"job-{job.id}", daemon=True
        )
        thread.start()
        return job

    def run(
        self,
        sources: Sequence[str],
        pin: str | None,
        work: Work,
        progress: Callable[[JobStatus], None],
    ) -> JobStatus:
        """Run ``work`` in this thread (embedded mode), reporting to ``progress`` too;
        its final status. A failure is recorded, then raised as it was, for the caller
        to report."""
        job = self._add(sources, pin)

        def report(status: JobStatus) -> None:
            job.update(status)
            progress(status)

        try:
            final = work(job.id, report, job.cancelled)
        except BaseException as exc:
            job.update(_failed(job.status, exc))
            raise
        job.update(final)
        return job.status

    def _add(self, sources: Sequence[str], pin: str | None, owner: str | None = None) -> Job:
        job = Job(uuid.uuid4().hex[:16], sources, pin, owner)
        with self._lock:
            self._jobs[job.id] = job
            self._forget_old()
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
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            if not job.status.finished:
                job.cancelled.set()  # and stop fetching for it
                job.update(
                    dataclasses.replace(
                        job.status,
                        state="cancelled",
                        error="the node is shutting down; run the prefetch again (blocks "
                        "already fetched stay cached)",
                        error_kind="NodeUnavailableError",
                    )
                )

    def cancel(self, job: Job, timeout: float = _CANCEL_WAIT) -> JobStatus:
        """Ask ``job`` to stop; its status once it has (or the latest, after
        ``timeout`` seconds: fills in flight end on their own)."""
        job.cancelled.set()
        with job._changed:
            job._changed.wait_for(lambda: job._status.finished, timeout)
            return job._status

    def _run(self, job: Job, work: Work) -> None:
        try:
            final = work(job.id, job.update, job.cancelled)
        except Exception as exc:
            job.update(_failed(job.status, exc))
            log.warning("job %s %s: %s", job.id, job.status.state, job.status.error)
            return
        job.update(final)
        log.info(
            "job %s %s: %d bytes, %d from the origin, %d from peers",
            job.id,
            final.state,
            final.bytes_total,
            final.fetched_bytes,
            final.peer_bytes,
        )

    def _forget_old(self) -> None:
        finished = [job_id for job_id, job in self._jobs.items() if job.status.finished]
        for job_id in finished[: max(0, len(finished) - _FINISHED_KEPT)]:
            del self._jobs[job_id]


def _failed(status: JobStatus, exc: BaseException) -> JobStatus:
    """``status`` ended by ``exc``: failed, or cancelled when interrupted."""
    if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit
        return dataclasses.replace(status, state="cancelled", error="interrupted")
    if isinstance(exc, JobCancelledError):
        return dataclasses.replace(
            status, state="cancelled", error=str(exc), error_kind="JobCancelledError"
        )
    # Imported on failure only: the table brings grpc, which embedded mode otherwise
    # never loads.
    from cachefs.rpc_errors import kind_of, message_of

    return dataclasses.replace(
        status, state="failed", error=message_of(exc), error_kind=kind_of(exc)
    )
