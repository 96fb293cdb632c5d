"""The real xentd for the co-installation tests, and a way to run a user's program.

The binary (path from $XENTD_BIN, default target/debug/xentd) is started once on a port the OS
picks, its `listening on HOST:PORT` line is read, and it is used once grpc.health reports
SERVING; SIGTERM stops it at the end, expecting a clean exit. The health check is sent as raw
bytes: this environment deliberately holds only what a user of the three clients would have
(no grpcio-health-checking), and tritonclient and kserve cannot be imported into one process
(both register the `inference` protobuf package in protobuf's default pool), so the fixture
imports neither.

Each client runs in a program of its own (`run_program`), as a user's script would.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 15.0
PROGRAM_TIMEOUT_S = 120.0
LISTENING_LINE = re.compile(r"^listening on (127\.0\.0\.1:\d+)$")
# grpc.health.v1.HealthCheckResponse{status: SERVING}
SERVING = b"\x08\x01"


@dataclass
class Xentd:
    address: str
    process: subprocess.Popen
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-8000:]


def _serving(channel: grpc.Channel) -> bool:
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check", request_serializer=bytes, response_deserializer=bytes
    )
    try:
        return check(b"", timeout=2) == SERVING
    except grpc.RpcError:
        return False


@pytest.fixture(scope="session")
def xentd(tmp_path_factory) -> Xentd:
    binary = Path(os.environ.get("XENTD_BIN") or REPO_ROOT / "target" / "debug" / "xentd")
    if not binary.is_file():
        pytest.fail(f"xentd not found at {binary}; build it or set XENTD_BIN", pytrace=False)
    stderr_path = tmp_path_factory.mktemp("xentd") / "stderr.log"
    with open(stderr_path, "wb") as stderr_file:
        process = subprocess.Popen(
            [str(binary), "--listen", "127.0.0.1:0", "--metrics-listen", "off"],
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
    server = Xentd(match.group(1), process, stderr_path)
    with grpc.insecure_channel(server.address) as channel:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _serving(channel):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                pytest.fail(f"xentd never reported SERVING; stderr:\n{server.stderr()}")
            time.sleep(0.05)

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


@dataclass
class Program:
    value: object
    """What the program printed as JSON on its last line of stdout."""
    stderr: str


def run_program(source: str, *, env: dict[str, str] | None = None) -> Program:
    """Runs `source` with this environment's Python in a fresh process, expecting exit 0."""
    done = subprocess.run(
        [sys.executable, "-c", source],
        capture_output=True,
        text=True,
        timeout=PROGRAM_TIMEOUT_S,
        env={**os.environ, **(env or {})},
    )
    # RuntimeError, not AssertionError: a test's strict xfail must not absorb a crash.
    if done.returncode != 0:
        raise RuntimeError(f"the program exited with {done.returncode}:\n{done.stderr}")
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"the program printed nothing; stderr:\n{done.stderr}")
    return Program(json.loads(lines[-1]), done.stderr)
