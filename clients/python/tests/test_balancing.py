"""How the client chooses endpoints, against real xentd processes: what is retried and what is
not, a shedding replica kept out of rotation for its retry delay only, an ejected replica
probed back in, failing fast or waiting when no endpoint is left, and names resolved again
(with a resolver the test gives the client: test_dns.py has the system's resolver)."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from conftest import Names, endpoint, wait_until

from xent_client import Client, RetryPolicy, XentError
from xent_client._targets import Name, parse

X = np.array([[1, 2, 0.5], [0.2, 0.8, 1.5]], np.float32)
Y = np.array([1, 2])
MEAN = 0.51742470


def test_endpoints_are_parsed_as_grpc_targets():
    assert parse("10.0.0.1:50051,xentd-headless.ns.svc:50051") == ["10.0.0.1:50051", Name("xentd-headless.ns.svc", 50051)]
    assert parse(["dns:///xentd.test:1", "http://[::1]:2", "ipv4:10.0.0.1:3,10.0.0.2:3"]) == [
        Name("xentd.test", 1),
        "[::1]:2",
        "10.0.0.1:3",
        "10.0.0.2:3",
    ]
    assert parse("unix:/run/xentd.sock") == ["unix:/run/xentd.sock"]
    for bad, message in [
        ("xentd.test", "has no port"),
        ("xentd.test:http", "has port 'http'"),
        ("::1:5", "in brackets"),
        ("dns://8.8.8.8/xentd.test:1", "DNS server"),
        ("ipv4:xentd.test:1", "not an IP address"),
        ("", "no endpoint"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse(bad)


def test_calls_spread_and_other_codes_are_not_retried(replicas):
    a, b = replicas(), replicas()
    with Client([a.address, b.address], timeout=30) as client:
        wait_until("both are in rotation", lambda: {s.state for s in client.endpoints()} == {"serving"})
        for _ in range(20):
            assert abs(float(client.evaluate(X, Y, reduction="mean").loss) - MEAN) < 1e-6
        assert [endpoint(client, r.address).calls for r in (a, b)] == [{"OK": 10}, {"OK": 10}]
        with pytest.raises(XentError) as err:
            client.evaluate(X, np.array([1, 3]))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert client.codes == {"OK": 20, "INVALID_ARGUMENT": 1} and client.retries == 0


def test_a_shedding_replica_is_kept_out_for_its_retry_delay_not_ejected(replicas):
    # One request computing and one waiting fill this replica: the next is refused, queue
    # full, UNAVAILABLE with a RetryInfo delay.
    shedding = replicas("--max-queue-requests", "1", "--max-inflight-batches", "1", "--batching", "false")
    other = replicas()
    x = np.random.default_rng(0).standard_normal((16, 1024)).astype(np.float32)
    y = np.zeros(16, np.int64)
    stop = threading.Event()
    failures: list[BaseException] = []
    with Client([shedding.address, other.address], timeout=30) as client:

        def caller() -> None:
            while not stop.is_set():
                try:
                    client.evaluate(x, y, outputs=["loss"])
                except BaseException as err:
                    failures.append(err)

        callers = [threading.Thread(target=caller) for _ in range(8)]
        for t in callers:
            t.start()
        try:
            wait_until("the replica refused 5 calls", lambda: endpoint(client, shedding.address).calls.get("UNAVAILABLE", 0) >= 5)
        finally:
            stop.set()
            for t in callers:
                t.join()
        refused = endpoint(client, shedding.address)
        assert failures == []
        assert (refused.state, refused.ejections) == ("serving", 0)
        assert client.codes["OK"] == client.calls and client.codes["UNAVAILABLE"] == client.retries
        print(f"\n{client.calls} calls, {client.retries} retried; shedding replica {refused.calls}")


def test_an_ejected_replica_is_probed_back_in(replicas):
    a, b = replicas(), replicas()
    with Client([a.address, b.address], timeout=30) as client:
        for _ in range(4):
            client.evaluate(X, Y)
        a.process.kill()
        a.process.wait()
        wait_until("the killed replica is ejected", lambda: endpoint(client, a.address).state == "ejected")
        for _ in range(4):
            client.evaluate(X, Y)
        wait_until("a probe failed", lambda: endpoint(client, a.address).last_error.startswith("probe: UNAVAILABLE"))
        before = endpoint(client, a.address).calls
        replicas(listen=a.address)  # the same address again
        wait_until("the replica is back in rotation", lambda: endpoint(client, a.address).state == "serving")
        for _ in range(4):
            client.evaluate(X, Y)
        back = endpoint(client, a.address)
        assert back.calls.get("OK", 0) > before.get("OK", 0) and back.ejections == 1


def test_no_endpoint_fails_fast_unless_waiting_for_ready():
    retry = RetryPolicy(max_attempts=3, initial_backoff=0.01)
    with Client("127.0.0.1:1", timeout=20, retry=retry) as client:
        with pytest.raises(XentError) as err:
            client.evaluate(X, Y)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert "127.0.0.1:1 ejected (probe: UNAVAILABLE" in err.value.details
        assert client.codes == {} and client.retries == 2, "nothing was sent"
    with Client("127.0.0.1:1", timeout=0.5, wait_for_ready=True) as client:
        with pytest.raises(XentError) as err:
            client.evaluate(X, Y)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_names_are_resolved_again_when_no_endpoint_is_left(replicas):
    live = replicas()
    names = Names(["127.0.0.1:1"])  # refuses connections
    # Periodic lookups would come in an hour: only "no endpoint left" can make the client look again.
    with Client("xentd-fleet.test:50051", resolver=names, resolve_interval=3600, wait_for_ready=True) as client:
        with pytest.raises(XentError) as err:
            client.evaluate(X, Y, timeout=0.5)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        names.addresses = [live.address]
        assert abs(float(client.evaluate(X, Y, reduction="mean", timeout=30).loss) - MEAN) < 1e-6
        assert names.lookups >= 2
        assert {s.address: s.state for s in client.endpoints()} == {live.address: "serving", "127.0.0.1:1": "removed"}


@pytest.mark.parametrize("failure", ["raises", "empty"])
def test_a_failed_lookup_keeps_the_last_answer(replicas, failure):
    live = replicas()
    names = Names([live.address])

    def resolver(host, port):
        answer = names(host, port)
        if names.lookups > 1:
            if failure == "raises":
                raise OSError("name server unreachable")
            return []
        return answer

    with Client("xentd-fleet.test:50051", resolver=resolver, resolve_interval=0.01, timeout=30) as client:
        client.evaluate(X, Y)
        wait_until("ten failed lookups", lambda: names.lookups > 10)
        client.evaluate(X, Y)
        assert [(s.address, s.state) for s in client.endpoints()] == [(live.address, "serving")]
