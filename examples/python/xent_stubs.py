"""Python stubs for the xent.v1 API, generated on the fly, and numpy <-> Tensor helpers.

The stubs are never checked in: `load()` runs grpcio-tools' bundled protoc on
`proto/xent/v1/xent.proto` from this repository, the same as

    python -m grpc_tools.protoc -I proto --python_out=OUT --grpc_python_out=OUT xent/v1/xent.proto

and imports the result as `xent.v1.xent_pb2` and `xent.v1.xent_pb2_grpc`.

Requirements: grpcio-tools and numpy (ml-dtypes for bfloat16); see tests/python/requirements.txt.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_FILE = "xent/v1/xent.proto"


def generate(out_dir: Path) -> None:
    """Generate xent/v1/xent_pb2.py and xent_pb2_grpc.py under `out_dir`."""
    from grpc_tools import protoc  # imported here so that importing this module stays cheap

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        PROTO_FILE,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(args)}")
    # Regular packages (not namespace packages), so that nothing else called `xent` on sys.path
    # can shadow the generated modules.
    for package in (out_dir / "xent", out_dir / "xent" / "v1"):
        (package / "__init__.py").touch()


def load(out_dir: Path | None = None) -> SimpleNamespace:
    """Generate (unless already imported) and import the stubs.

    Returns a namespace with `pb` (messages and enums) and `grpc` (XentStub and friends).
    With `out_dir` None the stubs are generated into a temporary directory that is removed once
    they are imported.
    """
    if "xent.v1.xent_pb2_grpc" not in sys.modules:
        if out_dir is None:
            with tempfile.TemporaryDirectory(prefix="xent-stubs-") as tmp:
                _generate_and_import(Path(tmp))
        else:
            _generate_and_import(Path(out_dir))
    return SimpleNamespace(
        pb=sys.modules["xent.v1.xent_pb2"], grpc=sys.modules["xent.v1.xent_pb2_grpc"]
    )


def _generate_and_import(out_dir: Path) -> None:
    generate(out_dir)
    sys.path.insert(0, str(out_dir))
    try:
        importlib.invalidate_caches()
        importlib.import_module("xent.v1.xent_pb2")
        importlib.import_module("xent.v1.xent_pb2_grpc")
    finally:
        sys.path.remove(str(out_dir))


# --- numpy <-> xent.v1.Tensor --------------------------------------------------------------

# DType enum name -> numpy dtype name ("bfloat16" comes from ml_dtypes).
_NUMPY_NAMES = {
    "DTYPE_FLOAT16": "float16",
    "DTYPE_BFLOAT16": "bfloat16",
    "DTYPE_FLOAT32": "float32",
    "DTYPE_FLOAT64": "float64",
    "DTYPE_INT32": "int32",
    "DTYPE_INT64": "int64",
}
# DType enum name -> the typed repeated field that carries it.
_TYPED_FIELDS = {
    "DTYPE_FLOAT16": "float_data",
    "DTYPE_BFLOAT16": "float_data",
    "DTYPE_FLOAT32": "float_data",
    "DTYPE_FLOAT64": "double_data",
    "DTYPE_INT32": "int32_data",
    "DTYPE_INT64": "int64_data",
}


def numpy_dtype(dtype_name: str) -> np.dtype:
    """numpy dtype for a DType enum name such as "DTYPE_FLOAT32"."""
    name = _NUMPY_NAMES[dtype_name]
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def dtype_name_of(array: np.ndarray) -> str:
    """DType enum name for a numpy array's dtype."""
    for enum_name, np_name in _NUMPY_NAMES.items():
        if array.dtype.name == np_name:
            return enum_name
    raise ValueError(f"xent has no dtype for numpy {array.dtype}")


def to_tensor(pb, array, *, typed: bool = False):
    """A Tensor holding `array` (its numpy dtype picks the DType).

    typed=False: little-endian `raw_data` (the fast path). typed=True: the typed repeated field.
    """
    array = np.asarray(array)
    name = dtype_name_of(array)
    tensor = pb.Tensor(dtype=pb.DType.Value(name), shape=list(array.shape))
    if typed:
        values = array.ravel()
        if values.dtype.name in ("float16", "bfloat16"):
            values = values.astype(np.float32)
        getattr(tensor, _TYPED_FIELDS[name]).extend(values.tolist())
    else:
        contiguous = np.ascontiguousarray(array)
        if sys.byteorder == "big":
            contiguous = contiguous.byteswap()
        tensor.raw_data = contiguous.tobytes()
    return tensor


def from_tensor(pb, tensor) -> np.ndarray:
    """The numpy array a Tensor holds, whichever way its data is encoded."""
    name = pb.DType.Name(tensor.dtype)
    if name not in _NUMPY_NAMES:
        raise ValueError(f"tensor has no usable dtype: {name}")
    dtype = numpy_dtype(name)
    shape = tuple(tensor.shape)
    typed = getattr(tensor, _TYPED_FIELDS[name])
    if tensor.raw_data:
        array = np.frombuffer(tensor.raw_data, dtype=dtype)
        if sys.byteorder == "big":
            array = array.byteswap()
    elif len(typed):
        array = np.array(list(typed)).astype(dtype)
    else:
        array = np.zeros(0, dtype=dtype)
    return array.reshape(shape)
