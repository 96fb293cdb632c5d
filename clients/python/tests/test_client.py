"""xent_client against a real xentd: every reference case of tests/reference (made by
TensorFlow, Keras and PyTorch) through the numpy API, raw and typed, sync and asyncio; errors,
deadlines, retries and several endpoints."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import grpc
import ml_dtypes
import numpy as np
import pytest

from xent_client import AsyncClient, Client, Health, RetryPolicy, XentError

HERE = Path(__file__).resolve().parent
REFERENCE = HERE.parents[2] / "tests" / "reference"
MANIFEST = json.loads((REFERENCE / "manifest.json").read_text())
TOL = {"float64": (1e-9, 1e-12), "float32": (3e-5, 2e-6), "float16": (4e-3, 1e-4), "bfloat16": (2e-2, 1e-3)}
CASES = [c for c in MANIFEST["cases"] if "expected" in c]
ERRORS = [c for c in MANIFEST["cases"] if "error" in c]


def wire_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def arguments(case):
    """(logits, labels, options) as the client takes them."""
    load = lambda key: np.load(REFERENCE / case["inputs"][key])  # noqa: E731
    dtype = wire_dtype(case["dtype"])
    logits = load("logits").astype(dtype)
    labels = load("labels")
    if case["loss"] == "sparse_softmax_cross_entropy":
        labels = labels.astype(case.get("label_dtype", "int64"))
    else:
        labels = labels.astype(dtype)
    options = {k: v for k, v in case["options"].items() if v is not None}
    for key in ("class_weights", "sample_weights", "upstream"):
        if key in case["inputs"]:
            options[key] = load(key)
    outputs = ["loss", "grad_logits"] + (["grad_labels"] if case["loss"] == "softmax_cross_entropy" else [])
    return logits, labels, dict(options, loss=case["loss"], outputs=outputs)


def check(case, result):
    rtol, atol = TOL[case["dtype"]]
    for name, path in case["expected"].items():
        want = np.load(REFERENCE / path).astype(np.float64)
        got = getattr(result, name)
        assert got is not None, name
        assert got.dtype == wire_dtype(case["dtype"]), name
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=rtol, atol=atol, err_msg=f"{case['name']} {name}")


@pytest.fixture(scope="module")
def client(address):
    with Client(address, timeout=30) as c:
        yield c


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_reference_cases_raw(client, case):
    logits, labels, options = arguments(case)
    check(case, client.evaluate(logits, labels, **options))


@pytest.mark.parametrize("case", CASES[::7], ids=[c["name"] for c in CASES[::7]])
def test_reference_cases_typed(address, case):
    logits, labels, options = arguments(case)
    with Client(address, timeout=30, typed=True) as c:
        check(case, c.evaluate(logits, labels, **options))


@pytest.mark.parametrize("case", ERRORS, ids=[c["name"] for c in ERRORS])
def test_refusals_name_the_field(client, case):
    logits, labels, options = arguments(case)
    options["outputs"] = ["loss"]
    with pytest.raises(XentError) as err:
        client.evaluate(logits, labels, **options)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details.startswith(case["error"]["field"]), err.value.details


def test_asyncio_client_concurrent_calls(address):
    case = next(c for c in CASES if c["name"] == "spec_example_none_f64")
    logits, labels, options = arguments(case)

    async def main():
        async with AsyncClient(address, timeout=30) as c:
            results = await asyncio.gather(*[c.evaluate(logits, labels, **options) for _ in range(16)])
            assert c.calls == 16
            return results

    for r in asyncio.run(main()):
        check(case, r)


def test_deadline_exceeded(address):
    x = np.zeros((4096, 1024), np.float32)
    with Client(address) as c:
        with pytest.raises(XentError) as err:
            c.evaluate(x, np.zeros(4096, np.int64), timeout=1e-4)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_several_endpoints_round_robin_and_unavailable_is_retried(address, second_address):
    x = np.array([[1, 2, 0.5], [0.2, 0.8, 1.5]], np.float32)
    y = np.array([1, 2])
    # 127.0.0.1:1 refuses connections: its calls are UNAVAILABLE and retried on the next one.
    retry = RetryPolicy(max_attempts=4, initial_backoff=0.001, max_backoff=0.01)
    with Client(["127.0.0.1:1", address, second_address], timeout=30, retry=retry) as c:
        for _ in range(12):
            r = c.evaluate(x, y, reduction="mean")
            assert abs(float(r.loss) - 0.51742470) < 1e-6
        assert c.calls == 12
    with Client("127.0.0.1:1", timeout=5, retry=RetryPolicy(max_attempts=2, initial_backoff=0.001)) as c:
        with pytest.raises(XentError) as err:
            c.evaluate(x, y)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_every_dtype_and_outputs(client):
    x = np.array([[1, 2, 0.5], [0.2, 0.8, 1.5]])
    y = np.array([[0, 1, 0], [0, 0, 1]])
    for name in ("float16", "bfloat16", "float32", "float64"):
        dtype = wire_dtype(name)
        r = client.evaluate(x.astype(dtype), y.astype(dtype), outputs=["grad_labels"])
        assert r.loss is None and r.grad_logits is None
        assert r.grad_labels.dtype == dtype and r.grad_labels.shape == (2, 3)
        for ids in (np.array([1, 2], np.int32), np.array([1, 2], np.int64)):
            r = client.evaluate(x.astype(dtype), ids)
            rtol, atol = TOL[name]
            # The semantics document's worked example, given to 8 digits.
            want = [0.46436878, 0.57048061]
            np.testing.assert_allclose(r.loss.astype(np.float64), want, rtol=max(rtol, 1e-7), atol=atol)


def test_numerical_health(client):
    x = np.array([[1.0, np.nan, 0.5], [0.2, -np.inf, 1.5], [0.1, 0.2, 0.3]], np.float32)
    y = np.array([[0, 1, 0], [0, 0, 1], [0.5, 0, 0]], np.float32)
    r = client.evaluate(x, y)
    assert r.health == Health(nonfinite_inputs=2, unnormalized_label_rows=1, nonfinite_loss_rows=1)
    assert client.evaluate(x[2:] * 0, y[:1]).health == Health()


def test_generated_stubs_are_up_to_date():
    script = HERE.parent / "scripts" / "generate_stubs.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, f"stale stubs; run {script}\n{done.stderr}"


def test_dependency_floors_are_those_of_the_generated_stubs():
    import re
    import tomllib

    sys.path.insert(0, str(HERE.parent / "scripts"))
    try:
        import generate_stubs
    finally:
        sys.path.pop(0)
    generated = HERE.parent / "xent_client" / "_generated"
    dependencies = tomllib.loads((HERE.parent / "pyproject.toml").read_text())["project"]["dependencies"]

    def floor(package: str) -> str:
        [spec] = [d for d in dependencies if re.match(rf"{package}\s*>=", d)]
        return re.match(rf"{package}\s*>=\s*([0-9.]+)", spec).group(1)

    # The protobuf runtime the _pb2 gencode was written for, and the grpcio its _pb2_grpc asks for.
    gencode = re.search(r"^# Protobuf Python Version: ([0-9.]+)$", (generated / "xent_pb2.py").read_text(), re.M)
    grpc_version = re.search(r"^GRPC_GENERATED_VERSION = '([0-9.]+)'$", (generated / "xent_pb2_grpc.py").read_text(), re.M)
    assert floor("protobuf") == gencode.group(1)
    assert floor("grpcio") == grpc_version.group(1) == generate_stubs.GENERATOR
