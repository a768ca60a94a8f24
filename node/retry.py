"""Retries with exponential backoff and full jitter, for transient origin errors only.

A 4xx answer is final (retrying a missing key or a denied request only hides the
cause); 5xx, throttling, resets and timeouts are retried up to ``attempts`` times.
An origin that says when to come back (``Retry-After``, in seconds or as a date) is
waited for that long, up to ``max_retry_after``; one that says to slow down without
a time (429, S3 ``SlowDown``) is given at least ``throttle_delay``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from cachefs.errors import OriginUnavailableError, TransientOriginError
from cachefs.node.config import RetryConfig

T = TypeVar("T")
log = logging.getLogger("cachefs.origin")


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, OriginUnavailableError):
        return False
    return isinstance(exc, TransientOriginError | ConnectionError | TimeoutError)


def backoff_delay(attempt: int, policy: RetryConfig) -> float:
    """Full jitter: uniform in [0, min(max_delay, base_delay * 2**attempt)]."""
    return random.uniform(0, min(policy.max_delay, policy.base_delay * 2**attempt))


def _delay(exc: BaseException, attempt: int, policy: RetryConfig, label: str) -> float:
    """How long to wait before the next attempt: the back-off, or longer when the
    origin asked (``Retry-After``) or said to slow down (429, ``SlowDown``)."""
    delay = backoff_delay(attempt, policy)
    asked = getattr(exc, "retry_after", None)
    if asked is not None:
        if asked > policy.max_retry_after:
            raise OriginUnavailableError(
                f"{label}: the origin asks to wait {asked:.0f}s before a retry (Retry-After), "
                f"longer than retry.max_retry_after ({policy.max_retry_after:g}s); retry later"
            ) from exc
        return max(delay, asked)
    if getattr(exc, "throttled", False):
        return max(delay, policy.throttle_delay * random.uniform(1.0, 1.5))
    return delay


def call_with_retries(
    fn: Callable[[], T],
    policy: RetryConfig,
    label: str,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """Run ``fn``; on a transient error wait and try again, at most ``attempts`` times."""
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if on_retry is not None:
                on_retry(exc)
            if attempt == policy.attempts - 1:
                raise OriginUnavailableError(
                    f"{label}: the origin kept failing after {policy.attempts} attempts "
                    f"(last: {exc}); check that it is reachable, or retry later"
                ) from exc
            delay = _delay(exc, attempt, policy, label)
            log.info(
                "%s; retry %d of %d in %.2fs",
                exc if label in str(exc) else f"{label}: {exc}",
                attempt + 1,
                policy.attempts - 1,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")
