"""Sync and asyncio clients of xentd with numpy in and out, balanced over its replicas.

A client is given addresses and names (a Kubernetes headless Service: one address per ready
pod) and keeps one HTTP/2 connection to each address for its whole life (`_fleet`: which
endpoints are in rotation, health checks, re-resolution). Every call and stream goes to one
endpoint in rotation; UNAVAILABLE is retried on another within the call's deadline (`_retry`),
and an `EvaluateStream` cut by a drain or a lost connection sends its unanswered requests
again on another endpoint (`_resend`), so each request is answered once. Tensors travel as raw
little-endian bytes by default (`_messages`).
"""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import math
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence, TypedDict

import grpc
import numpy.typing as npt

from xent_client import _targets
from xent_client._fleet import Endpoint, EndpointStats, Fleet
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
from xent_client._resend import Unanswered
from xent_client._retry import Attempts, RetryPolicy, XentError, server_delay, write_after_end
from xent_client._targets import DEFAULT_ADDRESS, Resolver

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "AsyncClient",
    "Client",
    "ClientOptions",
    "EndpointStats",
    "Health",
    "Loss",
    "Options",
    "Output",
    "Reduction",
    "Result",
    "RetryPolicy",
    "XentError",
    "build_request",
    "decode_response",
    "from_tensor",
    "to_tensor",
    "DEFAULT_ADDRESS",
    "MAX_MESSAGE_BYTES",
]

MAX_MESSAGE_BYTES = 256 << 20


def _channel_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # Retries are the client's (`_retry`): each attempt picks its endpoint and is counted.
        ("grpc.enable_retries", 0),
    ]


class ClientOptions(TypedDict, total=False):
    """The keyword arguments of Client and AsyncClient (their docstring says what each does)."""

    timeout: float | None
    retry: RetryPolicy
    typed: bool
    wait_for_ready: bool
    resolve_interval: float
    resolver: Resolver | None
    probe_timeout: float
    probe_backoff: float
    probe_max_backoff: float


class _Balanced:
    """What Client and AsyncClient share: the fleet, the retry rule and the counts."""

    def __init__(self, endpoints: str | Sequence[str] | None = None, **options: Unpack[ClientOptions]) -> None:
        unknown = set(options) - set(ClientOptions.__annotations__)
        if unknown:
            raise TypeError(f"unknown keyword arguments: {', '.join(sorted(unknown))}")
        self.timeout = options.get("timeout")
        self.retry = options.get("retry") or RetryPolicy()
        self.typed = options.get("typed", False)
        self._lock = threading.Lock()
        self.calls = 0  # calls answered successfully
        # Every Evaluate RPC sent, by the name of the gRPC status code it ended with ("OK",
        # "INVALID_ARGUMENT", ...); a retry is one more. What the server counts in its
        # xent_calls_total{method="Evaluate"}.
        self.codes: collections.Counter[str] = collections.Counter()
        self.stream_codes: collections.Counter[str] = collections.Counter()  # EvaluateStream RPCs
        self.retries = 0  # attempts that were retries (of calls and streams)
        self.retried_calls = 0  # calls and streams that took more than one attempt
        self.resent = 0  # stream requests sent again on a new stream
        self._fleet = Fleet(
            _targets.parse(endpoints),
            resolver=options.get("resolver") or _targets.getaddrinfo,
            resolve_interval=options.get("resolve_interval", 30.0),
            probe_timeout=options.get("probe_timeout", 1.0),
            probe_backoff=options.get("probe_backoff", 0.1),
            probe_max_backoff=options.get("probe_max_backoff", 5.0),
            wait_for_ready=options.get("wait_for_ready", False),
            channel_options=_channel_options(),
        )
        # A client dropped without close() still stops its threads and closes its channels.
        self._finalizer = weakref.finalize(self, self._fleet.close, False)

    def _close_fleet(self) -> None:
        self._finalizer.detach()
        self._fleet.close()

    def endpoints(self) -> list[EndpointStats]:
        """Every endpoint with its state and the calls it got; those removed last at the end."""
        return self._fleet.stats()

    def _failed(
        self, attempts: Attempts, ep: Endpoint, err: grpc.RpcError, codes: collections.Counter[str], *, cut: bool = False
    ) -> float:
        """Records a failed attempt on `ep`; the seconds to wait before the next one, or raises.
        `cut`: a stream ended early whatever its code says (the health watch decides whether
        the endpoint stays in rotation)."""
        code: grpc.StatusCode = err.code()
        details: str = err.details() or ""
        cool = eject = None
        if code == grpc.StatusCode.UNAVAILABLE:
            cool = server_delay(err, self.retry)
            if cool is None:
                eject = details or code.name
        self._fleet.release(ep, code.name, eject=eject, cool=cool)
        with self._lock:
            codes[code.name] += 1
        return attempts.after(code, details, untried=self._fleet.has_untried(attempts.tried), cut=cut)

    def _unplaced(self, attempts: Attempts) -> float:
        """An attempt found no endpoint: the seconds to wait before the next one, or raises."""
        attempts.left()
        attempts.start(None)
        return attempts.after(grpc.StatusCode.UNAVAILABLE, self._fleet.no_endpoint(), untried=False)

    def _answered(self, ep: Endpoint, codes: collections.Counter[str]) -> None:
        self._fleet.release(ep, "OK")
        with self._lock:
            codes["OK"] += 1
            if codes is self.codes:
                self.calls += 1

    def _done(self, attempts: Attempts, feed: Unanswered | None = None) -> None:
        with self._lock:
            self.retries += attempts.retries
            self.retried_calls += attempts.retries > 0
            if feed is not None:
                self.resent += feed.resent


class Client(_Balanced):
    """A synchronous client, safe to share between threads.

    `endpoints` is "host:port", a comma-separated list, or a list; None means $XENT_ADDRESS,
    as for the xent CLI, or else 127.0.0.1:50051. A name stands for every address it resolves
    to (see `resolver`). Keyword arguments:

    - `timeout`: default deadline of each call and stream, in seconds (None: none).
    - `retry`: how often and how late UNAVAILABLE is retried (`RetryPolicy`).
    - `typed`: send and ask for typed tensor fields instead of raw bytes.
    - `wait_for_ready`: when no endpoint is in rotation, wait for one (within the deadline)
      instead of failing the attempt at once.
    - `resolve_interval`: seconds between lookups of the names (30).
    - `resolver`: `resolver(host, port)` gives the addresses ("ip:port") a name stands for;
      the default asks the system (getaddrinfo: /etc/hosts, DNS).
    - `probe_timeout`: how long a health probe of an endpoint out of rotation may take (1 s).
    - `probe_backoff`, `probe_max_backoff`: seconds before the first probe of an ejected
      endpoint (0.1), doubling after each failed probe up to the maximum (5).

    Use as a context manager, or call close().
    """

    def close(self) -> None:
        self._close_fleet()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _stub(ep: Endpoint) -> pb_grpc.XentStub:
        if ep.stub is None:
            ep.stub = pb_grpc.XentStub(ep.channel)
        stub: pb_grpc.XentStub = ep.stub
        return stub

    def _pick(self, attempts: Attempts) -> Endpoint:
        while True:
            ep = self._fleet.pick(attempts.tried, attempts.deadline)
            if ep is not None:
                attempts.start(ep.address)
                return ep
            time.sleep(self._unplaced(attempts))

    def evaluate(
        self, logits: npt.ArrayLike, labels: npt.ArrayLike, *, timeout: float | None = None, **options: Unpack[Options]
    ) -> Result:
        """Loss and gradients for `logits` and `labels` (numpy arrays); keyword options as in
        the API: loss, axis, label_smoothing, class_weights, sample_weights, ignore_index,
        from_logits, z_loss, reduction, upstream, outputs, request_id."""
        options.setdefault("typed", self.typed)
        return decode_response(self.evaluate_raw(build_request(logits, labels, **options), timeout=timeout))

    def evaluate_raw(self, request: pb.EvaluateRequest, *, timeout: float | None = None) -> pb.EvaluateResponse:
        """Sends a protobuf request, retrying UNAVAILABLE on another endpoint within the deadline."""
        attempts = Attempts(self.retry, self.timeout if timeout is None else timeout)
        try:
            while True:
                ep = self._pick(attempts)
                try:
                    response: pb.EvaluateResponse = self._stub(ep).Evaluate(request, timeout=attempts.left())
                except grpc.RpcError as err:
                    time.sleep(self._failed(attempts, ep, err, self.codes))
                    continue
                except BaseException:
                    self._fleet.release(ep, None)
                    raise
                self._answered(ep, self.codes)
                return response
        finally:
            self._done(attempts)

    def evaluate_stream(
        self, requests: Iterable[pb.EvaluateRequest], *, timeout: float | None = None
    ) -> Iterator[pb.EvaluateStreamResponse]:
        """Pipelines `requests` (made by `build_request`) over one EvaluateStream and yields
        each answer, in order: a response, or an error for that request alone. When the stream
        is cut (a drain, a lost connection), the requests not answered yet go again on another
        endpoint, so each is answered once. `requests` is read as the stream can take them,
        in a gRPC thread."""
        attempts = Attempts(self.retry, self.timeout if timeout is None else timeout)
        feed = Unanswered(iter(requests))
        try:
            while True:
                ep = self._pick(attempts)
                attempt = feed.begin()
                call = None
                try:
                    call = self._stub(ep).EvaluateStream(feed.requests(attempt), timeout=attempts.left())
                    for response in call:
                        feed.answered()
                        attempts.progress()
                        yield response
                except grpc.RpcError as err:
                    if feed.error is not None:
                        self._fleet.release(ep, err.code().name)
                        raise feed.error from None
                    time.sleep(self._failed(attempts, ep, err, self.stream_codes))
                    continue
                except BaseException:  # the caller stopped reading, or a bug
                    if call is not None:
                        call.cancel()
                    self._fleet.release(ep, "CANCELLED" if call is not None else None)
                    raise
                self._answered(ep, self.stream_codes)
                if not feed.done:
                    raise XentError(grpc.StatusCode.INTERNAL, f"the stream ended with {feed.unanswered} requests unanswered")
                return
        finally:
            self._done(attempts, feed)


async def _async_iter(items: Iterable[pb.EvaluateRequest]) -> AsyncIterator[pb.EvaluateRequest]:
    for item in items:
        yield item


class AsyncClient(_Balanced):
    """The asyncio client (grpc.aio), with the API and the keyword arguments of Client. Create
    it inside a running event loop; use `async with` or `await close()`. Its calls run in
    the loop on channels of their own; the health checks and lookups run in threads."""

    def __init__(self, endpoints: str | Sequence[str] | None = None, **options: Unpack[ClientOptions]) -> None:
        self._loop = asyncio.get_running_loop()  # before any thread starts: RuntimeError outside a loop
        super().__init__(endpoints, **options)
        self._channels: dict[Endpoint, grpc.aio.Channel] = {}

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        await self._loop.run_in_executor(None, self._close_fleet)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _stub(self, ep: Endpoint) -> pb_grpc.XentStub:
        if ep.aio is None:
            channel = grpc.aio.insecure_channel(_targets.grpc_target(ep.address), options=ep.options)
            self._channels[ep] = channel
            ep.aio = pb_grpc.XentStub(channel)
        stub: pb_grpc.XentStub = ep.aio
        return stub

    async def _release(self, ep: Endpoint, code: str | None) -> None:
        self._fleet.release(ep, code)
        await self._close_removed()

    async def _close_removed(self) -> None:
        for ep in [e for e in self._channels if e.state == "removed" and e.in_flight == 0]:
            await self._channels.pop(ep).close()
            ep.aio = None

    async def _pick(self, attempts: Attempts) -> Endpoint:
        """As Client's, waiting in the loop: the fleet's threads wake it when endpoints change."""
        changed = asyncio.Event()

        def wake() -> None:
            try:
                self._loop.call_soon_threadsafe(changed.set)
            except RuntimeError:  # the loop is closed
                pass

        listening = False
        try:
            while True:
                changed.clear()
                ep, wait = self._fleet.try_pick(attempts.tried)
                if ep is not None:
                    attempts.start(ep.address)
                    return ep
                if wait is not None and not listening:
                    self._fleet.add_listener(wake)
                    listening = True
                    continue  # look again: a change may have come before the listener
                if wait is not None and attempts.deadline is not None:
                    left = attempts.deadline - time.monotonic()
                    wait = None if left <= 0 else min(wait, left)
                if wait is None:
                    await asyncio.sleep(self._unplaced(attempts))
                    continue
                if wait > 0:
                    try:
                        await asyncio.wait_for(changed.wait(), None if wait == math.inf else wait)
                    except asyncio.TimeoutError:
                        pass
        finally:
            if listening:
                self._fleet.remove_listener(wake)

    async def evaluate(
        self, logits: npt.ArrayLike, labels: npt.ArrayLike, *, timeout: float | None = None, **options: Unpack[Options]
    ) -> Result:
        """As Client.evaluate."""
        options.setdefault("typed", self.typed)
        return decode_response(await self.evaluate_raw(build_request(logits, labels, **options), timeout=timeout))

    async def evaluate_raw(self, request: pb.EvaluateRequest, *, timeout: float | None = None) -> pb.EvaluateResponse:
        """As Client.evaluate_raw."""
        attempts = Attempts(self.retry, self.timeout if timeout is None else timeout)
        try:
            while True:
                ep = await self._pick(attempts)
                try:
                    response: pb.EvaluateResponse = await self._stub(ep).Evaluate(request, timeout=attempts.left())
                except grpc.RpcError as err:
                    wait = self._failed(attempts, ep, err, self.codes)
                    await self._close_removed()
                    await asyncio.sleep(wait)
                    continue
                except BaseException:
                    await self._release(ep, None)
                    raise
                self._answered(ep, self.codes)
                await self._close_removed()
                return response
        finally:
            self._done(attempts)

    async def evaluate_stream(
        self, requests: AsyncIterable[pb.EvaluateRequest] | Iterable[pb.EvaluateRequest], *, timeout: float | None = None
    ) -> AsyncIterator[pb.EvaluateStreamResponse]:
        """As Client.evaluate_stream; `requests` may be an async iterable (read in the loop
        as the stream can take them)."""
        attempts = Attempts(self.retry, self.timeout if timeout is None else timeout)
        source = requests.__aiter__() if isinstance(requests, collections.abc.AsyncIterable) else _async_iter(requests)
        feed = Unanswered(source)
        try:
            while True:
                ep = await self._pick(attempts)
                attempt = feed.begin()
                call = None
                try:
                    call = self._stub(ep).EvaluateStream(feed.arequests(attempt), timeout=attempts.left())
                    async for response in call:
                        feed.answered()
                        attempts.progress()
                        yield response
                except grpc.RpcError as err:
                    if feed.error is not None:
                        await self._release(ep, err.code().name)
                        raise feed.error from None
                    wait = self._failed(attempts, ep, err, self.stream_codes, cut=write_after_end(err))
                    await self._close_removed()
                    await asyncio.sleep(wait)
                    continue
                except BaseException:  # the caller stopped reading, or a bug
                    if call is not None:
                        call.cancel()
                    await self._release(ep, "CANCELLED" if call is not None else None)
                    raise
                self._answered(ep, self.stream_codes)
                await self._close_removed()
                if not feed.done:
                    raise XentError(grpc.StatusCode.INTERNAL, f"the stream ended with {feed.unanswered} requests unanswered")
                return
        finally:
            self._done(attempts, feed)
