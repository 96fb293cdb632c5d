"""What a failed attempt means and whether, when and where the call is tried again.

One rule for every call and stream of both clients: UNAVAILABLE is retried, nothing else is.
xentd answers UNAVAILABLE when it is shutting down or its queue is full, with a
`google.rpc.RetryInfo` delay; gRPC itself reports UNAVAILABLE when a connection failed or was
lost, or a stream was refused by a GOAWAY. Evaluation has no side effects, so a retry is always
safe, even of a call the server may have seen. A retry on an endpoint the call has not tried
goes at once; a retry that can only go back to one it tried waits a backoff with full jitter.
Every retry stays within the call's deadline.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc

from xent_client import _wire


class XentError(Exception):
    """A call failed: `code` is the grpc.StatusCode, `details` the server's message (which
    starts with the field at fault for INVALID_ARGUMENT)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of UNAVAILABLE: `max_attempts` in all (counted afresh once a stream has been
    answered); a retry back to an endpoint already tried waits uniform in [0, backoff], the
    backoff doubling from `initial_backoff` up to `max_backoff` seconds. A server's RetryInfo
    delay, at most `max_backoff`, keeps calls off that endpoint for that long."""

    max_attempts: int = 4
    initial_backoff: float = 0.05
    max_backoff: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts is {self.max_attempts}; at least 1")
        if not 0 <= self.initial_backoff <= self.max_backoff:
            raise ValueError("backoffs must satisfy 0 <= initial_backoff <= max_backoff")

    def wait(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1 for the first)."""
        return random.uniform(0.0, min(self.max_backoff, self.initial_backoff * 2 ** (retry - 1)))


def server_delay(err: grpc.RpcError, policy: RetryPolicy) -> float | None:
    """The RetryInfo delay the server attached to `err`, capped at the policy's max_backoff;
    None when there is none (a transport failure, not an answer of the server)."""
    metadata = err.trailing_metadata() or ()
    for key, value in metadata:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            delay = _wire.retry_delay(value)
            return None if delay is None else min(delay, policy.max_backoff)
    return None


def write_after_end(err: grpc.RpcError) -> bool:
    """Whether `err` is grpc.aio's INTERNAL for a stream write that failed because the stream
    had just ended: grpc.aio then reports INTERNAL "Internal error from Core" in place of the
    status the server sent (grpc/grpc#36066). The server ended the stream before the client
    was done with it, so it was cut (a drain or a lost connection); what it said is lost."""
    if err.code() != grpc.StatusCode.INTERNAL:
        return False
    debug = getattr(err, "debug_error_string", None)
    return callable(debug) and "SendMessageOperation" in str(debug())


class Attempts:
    """The attempts of one call or stream: its deadline, the endpoints it tried, how many
    attempts it has left."""

    def __init__(self, policy: RetryPolicy, timeout: float | None) -> None:
        self.policy = policy
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.tried: set[str] = set()
        self.number = 0  # attempts since the start or the last progress
        self.retries = 0  # attempts after the first, in all
        self._started = False

    def left(self) -> float | None:
        """Seconds to the deadline (None: no deadline); raises DEADLINE_EXCEEDED when past it."""
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise XentError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {self.timeout} s")
        return left

    def start(self, address: str | None) -> None:
        """An attempt goes to `address` (None: it found no endpoint)."""
        if self._started:
            self.retries += 1
        self._started = True
        self.number += 1
        if address is not None:
            self.tried.add(address)

    def progress(self) -> None:
        """A stream was answered: its next failure starts a fresh count of attempts."""
        self.number = 0
        self.tried.clear()

    def after(self, code: grpc.StatusCode, details: str, *, untried: bool, cut: bool = False) -> float:
        """After a failed attempt: the seconds to wait before the next one, or raises the
        failure as an XentError when it is not retried. `untried` says whether an endpoint
        the call has not tried can take it; `cut` that a stream was cut, whatever `code` says."""
        if (code != grpc.StatusCode.UNAVAILABLE and not cut) or self.number >= self.policy.max_attempts:
            raise XentError(code, details)
        wait = 0.0 if untried else self.policy.wait(self.number)
        if self.deadline is not None and time.monotonic() + wait >= self.deadline:
            raise XentError(code, details)
        return wait
