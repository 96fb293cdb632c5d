"""The real xentd binary as a child process of a Python test suite, with the standard
library only, so that every suite's virtualenv can use it whatever else it holds.

`start` runs the binary on a port the OS picks, reads its `listening on HOST:PORT` line and
waits until the suite's own readiness probe says yes (each suite asks with the client it
tests); `Xentd.stop` sends SIGTERM and returns the exit code. Failures raise RuntimeError
with the tail of xentd's stderr.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[2]
LISTENING_LINE = re.compile(r"^listening on (127\.0\.0\.1:\d+)$")
START_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 15.0


def binary(variable: str, name: str) -> Path:
    """The binary `name` from $`variable`, else from target/debug."""
    path = Path(os.environ.get(variable) or REPO_ROOT / "target" / "debug" / name)
    if not path.is_file():
        raise FileNotFoundError(f"{name} not found at {path}; build it (cargo build --bins) or set {variable}")
    return path


@dataclass
class Xentd:
    address: str
    process: subprocess.Popen
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-8000:]

    def stop(self) -> int:
        """SIGTERM, then the exit code (killed, and RuntimeError, if it does not exit in time)."""
        if self.process.poll() is not None:
            raise RuntimeError(f"xentd died during the tests with code {self.process.returncode}:\n{self.stderr()}")
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"xentd did not exit within {SHUTDOWN_TIMEOUT_S:.0f} s of SIGTERM:\n{self.stderr()}")


def start(xentd_binary: Path, stderr_path: Path, ready: Callable[[str], bool]) -> Xentd:
    """xentd on a free port (no metrics listener), once `ready(address)` returns True."""
    with open(stderr_path, "wb") as stderr_file:
        process = subprocess.Popen(
            [str(xentd_binary), "--listen", "127.0.0.1:0", "--metrics-listen", "off"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr_file,
            text=True,
        )
    server = Xentd("", process, stderr_path)
    match = LISTENING_LINE.match(process.stdout.readline().rstrip("\r\n"))
    if not match:
        process.kill()
        process.wait()
        raise RuntimeError(f"xentd printed no 'listening on 127.0.0.1:PORT' line:\n{server.stderr()}")
    server.address = match.group(1)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready(server.address):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(f"xentd was not ready within {START_TIMEOUT_S:.0f} s:\n{server.stderr()}")
        time.sleep(0.05)
    return server
