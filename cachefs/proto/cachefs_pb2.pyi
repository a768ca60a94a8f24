from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ObjectInfo(_message.Message):
    __slots__ = ("url", "version", "size", "id", "is_directory", "complete", "local_path", "inode", "block_size", "etag")
    URL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    IS_DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PATH_FIELD_NUMBER: _ClassVar[int]
    INODE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    url: str
    version: str
    size: int
    id: str
    is_directory: bool
    complete: bool
    local_path: str
    inode: int
    block_size: int
    etag: str
    def __init__(self, url: _Optional[str] = ..., version: _Optional[str] = ..., size: _Optional[int] = ..., id: _Optional[str] = ..., is_directory: _Optional[bool] = ..., complete: _Optional[bool] = ..., local_path: _Optional[str] = ..., inode: _Optional[int] = ..., block_size: _Optional[int] = ..., etag: _Optional[str] = ...) -> None: ...

class StatRequest(_message.Message):
    __slots__ = ("url",)
    URL_FIELD_NUMBER: _ClassVar[int]
    url: str
    def __init__(self, url: _Optional[str] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("url", "cached")
    URL_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    url: str
    cached: bool
    def __init__(self, url: _Optional[str] = ..., cached: _Optional[bool] = ...) -> None: ...

class Entry(_message.Message):
    __slots__ = ("name", "size", "type", "version", "cached_bytes", "tier", "complete", "pinned_by", "id", "verified", "superseded")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CACHED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    PINNED_BY_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    type: str
    version: str
    cached_bytes: int
    tier: str
    complete: bool
    pinned_by: _containers.RepeatedScalarFieldContainer[str]
    id: str
    verified: str
    superseded: bool
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., type: _Optional[str] = ..., version: _Optional[str] = ..., cached_bytes: _Optional[int] = ..., tier: _Optional[str] = ..., complete: _Optional[bool] = ..., pinned_by: _Optional[_Iterable[str]] = ..., id: _Optional[str] = ..., verified: _Optional[str] = ..., superseded: _Optional[bool] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[Entry]
    def __init__(self, entries: _Optional[_Iterable[_Union[Entry, _Mapping]]] = ...) -> None: ...

class ReadRequest(_message.Message):
    __slots__ = ("url", "version", "size", "offset", "length", "chunk_size")
    URL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    url: str
    version: str
    size: int
    offset: int
    length: int
    chunk_size: int
    def __init__(self, url: _Optional[str] = ..., version: _Optional[str] = ..., size: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class ReadChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("sources", "pin_holder", "tier", "cluster", "objects")
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    PIN_HOLDER_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    sources: _containers.RepeatedScalarFieldContainer[str]
    pin_holder: str
    tier: str
    cluster: bool
    objects: _containers.RepeatedCompositeFieldContainer[ObjectInfo]
    def __init__(self, sources: _Optional[_Iterable[str]] = ..., pin_holder: _Optional[str] = ..., tier: _Optional[str] = ..., cluster: _Optional[bool] = ..., objects: _Optional[_Iterable[_Union[ObjectInfo, _Mapping]]] = ...) -> None: ...

class JobRef(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("id", "state", "sources", "pin_holder", "bytes_total", "bytes_done", "objects_total", "objects_done", "fetched_bytes", "cached_before", "evicted_during", "seconds", "error", "error_kind", "nodes_total", "nodes_done", "peer_bytes")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[JobStatus.State]
        RUNNING: _ClassVar[JobStatus.State]
        SUCCEEDED: _ClassVar[JobStatus.State]
        FAILED: _ClassVar[JobStatus.State]
        CANCELLED: _ClassVar[JobStatus.State]
    STATE_UNSPECIFIED: JobStatus.State
    RUNNING: JobStatus.State
    SUCCEEDED: JobStatus.State
    FAILED: JobStatus.State
    CANCELLED: JobStatus.State
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    PIN_HOLDER_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_DONE_FIELD_NUMBER: _ClassVar[int]
    FETCHED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    EVICTED_DURING_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_KIND_FIELD_NUMBER: _ClassVar[int]
    NODES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NODES_DONE_FIELD_NUMBER: _ClassVar[int]
    PEER_BYTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: JobStatus.State
    sources: _containers.RepeatedScalarFieldContainer[str]
    pin_holder: str
    bytes_total: int
    bytes_done: int
    objects_total: int
    objects_done: int
    fetched_bytes: int
    cached_before: int
    evicted_during: int
    seconds: float
    error: str
    error_kind: str
    nodes_total: int
    nodes_done: int
    peer_bytes: int
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[JobStatus.State, str]] = ..., sources: _Optional[_Iterable[str]] = ..., pin_holder: _Optional[str] = ..., bytes_total: _Optional[int] = ..., bytes_done: _Optional[int] = ..., objects_total: _Optional[int] = ..., objects_done: _Optional[int] = ..., fetched_bytes: _Optional[int] = ..., cached_before: _Optional[int] = ..., evicted_during: _Optional[int] = ..., seconds: _Optional[float] = ..., error: _Optional[str] = ..., error_kind: _Optional[str] = ..., nodes_total: _Optional[int] = ..., nodes_done: _Optional[int] = ..., peer_bytes: _Optional[int] = ...) -> None: ...

class UnpinRequest(_message.Message):
    __slots__ = ("holder", "sources")
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    holder: str
    sources: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, holder: _Optional[str] = ..., sources: _Optional[_Iterable[str]] = ...) -> None: ...

class UnpinResponse(_message.Message):
    __slots__ = ("objects",)
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    objects: int
    def __init__(self, objects: _Optional[int] = ...) -> None: ...

class ViewRequest(_message.Message):
    __slots__ = ("holder", "sources", "tier", "model", "version")
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    holder: str
    sources: _containers.RepeatedScalarFieldContainer[str]
    tier: str
    model: str
    version: str
    def __init__(self, holder: _Optional[str] = ..., sources: _Optional[_Iterable[str]] = ..., tier: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ViewResponse(_message.Message):
    __slots__ = ("path", "objects", "bytes")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    path: str
    objects: int
    bytes: int
    def __init__(self, path: _Optional[str] = ..., objects: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class ModelRequest(_message.Message):
    __slots__ = ("namespace", "name")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("namespace", "name", "source", "version", "phase", "target", "bytes_done", "bytes_total", "error", "tier")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    source: str
    version: str
    phase: str
    target: str
    bytes_done: int
    bytes_total: int
    error: str
    tier: str
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ..., source: _Optional[str] = ..., version: _Optional[str] = ..., phase: _Optional[str] = ..., target: _Optional[str] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., error: _Optional[str] = ..., tier: _Optional[str] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("sources",)
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    sources: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sources: _Optional[_Iterable[str]] = ...) -> None: ...

class EvictResponse(_message.Message):
    __slots__ = ("objects", "bytes")
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    objects: int
    bytes: int
    def __init__(self, objects: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStatus(_message.Message):
    __slots__ = ("name", "medium", "path", "quota", "used", "pinned", "objects", "evictions", "reserved", "high_water", "state", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEDIUM_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    HIGH_WATER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    medium: str
    path: str
    quota: int
    used: int
    pinned: int
    objects: int
    evictions: int
    reserved: int
    high_water: int
    state: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., medium: _Optional[str] = ..., path: _Optional[str] = ..., quota: _Optional[int] = ..., used: _Optional[int] = ..., pinned: _Optional[int] = ..., objects: _Optional[int] = ..., evictions: _Optional[int] = ..., reserved: _Optional[int] = ..., high_water: _Optional[int] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("node_id", "tiers", "pins", "jobs", "served_bytes", "hits", "misses", "fetched_bytes", "rpcs", "uptime_seconds", "members", "block_port")
    class PinsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ServedBytesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class RpcsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    PINS_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    SERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    FETCHED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RPCS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_PORT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    tiers: _containers.RepeatedCompositeFieldContainer[TierStatus]
    pins: _containers.ScalarMap[str, int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobStatus]
    served_bytes: _containers.ScalarMap[str, int]
    hits: int
    misses: int
    fetched_bytes: int
    rpcs: _containers.ScalarMap[str, int]
    uptime_seconds: float
    members: _containers.RepeatedScalarFieldContainer[str]
    block_port: int
    def __init__(self, node_id: _Optional[str] = ..., tiers: _Optional[_Iterable[_Union[TierStatus, _Mapping]]] = ..., pins: _Optional[_Mapping[str, int]] = ..., jobs: _Optional[_Iterable[_Union[JobStatus, _Mapping]]] = ..., served_bytes: _Optional[_Mapping[str, int]] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., fetched_bytes: _Optional[int] = ..., rpcs: _Optional[_Mapping[str, int]] = ..., uptime_seconds: _Optional[float] = ..., members: _Optional[_Iterable[str]] = ..., block_port: _Optional[int] = ...) -> None: ...
