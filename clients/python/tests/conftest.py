"""A real xentd for the client tests: the binary from $XENTD_BIN (default target/debug/xentd),
started once per session on a port the OS picks, ready once its health service says SERVING;
replicas of it with their metrics listener, for the fleet tests; and torch, required or
optional."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
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


def start_xentd(binary: Path, *args: str, listen: str = "127.0.0.1:0"):
    """Starts `binary` on `listen` (default: a free port) with `args` (default: no metrics
    listener) and returns the process and its address once it is SERVING."""
    process = subprocess.Popen(
        [str(binary), "--listen", listen, *(args or ("--metrics-listen", "off"))],
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SAMPLE = re.compile(r"^xent_calls_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")


def calls_by_method_and_code(metrics: str) -> dict[tuple[str, str], int]:
    """The non-zero samples of xent_calls_total, scraped from `metrics` (host:port)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as r:
                text = r.read().decode()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    calls = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m and float(m["value"]) != 0:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
            calls[(labels["method"], labels["code"])] = int(float(m["value"]))
    return calls


class Replica:
    """One xentd of a fleet, with its metrics listener, to be stopped, killed or drained."""

    def __init__(self, binary: Path, *args: str, listen: str = "127.0.0.1:0") -> None:
        self.metrics = f"127.0.0.1:{free_port()}"
        self.process, self.address = start_xentd(binary, "--metrics-listen", self.metrics, *args, listen=listen)

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stopped(self) -> bool:
        """Whether the process is stopped (SIGSTOP has taken effect), from /proc."""
        with open(f"/proc/{self.process.pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "T"

    def calls(self) -> dict[tuple[str, str], int]:
        return calls_by_method_and_code(self.metrics)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture()
def replicas(xentd_binary):
    """start(*args, listen=...) starts a Replica; what is left of them is killed at the end."""
    started: list[Replica] = []

    def start(*args: str, listen: str = "127.0.0.1:0") -> Replica:
        started.append(Replica(xentd_binary, *args, listen=listen))
        return started[-1]

    yield start
    for r in started:
        r.close()


def wait_until(what: str, condition, timeout: float = 60) -> None:
    """Polls `condition` until it holds; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.005)


class Names:
    """What the name xentd-fleet.test:50051 resolves to now: a resolver for the client,
    changed by the test as a headless Service's DNS records change."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = list(addresses)
        self.lookups = 0

    def __call__(self, host: str, port: int) -> list[str]:
        assert (host, port) == ("xentd-fleet.test", 50051)
        self.lookups += 1
        return list(self.addresses)


def endpoint(client, address: str):
    """What `client` knows of `address` (an empty record before it has heard of it)."""
    from xent_client import EndpointStats

    known = [s for s in client.endpoints() if s.address == address]
    return known[0] if known else EndpointStats(address, "unknown", 0, {}, 0, "")


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
