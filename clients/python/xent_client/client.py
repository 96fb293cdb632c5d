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
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Literal, Sequence, TypedDict

import grpc
import numpy as np
import numpy.typing as npt

from xent_client._generated import xent_pb2 as pb
from xent_client._generated import xent_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Client", "AsyncClient", "Result", "XentError", "RetryPolicy", "Options"]

MAX_MESSAGE_BYTES = 256 << 20
DEFAULT_ADDRESS = "127.0.0.1:50051"

Loss = Literal["softmax_cross_entropy", "sparse_softmax_cross_entropy"]
Reduction = Literal["none", "sum", "mean", "sum_over_batch_size", "sum_by_nonzero_weights"]
Output = Literal["loss", "grad_logits", "grad_labels"]


class Options(TypedDict, total=False):
    """The keyword options of `Client.evaluate`, named and typed as in the API (see
    `build_request` for their defaults)."""

    loss: Loss | None
    axis: int
    label_smoothing: float
    class_weights: npt.ArrayLike | None
    sample_weights: npt.ArrayLike | None
    ignore_index: int | None
    from_logits: bool
    z_loss: float
    reduction: Reduction
    upstream: npt.ArrayLike | None
    outputs: Iterable[Output]
    typed: bool
    request_id: str


REDUCTIONS = {
    "none": pb.REDUCTION_NONE,
    "sum": pb.REDUCTION_SUM,
    "mean": pb.REDUCTION_MEAN,
    "sum_over_batch_size": pb.REDUCTION_SUM_OVER_BATCH_SIZE,
    "sum_by_nonzero_weights": pb.REDUCTION_SUM_BY_NONZERO_WEIGHTS,
}
OUTPUTS = {
    "loss": pb.OUTPUT_LOSS,
    "grad_logits": pb.OUTPUT_GRAD_LOGITS,
    "grad_labels": pb.OUTPUT_GRAD_LABELS,
}
LOSSES = {
    "softmax_cross_entropy": pb.LOSS_KIND_SOFTMAX_CROSS_ENTROPY,
    "sparse_softmax_cross_entropy": pb.LOSS_KIND_SPARSE_SOFTMAX_CROSS_ENTROPY,
}

# numpy dtype name -> (DType, typed field)
_DTYPES = {
    "float16": (pb.DTYPE_FLOAT16, "float_data"),
    "bfloat16": (pb.DTYPE_BFLOAT16, "float_data"),
    "float32": (pb.DTYPE_FLOAT32, "float_data"),
    "float64": (pb.DTYPE_FLOAT64, "double_data"),
    "int32": (pb.DTYPE_INT32, "int32_data"),
    "int64": (pb.DTYPE_INT64, "int64_data"),
}
_BY_ENUM = {enum: (name, field) for name, (enum, field) in _DTYPES.items()}


def _numpy_dtype(name: str) -> np.dtype[Any]:
    if name == "bfloat16":
        import ml_dtypes

        bfloat16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return bfloat16
    return np.dtype(name)


def to_tensor(array: npt.ArrayLike, *, typed: bool = False) -> pb.Tensor:
    """A Tensor holding `array`; its numpy dtype picks the wire dtype."""
    array = np.asarray(array)
    if array.dtype.name not in _DTYPES:
        raise TypeError(f"xent has no dtype for numpy {array.dtype}; use float16, bfloat16, float32, float64, int32 or int64")
    enum, field = _DTYPES[array.dtype.name]
    tensor = pb.Tensor(dtype=enum, shape=list(array.shape))
    if typed:
        values = array.ravel()
        if values.dtype.name in ("float16", "bfloat16"):
            values = values.astype(np.float32)
        getattr(tensor, field).extend(values.tolist())
    else:
        data = np.ascontiguousarray(array)
        if sys.byteorder == "big":
            data = data.byteswap()
        tensor.raw_data = data.tobytes()
    return tensor


def from_tensor(tensor: pb.Tensor) -> npt.NDArray[Any]:
    """The numpy array a Tensor holds, raw or typed."""
    if tensor.dtype not in _BY_ENUM:
        raise ValueError(f"tensor has unknown dtype {tensor.dtype}")
    name, field = _BY_ENUM[tensor.dtype]
    dtype = _numpy_dtype(name)
    shape = tuple(tensor.shape)
    if tensor.raw_data:
        array = np.frombuffer(tensor.raw_data, dtype=dtype)
        if sys.byteorder == "big":
            array = array.byteswap()
    else:
        array = np.asarray(getattr(tensor, field)).astype(dtype)
    return array.reshape(shape)


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


@dataclass(frozen=True)
class Health:
    """What the server saw of a request's numbers (counts over the rows it computed)."""

    nonfinite_inputs: int = 0
    """NaN or infinite values in logits, dense labels, weights and upstream (-inf masks too)."""
    unnormalized_label_rows: int = 0
    """Dense label rows whose sum is off 1 by more than 1e-3 (1e-2 for halves)."""
    nonfinite_loss_rows: int = 0
    """Rows whose (weighted) per-example loss is NaN or infinite."""


@dataclass
class Result:
    """The outputs asked for (None otherwise), in the logits' dtype, and the numerical
    health of the request."""

    loss: npt.NDArray[Any] | None
    grad_logits: npt.NDArray[Any] | None
    grad_labels: npt.NDArray[Any] | None
    request_id: str = ""
    health: Health = field(default_factory=Health)


def build_request(
    logits: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    loss: Loss | None = None,
    axis: int = -1,
    label_smoothing: float = 0.0,
    class_weights: npt.ArrayLike | None = None,
    sample_weights: npt.ArrayLike | None = None,
    ignore_index: int | None = None,
    from_logits: bool = True,
    z_loss: float = 0.0,
    reduction: Reduction = "none",
    upstream: npt.ArrayLike | None = None,
    outputs: Iterable[Output] = ("loss", "grad_logits"),
    typed: bool = False,
    request_id: str = "",
) -> pb.EvaluateRequest:
    """An EvaluateRequest from numpy arrays. `loss` defaults to sparse_softmax_cross_entropy
    for integer labels and softmax_cross_entropy for float labels."""
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if loss is None:
        loss = "sparse_softmax_cross_entropy" if np.issubdtype(labels.dtype, np.integer) else "softmax_cross_entropy"
    if loss not in LOSSES:
        raise ValueError(f"loss {loss!r}: expected one of {sorted(LOSSES)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r}: expected one of {sorted(REDUCTIONS)}")
    if loss == "sparse_softmax_cross_entropy" and labels.dtype.name not in ("int32", "int64"):
        labels = labels.astype(np.int64)
    wanted = list(outputs)
    for o in wanted:
        if o not in OUTPUTS:
            raise ValueError(f"output {o!r}: expected some of {sorted(OUTPUTS)}")

    def weights(w: npt.ArrayLike | None) -> pb.Tensor | None:
        if w is None:
            return None
        w = np.asarray(w)
        if not np.issubdtype(w.dtype, np.floating) and w.dtype.name != "bfloat16":
            w = w.astype(np.float64)
        return to_tensor(w, typed=typed)

    req = pb.EvaluateRequest(
        request_id=request_id,
        loss=LOSSES[loss],
        logits=to_tensor(logits, typed=typed),
        labels=to_tensor(labels, typed=typed),
        axis=axis,
        label_smoothing=label_smoothing,
        from_logits=from_logits,
        z_loss=z_loss,
        reduction=REDUCTIONS[reduction],
        outputs=[OUTPUTS[o] for o in wanted],
        response_encoding=pb.ENCODING_TYPED if typed else pb.ENCODING_RAW,
    )
    if ignore_index is not None:
        req.ignore_index = ignore_index
    for name, value in (("class_weights", class_weights), ("sample_weights", sample_weights), ("upstream", upstream)):
        t = weights(value)
        if t is not None:
            getattr(req, name).CopyFrom(t)
    return req


def decode_response(resp: pb.EvaluateResponse) -> Result:
    """numpy arrays of a response."""

    def get(name: str) -> npt.NDArray[Any] | None:
        return from_tensor(getattr(resp, name)) if resp.HasField(name) else None

    h = resp.health
    health = Health(h.nonfinite_inputs, h.unnormalized_label_rows, h.nonfinite_loss_rows)
    return Result(get("loss"), get("grad_logits"), get("grad_labels"), resp.request_id, health)


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
