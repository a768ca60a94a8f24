"""The policy: one table that says which caller may do what to which sources.

Each rule names callers (patterns of ``callers.py``: ``cluster``, ``uid:1000``,
``namespace:team-a``, ...), operations and source prefixes; a call is allowed when
some rule names its caller, its operation and a prefix of its source. Operations:

- ``read``: stat, list, read, status (what it shows of jobs and pins is filtered);
- ``prefetch``: prefetch jobs, and pins under the caller's own holder names;
- ``view``: views (what a CSI volume mounts), under the caller's own holder names;
- ``manage``: evict and unpin anything, any holder name, cluster prefetches;
- ``peer``: node-to-node calls (blocks, manifests resolved by another node);
- ``all``: every one of them.

Holder names are the caller's own unless it may ``manage`` every source: a name
``job:x`` given by ``uid:1000`` is kept as ``uid:1000/job:x``, so no caller can
release another's pins. Prefixes match at path boundaries (``s3://models/`` allows
``s3://models/llama/``, never ``s3://models-private/``), on the canonical URL
(``cachefs.urls``), the same form that keys the cache and goes to the origin.

Without a ``policy`` in the config, local processes and the cluster token may do
everything (the socket's mode and group decide who connects) and pods nothing. The
CSI plugin checks the pod behind a volume against the same table (``view``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cachefs.node.callers import IN_PROCESS, Caller, check_pattern
from cachefs.urls import canonical_source

OPERATIONS = ("read", "prefetch", "view", "manage", "peer")
EVERY_SOURCE = "*"


@dataclass(frozen=True)
class Rule:
    callers: tuple[str, ...]
    operations: frozenset[str]
    sources: tuple[str, ...]  # canonical prefixes, or "*"

    @classmethod
    def parse(
        cls, callers: Iterable[str], operations: Iterable[str], sources: Iterable[str]
    ) -> Rule:
        """A rule from its parts as a user writes them; ValueError says what is wrong."""
        patterns = tuple(check_pattern(str(c)) for c in callers)
        if not patterns:
            raise ValueError("a policy rule needs at least one caller")
        allowed: set[str] = set()
        for operation in operations:
            if operation == "all":
                allowed.update(OPERATIONS)
            elif operation in OPERATIONS:
                allowed.add(operation)
            else:
                raise ValueError(
                    f"operation {operation!r} is not one of {', '.join(OPERATIONS)}, all"
                )
        if not allowed:
            raise ValueError("a policy rule needs at least one operation (allow: [...])")
        prefixes = tuple(_prefix(str(s)) for s in sources)
        return cls(patterns, frozenset(allowed), prefixes or (EVERY_SOURCE,))

    def names(self, caller: Caller, operation: str) -> bool:
        return operation in self.operations and any(caller.matches(p) for p in self.callers)

    def covers(self, canonical: str) -> bool:
        return any(_under(canonical, prefix) for prefix in self.sources)


DEFAULT_RULES = (Rule(("cluster", "local"), frozenset(OPERATIONS), (EVERY_SOURCE,)),)


class Policy:
    """The rules of one node (and of its CSI plugin)."""

    def __init__(self, rules: Sequence[Rule] = DEFAULT_RULES) -> None:
        self.rules = tuple(rules)

    @classmethod
    def from_config(cls, raw: Any) -> Policy:
        """The ``policy`` config key: a list of {callers, allow, sources}; None: default."""
        if raw is None:
            return cls()
        if not isinstance(raw, list):
            raise ValueError("config key 'policy' must be a list of rules")
        rules = []
        for index, item in enumerate(raw):
            if not isinstance(item, dict) or not {"callers", "allow"} <= set(item):
                raise ValueError(f"policy[{index}] needs callers and allow")
            unknown = set(item) - {"callers", "allow", "sources"}
            if unknown:
                raise ValueError(f"unknown keys in policy[{index}]: {', '.join(sorted(unknown))}")
            try:
                rules.append(
                    Rule.parse(
                        _strings(item["callers"]),
                        _strings(item["allow"]),
                        _strings(item.get("sources", [EVERY_SOURCE])),
                    )
                )
            except ValueError as exc:
                raise ValueError(f"policy[{index}]: {exc}") from None
        return cls(rules)

    def allows(self, caller: Caller, operation: str, canonical: str) -> bool:
        if caller == IN_PROCESS:
            return True
        return any(r.names(caller, operation) and r.covers(canonical) for r in self.rules)

    def require(self, caller: Caller, operation: str, source: str) -> str:
        """The canonical URL of ``source`` if ``caller`` may ``operation`` it; else a
        PermissionError naming the caller, the source and the rule to add."""
        canonical = canonical_source(source)
        if not self.allows(caller, operation, canonical):
            raise PermissionError(
                f"{caller} may not {operation} {canonical}: no rule of the node's policy "
                f"allows it; add one, e.g. {{callers: [{caller.principal}], allow: "
                f"[{operation}], sources: [{canonical}]}}"
            )
        return canonical

    def require_everywhere(self, caller: Caller, operation: str) -> None:
        """``caller`` may ``operation`` any source (peer calls, cluster prefetches)."""
        if not self.everywhere(caller, operation):
            raise PermissionError(
                f"{caller} may not {operation}: no rule of the node's policy allows it; "
                f"add one, e.g. {{callers: [{caller.principal}], allow: [{operation}]}}"
            )

    def everywhere(self, caller: Caller, operation: str) -> bool:
        if caller == IN_PROCESS:
            return True
        return any(r.names(caller, operation) and EVERY_SOURCE in r.sources for r in self.rules)

    def holder(self, caller: Caller, name: str) -> str:
        """The holder name ``caller`` means by ``name``: its own, unless it manages all."""
        if not name:
            raise ValueError("name the pin's holder")
        if self.everywhere(caller, "manage"):
            return name
        return f"{caller.principal}/{name}"

    def owns(self, caller: Caller, holder: str) -> bool:
        """Whether ``holder`` is one of ``caller``'s (a manager's are all)."""
        return self.everywhere(caller, "manage") or holder.startswith(caller.principal + "/")


def _prefix(source: str) -> str:
    return source if source == EVERY_SOURCE else canonical_source(source)


def _under(canonical: str, prefix: str) -> bool:
    """``canonical`` is ``prefix`` or below it, at a path boundary."""
    if prefix == EVERY_SOURCE:
        return True
    if prefix.endswith("/"):
        return canonical.startswith(prefix) or canonical + "/" == prefix
    return canonical == prefix or canonical.startswith(prefix + "/")


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValueError(f"{value!r} must be a list")
    return [str(v) for v in value]
