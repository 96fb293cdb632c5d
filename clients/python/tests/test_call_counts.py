"""The clients and xentd agree on how many calls were made: calls from the Python client (sync
and asyncio, answered and refused) and from the load generator (`xent bench --json`) against one
real xentd must show in its `xent_calls_total`, scraped from its /metrics listener, exactly as
the clients counted them by gRPC code: no call forgotten, counted twice or filed under another
code, on either side. tests/integration/call_counts.rs holds the load generator's half alone."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import calls_by_method_and_code, free_port, start_xentd, stop_xentd

from xent_client import AsyncClient, Client, XentError

LOGITS = np.array([[1, 2, 0.5], [0.2, 0.8, 1.5]], np.float32)
LABELS = np.array([1, 2])
OUT_OF_RANGE_LABELS = np.array([1, 3])  # class 3 of 3: INVALID_ARGUMENT


@pytest.fixture(scope="module")
def xent_binary(xentd_binary) -> Path:
    """The `xent` CLI (its `bench` subcommand): $XENT_BIN, or beside xentd."""
    binary = Path(os.environ.get("XENT_BIN") or xentd_binary.with_name("xent"))
    if not binary.is_file():
        pytest.fail(f"xent not found at {binary}; `cargo build --bins` or set XENT_BIN", pytrace=False)
    return binary


@pytest.fixture()
def xentd_with_metrics(xentd_binary):
    """A fresh xentd (its counters at zero) and the address of its metrics listener."""
    metrics = f"127.0.0.1:{free_port()}"
    process, address = start_xentd(xentd_binary, "--metrics-listen", metrics)
    yield address, metrics
    stop_xentd(process)


def test_xentd_counts_exactly_the_calls_the_clients_made(xentd_with_metrics, xent_binary):
    address, metrics = xentd_with_metrics
    assert calls_by_method_and_code(metrics) == {}, "health checks and the warm-up are not calls"
    counted = collections.Counter()

    with Client(address, timeout=30) as client:
        for _ in range(23):
            client.evaluate(LOGITS, LABELS)
        for _ in range(5):
            with pytest.raises(XentError) as refused:
                client.evaluate(LOGITS, OUT_OF_RANGE_LABELS)
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        # Refused by the client itself: never sent, so counted by neither side.
        with pytest.raises(ValueError):
            client.evaluate(LOGITS, LABELS, reduction="average")
        assert client.codes == {"OK": 23, "INVALID_ARGUMENT": 5}
        counted += client.codes

    async def concurrently():
        async with AsyncClient(address, timeout=30) as client:
            answers = await asyncio.gather(
                *(client.evaluate(LOGITS, labels) for labels in [LABELS] * 11 + [OUT_OF_RANGE_LABELS] * 4),
                return_exceptions=True,
            )
            assert sum(isinstance(a, XentError) for a in answers) == 4
            return client.codes

    codes = asyncio.run(concurrently())
    assert codes == {"OK": 11, "INVALID_ARGUMENT": 4}
    counted += codes

    # The load generator: as many calls as 3 callers make in 0.4 s, then refused ones
    # (label smoothing outside [0, 1]); only its report knows how many.
    for args in (
        ["--concurrency", "3", "--duration", "0.4", "--rows", "8", "--classes", "16"],
        ["--concurrency", "2", "--duration", "0.2", "--rows", "2", "--classes", "3", "--label-smoothing", "2"],
    ):
        run = subprocess.run(
            [str(xent_binary), "bench", "--address", address, "--json", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={k: v for k, v in os.environ.items() if k != "XENT_ADDRESS"},
        )
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout)
        assert report["requests"] == report["ok"] + sum(report["errors"].values()), report
        assert report["requests"] > 0, report
        counted["OK"] += report["ok"]
        counted.update(report["errors"])

    expected = {("Evaluate", code): n for code, n in counted.items() if n}
    assert calls_by_method_and_code(metrics) == expected
