"""Sync and asyncio clients of xentd with numpy in and out.

Both clients keep their channels open for their whole life (connection reuse: one HTTP/2
connection per endpoint), send tensors as raw little-endian bytes by default, put a deadline on
every call when given one, and retry calls answered UNAVAILABLE with exponential backoff and
full jitter, never past the call's deadline. Evaluation has no side effects, so a retry is
always safe.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import grpc
import numpy.typing as npt

from xent_client._generated import xent_pb2 as pb
from xent_client._generated import xent_pb2_grpc as pb_grpc
from xent_client._messages import (
    Health,
    Loss,
    Options,
    Output,
    Reduction,
    Result,
    build_request,
    decode_response,
    from_tensor,
    to_tensor,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "Client",
    "AsyncClient",
    "Result",
    "XentError",
    "RetryPolicy",
    "Options",
    "Health",
    "Loss",
    "Output",
    "Reduction",
    "build_request",
    "decode_response",
    "from_tensor",
    "to_tensor",
]

MAX_MESSAGE_BYTES = 256 << 20
DEFAULT_ADDRESS = "127.0.0.1:50051"

class XentError(Exception):
    """A call failed: `code` is the grpc.StatusCode, `details` the server's message (which
    starts with the field at fault for INVALID_ARGUMENT)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of UNAVAILABLE: `max_attempts` in all; waits uniform in [0, backoff], the
    backoff doubling from `initial_backoff` up to `max_backoff` seconds."""

    max_attempts: int = 4
    initial_backoff: float = 0.05
    max_backoff: float = 2.0

    def wait(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1 for the first)."""
        return random.uniform(0.0, min(self.max_backoff, self.initial_backoff * 2 ** (retry - 1)))


def _channel_options() -> list[tuple[str, object]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.lb_policy_name", "round_robin"),
    ]


def _targets(endpoints: str | Sequence[str] | None) -> list[str]:
    if endpoints is None:
        # As the xent CLI's --address.
        endpoints = os.environ.get("XENT_ADDRESS") or DEFAULT_ADDRESS
    if isinstance(endpoints, str):
        endpoints = [e for e in endpoints.split(",") if e]
    targets = [e.removeprefix("http://") for e in endpoints]
    if not targets:
        raise ValueError("no endpoint given")
    # A bare host:port goes through gRPC's DNS resolver, so a name with several A records
    # (a headless Service) is spread over by the round_robin policy.
    return [t if ":///" in t or t.startswith(("ipv4:", "ipv6:", "unix:")) else f"dns:///{t}" for t in targets]


class Client:
    """A synchronous client. `endpoints` is "host:port", a comma-separated list, or a list;
    calls go round-robin over them. None means $XENT_ADDRESS, as for the xent CLI, or else
    127.0.0.1:50051. `timeout` (seconds) is the default deadline of each call.
    Use as a context manager, or call close()."""

    def __init__(
        self,
        endpoints: str | Sequence[str] | None = None,
        *,
        timeout: float | None = None,
        retry: RetryPolicy = RetryPolicy(),
        typed: bool = False,
    ) -> None:
        self._channels = [grpc.insecure_channel(t, options=_channel_options()) for t in _targets(endpoints)]
        self._stubs = [pb_grpc.XentStub(c) for c in self._channels]
        self._next = itertools.cycle(range(len(self._stubs)))
        self.timeout = timeout
        self.retry = retry
        self.typed = typed
        self.calls = 0  # calls answered successfully
        # Every RPC sent, by the name of the gRPC status code it ended with ("OK",
        # "INVALID_ARGUMENT", ...); a retry is one more. What the server counts in its
        # xent_calls_total{method="Evaluate"}.
        self.codes: collections.Counter[str] = collections.Counter()

    def close(self) -> None:
        for c in self._channels:
            c.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def evaluate(
        self, logits: npt.ArrayLike, labels: npt.ArrayLike, *, timeout: float | None = None, **options: Unpack[Options]
    ) -> Result:
        """Loss and gradients for `logits` and `labels` (numpy arrays); keyword options as in
        the API: loss, axis, label_smoothing, class_weights, sample_weights, ignore_index,
        from_logits, z_loss, reduction, upstream, outputs, request_id."""
        options.setdefault("typed", self.typed)
        return decode_response(self.evaluate_raw(build_request(logits, labels, **options), timeout=timeout))

    def evaluate_raw(self, request: pb.EvaluateRequest, *, timeout: float | None = None) -> pb.EvaluateResponse:
        """Sends a protobuf request, retrying UNAVAILABLE within the deadline."""
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 1
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise XentError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout} s")
            stub = self._stubs[next(self._next)]
            try:
                response: pb.EvaluateResponse = stub.Evaluate(request, timeout=left)
                self.calls += 1
                self.codes["OK"] += 1
                return response
            except grpc.RpcError as err:
                code, details = err.code(), err.details()
                self.codes[code.name] += 1
            if code != grpc.StatusCode.UNAVAILABLE or attempt >= self.retry.max_attempts:
                raise XentError(code, details)
            wait = self.retry.wait(attempt)
            if deadline is not None and time.monotonic() + wait >= deadline:
                raise XentError(code, details)
            time.sleep(wait)
            attempt += 1


class AsyncClient:
    """The asyncio client (grpc.aio), with the API of Client. Create it inside a running
    event loop; use `async with` or `await close()`."""

    def __init__(
        self,
        endpoints: str | Sequence[str] | None = None,
        *,
        timeout: float | None = None,
        retry: RetryPolicy = RetryPolicy(),
        typed: bool = False,
    ) -> None:
        self._channels = [grpc.aio.insecure_channel(t, options=_channel_options()) for t in _targets(endpoints)]
        self._stubs = [pb_grpc.XentStub(c) for c in self._channels]
        self._next = itertools.cycle(range(len(self._stubs)))
        self.timeout = timeout
        self.retry = retry
        self.typed = typed
        self.calls = 0
        self.codes: collections.Counter[str] = collections.Counter()  # as Client.codes

    async def close(self) -> None:
        for c in self._channels:
            await c.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def evaluate(
        self, logits: npt.ArrayLike, labels: npt.ArrayLike, *, timeout: float | None = None, **options: Unpack[Options]
    ) -> Result:
        """As Client.evaluate."""
        options.setdefault("typed", self.typed)
        return decode_response(await self.evaluate_raw(build_request(logits, labels, **options), timeout=timeout))

    async def evaluate_raw(self, request: pb.EvaluateRequest, *, timeout: float | None = None) -> pb.EvaluateResponse:
        """As Client.evaluate_raw."""
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 1
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise XentError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout} s")
            stub = self._stubs[next(self._next)]
            try:
                response: pb.EvaluateResponse = await stub.Evaluate(request, timeout=left)
                self.calls += 1
                self.codes["OK"] += 1
                return response
            except grpc.aio.AioRpcError as err:
                code, details = err.code(), err.details()
                self.codes[code.name] += 1
            if code != grpc.StatusCode.UNAVAILABLE or attempt >= self.retry.max_attempts:
                raise XentError(code, details)
            wait = self.retry.wait(attempt)
            if deadline is not None and time.monotonic() + wait >= deadline:
                raise XentError(code, details)
            await asyncio.sleep(wait)
            attempt += 1
