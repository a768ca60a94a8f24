"""Contract types to protobuf messages and back: one conversion per type.

The node's servicer and the gRPC client both use these, so a field added to a type
and to its message (under the same name) crosses the wire without another line
here; tests/test_proto.py holds the two to the same field names. proto3 has no null:
an optional text (``None`` in a type) travels as "".
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from cachefs.proto import cachefs_pb2 as pb
from cachefs.types import (
    JOB_STATES,
    CachedEntry,
    JobStatus,
    ModelInfo,
    NodeStatus,
    ObjectInfo,
    TierStatus,
)

T = TypeVar("T")

# Fields whose message spells them otherwise: type field -> message field.
_RENAMED: dict[type, dict[str, str]] = {CachedEntry: {"url": "name"}}


def _to_message(value: Any, message_class: Any, **overrides: Any) -> Any:
    """A message with every field of ``value`` (a contract dataclass) set."""
    renamed = _RENAMED.get(type(value), {})
    fields = {}
    for f in dataclasses.fields(value):
        item = getattr(value, f.name)
        if item is not None:
            fields[renamed.get(f.name, f.name)] = item
    fields.update(overrides)
    return message_class(**fields)


def _from_message(message: Any, cls: type[T], **overrides: Any) -> T:
    """A ``cls`` (contract dataclass) from the message fields of the same names."""
    renamed = _RENAMED.get(cls, {})
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in overrides or not f.init:
            continue
        item = getattr(message, renamed.get(f.name, f.name))
        if f.default is None and item == "":
            item = None
        elif not isinstance(item, str | bytes | int | float | bool):
            item = tuple(item)  # repeated fields
        values[f.name] = item
    return cls(**values, **overrides)


def job_message(status: JobStatus) -> pb.JobStatus:
    return _to_message(status, pb.JobStatus, state=JOB_STATES.index(status.state) + 1)


def job_status(message: pb.JobStatus) -> JobStatus:
    state = JOB_STATES[message.state - 1] if message.state else "running"
    return _from_message(message, JobStatus, state=state)


def cached_entry_message(entry: CachedEntry) -> pb.Entry:
    return _to_message(entry, pb.Entry, type="file")


def cached_entry(message: pb.Entry) -> CachedEntry:
    return _from_message(message, CachedEntry)


def status_message(status: NodeStatus) -> pb.StatusResponse:
    return _to_message(
        status,
        pb.StatusResponse,
        tiers=[_to_message(tier, pb.TierStatus) for tier in status.tiers],
        jobs=[job_message(job) for job in status.jobs],
    )


def node_status(message: pb.StatusResponse) -> NodeStatus:
    return _from_message(
        message,
        NodeStatus,
        tiers=tuple(_from_message(tier, TierStatus) for tier in message.tiers),
        jobs=tuple(job_status(job) for job in message.jobs),
        pins=dict(message.pins),
        served_bytes=dict(message.served_bytes),
        rpcs=dict(message.rpcs),
    )


def object_message(info: ObjectInfo, block_size: int) -> pb.ObjectInfo:
    return _to_message(dataclasses.replace(info, handle=None), pb.ObjectInfo, block_size=block_size)


def object_info(message: pb.ObjectInfo, handle: Any) -> ObjectInfo:
    return _from_message(message, ObjectInfo, handle=handle)


def model_message(info: ModelInfo) -> pb.ModelInfo:
    return _to_message(info, pb.ModelInfo)


def model_info(message: pb.ModelInfo) -> ModelInfo:
    return _from_message(message, ModelInfo)
