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
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tests" / "support"))

import xentd_process  # noqa: E402  (tests/support: the binary as a child process)

PROGRAM_TIMEOUT_S = 120.0
# grpc.health.v1.HealthCheckResponse{status: SERVING}
SERVING = b"\x08\x01"


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check", request_serializer=bytes, response_deserializer=bytes
        )
        try:
            return check(b"", timeout=2) == SERVING
        except grpc.RpcError:
            return False


@pytest.fixture(scope="session")
def xentd(tmp_path_factory) -> xentd_process.Xentd:
    binary = xentd_process.binary("XENTD_BIN", "xentd")
    server = xentd_process.start(binary, tmp_path_factory.mktemp("xentd") / "stderr.log", _serving)
    yield server
    code = server.stop()
    assert code == 0, f"xentd exited with {code} after SIGTERM:\n{server.stderr()}"


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
