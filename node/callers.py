"""Who is calling: every call to a node has a caller, and the policy decides by it.

- ``cluster``: a holder of the cluster token (``CACHEFS_TOKEN``): another node, or
  the operator's own components (the CSI plugin, prefetch Jobs);
- ``pod``: a process that presents a projected ServiceAccount token (audience
  ``cachefs``), checked with the Kubernetes TokenReview API: its namespace and
  service account;
- ``local``: a process on the node's unix socket without a token: its uid, gid and
  pid as the kernel reports them for the connection (``SO_PEERCRED``);
- ``in-process``: the library's own engine in embedded mode (the user's process
  owns that cache; nothing to check).

A caller is matched against the policy's patterns (``Caller.matches``) and named in
every refusal (``str``); the token itself never appears.
"""

from __future__ import annotations

from dataclasses import dataclass

CALLER_KINDS = ("cluster", "pod", "local")
# Patterns a policy rule may name; those with a value take it after the colon.
PATTERNS = ("any", "cluster", "pod", "local", "uid", "gid", "namespace", "serviceaccount")


@dataclass(frozen=True)
class Caller:
    kind: str  # "cluster", "pod", "local" or "in-process"
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    namespace: str | None = None
    service_account: str | None = None

    def __str__(self) -> str:
        if self.kind == "pod":
            return f"pod service account {self.namespace}/{self.service_account}"
        if self.kind == "local":
            return f"local process uid {self.uid} gid {self.gid} (pid {self.pid})"
        if self.kind == "cluster":
            return "a holder of the cluster token"
        return "this process"

    @property
    def principal(self) -> str:
        """The most specific pattern that names this caller (``uid:1000``, ...)."""
        if self.kind == "pod":
            return f"serviceaccount:{self.namespace}/{self.service_account}"
        if self.kind == "local":
            return f"uid:{self.uid}"
        return self.kind

    def matches(self, pattern: str) -> bool:
        """Whether a policy pattern (``cluster``, ``uid:0``, ``namespace:team-a``...)
        names this caller."""
        name, _, value = pattern.partition(":")
        if self.kind == "in-process":
            return False
        if name == "any":
            return True
        if name in ("cluster", "pod", "local"):
            return self.kind == name
        if name == "uid":
            return self.kind == "local" and str(self.uid) == value
        if name == "gid":
            return self.kind == "local" and str(self.gid) == value
        if name == "namespace":
            return self.kind == "pod" and self.namespace == value
        if name == "serviceaccount":
            return self.kind == "pod" and f"{self.namespace}/{self.service_account}" == value
        return False


IN_PROCESS = Caller("in-process")


def check_pattern(pattern: str) -> str:
    """A caller pattern as the policy accepts it; ValueError says what is wrong."""
    name, colon, value = pattern.partition(":")
    if name not in PATTERNS:
        raise ValueError(
            f"caller {pattern!r} is not a caller pattern: use one of any, cluster, pod, "
            "local, uid:N, gid:N, namespace:NAME, serviceaccount:NAMESPACE/NAME"
        )
    needs_value = name in ("uid", "gid", "namespace", "serviceaccount")
    if needs_value != bool(colon and value):
        raise ValueError(
            f"caller {pattern!r}: {name} "
            + ("needs a value after the colon" if needs_value else "takes no value")
        )
    if name in ("uid", "gid") and not value.isdigit():
        raise ValueError(f"caller {pattern!r}: {name} takes a number")
    if name == "serviceaccount" and value.count("/") != 1:
        raise ValueError(f"caller {pattern!r}: write serviceaccount:NAMESPACE/NAME")
    return pattern
