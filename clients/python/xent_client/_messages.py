"""numpy arrays to xent.v1 messages and back: tensors, requests with every option of the API,
and the results decoded from responses."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, TypedDict

import numpy as np
import numpy.typing as npt

from xent_client._generated import xent_pb2 as pb

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
