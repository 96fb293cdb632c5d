"""A name with several A records, resolved by the system's resolver (getaddrinfo), as a
Kubernetes headless Service is: three xentd on 127.0.0.2-4, one port, and a hosts file naming
them. The client runs in a private mount namespace (`unshare -m`) whose /etc/hosts is the
test's file, so the machine's own is never touched; the test rewrites that file as DNS
records change, and the client follows: a record that goes stops getting calls, one that
comes starts getting them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
NAME = "xentd-headless.xent.test"


def private_mounts() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not private_mounts(), reason="needs a private mount namespace (unshare -m) for a hosts file of its own")


def test_a_headless_name_is_followed_as_its_records_change(replicas, tmp_path):
    first = replicas(listen="127.0.0.2:0")
    port = first.address.rsplit(":", 1)[1]
    second, third = replicas(listen=f"127.0.0.3:{port}"), replicas(listen=f"127.0.0.4:{port}")
    hosts = tmp_path / "hosts"
    system = Path("/etc/hosts").read_text()

    def records(*ips: str) -> None:
        # In place: the namespace's /etc/hosts is a bind mount of this very file.
        with open(hosts, "w") as f:
            f.write(system + "".join(f"{ip} {NAME}\n" for ip in ips))

    records("127.0.0.2", "127.0.0.3")
    script = 'mount --bind "$0" /etc/hosts && exec "$@"'
    driver = subprocess.Popen(
        ["unshare", "-m", "sh", "-c", script, str(hosts), sys.executable, str(HERE / "dns_client.py"), f"dns:///{NAME}:{port}", "0.1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    def ask(command: str) -> dict:
        driver.stdin.write(command + "\n")
        driver.stdin.flush()
        line = driver.stdout.readline()
        assert line, f"the client exited with {driver.wait()}"
        return json.loads(line)

    a, b, c = first.address, second.address, third.address
    try:
        known = ask(f"until {a},{b}")
        assert set(known) == {a, b}
        spread = ask("calls 20")
        assert [spread[x]["calls"]["OK"] - known[x]["calls"]["OK"] for x in (a, b)] == [10, 10]
        records("127.0.0.3", "127.0.0.4")
        known = ask(f"until {b},{c}")
        assert known[a]["state"] == "removed"
        assert {known[b]["state"], known[c]["state"]} == {"serving"} and known[c]["calls"]["OK"] >= 1
        moved = ask("calls 20")
        assert moved[a] == known[a], "the address that left the name gets no calls"
        assert moved[b]["calls"]["OK"] - known[b]["calls"]["OK"] == moved[c]["calls"]["OK"] - known[c]["calls"]["OK"] == 10
    finally:
        driver.stdin.close()
        assert driver.wait(timeout=60) == 0
