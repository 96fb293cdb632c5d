"""The replicas a client spreads its calls over, and which of them may take a call now.

Each endpoint (one address) has its own channel, so its failures are its own and the client,
not gRPC's load balancer, decides where each attempt goes: a retry can avoid the endpoint that
just failed, and the count of calls each endpoint got is known. An endpoint is in rotation
only while it is known to serve:

- A new endpoint, and an ejected one when its back-off has run out, is probed with a
  grpc.health `Check` of `xent.v1.Xent` (at most `probe_timeout`; a refused connection fails
  it at once). SERVING puts it in rotation; anything else ejects it again, with the back-off
  doubling from `probe_backoff` up to `probe_max_backoff` seconds (jittered by +-20 %).
- In rotation, a health `Watch` stream runs on its connection. xentd reports NOT_SERVING the
  moment it starts to drain, and the stream breaks when the connection is lost, so either
  ejects the endpoint before calls are sent to it, not after they failed.
- A call that fails UNAVAILABLE without a server's retry delay (connection refused or lost,
  stream refused by a GOAWAY) ejects its endpoint at once. UNAVAILABLE with a RetryInfo
  delay (xentd's queue is full) keeps the endpoint out of rotation for that delay only.
- A server without the health service (UNIMPLEMENTED) is taken as serving; only failed calls
  eject it.

Names are resolved every `resolve_interval` seconds, every second while no endpoint is in
rotation, and at once (at most once a second) when the last one is ejected: addresses that appear become endpoints, addresses that
disappear are dropped once their calls in flight are done. A failed or empty lookup keeps the
name's last answer.

Calls go round robin over the endpoints in rotation, and of the next two in turn the one with
fewer calls in flight takes the call: even spread for a lone caller, and a replica that is
slow (or has a long call) gets fewer of many callers' calls.

Threads: one per endpoint (its probes and its Watch) and one for resolution; the calls run in
the caller's thread (Client) or event loop (AsyncClient, which has channels of its own).
"""

from __future__ import annotations

import collections
import logging
import math
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import grpc

from xent_client import _wire
from xent_client._targets import Name, Resolver, canonical, grpc_target

log = logging.getLogger("xent_client")

HEALTH_SERVICE = "xent.v1.Xent"
MIN_RESOLVE_GAP = 1.0  # seconds between lookups asked for because no endpoint is left
REMOVED_KEPT = 64  # removed endpoints whose counts `stats` still reports

PROBING, SERVING, EJECTED, REMOVED = "probing", "serving", "ejected", "removed"


@dataclass(frozen=True)
class EndpointStats:
    """What a client knows of one endpoint."""

    address: str
    state: str
    """"probing" (new, first health check running), "serving" (in rotation), "ejected"
    (waiting for its next probe), or "removed" (its name no longer resolves to it)."""
    in_flight: int
    """Calls and streams on it now."""
    calls: dict[str, int]
    """RPCs (Evaluate and EvaluateStream) it got, by the gRPC status code they ended with."""
    ejections: int
    """Times it was taken out of rotation."""
    last_error: str
    """Why it was last ejected or failed a probe ("" if never)."""


def describe(err: grpc.RpcError) -> str:
    return f"{err.code().name}: {err.details()}"


class Endpoint:
    """One address: its channel and where it stands. Fields are guarded by the fleet's lock."""

    def __init__(self, address: str, options: list[tuple[str, Any]]) -> None:
        self.address = address
        self.options = options
        self.channel = grpc.insecure_channel(grpc_target(address), options=options)
        self.state = PROBING
        self.in_flight = 0
        self.calls: collections.Counter[str] = collections.Counter()
        self.ejections = 0
        self.failed_probes = 0
        self.next_probe = 0.0
        self.cool_until = 0.0
        self.last_error = ""
        self.health_unimplemented = False
        self.wake = threading.Event()  # set (under the lock) when its state changes
        self.running: grpc.Future | None = None  # its probe or Watch, to cancel
        self.supervised = True  # its thread has not ended
        self.thread: threading.Thread | None = None
        self.stub: Any = None  # the sync client's stub on `channel`
        self.aio: Any = None  # the asyncio client's stub, on a channel of its own

    def stats(self) -> EndpointStats:
        return EndpointStats(self.address, self.state, self.in_flight, dict(self.calls), self.ejections, self.last_error)


class Fleet:
    """The endpoints of one client, kept up to date by its threads."""

    def __init__(
        self,
        entries: list[str | Name],
        *,
        resolver: Resolver,
        resolve_interval: float,
        probe_timeout: float,
        probe_backoff: float,
        probe_max_backoff: float,
        wait_for_ready: bool,
        channel_options: list[tuple[str, Any]],
    ) -> None:
        if resolve_interval <= 0 or probe_timeout <= 0 or not 0 < probe_backoff <= probe_max_backoff:
            raise ValueError("resolve_interval and probe_timeout must be > 0, and 0 < probe_backoff <= probe_max_backoff")
        self._cond = threading.Condition()
        self._endpoints: dict[str, Endpoint] = {}
        self._removed: collections.deque[Endpoint] = collections.deque(maxlen=REMOVED_KEPT)
        self._static = [e for e in entries if isinstance(e, str)]
        self._names = list(dict.fromkeys(e for e in entries if isinstance(e, Name)))
        self._answers: dict[Name, list[str]] = {}
        self._lookup_errors: dict[Name, str] = {}
        self._resolved = not self._names
        self._resolver = resolver
        self._resolve_interval = resolve_interval
        self._probe_timeout = probe_timeout
        self._probe_backoff = probe_backoff
        self._probe_max_backoff = probe_max_backoff
        self._wait_for_ready = wait_for_ready
        self._reconnect = [
            # Keep gRPC's own reconnection back-off near the probes', so that a probe after a
            # short back-off does not find the channel still waiting out a long one.
            ("grpc.initial_reconnect_backoff_ms", int(probe_backoff * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(probe_max_backoff * 1000)),
        ]
        self._options = channel_options
        self._cursor = 0
        self._closed = False
        self._closing = threading.Event()
        self._resolve_now = threading.Event()
        self._listeners: list[Callable[[], None]] = []
        self._set_addresses({a: None for a in self._static})
        self._resolver_thread: threading.Thread | None = None
        if self._names:
            self._resolver_thread = threading.Thread(target=self._resolve_loop, name="xent-resolve", daemon=True)
            self._resolver_thread.start()

    # -- what the calls use

    def add_listener(self, callback: Callable[[], None]) -> None:
        """`callback()` runs (in a fleet thread, under its lock: it must only schedule work)
        whenever an endpoint changes state."""
        with self._cond:
            self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        with self._cond:
            self._listeners.remove(callback)

    def try_pick(self, tried: set[str]) -> tuple[Endpoint | None, float | None]:
        """An endpoint for the next attempt (its call counted as in flight), preferring one not
        in `tried`; or None and how long to wait before asking again (math.inf: until a
        listener is told of a change; None: no endpoint can take it now)."""
        with self._cond:
            if self._closed:
                raise ValueError("the client is closed")
            now = time.monotonic()
            ready = [e for e in self._endpoints.values() if e.state == SERVING and e.cool_until <= now]
            if ready:
                fresh = [e for e in ready if e.address not in tried] or ready
                i = self._cursor % len(fresh)
                self._cursor += 1
                first, second = fresh[i], fresh[(i + 1) % len(fresh)]
                ep = second if second.in_flight < first.in_flight else first
                ep.in_flight += 1
                return ep, None
            cooling = [e.cool_until - now for e in self._endpoints.values() if e.state == SERVING]
            if cooling:
                return None, max(0.0, min(cooling))
            if self._wait_for_ready or not self._resolved or any(e.state == PROBING for e in self._endpoints.values()):
                return None, math.inf
            return None, None

    def pick(self, tried: set[str], deadline: float | None) -> Endpoint | None:
        """As try_pick, waiting (never past `deadline`) while the answer may change."""
        with self._cond:
            while True:
                ep, wait = self.try_pick(tried)
                if ep is not None or wait is None:
                    return ep
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    wait = min(wait, left)
                if wait > 0:
                    self._cond.wait(None if wait == math.inf else wait)

    def has_untried(self, tried: set[str]) -> bool:
        """Whether an endpoint in rotation is not in `tried`."""
        now = time.monotonic()
        with self._cond:
            return any(e.state == SERVING and e.cool_until <= now and e.address not in tried for e in self._endpoints.values())

    def release(self, ep: Endpoint, code: str | None, *, eject: str | None = None, cool: float | None = None) -> None:
        """A call on `ep` ended with `code` (None: it was never sent); `eject` ejects the
        endpoint for that reason, `cool` keeps it out of rotation for that many seconds."""
        with self._cond:
            ep.in_flight -= 1
            if code is not None:
                ep.calls[code] += 1
            if cool:
                ep.cool_until = max(ep.cool_until, time.monotonic() + cool)
                self._changed()
            if eject:
                self._eject(ep, eject)
            close = ep.state == REMOVED and ep.in_flight == 0 and not ep.supervised
        if close:
            ep.channel.close()

    def no_endpoint(self) -> str:
        """Why no endpoint can take a call, for the error that says so."""
        with self._cond:
            parts = [f"{e.address} {e.state}" + (f" ({e.last_error})" if e.last_error else "") for e in self._endpoints.values()]
            parts += [f"{n} did not resolve ({err})" for n, err in self._lookup_errors.items() if n not in self._answers]
        shown = "; ".join(parts[:6]) + (f"; and {len(parts) - 6} more" if len(parts) > 6 else "")
        return f"no endpoint in rotation: {shown or 'none known'}"

    def stats(self) -> list[EndpointStats]:
        """Every endpoint, in the order they were added, then those removed last."""
        with self._cond:
            return [e.stats() for e in self._endpoints.values()] + [e.stats() for e in self._removed]

    def endpoints(self) -> list[Endpoint]:
        with self._cond:
            return list(self._endpoints.values()) + list(self._removed)

    def close(self, wait: bool = True) -> None:
        """Stops the threads (waiting for them to end, unless not `wait`) and closes the
        channels (calls still running are cancelled)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            endpoints = list(self._endpoints.values()) + list(self._removed)
            running = [e.running for e in endpoints if e.running is not None]
            for e in endpoints:
                e.wake.set()
            self._changed()
        self._closing.set()
        self._resolve_now.set()
        for call in running:
            call.cancel()
        for thread in [self._resolver_thread] + [e.thread for e in endpoints]:
            if thread is not None and wait:
                thread.join(timeout=self._probe_timeout + 5)
        for e in endpoints:
            e.channel.close()

    # -- state changes (under the lock)

    def _changed(self) -> None:
        self._cond.notify_all()
        for callback in self._listeners:
            callback()

    def _backoff(self, failed_probes: int) -> float:
        base = min(self._probe_max_backoff, self._probe_backoff * 2.0**failed_probes)
        return min(self._probe_max_backoff, base * random.uniform(0.8, 1.2))

    def _eject(self, ep: Endpoint, reason: str) -> None:
        """Takes a serving endpoint out of rotation until a probe brings it back."""
        if ep.state != SERVING or self._closed:
            return
        log.info("%s ejected: %s", ep.address, reason)
        ep.state = EJECTED
        ep.ejections += 1
        ep.failed_probes = 0
        ep.next_probe = time.monotonic() + self._backoff(0)
        ep.last_error = reason
        ep.wake.set()
        if ep.running is not None:
            ep.running.cancel()  # its Watch
        if self._names and not any(e.state == SERVING for e in self._endpoints.values()):
            self._resolve_now.set()
        self._changed()

    def _probed(self, ep: Endpoint, failure: str | None) -> None:
        if ep.state not in (PROBING, EJECTED):
            return
        if failure is None:
            log.info("%s in rotation", ep.address)
            ep.state = SERVING
            ep.failed_probes = 0
        else:
            ep.state = EJECTED
            ep.last_error = failure
            ep.failed_probes += 1
            ep.next_probe = time.monotonic() + self._backoff(ep.failed_probes)
        self._changed()

    def _set_addresses(self, wanted: dict[str, str | None]) -> None:
        """Makes the endpoints those of `wanted` (address -> the name it came from)."""
        with self._cond:
            if self._closed:
                return
            for address, name in wanted.items():
                if address in self._endpoints:
                    continue
                authority = [("grpc.default_authority", name)] if name else []
                ep = Endpoint(address, self._options + self._reconnect + authority)
                ep.thread = threading.Thread(target=self._supervise, args=(ep,), name=f"xent-health-{address}", daemon=True)
                self._endpoints[address] = ep
                ep.thread.start()
            for address, ep in list(self._endpoints.items()):
                if address not in wanted:
                    log.info("%s removed: no longer resolved", address)
                    del self._endpoints[address]
                    ep.state = REMOVED
                    ep.wake.set()
                    if ep.running is not None:
                        ep.running.cancel()
                    self._removed.append(ep)
            self._changed()

    # -- the threads

    def _supervise(self, ep: Endpoint) -> None:
        """Probes `ep` while it is out of rotation and watches its health while it is in."""
        try:
            while True:
                with self._cond:
                    if ep.state == REMOVED or self._closed:
                        return
                    ep.wake.clear()
                    state, wait = ep.state, ep.next_probe - time.monotonic()
                    idle = state == SERVING and ep.health_unimplemented
                if idle:
                    ep.wake.wait()
                elif state == SERVING:
                    self._watch(ep)
                elif wait > 0:
                    ep.wake.wait(wait)
                else:
                    self._probe(ep)
        except ValueError:  # the channel was closed under a call: the fleet is closing
            return
        finally:
            with self._cond:
                ep.supervised = False
                close = ep.state == REMOVED and ep.in_flight == 0
            if close:
                ep.channel.close()

    def _start(self, ep: Endpoint, call: grpc.Future, state: str) -> bool:
        """Records the probe or Watch `call` of `ep`, unless `ep` left `state` meanwhile."""
        with self._cond:
            if ep.state != state or self._closed:
                call.cancel()
                return False
            ep.running = call
            return True

    def _probe(self, ep: Endpoint) -> None:
        state = ep.state
        check = ep.channel.unary_unary(_wire.HEALTH_CHECK)
        future = check.future(_wire.health_request(HEALTH_SERVICE), timeout=self._probe_timeout)
        if not self._start(ep, future, state):
            return
        failure: str | None
        try:
            status = _wire.health_status(future.result())
            failure = None if status == _wire.SERVING else f"health {_wire.SERVING_STATUS.get(status, status)}"
        except grpc.FutureCancelledError:
            return
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.CANCELLED:
                return
            unimplemented = err.code() == grpc.StatusCode.UNIMPLEMENTED
            failure = None if unimplemented else f"probe: {describe(err)}"
            with self._cond:
                ep.health_unimplemented = unimplemented
        except ValueError as err:
            failure = f"probe: malformed health answer ({err})"
        finally:
            with self._cond:
                ep.running = None
        with self._cond:
            self._probed(ep, failure)

    def _watch(self, ep: Endpoint) -> None:
        watch = ep.channel.unary_stream(_wire.HEALTH_WATCH)
        call = watch(_wire.health_request(HEALTH_SERVICE))
        if not self._start(ep, call, SERVING):
            return
        reason = "health watch ended"
        try:
            for message in call:
                status = _wire.health_status(message)
                if status != _wire.SERVING:
                    reason = f"health {_wire.SERVING_STATUS.get(status, status)}"
                    break
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                with self._cond:
                    ep.health_unimplemented = True
                    ep.running = None
                return
            reason = f"health watch: {describe(err)}"
        except ValueError as err:
            reason = f"malformed health answer ({err})"
        with self._cond:
            ep.running = None
            self._eject(ep, reason)
        call.cancel()

    def _resolve_loop(self) -> None:
        """Resolves every `resolve_interval`; every MIN_RESOLVE_GAP while no endpoint is in
        rotation; and at once (but not sooner than MIN_RESOLVE_GAP after the last lookup)
        when the last one in rotation is ejected."""
        while not self._closing.is_set():
            self._resolve()
            last = time.monotonic()
            with self._cond:
                serving = any(e.state == SERVING for e in self._endpoints.values())
            gap = min(self._resolve_interval, MIN_RESOLVE_GAP)
            if self._resolve_now.wait(self._resolve_interval if serving else gap):
                self._resolve_now.clear()
                self._closing.wait(last + gap - time.monotonic())

    def _resolve(self) -> None:
        """Looks every name up (blocking, outside the lock) and applies the answers."""
        for name in self._names:
            try:
                answer = [canonical(a) for a in self._resolver(name.host, name.port)]
                if not answer:
                    raise ValueError("no addresses")
            except Exception as err:  # a resolver's failure of any kind keeps the last answer
                log.info("%s did not resolve: %s", name, err)
                with self._cond:
                    self._lookup_errors[name] = str(err) or type(err).__name__
                continue
            with self._cond:
                self._answers[name] = answer
                self._lookup_errors.pop(name, None)
        with self._cond:
            wanted: dict[str, str | None] = {a: None for a in self._static}
            for name, answer in self._answers.items():
                for a in answer:
                    wanted.setdefault(a, str(name))
            self._resolved = True
            self._set_addresses(wanted)
