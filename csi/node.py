"""The CSI Node service: publish a source as a read-only view at kubelet's target path.

NodePublishVolume checks that the pod behind the volume (its namespace and service
account, from ``podInfoOnMount``) may ``view`` the source under the node's policy
(``cachefs.node.policy``: the same table the node applies to its own callers), asks
the local cachefs
node to prefetch and pin it (holder ``csi:<volume id>``), waits up to
``publish_timeout`` seconds (below kubelet's two-minute operation timeout), and
answers ABORTED with the progress when the model is not local yet: kubelet calls
again and the prefetch goes on meanwhile. Once complete, the node builds the view
and the plugin bind-mounts it read-only, nosuid, nodev. Both calls are idempotent;
a failed publish leaves no mount, no record and no pin behind.

A volume may name a CachedModel of the pod's namespace (``cachedModel``) instead of a
source: the plugin asks the node for the model, checks that the pod may ``view`` its
source, waits (up to ``publish_timeout``, then ABORTED with the progress) until a
version of it is ready on this node, and mounts a view of exactly that version's
manifest as the node filled it, pinned by the volume. A later version leaves the
volume on its files; volumes published after it is ready here get it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from cachefs.csi import mounts
from cachefs.csi.proto import csi_pb2 as csi
from cachefs.csi.proto import csi_pb2_grpc as csi_grpc
from cachefs.csi.volumes import PublishedVolume, VolumeRecords
from cachefs.errors import NodeUnavailableError, QuotaExceededError, VersionChangedError
from cachefs.node.callers import Caller
from cachefs.node.models.names import check_name
from cachefs.node.policy import Policy
from cachefs.units import format_size

log = logging.getLogger("cachefs.csi")

POD_INFO_PREFIX = "csi.storage.k8s.io/"
VOLUME_ATTRIBUTES = {"source", "tier", "cachedModel"}
MODEL_POLL = 0.5  # seconds between asks while a model is not ready on this node


class CsiError(Exception):
    """A failure with the status code the CSI spec names for it."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def holder_of(volume_id: str) -> str:
    return f"csi:{volume_id}"


class NodeService(csi_grpc.NodeServicer):
    def __init__(
        self,
        node_id: str,
        client: Callable[[], Any],
        policy: Policy,
        records: VolumeRecords,
        publish_timeout: float = 60.0,
    ) -> None:
        self.node_id = node_id
        self._client = client
        self.policy = policy
        self.records = records
        self.publish_timeout = publish_timeout
        self._jobs: dict[str, str] = {}  # volume id -> the prefetch job publishing it
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def _volume_lock(self, volume_id: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(volume_id, threading.Lock())

    # -- the RPCs ------------------------------------------------------------------

    def NodeGetInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        return csi.NodeGetInfoResponse(node_id=self.node_id)

    def NodeGetCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        return csi.NodeGetCapabilitiesResponse()  # no stage/unstage: publish does it all

    def NodePublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._run(context, self._publish, request)

    def NodeUnpublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._run(context, self._unpublish, request)

    def _run(self, context: grpc.ServicerContext, call: Callable[[Any], Any], request: Any) -> Any:
        if not request.volume_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "volume_id is missing")
        with self._volume_lock(request.volume_id):
            try:
                return call(request)
            except CsiError as exc:
                log.info("%s of %s: %s", call.__name__.strip("_"), request.volume_id, exc)
                context.abort(exc.code, str(exc))
            except NodeUnavailableError as exc:
                context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            except OSError as exc:
                log.exception("%s of %s failed", call.__name__.strip("_"), request.volume_id)
                context.abort(grpc.StatusCode.INTERNAL, str(exc))

    # -- publish -------------------------------------------------------------------

    def _publish(self, request: Any) -> Any:
        volume_id = request.volume_id
        target = _target(request.target_path)
        if not request.HasField("volume_capability"):
            raise CsiError(grpc.StatusCode.INVALID_ARGUMENT, "volume_capability is missing")
        if request.volume_capability.HasField("block"):
            raise CsiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "cachefs volumes are file systems: ask for a mount volume, not a block one",
            )
        attributes = dict(request.volume_context)
        unknown = {k for k in attributes if not k.startswith(POD_INFO_PREFIX)} - VOLUME_ATTRIBUTES
        if unknown:
            raise CsiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown volumeAttributes {', '.join(sorted(unknown))}: cachefs volumes take "
                "source (a URL or a prefix ending in /) and optionally tier, or cachedModel",
            )
        namespace = attributes.get(POD_INFO_PREFIX + "pod.namespace")
        pod = attributes.get(POD_INFO_PREFIX + "pod.name")
        account = attributes.get(POD_INFO_PREFIX + "serviceAccount.name")
        caller = Caller("pod", namespace=namespace or "", service_account=account or "")
        model = _model_of(attributes, namespace)
        tier = attributes.get("tier") or None
        source = None if model else self._allowed(caller, attributes.get("source", ""))
        wanted = f"CachedModel {model}" if model else f"source {source}"

        existing = self.records.get(volume_id)
        if existing is not None:
            had = f"CachedModel {existing.model}" if existing.model else f"source {existing.source}"
            if existing.target_path != str(target) or had != wanted:
                raise CsiError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"volume {volume_id} is published at {existing.target_path} with {had}; "
                    f"this call asks for {target} with {wanted}",
                )
            if mounts.shows(target, Path(existing.view)):
                return csi.NodePublishVolumeResponse()  # the same call again: done
        elif mounts.is_mount_point(target):
            raise CsiError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"{target} is already a mount point of something else; unpublish it first",
            )

        holder = holder_of(volume_id)
        client = self._client()
        version = None
        try:
            if model:
                source, version = self._ready_model(client, caller, model)
                view = Path(self._model_view(client, volume_id, holder, model, source, version))
            else:
                assert source is not None
                self._prefetch(client, volume_id, source, holder, tier)
                view = Path(client.view(holder, [source], tier).path)
        except CsiError:
            raise
        except (FileNotFoundError, IsADirectoryError) as exc:
            self._release(client, volume_id, holder)
            raise CsiError(grpc.StatusCode.NOT_FOUND, str(exc)) from exc
        except QuotaExceededError as exc:
            self._release(client, volume_id, holder)
            raise CsiError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc
        except PermissionError as exc:
            self._release(client, volume_id, holder)
            raise CsiError(grpc.StatusCode.PERMISSION_DENIED, str(exc)) from exc
        except ValueError as exc:
            self._release(client, volume_id, holder)
            raise CsiError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        except VersionChangedError as exc:
            self._jobs.pop(volume_id, None)
            raise CsiError(grpc.StatusCode.ABORTED, str(exc)) from exc

        record = PublishedVolume(
            volume_id, str(target), source, holder, str(view), namespace, pod, model, version
        )
        self.records.put(record)  # first: a crash after mounting leaves a record to check
        created = False
        try:
            if not target.exists():
                target.mkdir(mode=0o750)
                created = True
            mounts.bind_read_only(view, target)
        except OSError as exc:
            self.records.delete(volume_id)
            if created:
                target.rmdir()
            self._release(client, volume_id, holder)
            raise CsiError(
                grpc.StatusCode.INTERNAL, f"cannot mount the view at {target}: {exc.strerror}"
            ) from exc
        self._jobs.pop(volume_id, None)
        log.info("published %s at %s (%s)", wanted, target, volume_id)
        return csi.NodePublishVolumeResponse()

    def _allowed(self, caller: Caller, source: str) -> str:
        """``source`` in its normal form, if the pod may ``view`` it."""
        if not source:
            raise CsiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "volumeAttributes.source is missing: name a URL or a prefix ending in /, "
                "or a CachedModel of the pod's namespace with cachedModel",
            )
        try:
            return self.policy.require(caller, "view", source)
        except ValueError as exc:
            raise CsiError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        except PermissionError as exc:
            raise CsiError(grpc.StatusCode.PERMISSION_DENIED, str(exc)) from exc

    def _ready_model(self, client: Any, caller: Caller, model: str) -> tuple[str, str]:
        """(source, version) of the model's version ready on this node, once the pod
        may view its source; ABORTED with the progress while none is."""
        namespace, _, name = model.partition("/")
        deadline = time.monotonic() + self.publish_timeout
        while True:
            try:
                info = client.model(namespace, name)
            except BlockingIOError as exc:  # the node has not listed the models yet
                info, waiting = None, str(exc)
            except ValueError as exc:  # the node does not reconcile models, a bad spec
                raise CsiError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from exc
            if info is not None:
                source = self._allowed(caller, info.source)
                if info.phase in ("NotSelected", "Deleting"):
                    raise CsiError(
                        grpc.StatusCode.FAILED_PRECONDITION, f"CachedModel {model}: {info.error}"
                    )
                if info.version:
                    return source, info.version
                waiting = _model_progress(info)
            left = deadline - time.monotonic()
            if left <= 0:
                raise CsiError(
                    grpc.StatusCode.ABORTED,
                    f"CachedModel {model} is not ready on this node yet: {waiting}; the "
                    "volume is published once it is",
                )
            threading.Event().wait(min(MODEL_POLL, left))

    def _model_view(
        self, client: Any, volume_id: str, holder: str, model: str, source: str, version: str
    ) -> str:
        """The view of exactly that version of the model, pinned by the volume."""
        try:
            return str(client.view(holder, [source], model=model, version=version).path)
        except FileNotFoundError as exc:  # a newer version became the one served meanwhile
            self._release(client, volume_id, holder)
            raise CsiError(grpc.StatusCode.ABORTED, str(exc)) from exc

    def _prefetch(
        self, client: Any, volume_id: str, source: str, holder: str, tier: str | None
    ) -> None:
        """Run (or follow) the volume's prefetch; ABORTED with progress when it is slow."""
        job_id = self._jobs.get(volume_id)
        if job_id is None or client.job(job_id) is None:  # none yet, or the node restarted
            job_id = client.prefetch([source], pin=holder, tier=tier, detach=True).id
            self._jobs[volume_id] = job_id
        try:
            status = client.wait(job_id, timeout=self.publish_timeout)
        except BaseException:
            self._jobs.pop(volume_id, None)
            raise
        if not status.finished:
            raise CsiError(
                grpc.StatusCode.ABORTED,
                f"prefetching {source}: {format_size(status.bytes_done)} of "
                f"{format_size(status.bytes_total)} ({status.objects_done} of "
                f"{status.objects_total} files); the volume is published once it is local",
            )

    def _release(self, client: Any, volume_id: str, holder: str) -> None:
        """Drop the volume's pin (its data stays cached until evicted)."""
        self._jobs.pop(volume_id, None)
        with contextlib.suppress(FileNotFoundError):  # it held no pins
            client.unpin(holder)

    # -- unpublish -------------------------------------------------------------------

    def _unpublish(self, request: Any) -> Any:
        volume_id = request.volume_id
        target = _target(request.target_path)
        if mounts.is_mount_point(target):
            mounts.unmount(target)
        try:
            target.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                raise CsiError(
                    grpc.StatusCode.INTERNAL, f"cannot remove {target}: {exc.strerror}"
                ) from exc
            log.warning("left %s in place: it is not empty and not our mount", target)
        record = self.records.get(volume_id)
        holder = record.holder if record is not None else holder_of(volume_id)
        self._release(self._client(), volume_id, holder)  # UNAVAILABLE keeps the record
        self.records.delete(volume_id)
        log.info("unpublished %s from %s", volume_id, target)
        return csi.NodeUnpublishVolumeResponse()

    # -- restarts ----------------------------------------------------------------------

    def reconcile(self) -> None:
        """Check what an earlier run published: keep live volumes, clean up stale ones."""
        for record in self.records.all():
            target = Path(record.target_path)
            if mounts.shows(target, Path(record.view)):
                log.info("volume %s is still published at %s", record.volume_id, target)
                continue
            log.info("volume %s at %s is gone: cleaning up", record.volume_id, target)
            if mounts.is_mount_point(target):
                mounts.unmount(target)
            try:
                self._release(self._client(), record.volume_id, record.holder)
            except NodeUnavailableError:
                log.warning("the node is unavailable: %s keeps its pin for now", record.holder)
                continue
            self.records.delete(record.volume_id)


def _model_of(attributes: dict[str, str], namespace: str | None) -> str | None:
    """``<namespace>/<name>`` of the CachedModel a volume names, checked; None if none."""
    if "cachedModel" not in attributes:
        return None
    if "source" in attributes or "tier" in attributes:
        raise CsiError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "a volume names either cachedModel or a source (and tier), not both: the "
            "CachedModel's spec gives the source and the tier",
        )
    if not namespace:
        raise CsiError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"cachedModel needs the pod's namespace ({POD_INFO_PREFIX}pod.namespace), which "
            "kubelet passes only when the CSIDriver has podInfoOnMount: true",
        )
    try:
        namespace, name = check_name(namespace, attributes["cachedModel"])
    except ValueError as exc:
        raise CsiError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
    return f"{namespace}/{name}"


def _model_progress(info: Any) -> str:
    """Where a model stands on this node, for an ABORTED answer."""
    text = info.phase
    if info.bytes_total:
        text += f", {format_size(info.bytes_done)} of {format_size(info.bytes_total)}"
    if info.target:
        text += f" (version {info.target})"
    return text + (f"; last error: {info.error}" if info.error else "")


def _target(path: str) -> Path:
    if not path:
        raise CsiError(grpc.StatusCode.INVALID_ARGUMENT, "target_path is missing")
    if not os.path.isabs(path) or ".." in Path(path).parts:
        raise CsiError(
            grpc.StatusCode.INVALID_ARGUMENT, f"target_path {path!r} must be an absolute path"
        )
    return Path(path)
