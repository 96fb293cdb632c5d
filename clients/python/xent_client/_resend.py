"""The requests of one EvaluateStream that are sent and not yet answered, across the streams
that carry it.

xentd answers a stream's requests in the order they were sent. When a drain ends a stream
with UNAVAILABLE, it has answered every request it read and none after; when a connection is
lost, some answers may never arrive. Either way the requests not answered are exactly those
after the last answer, so they are kept here, in order, and a new stream on another endpoint
sends them again before it takes more from the caller's iterator. Each answer is handed out
once: the first stream's answers, then the next one's.

Each stream attempt reads requests through its own iterator (`requests` in a gRPC thread
for Client, `arequests` as a task for AsyncClient). An attempt whose stream has ended reads no
more; a request it had begun to take from the caller's iterator is still kept, and the next
attempt sends it. The caller's iterator is read by one attempt at a time.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Any, AsyncIterator, Iterator

from xent_client._generated import xent_pb2 as pb


class Unanswered:
    """Sent and unanswered requests, fed from the caller's `source` (an iterator, or an async
    iterator for `arequests`)."""

    def __init__(self, source: Any) -> None:
        self._source = source
        self._lock = threading.Lock()  # the queue and the attempt number
        self._reading = threading.Lock()  # the caller's iterator
        self._pending: collections.deque[pb.EvaluateRequest] = collections.deque()
        self._first = 0  # sequence number of _pending[0]
        self._attempt = 0
        self._next: asyncio.Future[None] | None = None  # the async read in progress
        self.exhausted = False
        self.error: BaseException | None = None  # raised by the caller's iterator
        self.resent = 0  # requests sent again on a new stream

    def begin(self) -> int:
        """A new stream attempt; the ones before it read no more. Returns its number."""
        with self._lock:
            self._attempt += 1
            if self._attempt > 1:
                self.resent += len(self._pending)
            return self._attempt

    def answered(self) -> None:
        """The oldest unanswered request got its answer."""
        with self._lock:
            if not self._pending:
                raise ValueError("an answer to a request that was not sent")
            self._pending.popleft()
            self._first += 1

    @property
    def unanswered(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def done(self) -> bool:
        """Every request read and answered."""
        with self._lock:
            return self.exhausted and not self._pending

    def _next_pending(self, attempt: int, cursor: int) -> tuple[bool, pb.EvaluateRequest | None, int]:
        """(go on, the request at `cursor` if it is queued, the cursor after it)."""
        with self._lock:
            if attempt != self._attempt:
                return False, None, cursor
            cursor = max(cursor, self._first)
            if cursor - self._first < len(self._pending):
                return True, self._pending[cursor - self._first], cursor + 1
            return not self.exhausted, None, cursor

    def _store(self, request: pb.EvaluateRequest | None) -> None:
        with self._lock:
            if request is None:
                self.exhausted = True
            else:
                self._pending.append(request)

    def requests(self, attempt: int) -> Iterator[pb.EvaluateRequest]:
        """What stream attempt `attempt` sends: the unanswered requests, then new ones."""
        cursor = 0
        while True:
            go_on, request, cursor = self._next_pending(attempt, cursor)
            if request is not None:
                yield request
                continue
            if not go_on:
                return
            with self._reading:
                go_on, request, _ = self._next_pending(attempt, cursor)
                if request is not None or not go_on:
                    continue  # another attempt read one meanwhile, or this one has ended
                try:
                    self._store(next(self._source, None))
                except BaseException as err:
                    self.error = err
                    raise

    async def arequests(self, attempt: int) -> AsyncIterator[pb.EvaluateRequest]:
        """As `requests`, for an async iterator. A read of the caller's iterator is its own
        task, so that cancelling an ended stream's attempt never cancels the caller's
        iterator; the next attempt waits for that same read."""
        cursor = 0
        while True:
            go_on, request, cursor = self._next_pending(attempt, cursor)
            if request is not None:
                yield request
                continue
            if not go_on:
                return
            if self._next is None:
                self._next = asyncio.ensure_future(self._aread())
            await asyncio.shield(self._next)

    async def _aread(self) -> None:
        try:
            self._store(await self._source.__anext__())
        except StopAsyncIteration:
            self._store(None)
        except BaseException as err:
            self.error = err
            raise
        finally:
            self._next = None
