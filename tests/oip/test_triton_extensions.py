"""Triton's extensions of the protocol with the unmodified tritonclient (grpc and grpc.aio)
against the real xentd: ModelConfig, ModelStatistics (checked against the Prometheus
metrics of the same calls), ModelStreamInfer, the reserved parameters `priority` and
`timeout`, the RPCs xentd does not serve, and a replay of perf_analyzer's exact calls.

perf_analyzer itself ships in a wheel built for a newer glibc than this OS has, so its
calls are replayed with the generated stubs tritonclient bundles, which are the same
messages its C++ client sends. The sequence and every parameter follow perf_analyzer's
source (triton-inference-server/perf_analyzer at 263c5f6: src/perf_analyzer.cc,
src/model_parser.cc, src/infer_data_manager.cc, src/inference_profiler.cc) and the C++
client's request builder (triton-inference-server/client at 58a44ca:
src/c++/library/grpc_client.cc, PreRunProcessing): ModelMetadata, then ModelConfig (from
which it takes max_batch_size, the scheduler, and which inputs are optional), then
ServerMetadata (server-side statistics only when it lists "statistics"), then
ModelStatistics around each measurement window, and ModelInfer (or ModelStreamInfer with
--streaming) carrying `triton_enable_empty_final_response` on every request, inputs shaped
[batch] + the metadata's shape without its batch dimension, in raw_input_contents.
"""

from __future__ import annotations

import asyncio
import queue
import re
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import running_xentd
from test_tritonclient import DENSE, SPARSE, TOL, close, dense_ref, inp, rng_logits, sparse_ref


def sparse_inputs(rows: int, classes: int, seed: int):
    x = rng_logits((rows, classes), seed).astype(np.float32)
    ids = np.arange(rows, dtype=np.int64) % classes
    return x, ids, [inp("logits", x, "FP32"), inp("labels", ids, "INT64")]


def metrics(xentd) -> dict[str, float]:
    """Every sample of xentd's /metrics, summed over label sets, by series name (with the
    `code` label kept for xent_calls_total)."""
    body = urllib.request.urlopen(f"http://{xentd.metrics}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(r"^(\w+)(\{[^}]*\})? (\S+)$", body, re.M):
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name == "xent_calls_total":
            name += "/" + re.search(r'code="(\w+)"', labels).group(1)
        out[name] = out.get(name, 0.0) + value
    return out


def statistics(client) -> dict[str, dict]:
    """ModelStatistics of every model, as tritonclient returns them, by model name."""
    stats = client.get_inference_statistics(as_json=True)["model_stats"]
    return {m["name"]: m for m in stats}


def duration(m: dict, what: str) -> tuple[int, int]:
    d = m.get("inference_stats", {}).get(what, {})
    return int(d.get("count", 0)), int(d.get("ns", 0))


def test_model_config_describes_the_batch_dimension_and_optional_inputs(client):
    cfg = client.get_model_config(SPARSE).config
    assert cfg.name == SPARSE and cfg.platform == "xent"
    assert cfg.max_batch_size == 1 << 26, "--max-request-elements, rows of one class"
    assert [(i.name, list(i.dims), i.optional) for i in cfg.input] == [
        ("logits", [-1], False),
        ("labels", [1], False),
        ("class_weights", [], True),
        ("sample_weights", [1], True),
        ("upstream", [1], True),
    ]
    assert list(cfg.input[1].reshape.shape) == [] and cfg.input[1].HasField("reshape")
    assert [o.name for o in cfg.output] == ["loss", "grad_logits"]
    assert cfg.WhichOneof("scheduling_choice") == "dynamic_batching"
    db = cfg.dynamic_batching
    assert (db.max_queue_delay_microseconds, db.priority_levels, db.default_priority_level) == (0, 2, 2)
    assert db.default_queue_policy.allow_timeout_override
    assert db.default_queue_policy.max_queue_size == 1024
    as_json = client.get_model_config(DENSE, as_json=True)["config"]
    assert as_json["input"][1] == {"name": "labels", "data_type": "TYPE_FP32", "dims": ["-1"]}
    meta = client.get_model_metadata(SPARSE, as_json=True)
    assert [t["shape"] for t in meta["inputs"]] == [["-1", "-1"], ["-1", "1"], ["-1"], ["-1", "1"], ["-1", "1"]]


def test_model_config_follows_the_flags(tmp_path):
    flags = ("--max-batch-delay-ms", "2.5", "--priority-levels", "4", "--max-request-elements",
             "100000", "--max-queue-requests", "9", "--max-batch-rows", "64")
    with running_xentd(tmp_path, *flags) as server:
        with grpcclient.InferenceServerClient(server.address) as c:
            cfg = c.get_model_config(DENSE).config
    db = cfg.dynamic_batching
    assert cfg.max_batch_size == 100000
    assert (db.max_queue_delay_microseconds, db.priority_levels, db.default_priority_level) == (2500, 4, 4)
    assert list(db.preferred_batch_size) == [64] and db.default_queue_policy.max_queue_size == 9
    with running_xentd(tmp_path, "--batching", "false") as server:
        with grpcclient.InferenceServerClient(server.address) as c:
            cfg = c.get_model_config(DENSE).config
    assert cfg.WhichOneof("scheduling_choice") is None, "no batching: no dynamic_batching"


def test_sparse_labels_shaped_as_a_batch_of_scalars_are_taken(client):
    x, ids, _ = sparse_inputs(3, 5, 20)
    flat = client.infer(SPARSE, [inp("logits", x, "FP32"), inp("labels", ids, "INT64")])
    column = client.infer(SPARSE, [inp("logits", x, "FP32"), inp("labels", ids[:, None].copy(), "INT64")])
    assert flat.as_numpy("loss").tobytes() == column.as_numpy("loss").tobytes()
    close(column.as_numpy("loss"), sparse_ref(x, ids)[0], TOL[np.float32])


def test_statistics_count_the_calls_exactly_as_the_metrics_do(client, xentd):
    before_stats, before = statistics(client), metrics(xentd)
    rows = 0
    for n in range(6):
        _, _, inputs = sparse_inputs(2 + n, 7, 30 + n)
        client.infer(SPARSE, inputs, parameters={"reduction": "mean"})
        rows += 2 + n
    x = rng_logits((4, 3), 40).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    client.infer(DENSE, [inp("logits", x, "FP32"), inp("labels", y, "FP32")])
    # Refused after validation: a failure of its model, in both.
    with pytest.raises(InferenceServerException):
        client.infer(DENSE, [inp("logits", x, "FP32"), inp("labels", y, "FP32")], priority=7)
    after_stats, after = statistics(client), metrics(xentd)

    def delta(model, what):
        (c1, n1), (c0, n0) = duration(after_stats[model], what), duration(before_stats[model], what)
        return c1 - c0, n1 - n0

    def both(what):
        (c1, n1), (c2, n2) = delta(SPARSE, what), delta(DENSE, what)
        return c1 + c2, (n1 + n2) / 1e9

    def metric(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta(SPARSE, "success")[0] == 6 and delta(DENSE, "success")[0] == 1
    assert delta(DENSE, "fail")[0] == 1
    inferences = int(after_stats[SPARSE]["inference_count"]) - int(before_stats[SPARSE].get("inference_count", 0))
    assert inferences == rows
    calls, call_s = (a + b for a, b in zip(both("success"), both("fail")))
    assert calls == metric("xent_calls_total/OK") + metric("xent_calls_total/INVALID_ARGUMENT")
    assert calls == metric("xent_call_duration_seconds_count")
    assert call_s == pytest.approx(metric("xent_call_duration_seconds_sum"), rel=1e-6, abs=1e-6)
    queue_n, queue_s = both("queue")
    assert queue_n == 7 == metric("xent_queue_wait_seconds_count")
    assert queue_s == pytest.approx(metric("xent_queue_wait_seconds_sum"), rel=1e-6, abs=1e-6)
    infer_n, infer_s = both("compute_infer")
    output_n, output_s = both("compute_output")
    assert infer_n == output_n == 7 == metric("xent_compute_seconds_count")
    assert infer_s + output_s == pytest.approx(metric("xent_compute_seconds_sum"), rel=1e-6, abs=1e-6)
    assert infer_s > 0 and call_s > queue_s + infer_s
    assert int(after_stats[SPARSE]["last_inference"]) >= int(before_stats[SPARSE].get("last_inference", 0))


def test_priority_and_timeout_are_taken(client):
    _, _, inputs = sparse_inputs(2, 4, 50)
    for kwargs in ({"priority": 1}, {"priority": 2}, {"timeout": 5_000_000}, {"priority": 1, "timeout": 2_000_000}):
        r = client.infer(SPARSE, inputs, **kwargs)
        assert r.as_numpy("loss").shape == (2,), kwargs
    with pytest.raises(InferenceServerException) as e:
        client.infer(SPARSE, inputs, priority=3)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert e.value.message().startswith("priority is 3; this server's priority levels are 1 (first) to 2")


def test_stream_infer_answers_every_request_through_the_batcher(client):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    sent = {}
    try:
        for n in range(5):
            x, ids, inputs = sparse_inputs(2 + n, 6, 60 + n)
            sent[f"r{n}"] = (x, ids)
            client.async_stream_infer(SPARSE, inputs, request_id=f"r{n}", enable_empty_final_response=(n % 2 == 0))
        client.async_stream_infer("resnet50", inputs, request_id="bad")
        got = [answers.get(timeout=30) for _ in range(6)]
    finally:
        client.stop_stream()
    errors = [e for r, e in got if e is not None]
    assert len(errors) == 1 and errors[0].message().startswith('model "resnet50"'), errors
    results = {r.get_response().id: r for r, e in got if e is None}
    assert sorted(results) == sorted(sent)
    for rid, (x, ids) in sent.items():
        response = results[rid].get_response()
        close(results[rid].as_numpy("loss"), sparse_ref(x, ids)[0], TOL[np.float32])
        final = response.parameters.get("triton_final_response")
        if int(rid[1:]) % 2 == 0:
            assert final is not None and final.bool_param, rid
        else:
            assert final is None, rid


def test_the_rpcs_xentd_does_not_serve_say_why(client):
    cases = [
        (client.get_model_repository_index, "xentd has no model repository"),
        (lambda: client.load_model(DENSE), "xentd has no model repository"),
        (lambda: client.unload_model(DENSE), "xentd has no model repository"),
        (client.get_system_shared_memory_status, "xentd does not read or write shared memory"),
        (lambda: client.unregister_cuda_shared_memory(), "xentd does not read or write shared memory"),
        (client.get_trace_settings, "xentd's tracing is set when it starts"),
        (client.get_log_settings, "xentd's logging is set when it starts"),
    ]
    for call, start in cases:
        with pytest.raises(InferenceServerException) as e:
            call()
        assert e.value.status() == "StatusCode.UNIMPLEMENTED", start
        assert e.value.message().startswith(start), e.value.message()


def test_the_asyncio_client(xentd):
    async def main():
        async with aioclient.InferenceServerClient(xentd.address) as c:
            cfg = await c.get_model_config(SPARSE, as_json=True)
            stats = await c.get_inference_statistics(SPARSE, as_json=True)
            x, ids, inputs = sparse_inputs(3, 5, 70)
            first = await c.infer(SPARSE, inputs, priority=1, timeout=2_000_000, request_id="p1")

            async def requests():
                for n in range(3):
                    yield {"model_name": SPARSE, "inputs": inputs, "request_id": f"s{n}", "priority": 1}

            streamed = [(r, e) async for r, e in c.stream_infer(requests())]
            return cfg, stats, first, streamed, (x, ids)

    cfg, stats, first, streamed, (x, ids) = asyncio.run(main())
    assert cfg["config"]["max_batch_size"] == 1 << 26
    assert stats["model_stats"][0]["name"] == SPARSE
    close(first.as_numpy("loss"), sparse_ref(x, ids)[0], TOL[np.float32])
    assert [e for _, e in streamed] == [None] * 3
    assert [r.get_response().id for r, _ in streamed] == ["s0", "s1", "s2"]
    for r, _ in streamed:
        assert r.as_numpy("loss").tobytes() == first.as_numpy("loss").tobytes()


def _perf_analyzer_request(model, metadata, batch, data, request_id=""):
    """The ModelInferRequest perf_analyzer's C++ client builds: the final-response flag
    always, no requested outputs, each input [batch] + its metadata shape after the batch
    dimension (a -1 replaced by the --shape given), raw contents in input order."""
    req = service_pb2.ModelInferRequest(model_name=model, model_version="", id=request_id)
    req.parameters["triton_enable_empty_final_response"].bool_param = True
    for t in metadata.inputs:
        if t.name not in data:
            continue
        array = data[t.name]
        tensor = req.inputs.add(name=t.name, datatype=t.datatype)
        tensor.shape.extend([batch, *array.shape[1:]])
        req.raw_input_contents.append(array.tobytes())
    return req


def test_perf_analyzer_call_sequence(xentd):
    """perf_analyzer -m sparse_softmax_cross_entropy -b 4 --shape logits:16
    --input-data <logits and labels only> [--streaming], replayed call for call."""
    batch, classes = 4, 16
    with grpc.insecure_channel(xentd.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        metadata = stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=SPARSE, version=""))
        config = stub.ModelConfig(service_pb2.ModelConfigRequest(name=SPARSE, version="")).config
        # ModelParser::InitTriton: the scheduler, the batch size, which inputs may be left out.
        assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
        assert config.max_batch_size >= batch, "-b 4 needs max_batch_size >= 4"
        optional = {i.name for i in config.input if i.optional}
        assert optional == {"class_weights", "sample_weights", "upstream"}
        shapes = {t.name: list(t.shape)[1:] for t in metadata.inputs}  # batch dimension skipped
        assert shapes["logits"] == [-1] and shapes["labels"] == [1]
        server = stub.ServerMetadata(service_pb2.ServerMetadataRequest())
        assert "statistics" in server.extensions
        x = rng_logits((batch, classes), 80).astype(np.float32)
        ids = (np.arange(batch, dtype=np.int64) % classes).reshape(batch, *shapes["labels"])
        data = {"logits": x, "labels": ids}  # the optional inputs are not in --input-data
        want = sparse_ref(x, ids[:, 0])[0]

        def stats():
            (m,) = stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name=SPARSE, version="")).model_stats
            return m

        start = stats()
        for n in range(3):
            resp = stub.ModelInfer(_perf_analyzer_request(SPARSE, metadata, batch, data, str(n)))
            loss = np.frombuffer(resp.raw_output_contents[0], np.float32)
            assert [o.name for o in resp.outputs] == ["loss", "grad_logits"]
            close(loss, want, TOL[np.float32])
            assert resp.parameters["triton_final_response"].bool_param
        # --streaming: every request on one ModelStreamInfer, each waited for until its
        # response says it is the final one.
        requests = [_perf_analyzer_request(SPARSE, metadata, batch, data, f"s{n}") for n in range(3)]
        streamed = list(stub.ModelStreamInfer(iter(requests), timeout=30))
        assert [r.error_message for r in streamed] == [""] * 3
        assert [r.infer_response.id for r in streamed] == ["s0", "s1", "s2"]
        for r in streamed:
            assert r.infer_response.parameters["triton_final_response"].bool_param
            close(np.frombuffer(r.infer_response.raw_output_contents[0], np.float32), want, TOL[np.float32])
        end = stats()
    # InferenceProfiler::DetermineStatsModelVersion: the version whose queue count grew.
    assert end.version == "1"
    assert end.inference_stats.queue.count - start.inference_stats.queue.count == 6
    assert end.inference_stats.success.count - start.inference_stats.success.count == 6
    assert end.inference_count - start.inference_count == 6 * batch
    assert end.execution_count > start.execution_count


def test_dense_model_with_perf_analyzer_batch(xentd):
    """perf_analyzer -m softmax_cross_entropy -b 4 --shape logits:8 --shape labels:8."""
    batch, classes = 4, 8
    with grpc.insecure_channel(xentd.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        metadata = stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=DENSE))
        x = rng_logits((batch, classes), 90).astype(np.float32)
        y = np.eye(classes, dtype=np.float32)[np.arange(batch) % classes]
        resp = stub.ModelInfer(_perf_analyzer_request(DENSE, metadata, batch, {"logits": x, "labels": y}))
    close(np.frombuffer(resp.raw_output_contents[0], np.float32), dense_ref(x, y)[0], TOL[np.float32])
