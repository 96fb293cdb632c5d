"""A real xentd for the client tests: the binary from $XENTD_BIN (default target/debug/xentd),
started once per session on a port the OS picks, ready once its health service says SERVING;
and torch, required or optional."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]


def import_torch():
    """torch, for the tests of the PyTorch integration. Where XENT_TEST_TORCH=1 (CI sets it, and
    scripts/test then installs torch) a missing torch fails those tests; elsewhere it skips
    them."""
    if os.environ.get("XENT_TEST_TORCH") == "1":
        import torch

        return torch
    return pytest.importorskip("torch", reason="torch is not installed (XENT_TEST_TORCH=1 scripts/test installs it)")


def start_xentd(binary: Path, *args: str):
    """Starts `binary` on a free port with `args` (default: no metrics listener) and returns
    the process and its address once it is SERVING."""
    process = subprocess.Popen(
        [str(binary), "--listen", "127.0.0.1:0", *(args or ("--metrics-listen", "off"))],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = process.stdout.readline().strip()
    if not line.startswith("listening on "):
        process.kill()
        pytest.fail(f"xentd did not print 'listening on ADDR' (got {line!r})")
    address = line.removeprefix("listening on ")
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 60
        while True:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                process.kill()
                pytest.fail("xentd never became SERVING")
            time.sleep(0.05)
    return process, address


def stop_xentd(process) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def xentd_binary() -> Path:
    binary = Path(os.environ.get("XENTD_BIN") or REPO_ROOT / "target" / "debug" / "xentd")
    if not binary.is_file():
        pytest.fail(f"xentd not found at {binary}; `cargo build --bin xentd` or set XENTD_BIN", pytrace=False)
    return binary


@pytest.fixture(scope="session")
def address(xentd_binary) -> str:
    process, address = start_xentd(xentd_binary)
    yield address
    stop_xentd(process)


@pytest.fixture(scope="session")
def second_address(xentd_binary) -> str:
    process, address = start_xentd(xentd_binary)
    yield address
    stop_xentd(process)
