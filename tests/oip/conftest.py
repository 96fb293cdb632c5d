"""Fixtures for the Open Inference Protocol tests: the real xentd binary, once per session
(and `running_xentd` for a test that needs other flags).

The binary (path from $XENTD_BIN, default target/debug/xentd) is started on ephemeral ports
for gRPC and for its Prometheus metrics, its `listening on HOST:PORT` line is read, and it is
stopped with SIGTERM at the end, expecting a clean exit. Readiness is waited for through
tritonclient's own `is_server_ready`, which is part of what is under test.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 15.0
LISTENING_LINE = re.compile(r"^listening on (127\.0\.0\.1:\d+)$")


@dataclass
class Xentd:
    address: str
    metrics: str
    process: subprocess.Popen
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-8000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_xentd(directory: Path, *flags: str):
    """The real xentd with `flags`, on ephemeral ports, ready; stopped with SIGTERM after."""
    binary = Path(os.environ.get("XENTD_BIN") or REPO_ROOT / "target" / "debug" / "xentd")
    if not binary.is_file():
        pytest.fail(f"xentd not found at {binary}; build it or set XENTD_BIN", pytrace=False)
    stderr_path = directory / "stderr.log"
    metrics = f"127.0.0.1:{_free_port()}"
    with open(stderr_path, "wb") as stderr_file:
        process = subprocess.Popen(
            [str(binary), "--listen", "127.0.0.1:0", "--metrics-listen", metrics, *flags],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr_file,
            text=True,
        )
    line = process.stdout.readline()
    match = LISTENING_LINE.match(line.rstrip("\r\n"))
    if not match:
        process.kill()
        process.wait()
        pytest.fail(f"xentd printed {line!r}; stderr:\n{stderr_path.read_text()}")
    server = Xentd(match.group(1), metrics, process, stderr_path)

    client = grpcclient.InferenceServerClient(server.address)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _ready(client):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"xentd never became ready; stderr:\n{server.stderr()}")
        time.sleep(0.05)
    client.close()

    yield server

    assert process.poll() is None, f"xentd died during the tests:\n{server.stderr()}"
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=SHUTDOWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"xentd did not exit after SIGTERM:\n{server.stderr()}")
    assert code == 0, f"xentd exited with {code}:\n{server.stderr()}"


@pytest.fixture(scope="session")
def xentd(tmp_path_factory) -> Xentd:
    with running_xentd(tmp_path_factory.mktemp("xentd")) as server:
        yield server


def _ready(client) -> bool:
    try:
        return client.is_server_ready()
    except Exception:  # noqa: BLE001  (not listening yet: keep polling)
        return False


@pytest.fixture(scope="session")
def client(xentd):
    c = grpcclient.InferenceServerClient(xentd.address)
    yield c
    c.close()
