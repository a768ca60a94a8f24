"""CachedModels reconciled by every node: fill what matches, report, let go.

Every node lists and watches the CachedModels of the cluster and, for each, once a
second at most and on every change:

* **The leader** (the holder of one Lease, see ``lease``) resolves the model's
  source once into a manifest (every object's version) and records it in
  ``status.resolved``; it adds the finalizer; it writes the aggregate: conditions
  ``Resolved`` and ``Ready``, ready nodes out of desired ones, the size. A model is
  resolved again when its spec changes (a new generation), or every ``resync``
  seconds with ``updatePolicy: Latest``; a new version keeps the old one in
  ``status.previous`` until no node reports it.
* **Each node** whose labels match ``spec.nodeSelector`` prefetches exactly the
  recorded manifest (each entry checked against its origin first), pinned by
  ``model:<namespace>/<name>@<version>``, as a job of the node (``cachefs status``
  shows it), and reports its own entry of ``status.nodes`` by server-side apply under
  a field manager of its own: phase, version, bytes done, the last error. When a new
  version is ready here, the pins of the older ones are released: files that mounted
  volumes hold stay pinned by the volumes (``csi:<volume>``) until they go.
* **Nodes that leave**: a node that stops cleanly removes its own entries; one that
  vanishes (a crash, its Node deleted) stops renewing its heartbeat Lease
  (``presence``), and the leader removes its entries, applying as that node's field
  manager with the entry left out (the API removes what a manager applied before and
  leaves out). The aggregate counts only the entries left. A node that comes back
  finds its entry gone and reports it again.
* **Deletion**: the finalizer keeps the object while nodes release their pins and
  remove their entries (the leader removes those of nodes that left); then the leader
  removes the finalizer. The bytes stay cached until eviction needs the room.
* **Volumes** that name a model (``cachedModel``) get the version last ready on this
  node, exactly the manifest it filled (``model`` and ``manifest``, which the service
  offers its clients): during a rollout that is the old version until the new one is
  ready here.

Nodes never write each other's entries, and only the leader writes the aggregate, so
two nodes writing at once lose nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException

from cachefs.node.callers import Caller
from cachefs.node.engine import Manifest
from cachefs.node.labels import label_key
from cachefs.node.models.api import Expired, ModelsApi
from cachefs.node.models.lease import LeaseElection
from cachefs.node.models.presence import Presence
from cachefs.node.models.spec import (
    FINALIZER,
    ModelSpec,
    manifest_from_record,
    manifest_record,
    manifest_version,
    parse_model,
)
from cachefs.node.service import CacheService
from cachefs.types import ModelInfo
from cachefs.units import format_size

log = logging.getLogger("cachefs.models")
LEADER_MANAGER = "cachefs-leader"
_WATCH_SECONDS = 60
_BACKOFF = (0.5, 30.0)
_FAILED_RETRY = 30.0  # seconds before a failed fill of a model is tried again
_PROGRESS_EVERY = 1.0  # seconds between reports of a fill's progress
_CLUSTER = Caller("cluster")
_WITHDRAW_SECONDS = 10.0  # of a clean stop, for removing this node's entries


def node_manager(node_name: str) -> str:
    """The field manager of one node's entries of ``status.nodes``."""
    return f"cachefs-node-{node_name}"


@dataclass
class _Local:
    """What this node did for one model."""

    version: str = ""
    phase: str = "Pending"
    bytes_done: int = 0
    bytes_total: int = 0
    error: str = ""
    job_id: str = ""
    retry_at: float = 0.0
    reported: tuple[Any, ...] = ()  # the entry last written (skip identical writes)
    manifest: Manifest | None = None  # of ``version``
    ready: str = ""  # the version last ready here: what a new volume gets
    ready_manifest: Manifest | None = None


class ModelController:
    """The model loop of one node; ``start`` and ``stop`` it with the daemon."""

    def __init__(
        self,
        service: CacheService,
        api: ModelsApi,
        node_name: str,
        node_labels: Callable[[], Mapping[str, str]],
        election: LeaseElection,
        presence: Presence,
        resync: float = 10.0,
    ) -> None:
        self.service = service
        self.api = api
        self.node_name = node_name
        self.manager = node_manager(node_name)
        self._labels = node_labels
        self._election = election
        self._presence = presence
        self._resync = resync
        self._models: dict[str, dict[str, Any]] = {}  # "ns/name" -> latest object
        self._local: dict[str, _Local] = {}
        self._resolved_at: dict[str, float] = {}
        self._lock = threading.Lock()
        self._listed = threading.Event()  # the models are known (a first list)
        self._node_labels_seen: Mapping[str, str] | None = None
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._threads = [
            threading.Thread(target=self._watch_loop, name="cachefs-models-watch", daemon=True),
            threading.Thread(target=self._reconcile_loop, name="cachefs-models", daemon=True),
        ]

    def start(self) -> None:
        self._presence.start()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop the loop, then leave the models' status: remove this node's entries
        and give the leader's lease up (a drain: no wait for the heartbeat to lapse)."""
        self._stopped.set()
        self._wake.set()
        self._presence.stop()
        self._threads[1].join(timeout=2.0)  # a pass in flight reports nothing now
        deadline = time.monotonic() + _WITHDRAW_SECONDS
        with self._lock:
            models = list(self._models.values())
        for obj in models:
            entries = (obj.get("status") or {}).get("nodes") or ()
            left = deadline - time.monotonic()
            ours = _key(obj) in self._local or any(e.get("name") == self.node_name for e in entries)
            if left <= 0 or not ours:
                continue
            meta = obj.get("metadata") or {}
            try:
                self.api.apply_status(
                    str(meta.get("namespace")),
                    str(meta.get("name")),
                    self.manager,
                    {"nodes": []},
                    timeout=(min(left, 5.0), left),
                )
            except Exception as exc:
                log.warning("model %s: this node's entry stays (%s)", _key(obj), _brief(exc))
        self._election.release()

    # -- the cluster's models ------------------------------------------------------

    def _watch_loop(self) -> None:
        delay = _BACKOFF[0]
        version: str | None = None
        while not self._stopped.is_set():
            try:
                if version is None:
                    items, version = self.api.list()
                    with self._lock:
                        self._models = {_key(o): o for o in items}
                    self._listed.set()
                    self._wake.set()
                for kind, obj in self.api.watch(version, _WATCH_SECONDS):
                    if self._stopped.is_set():
                        return
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                    if kind == "BOOKMARK":
                        continue
                    with self._lock:
                        if kind == "DELETED":
                            self._models.pop(_key(obj), None)
                        else:
                            self._models[_key(obj)] = obj
                    self._wake.set()
                delay = _BACKOFF[0]
            except Expired:
                version = None  # history moved on: list again
            except Exception as exc:
                log.warning(
                    "watching cachedmodels failed (%s); again in %.1f s", _brief(exc), delay
                )
                version = None
                self._stopped.wait(delay)
                delay = min(delay * 2, _BACKOFF[1])

    def _reconcile_loop(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait(self._resync)
            self._wake.clear()
            if self._stopped.is_set():
                return
            if not self._presence.beating.wait(self._resync):
                continue  # entries of a node without a heartbeat would be dropped
            with self._lock:
                models = list(self._models.values())
            leader = self._election.is_leader()
            labels = self._node_labels()
            gone: set[str] = set()
            if leader:
                gone = self._presence.gone(
                    e.get("name")
                    for o in models
                    for e in (o.get("status") or {}).get("nodes") or ()
                )
            for obj in models:
                try:
                    self._reconcile(obj, leader, labels, gone)
                except ApiException as exc:
                    if exc.status == 409:  # changed since it was read: again, seen anew
                        log.debug("model %s changed meanwhile; again next pass", _key(obj))
                        self._wake.set()
                    else:
                        log.warning("model %s: %s", _key(obj), _brief(exc))
                except Exception as exc:
                    log.warning("model %s: %s", _key(obj), _brief(exc), exc_info=True)
            self._forget_gone({_key(o) for o in models})

    def _node_labels(self) -> Mapping[str, str] | None:
        try:
            self._node_labels_seen = self._labels()
            return self._node_labels_seen
        except Exception as exc:
            log.warning("this node's labels cannot be read (%s): no model is filled", _brief(exc))
            return None

    # -- one model -------------------------------------------------------------------

    def _reconcile(
        self,
        obj: dict[str, Any],
        leader: bool,
        labels: Mapping[str, str] | None,
        gone: Collection[str] = (),
    ) -> None:
        meta = obj.get("metadata") or {}
        status = obj.get("status") or {}
        if leader and gone:
            status = self._drop(obj, status, gone)
        try:
            spec = parse_model(obj)
        except ValueError as exc:
            if leader:
                self._write_aggregate(obj, None, status, resolved_error=("InvalidSpec", str(exc)))
            return
        if meta.get("deletionTimestamp"):
            self._release(spec, obj, everything=True)
            if leader and not status.get("nodes") and FINALIZER in (meta.get("finalizers") or []):
                rest = [f for f in meta["finalizers"] if f != FINALIZER]
                self.api.set_finalizers(spec.namespace, spec.name, rest, meta["resourceVersion"])
                log.info("model %s: every node let go; finalizer removed", spec.key)
            return
        if leader:
            if FINALIZER not in (meta.get("finalizers") or []):
                finalizers = [*(meta.get("finalizers") or []), FINALIZER]
                obj = self.api.set_finalizers(
                    spec.namespace, spec.name, finalizers, meta["resourceVersion"]
                )
                status = obj.get("status") or {}
            status = self._resolve_if_due(obj, spec, status)
        if labels is not None:
            if spec.matches(labels):
                self._fill(spec, obj, status)
            else:
                self._release(spec, obj, everything=True)
        if leader:
            self._write_aggregate(obj, spec, status)

    def _drop(self, obj: dict[str, Any], status: dict[str, Any], gone: set[str]) -> dict[str, Any]:
        """Remove the entries of nodes that left; the status without them."""
        meta = obj.get("metadata") or {}
        entries = status.get("nodes") or []
        for entry in entries:
            name = str(entry.get("name"))
            if name in gone:
                self.api.apply_status(
                    str(meta.get("namespace")),
                    str(meta.get("name")),
                    node_manager(name),
                    {"nodes": []},
                )
                log.info("model %s: node %s left; its entry is removed", _key(obj), name)
        return {**status, "nodes": [e for e in entries if e.get("name") not in gone]}

    def _resolve_if_due(
        self, obj: dict[str, Any], spec: ModelSpec, status: dict[str, Any]
    ) -> dict[str, Any]:
        """Resolve the source when the model is new, changed, or follows the origin."""
        resolved = status.get("resolved") or {}
        due = not resolved or status.get("observedGeneration") != spec.generation
        if (
            spec.update_policy == "Latest"
            and time.monotonic() - self._resolved_at.get(spec.key, 0.0) >= self._resync
        ):
            due = True
        if not due:
            return status
        self._resolved_at[spec.key] = time.monotonic()
        try:
            manifest = self.service.engine.resolve([spec.source])
        except (OSError, ValueError) as exc:
            self._write_aggregate(obj, spec, status, resolved_error=("ResolveFailed", str(exc)))
            return status
        version = manifest_version(manifest.objects)
        if len(manifest.objects) == 1:
            version = manifest.objects[0].version
        if spec.revision and not _same_revision(spec.revision, version):
            reason = (
                f"the origin has version {version} of {spec.source}, not the revision "
                f"{spec.revision} the spec pins: cachefs fetches the origin's current "
                "version; change spec.revision (or remove it) to accept this one"
            )
            self._write_aggregate(obj, spec, status, resolved_error=("RevisionNotAtOrigin", reason))
            return status
        if resolved.get("version") == version:
            return {**status, "observedGeneration": spec.generation}
        new = {
            "version": version,
            "objects": len(manifest.objects),
            "bytes": manifest.size,
            "resolvedAt": _stamp(),
            "manifest": manifest_record(manifest),
        }
        update: dict[str, Any] = {"resolved": new, "observedGeneration": spec.generation}
        if resolved:
            update["previous"] = {k: v for k, v in resolved.items() if k != "manifest"}
        log.info(
            "model %s: %s resolved to %s (%d objects, %s)",
            spec.key,
            spec.source,
            version,
            len(manifest.objects),
            format_size(manifest.size),
        )
        # Written with the aggregate, in one apply: never a new version beside the old
        # one's Ready condition.
        return {**status, **update}

    def _fill(self, spec: ModelSpec, obj: dict[str, Any], status: dict[str, Any]) -> None:
        resolved = status.get("resolved") or {}
        local = self._local.setdefault(spec.key, _Local())
        if not any(e.get("name") == self.node_name for e in status.get("nodes") or ()):
            local.reported = ()  # not (or no longer) there: the leader dropped it, or new
        target = str(resolved.get("version") or "")
        if not target:
            self._report(spec, local)  # Pending: the leader has not resolved it yet
            return
        if local.version == target and local.phase in ("Filling", "Ready"):
            self._report(spec, local)
            return
        if (
            local.version == target
            and local.phase == "Failed"
            and time.monotonic() < local.retry_at
        ):
            return
        try:
            manifest = manifest_from_record(spec.source, resolved.get("manifest") or ())
        except (KeyError, ValueError) as exc:
            self._failed(spec, local, target, f"status.resolved is unreadable: {exc}")
            return
        holder = spec.holder(target) if spec.pin else None
        try:
            job = self.service.start_job(
                _CLUSTER, [spec.source], holder, spec.tier, manifest=manifest
            )
        except (OSError, ValueError) as exc:
            self._failed(spec, local, target, str(exc))
            return
        local.version, local.phase, local.error, local.job_id = target, "Filling", "", job.id
        local.manifest = manifest
        local.bytes_done, local.bytes_total = job.bytes_done, job.bytes_total
        log.info("model %s: filling version %s here (job %s)", spec.key, target, job.id)
        self._report(spec, local)
        threading.Thread(
            target=self._follow, args=(spec, local, job.id), name="cachefs-model-fill", daemon=True
        ).start()

    def _follow(self, spec: ModelSpec, local: _Local, job_id: str) -> None:
        """Report a fill's progress, then its end; release older versions once ready."""
        last = 0.0
        job = self.service.job(_CLUSTER, job_id)
        final = None
        for status in job.watch(lambda: not self._stopped.is_set()):
            final = status
            local.bytes_done, local.bytes_total = status.bytes_done, status.bytes_total
            if time.monotonic() - last >= _PROGRESS_EVERY and not status.finished:
                last = time.monotonic()
                self._report(spec, local)
        if final is None or local.job_id != job_id or self._stopped.is_set():
            return  # replaced, or the node stops: its fills are cancelled, not failed
        if final.state == "succeeded":
            local.phase = "Ready"
            local.ready, local.ready_manifest = local.version, local.manifest
            log.info("model %s: version %s ready here", spec.key, local.version)
            self._release(spec, None, keep=local.version)
        else:
            self._failed(spec, local, local.version, final.error or f"the fill {final.state}")
        self._report(spec, local)
        self._wake.set()  # the leader's aggregate

    def _failed(self, spec: ModelSpec, local: _Local, version: str, error: str) -> None:
        local.version, local.phase, local.error = version, "Failed", error
        local.retry_at = time.monotonic() + _FAILED_RETRY
        log.warning("model %s: version %s failed here: %s", spec.key, version, error)
        self._report(spec, local)

    def _release(
        self, spec: ModelSpec, obj: dict[str, Any] | None, everything: bool = False, keep: str = ""
    ) -> None:
        """Unpin this model's versions here (all, or all but ``keep``); with
        ``everything``, also drop this node's entry from the status."""
        prefix = f"model:{spec.key}@"
        store = self.service.engine.store
        for holder in [h for h in store.pins() if h.startswith(prefix)]:
            if everything or holder != prefix + keep:
                store.unpin(holder)
                log.info("model %s: released %s here", spec.key, holder)
        if not everything:
            return
        local = self._local.pop(spec.key, None)
        if local is not None and local.job_id:
            with contextlib.suppress(FileNotFoundError):
                self.service.cancel(_CLUSTER, local.job_id)
        entries = ((obj or {}).get("status") or {}).get("nodes") or []
        if any(e.get("name") == self.node_name for e in entries):
            self.api.apply_status(spec.namespace, spec.name, self.manager, {"nodes": []})

    def _report(self, spec: ModelSpec, local: _Local) -> None:
        entry = {
            "name": self.node_name,
            "phase": local.phase,
            "version": local.version,
            "bytesDone": local.bytes_done,
            "bytesTotal": local.bytes_total,
            "lastError": local.error[:4096],
        }
        fingerprint = tuple(entry.values())
        if fingerprint == local.reported or self._stopped.is_set():
            return  # nothing new, or this node is leaving: its entry goes
        try:
            self.api.apply_status(
                spec.namespace,
                spec.name,
                self.manager,
                {"nodes": [{**entry, "updatedAt": _stamp()}]},
            )
            local.reported = fingerprint
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile: nothing to report
                raise

    def _write_aggregate(
        self,
        obj: dict[str, Any],
        spec: ModelSpec | None,
        status: dict[str, Any],
        resolved_error: tuple[str, str] | None = None,
    ) -> None:
        """The leader's part of the status: conditions and counts."""
        meta = obj.get("metadata") or {}
        resolved = status.get("resolved") or {}
        target = resolved.get("version")
        nodes = [e for e in status.get("nodes") or () if e.get("phase") != "Draining"]
        ready = [e for e in nodes if e.get("phase") == "Ready" and e.get("version") == target]
        failed = [e for e in nodes if e.get("phase") == "Failed"]
        old = {c.get("type"): c for c in status.get("conditions") or ()}
        if resolved_error is not None:
            resolved_condition = ("False", *resolved_error)
        elif resolved:
            resolved_condition = (
                "True",
                "Resolved",
                f"{resolved.get('objects')} objects, "
                f"{format_size(int(resolved.get('bytes') or 0))}, version {target}",
            )
        else:
            resolved_condition = ("Unknown", "Resolving", "the source is being resolved")
        if not resolved:
            ready_condition = ("False", "NotResolved", "waiting for the source to be resolved")
        elif not nodes:
            selector = dict(spec.node_selector) if spec else {}
            ready_condition = (
                "False",
                "NoNodes",
                f"no cachefs node matches nodeSelector {selector or '{}'} yet",
            )
        elif len(ready) == len(nodes):
            ready_condition = ("True", "AllNodesReady", f"version {target} on {len(ready)} nodes")
        else:
            first = failed[0] if failed else None
            ready_condition = (
                "False",
                "NodesFailing" if failed else "Filling",
                f"{len(ready)} of {len(nodes)} nodes ready"
                + (f"; {first['name']}: {first.get('lastError', '')}"[:2000] if first else ""),
            )
        conditions = [
            _condition("Resolved", *resolved_condition, old, meta),
            _condition("Ready", *ready_condition, old, meta),
        ]
        update = {
            **_owned(status),
            "conditions": conditions,
            "readyNodes": len(ready),
            "desiredNodes": len(nodes),
            "ready": f"{len(ready)}/{len(nodes)}",
            "size": format_size(int(resolved.get("bytes") or 0)) if resolved else "",
        }
        if resolved_error is None and spec is not None:
            update["observedGeneration"] = spec.generation
        stored = obj.get("status") or {}
        if all(update.get(k) == stored.get(k) for k in update if k != "conditions") and [
            (c["type"], c["status"], c["reason"], c["message"]) for c in conditions
        ] == [
            (c.get("type"), c.get("status"), c.get("reason"), c.get("message"))
            for c in stored.get("conditions") or ()
        ]:
            return  # nothing new: no write, no event
        self.api.apply_status(
            str(meta.get("namespace")), str(meta.get("name")), LEADER_MANAGER, update
        )

    # -- what volumes name ----------------------------------------------------------

    def model(self, namespace: str, name: str) -> ModelInfo:
        """The model ``namespace/name`` as this node holds it."""
        key = f"{namespace}/{name}"
        if not self._listed.is_set():
            raise BlockingIOError(
                "this node has not listed the CachedModels yet (is the Kubernetes API "
                "reachable?); ask again shortly"
            )
        with self._lock:
            obj = self._models.get(key)
        if obj is None:
            raise FileNotFoundError(
                f"no CachedModel {name} in namespace {namespace} "
                f"(kubectl -n {namespace} get cachedmodels lists them)"
            )
        try:
            spec = parse_model(obj)
        except ValueError as exc:
            raise ValueError(f"CachedModel {key} is invalid: {exc}") from None
        status = obj.get("status") or {}
        target = str((status.get("resolved") or {}).get("version") or "")
        local = self._local.get(key)
        labels = self._node_labels_seen
        info = ModelInfo(namespace, name, spec.source, "", "Pending", target, tier=spec.tier)
        if (obj.get("metadata") or {}).get("deletionTimestamp"):
            return dataclasses.replace(info, phase="Deleting", error="the model is being deleted")
        if labels is not None and not spec.matches(labels):
            return dataclasses.replace(
                info,
                phase="NotSelected",
                error=(
                    f"this node does not match its nodeSelector {dict(spec.node_selector)}: "
                    "schedule the pods that mount it onto the model's nodes (nodeAffinity "
                    f"on {label_key(spec.source)}=ready)"
                ),
            )
        if local is None:
            return info
        ready = local.ready_manifest
        return dataclasses.replace(
            info,
            source=ready.sources[0] if ready is not None else spec.source,
            version=local.ready,
            phase=local.phase,
            bytes_done=local.bytes_done if local.version == target else 0,
            bytes_total=local.bytes_total if local.version == target else 0,
            error=local.error,
        )

    def manifest(self, namespace: str, name: str, version: str) -> tuple[Manifest, str | None]:
        """The manifest of ``version`` as this node filled it, if a new volume gets
        that version now; and the model's tier."""
        local = self._local.get(f"{namespace}/{name}")
        if local is None or local.ready != version or local.ready_manifest is None:
            now = local.ready if local is not None and local.ready else "none"
            raise FileNotFoundError(
                f"version {version} of CachedModel {namespace}/{name} is not the one this "
                f"node serves now ({now}); ask for the model again"
            )
        with self._lock:
            obj = self._models.get(f"{namespace}/{name}") or {}
        tier = (obj.get("spec") or {}).get("tier")
        return local.ready_manifest, tier if isinstance(tier, str) else None

    def _forget_gone(self, present: set[str]) -> None:
        """Models deleted while this node was away: release their pins here."""
        store = self.service.engine.store
        for holder in list(store.pins()):
            if holder.startswith("model:"):
                key = holder.removeprefix("model:").rpartition("@")[0]
                if key not in present:
                    store.unpin(holder)
                    self._local.pop(key, None)
                    log.info("model %s is gone: released %s here", key, holder)


def _owned(status: Mapping[str, Any]) -> dict[str, Any]:
    """The fields the leader owns, as they are: an apply names all of them, or the
    ones it leaves out are removed."""
    keys = ("resolved", "previous", "observedGeneration", "conditions", "readyNodes")
    keys += ("desiredNodes", "ready", "size")
    return {k: status[k] for k in keys if k in status}


def _condition(
    kind: str,
    status: str,
    reason: str,
    message: str,
    old: Mapping[str, Mapping[str, Any]],
    meta: Mapping[str, Any],
) -> dict[str, Any]:
    previous = old.get(kind) or {}
    changed = previous.get("status") != status
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message[:32768],
        "lastTransitionTime": _stamp() if changed else previous.get("lastTransitionTime", _stamp()),
        "observedGeneration": int(meta.get("generation") or 0),
    }


def _same_revision(revision: str, version: str) -> bool:
    """A revision as a user writes it (an ETag with or without quotes, a version id)
    against a version as cachefs records it (``etag:"..."``)."""

    def bare(text: str) -> str:
        text = text.split(":", 1)[1] if ":" in text and not text.startswith("sha256:") else text
        return text.strip().strip('"')

    return revision == version or bare(revision) == bare(version)


def _key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace') or 'default'}/{meta.get('name')}"


def _stamp() -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _brief(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"[:300]
