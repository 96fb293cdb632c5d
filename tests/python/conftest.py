"""Fixtures for the Python interoperability tests.

At session start the xent.v1 stubs are generated from proto/xent/v1/xent.proto into a temporary
directory (nothing is checked in or downloaded). The `xentd` fixture starts the server binary
once per session (path from $XENTD_BIN, default target/debug/xentd), waits for its
`listening on HOST:PORT` line and for its health service to report SERVING, and stops it with
SIGTERM at the end, expecting a clean exit.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "examples" / "python"))

import xent_stubs  # noqa: E402  (lives in examples/python, shared with the examples)

LISTEN_TIMEOUT_S = 60.0
HEALTH_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 15.0
LISTENING_LINE = re.compile(r"^listening on (127\.0\.0\.1:\d+)$")
HEALTH_SERVICES = ("", "xent.v1.Xent")

_stub_dir: str | None = None


def pytest_configure(config):
    global _stub_dir
    if _stub_dir is None:
        _stub_dir = tempfile.mkdtemp(prefix="xent-pytest-stubs-")
        xent_stubs.load(Path(_stub_dir))


def pytest_unconfigure(config):
    global _stub_dir
    if _stub_dir is not None:
        shutil.rmtree(_stub_dir, ignore_errors=True)
        _stub_dir = None


def xentd_binary() -> Path:
    return Path(os.environ.get("XENTD_BIN") or REPO_ROOT / "target" / "debug" / "xentd")


def pytest_report_header(config):
    return f"xentd: {xentd_binary()}"


@dataclass
class Server:
    address: str
    channel: grpc.Channel
    process: subprocess.Popen
    stderr_path: Path

    def stderr(self) -> str:
        return _tail(self.stderr_path)


def _tail(path: Path, limit: int = 8000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        return f"<cannot read {path}: {err}>"
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _read_lines(stream, lines: queue.Queue) -> None:
    # Drains stdout for the whole life of the server so that it can never block on a full pipe.
    for line in stream:
        lines.put(line)
    lines.put(None)


def _remaining_lines(lines: queue.Queue, timeout: float = 5.0) -> list[str]:
    found = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            continue
        if line is None:
            break
        found.append(line)
    return found


def _wait_for_listening_line(process, lines: queue.Queue, stderr_path: Path) -> str:
    deadline = time.monotonic() + LISTEN_TIMEOUT_S
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            process.kill()
            process.wait()
            pytest.fail(
                f"xentd printed no 'listening on' line within {LISTEN_TIMEOUT_S:.0f} s; "
                f"stderr:\n{_tail(stderr_path)}"
            )
        try:
            line = lines.get(timeout=min(remaining, 0.5))
        except queue.Empty:
            continue
        if line is None:
            code = process.wait()
            pytest.fail(
                f"xentd exited with code {code} before printing 'listening on'; "
                f"stderr:\n{_tail(stderr_path)}"
            )
        match = LISTENING_LINE.match(line.rstrip("\r\n"))
        if not match:
            process.kill()
            process.wait()
            pytest.fail(
                f"xentd's first stdout line is {line!r}, expected 'listening on 127.0.0.1:PORT'; "
                f"stderr:\n{_tail(stderr_path)}"
            )
        return match.group(1)


def _wait_for_serving(process, channel, stderr_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    pending = list(HEALTH_SERVICES)
    last = "no answer yet"
    while pending:
        if process.poll() is not None:
            pytest.fail(
                f"xentd exited with code {process.returncode} while warming up; "
                f"stderr:\n{_tail(stderr_path)}"
            )
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(
                f"xentd's health service did not report SERVING for {pending} within "
                f"{HEALTH_TIMEOUT_S:.0f} s (last: {last}); stderr:\n{_tail(stderr_path)}"
            )
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(service=pending[0]), timeout=2)
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                pending.pop(0)
                continue
        except grpc.RpcError as err:
            last = f"{err.code().name}: {err.details()}"
        time.sleep(0.1)


@pytest.fixture(scope="session")
def xentd(tmp_path_factory) -> Server:
    binary = xentd_binary()
    if not binary.is_file() or not os.access(binary, os.X_OK):
        pytest.fail(
            f"xentd binary not found or not executable at {binary}. Build it with "
            "`cargo build --bin xentd`, or point XENTD_BIN at a built binary.",
            pytrace=False,
        )
    stderr_path = tmp_path_factory.mktemp("xentd") / "stderr.log"
    with open(stderr_path, "wb") as stderr_file:
        # No metrics listener: its default port may be taken by a xentd the developer runs.
        process = subprocess.Popen(
            [str(binary), "--listen", "127.0.0.1:0", "--metrics-listen", "off"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr_file,
            text=True,
        )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()

    address = _wait_for_listening_line(process, lines, stderr_path)
    channel = grpc.insecure_channel(address)
    _wait_for_serving(process, channel, stderr_path)

    yield Server(address=address, channel=channel, process=process, stderr_path=stderr_path)

    channel.close()
    if process.poll() is not None:
        pytest.fail(
            f"xentd died during the tests with code {process.returncode}; "
            f"stderr:\n{_tail(stderr_path)}"
        )
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=SHUTDOWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(
            f"xentd did not exit within {SHUTDOWN_TIMEOUT_S:.0f} s of SIGTERM; "
            f"stderr:\n{_tail(stderr_path)}"
        )
    extra = _remaining_lines(lines)
    assert code == 0, f"xentd exited with code {code} after SIGTERM; stderr:\n{_tail(stderr_path)}"
    assert not extra, f"xentd printed more than one line to stdout: {extra!r}"


@pytest.fixture(scope="session")
def channel(xentd) -> grpc.Channel:
    return xentd.channel


@pytest.fixture(scope="session")
def stub(channel):
    return xent_stubs.load().grpc.XentStub(channel)
