"""The daemon's and the embedded engine's configuration.

One YAML file (``CACHEFS_CONFIG``), every key overridable by environment
(``CACHEFS_<SECTION>__<KEY>``, double underscore nests) and by explicit arguments.
Defaults serve a laptop: one disk tier under the user's cache directory.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from cachefs.node.policy import Policy
from cachefs.units import parse_size

DEFAULT_BLOCK_SIZE = 8 * 1024 * 1024
MEDIA = ("memory", "disk")
# Environment variables that are not config keys.
_RESERVED_ENV = {
    "CACHEFS_CONFIG",
    "CACHEFS_ENDPOINT",
    "CACHEFS_TOKEN",
    "CACHEFS_TOKEN_FILE",
    "CACHEFS_TLS_CA",
    "CACHEFS_RECONNECT_GRACE",
    "CACHEFS_POD_TOKEN_FILE",
    "CACHEFS_TEST_CRASH_AT",
    "CACHEFS_TEST_CORRUPT_PEER_BLOCKS",
}


@dataclass(frozen=True)
class TierConfig:
    """A directory with a byte quota. ``quota`` None means: 90% of the free space."""

    name: str
    path: Path
    medium: str = "disk"
    quota: int | None = None


@dataclass(frozen=True)
class OriginConfig:
    """Storage options for every URL under ``prefix`` (longest prefix wins)."""

    prefix: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RetryConfig:
    """How origin requests are retried, bounded and given up on (docs/reliability.md)."""

    attempts: int = 5
    base_delay: float = 0.1
    max_delay: float = 5.0
    timeout: float = 60.0  # seconds one socket read or connect may take
    # A block's GET must bring at least this many bytes per second (after ``timeout``
    # of grace), or it is abandoned and retried: a dripping body cannot hold a fill.
    min_rate: float = 1024 * 1024
    throttle_delay: float = 1.0  # least wait after 429/503 SlowDown without Retry-After
    max_retry_after: float = 120.0  # a longer Retry-After fails the request at once
    breaker_failures: int = 5  # failed requests in a row that open a host's breaker (0: off)
    breaker_cooldown: float = 10.0  # seconds an open breaker fails fast before a probe


@dataclass(frozen=True)
class OriginLimitConfig:
    """Each origin host's limit on requests in flight, adapted to what it delivers
    (node/origins/adaptive.py): it starts at ``concurrency``, rises while more
    requests bring more bytes per second, halves on push-back. The fill pool runs
    as many fills at once as the busiest host's limit allows."""

    # Default: on, unless the config sets `concurrency` (a fixed number of fills then).
    adaptive: bool = True
    max: int = 64  # the most a host may reach (origin_connections bounds it too)
    hold: float = 10.0  # seconds after a cut or a rise that did not pay before the next rise


@dataclass(frozen=True)
class ServerConfig:
    """Where and how ``cachefs node`` listens (flags override these)."""

    node_id: str = ""  # default: the host name
    socket: str = ""  # default: /run/cachefs/cachefs.sock as root, else the user's runtime dir
    socket_mode: int = 0o660
    socket_group: str | None = None
    address: str | None = None  # host:port for TCP clients; needs CACHEFS_TOKEN(_FILE)
    metrics_address: str | None = None  # host:port of the Prometheus endpoint
    tls_cert: str | None = None  # PEM files: with both set, TCP speaks TLS
    tls_key: str | None = None
    shutdown_grace: float = 30.0  # seconds in-flight calls get after SIGTERM
    max_request_bytes: int = 4 * 1024 * 1024
    workers: int = 64  # concurrent calls per listener


@dataclass(frozen=True)
class CsiConfig:
    """How long a ``cachefs csi`` publish waits, and where it records volumes (which
    sources a volume may name is the policy's business: ``view`` for pods)."""

    publish_timeout: float = 60.0  # below kubelet's two-minute operation timeout
    state_dir: str = "/var/lib/cachefs/csi"


MEMBERSHIPS = ("none", "static", "dns", "kubernetes")


@dataclass(frozen=True)
class ClusterConfig:
    """Who the other nodes are, and how a node asks them for blocks."""

    membership: str = "none"  # none | static | dns | kubernetes
    peers: tuple[str, ...] = ()  # static: host:port of every node (this one included)
    self_address: str | None = None  # how peers reach this node; default: its TCP address
    dns_name: str | None = None  # dns: a headless Service name
    dns_port: int = 7070  # dns: the nodes' gRPC port
    dns_resolver: str | None = None  # dns: "ip" or "ip:port"; default: the system's
    refresh_interval: float = 10.0  # dns: seconds between resolutions
    kubernetes_service: str = "cachefs"
    kubernetes_namespace: str | None = None  # default: POD_NAMESPACE, else "default"
    kubernetes_port_name: str = "grpc"
    kubernetes_api_url: str | None = None  # default: in-cluster configuration
    kubeconfig: str | None = None
    peer_timeout: float = 30.0  # seconds a peer may take for one block
    # The port peers fetch blocks from (HTTP/1.1, sendfile), on the TCP listener's
    # host; 0: any free port (nodes learn each other's from Status).
    block_port: int = 0
    backoff: float = 30.0  # seconds a failing peer is avoided
    label_node: bool = False  # label this node's Node with the sources complete here


@dataclass(frozen=True)
class ModelsConfig:
    """CachedModel objects reconciled by ``cachefs node`` (docs/kubernetes.md)."""

    enabled: bool = False  # watch cachedmodels.cachefs.io and fill the matching ones
    lease_name: str = "cachefs-models"  # the Lease whose holder writes the aggregate status
    lease_namespace: str | None = None  # default: POD_NAMESPACE, else "default"
    resync: float = 10.0  # seconds between passes over every model (and Latest re-checks)


@dataclass(frozen=True)
class ScrubConfig:
    """How ``cachefs node`` re-reads its stored blocks: a verified block is served
    without a check, so a bit that flips on the disk later is only found this way."""

    rate: int = 64 * 1024 * 1024  # bytes per second; 0: no scrubber
    pause: float = 3600.0  # seconds from the end of one pass to the start of the next


@dataclass(frozen=True)
class Config:
    tiers: tuple[TierConfig, ...]
    block_size: int = DEFAULT_BLOCK_SIZE
    concurrency: int = 16
    # Origin requests in flight at once, whoever makes them (prefetches, readers,
    # fills peers forward): the node's bulkhead (node/origins/slots.py).
    origin_connections: int = 64
    origin_limit: OriginLimitConfig = field(default_factory=OriginLimitConfig)
    revalidate_after: float = 60.0
    readahead_blocks: int = 4
    group: str | None = None
    origins: tuple[OriginConfig, ...] = ()
    # Non-public networks HTTP redirects may lead to (loopback, private, link-local...).
    allow_redirects_to: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    retry: RetryConfig = field(default_factory=RetryConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    csi: CsiConfig = field(default_factory=CsiConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    scrub: ScrubConfig = field(default_factory=ScrubConfig)  # cachefs node only
    models: ModelsConfig = field(default_factory=ModelsConfig)  # cachefs node only
    policy: Policy = field(default_factory=Policy)  # who may do what (node/policy.py)

    def options_for(self, canonical_url: str) -> dict[str, Any]:
        """Configured storage options of the longest matching origin prefix."""
        best: OriginConfig | None = None
        for origin in self.origins:
            if canonical_url.startswith(origin.prefix) and (
                best is None or len(origin.prefix) > len(best.prefix)
            ):
                best = origin
        return dict(best.options) if best else {}


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("cachefs"))


def default_quota(path: Path) -> int:
    """90% of the space free where ``path`` lives (or its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return int(shutil.disk_usage(probe).free * 0.9)


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build a Config from file, environment and ``overrides``, in rising precedence."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    path = path or environ.get("CACHEFS_CONFIG")
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ValueError(f"cannot read config file {path}: {exc.strerror}") from exc
        import yaml  # only when there is a file to read: it costs start-up time

        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of keys")
        raw.update(loaded)
    _apply_environment(raw, environ)
    if raw.get("tiers") and "CACHEFS_CACHE_DIR" in environ and "cache_dir" not in (overrides or {}):
        raw.pop("cache_dir", None)  # the default tier's root; explicit tiers win
    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = value
    if overrides and overrides.get("cache_dir"):
        raw.pop("tiers", None)  # an explicit cache_dir asks for the single default tier
    return _build(raw)


# What Kubernetes injects for each Service of the namespace (named cachefs...):
# <NAME>_SERVICE_HOST, <NAME>_SERVICE_PORT[_<PORT>], <NAME>_PORT[_<N>_<PROTO>[_<PART>]].
_SERVICE_LINK = re.compile(
    r"CACHEFS(_[A-Z0-9_]*)?_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?"
    r"|PORT(_[0-9]+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)"
)


def _apply_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, value in environ.items():
        if not name.startswith("CACHEFS_") or name in _RESERVED_ENV:
            continue
        if "__" not in name and _SERVICE_LINK.fullmatch(name):
            continue  # a Service's link variable, not ours
        keys = name[len("CACHEFS_") :].lower().split("__")
        if keys[0] not in _KNOWN_KEYS:
            raise ValueError(
                f"{name} names no config key ({keys[0]!r} is not one of "
                f"{', '.join(sorted(_KNOWN_KEYS))}); unset it or fix its name"
            )
        target = raw
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise ValueError(f"{name} overrides a key that is not a section")
        target[keys[-1]] = _parse_value(value)


_KNOWN_KEYS = {
    "tiers",
    "cache_dir",
    "block_size",
    "concurrency",
    "origin_connections",
    "origin_limit",
    "revalidate_after",
    "readahead_blocks",
    "group",
    "origins",
    "allow_redirects_to",
    "retry",
    "server",
    "csi",
    "cluster",
    "policy",
    "scrub",
    "models",
}


def _build(raw: dict[str, Any]) -> Config:
    unknown = set(raw) - _KNOWN_KEYS
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
    tiers = _build_tiers(raw)
    retry_raw = raw.get("retry") or {}
    if not isinstance(retry_raw, dict):
        raise ValueError("config key 'retry' must be a mapping")
    retry = RetryConfig(
        **{
            k: _number(
                v,
                f"retry.{k}",
                low=_RETRY_LOWS[k],
                whole=isinstance(getattr(RetryConfig, k), int),
            )
            for k, v in retry_raw.items()
            if _check_key("retry", k, RetryConfig)
        }
    )
    server = _build_server(raw.get("server") or {})
    csi = _build_csi(raw.get("csi") or {})
    cluster = _build_cluster(raw.get("cluster") or {})
    scrub = _build_scrub(raw.get("scrub"))
    models = _build_models(raw.get("models") or {})
    block_size = _size(raw.get("block_size", DEFAULT_BLOCK_SIZE), "block_size")
    if block_size < 4096 or block_size % 4096:
        raise ValueError(
            f"block_size must be a multiple of 4 KiB, at least 4 KiB, not {block_size} "
            f"({_env_name('block_size')})"
        )
    concurrency = _number(raw.get("concurrency", 16), "concurrency", low=1, high=256, whole=True)
    origin_connections = _number(
        raw.get("origin_connections", 64), "origin_connections", low=1, high=4096, whole=True
    )
    origins = tuple(
        OriginConfig(prefix=str(o["prefix"]), options=dict(o.get("options") or {}))
        for i, o in enumerate(raw.get("origins") or ())
        if _check_entry("origins", i, o, {"prefix", "options"}, "prefix")
    )
    return Config(
        tiers=tiers,
        block_size=block_size,
        concurrency=concurrency,
        origin_connections=origin_connections,
        origin_limit=_build_origin_limit(raw.get("origin_limit"), "concurrency" not in raw),
        revalidate_after=_number(raw.get("revalidate_after", 60.0), "revalidate_after", low=0),
        readahead_blocks=_number(
            raw.get("readahead_blocks", 4), "readahead_blocks", low=0, whole=True
        ),
        group=str(raw["group"]) if raw.get("group") is not None else None,
        origins=origins,
        allow_redirects_to=_build_networks(raw.get("allow_redirects_to")),
        retry=retry,
        server=server,
        csi=csi,
        cluster=cluster,
        scrub=scrub,
        models=models,
        policy=Policy.from_config(raw.get("policy")),
    )


def _build_networks(raw: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``allow_redirects_to``: CIDRs as a list, or one comma-separated string (the
    environment's form); each error names the key and the entry."""
    if raw is None:
        return ()
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple):
        raise ValueError(
            "config key 'allow_redirects_to' (CACHEFS_ALLOW_REDIRECTS_TO) must be a list of "
            f"networks such as [10.0.0.0/8, 127.0.0.1/32], not {raw!r}"
        )
    networks = []
    for index, item in enumerate(items):
        try:
            networks.append(ipaddress.ip_network(str(item).strip()))
        except ValueError:
            raise ValueError(
                f"allow_redirects_to[{index}] {item!r} is not a network: write an address "
                "with its prefix length and no host bits set, such as 10.0.0.0/8, "
                "127.0.0.1/32 or fd00::/8"
            ) from None
    return tuple(networks)


def _build_cluster(raw: Any) -> ClusterConfig:
    if not isinstance(raw, dict):
        raise ValueError("config key 'cluster' must be a mapping")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        _check_key("cluster", key, ClusterConfig)
        default = getattr(ClusterConfig, key)
        if value is None:
            values[key] = None
        elif key == "peers":
            items = value.split(",") if isinstance(value, str) else value
            values[key] = tuple(str(p).strip() for p in items if str(p).strip())
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"cluster.{key} must be true or false, not {value!r}")
            values[key] = value
        elif key == "dns_port":
            values[key] = _number(value, "cluster.dns_port", low=1, high=65535, whole=True)
        elif key == "block_port":
            values[key] = _number(value, "cluster.block_port", low=0, high=65535, whole=True)
        elif isinstance(default, int | float):
            values[key] = _number(value, f"cluster.{key}", low=0, whole=isinstance(default, int))
        else:
            values[key] = str(value)
    cluster = ClusterConfig(**values)
    if cluster.membership not in MEMBERSHIPS:
        raise ValueError(
            f"cluster.membership must be one of {MEMBERSHIPS}, not {cluster.membership!r}"
        )
    if cluster.membership == "static" and not cluster.peers:
        raise ValueError("cluster.membership static needs cluster.peers (host:port of every node)")
    if cluster.membership == "dns" and not cluster.dns_name:
        raise ValueError("cluster.membership dns needs cluster.dns_name (a headless Service name)")
    for peer in cluster.peers:
        host, sep, port = peer.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"cluster.peers entry {peer!r} is not host:port")
    return cluster


def _build_models(raw: Any) -> ModelsConfig:
    if not isinstance(raw, dict):
        raise ValueError("config key 'models' (CACHEFS_MODELS__<KEY>) must be a mapping")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        _check_key("models", key, ModelsConfig)
        if key == "enabled":
            if not isinstance(value, bool):
                raise ValueError(
                    f"models.enabled (CACHEFS_MODELS__ENABLED) must be true or false, not {value!r}"
                )
            values[key] = value
        elif key == "resync":
            values[key] = _number(value, "models.resync", low=0.1, high=3600)
        elif value is not None:
            values[key] = str(value)
    return ModelsConfig(**values)


def _build_origin_limit(raw: Any, adaptive: bool) -> OriginLimitConfig:
    """The adaptive per-host limit's settings; ``adaptive``: the default (off where
    ``concurrency`` is set). Each error names the key and its variable."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(
            "config key 'origin_limit' (CACHEFS_ORIGIN_LIMIT__<KEY>) must be a mapping"
        )
    values: dict[str, Any] = {"adaptive": adaptive}
    for key, value in raw.items():
        _check_key("origin_limit", key, OriginLimitConfig)
        if key == "adaptive":
            if not isinstance(value, bool):
                raise ValueError(
                    "origin_limit.adaptive (CACHEFS_ORIGIN_LIMIT__ADAPTIVE) must be true or "
                    f"false, not {_shown(value)}"
                )
            values[key] = value
        elif key == "max":
            values[key] = _number(value, "origin_limit.max", low=1, high=1024, whole=True)
        elif key == "hold":
            values[key] = _number(value, "origin_limit.hold", low=0, high=3600)
    return OriginLimitConfig(**values)


def _build_scrub(raw: Any) -> ScrubConfig:
    """The scrubber's settings; each error names the key and its environment form."""
    if raw is None:
        return ScrubConfig()
    if not isinstance(raw, dict):
        raise ValueError(
            "config key 'scrub' (CACHEFS_SCRUB__<KEY>) must be a mapping such as "
            f"{{rate: 64MiB, pause: 3600}}, not {raw!r}"
        )
    for key in raw:
        _check_key("scrub", key, ScrubConfig)
    rate = raw.get("rate", ScrubConfig.rate)
    try:
        rate = parse_size(rate)
    except ValueError as exc:
        raise ValueError(
            "scrub.rate (CACHEFS_SCRUB__RATE) is bytes per second, 0 to turn the "
            f"scrubber off: {exc}"
        ) from None
    pause = raw.get("pause", ScrubConfig.pause)
    try:
        seconds = math.nan if isinstance(pause, bool) else float(pause)
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(
            "scrub.pause (CACHEFS_SCRUB__PAUSE) must be the seconds between two passes, "
            f"0 or more (e.g. 3600): {pause!r}"
        )
    return ScrubConfig(rate=rate, pause=seconds)


def _build_csi(raw: Any) -> CsiConfig:
    if not isinstance(raw, dict):
        raise ValueError("config key 'csi' must be a mapping")
    if "allow" in raw:
        raise ValueError(
            "csi.allow is now part of the policy: write its prefixes as a rule, "
            "policy: [{callers: [pod], allow: [view], sources: [PREFIX, ...]}] (callers "
            "namespace:NAME for one namespace)"
        )
    for key in raw:
        _check_key("csi", key, CsiConfig)
    return CsiConfig(
        publish_timeout=checked_publish_timeout(
            raw.get("publish_timeout", CsiConfig.publish_timeout), "csi.publish_timeout"
        ),
        state_dir=str(raw.get("state_dir", CsiConfig.state_dir)),
    )


def checked_publish_timeout(value: Any, name: str) -> float:
    """Seconds a CSI publish waits: kubelet gives up on the call after 120."""
    timeout = float(value)
    if not 1 <= timeout <= 110:
        raise ValueError(
            f"{name} must be between 1 and 110 seconds (kubelet gives up after 120): {timeout:g}"
        )
    return timeout


def _build_server(raw: Any) -> ServerConfig:
    if not isinstance(raw, dict):
        raise ValueError("config key 'server' must be a mapping")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        _check_key("server", key, ServerConfig)
        if value is None:
            values[key] = None
        elif key == "socket_mode":
            try:
                values[key] = int(value, 8) if isinstance(value, str) else int(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"server.socket_mode {value!r} must be an octal mode such as 0660"
                ) from None
            if values[key] & ~0o777 or values[key] & 0o007:
                raise ValueError(
                    f"server.socket_mode {value!r} must be an octal mode without rights "
                    "for others (e.g. 0660)"
                )
        elif key == "max_request_bytes":
            values[key] = _size(value, "server.max_request_bytes")
        elif key in ("shutdown_grace",):
            values[key] = _number(value, f"server.{key}", low=0)
        elif key == "workers":
            values[key] = _number(value, "server.workers", low=1, whole=True)
        else:
            values[key] = str(value)
    if bool(values.get("tls_cert")) != bool(values.get("tls_key")):
        raise ValueError("TLS needs both server.tls_cert and server.tls_key, or neither")
    return ServerConfig(**values)


def _check_entry(section: str, index: int, item: Any, known: set[str], required: str) -> bool:
    if not isinstance(item, dict) or required not in item:
        raise ValueError(f"{section}[{index}] needs at least a {required}")
    unknown = set(item) - known
    if unknown:
        raise ValueError(f"unknown config keys in {section}[{index}]: {', '.join(sorted(unknown))}")
    return True


# The least value of each retry key.
_RETRY_LOWS: dict[str, float] = {
    "attempts": 1,
    "base_delay": 0,
    "max_delay": 0,
    "timeout": 0.001,
    "min_rate": 1,
    "throttle_delay": 0,
    "max_retry_after": 0,
    "breaker_failures": 0,
    "breaker_cooldown": 0,
}


def _env_name(name: str) -> str:
    """The environment variable that sets config key ``name`` ("retry.attempts" ->
    CACHEFS_RETRY__ATTEMPTS; a list's entries, "tiers[0].quota", come with the list's)."""
    return "CACHEFS_" + name.split("[", 1)[0].replace(".", "__").upper()


def _shown(value: Any) -> str:
    return (
        f"{value:g}"
        if isinstance(value, int | float) and not isinstance(value, bool)
        else repr(value)
    )


def _number(
    value: Any, name: str, *, low: float, high: float | None = None, whole: bool = False
) -> Any:
    """A numeric config value, checked: the error names the key, says what it must be
    and names the environment variable that sets it."""
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is not None and (not math.isfinite(number) or (whole and number != int(number))):
        number = None
    span = f"at least {low:g}" if high is None else f"between {low:g} and {high:g}"
    if number is None:
        kind = "a whole number" if whole else "a number"
        span = f"of at least {low:g}" if high is None else span
        raise ValueError(f"{name} must be {kind} {span}, not {_shown(value)} ({_env_name(name)})")
    if number < low or (high is not None and number > high):
        raise ValueError(f"{name} must be {span}, not {_shown(value)} ({_env_name(name)})")
    return int(number) if whole else float(number)


def _size(value: Any, name: str) -> int:
    """A size config value ("8MiB", 40GiB, 1000000), checked like ``_number``."""
    try:
        return parse_size(value)
    except ValueError:
        pass
    if (isinstance(value, int | float) and value < 0) or str(value).strip().startswith("-"):
        raise ValueError(
            f"{name} must be a size of 0 or more, not a negative one: {_shown(value)} "
            f"({_env_name(name)})"
        ) from None
    raise ValueError(
        f"{name} is not a size: {_shown(value)} ({_env_name(name)}); write e.g. 8MiB, "
        "40GiB, 1000000"
    ) from None


def _check_key(section: str, key: str, cls: type) -> bool:
    if not hasattr(cls, key):
        raise ValueError(f"unknown config key {section}.{key}")
    return True


def _build_tiers(raw: dict[str, Any]) -> tuple[TierConfig, ...]:
    spec = raw.get("tiers")
    if not spec:
        cache_dir = raw.get("cache_dir") or default_cache_dir()
        return (TierConfig(name="disk", path=Path(cache_dir).expanduser(), medium="disk"),)
    if raw.get("cache_dir"):
        raise ValueError("set either cache_dir or tiers, not both")
    tiers = []
    for index, item in enumerate(spec):
        _check_entry("tiers", index, item, {"name", "path", "medium", "quota"}, "path")
        medium = str(item.get("medium", "disk"))
        if medium not in MEDIA:
            raise ValueError(f"tiers[{index}].medium must be one of {MEDIA}, not {medium!r}")
        quota = item.get("quota")
        tiers.append(
            TierConfig(
                name=str(item.get("name", medium)),
                path=Path(item["path"]).expanduser(),
                medium=medium,
                quota=_size(quota, f"tiers[{index}].quota") if quota is not None else None,
            )
        )
    names = [t.name for t in tiers]
    if len(set(names)) != len(names):
        raise ValueError(f"tier names must be unique: {names}")
    return tuple(tiers)


def _parse_value(value: str) -> Any:
    """An environment value as YAML would read it ("8" -> 8, "true" -> True)."""
    if not value:
        return value
    import yaml

    return yaml.safe_load(value)
