"""The client side of test_dns.py, run where /etc/hosts is the test's own file (a private
mount namespace): a Client of the name given, driven by commands on stdin, one JSON line of
what it knows on stdout per command.

    calls N        make N calls
    until A,B,...  make calls until exactly these addresses are in rotation and each answered one
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from xent_client import Client

X = np.array([[1, 2, 0.5], [0.2, 0.8, 1.5]], np.float32)
Y = np.array([1, 2])
MEAN = 0.51742470


def call(client: Client) -> None:
    loss = float(client.evaluate(X, Y, reduction="mean").loss)
    assert abs(loss - MEAN) < 1e-6, loss


def main() -> None:
    target, interval = sys.argv[1], float(sys.argv[2])
    with Client(target, timeout=30, resolve_interval=interval) as client:
        for line in sys.stdin:
            command, _, argument = line.strip().partition(" ")
            if command == "calls":
                for _ in range(int(argument)):
                    call(client)
            elif command == "until":
                wanted = set(argument.split(","))
                before = {s.address: s.calls.get("OK", 0) for s in client.endpoints()}
                deadline = time.monotonic() + 60
                while True:
                    call(client)
                    now = client.endpoints()
                    serving = {s.address for s in now if s.state == "serving"}
                    answered = {s.address for s in now if s.calls.get("OK", 0) > before.get(s.address, 0)}
                    if serving == wanted and wanted <= answered:
                        break
                    if time.monotonic() > deadline:
                        break
            print(json.dumps({s.address: {"state": s.state, "calls": s.calls} for s in client.endpoints()}), flush=True)


if __name__ == "__main__":
    main()
