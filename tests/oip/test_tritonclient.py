"""xentd through the Open Inference Protocol with the unmodified tritonclient from PyPI.

Expected values are computed here in float64 with numpy from the formulas of the semantics
document (softmax cross-entropy, its gradients, label smoothing, ignore_index, the mean), on
exactly the values sent (halves rounded first), and compared within the contract's tolerance
for the dtype. The wire format itself is checked against tritonclient's bundled
grpc_service.proto and model_config.proto: every message and method, fetched from xentd by
gRPC reflection, has the same fields with the same numbers and types.
"""

from __future__ import annotations

import re
import urllib.request

import grpc
import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

DENSE = "softmax_cross_entropy"
SPARSE = "sparse_softmax_cross_entropy"
TOL = {np.float16: 4e-3, ml_dtypes.bfloat16: 2e-2, np.float32: 3e-5, np.float64: 1e-9}


def log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    return (x - m) - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def dense_ref(x, y, eps=0.0):
    x, y = x.astype(np.float64), y.astype(np.float64)
    y = y * (1 - eps) + eps / x.shape[-1]
    ls = log_softmax(x)
    loss = -(y * ls).sum(axis=-1)
    grad = np.exp(ls) * y.sum(axis=-1, keepdims=True) - y
    return loss, grad, -ls


def sparse_ref(x, ids, ignore=None):
    x = x.astype(np.float64)
    ls = log_softmax(x)
    keep = np.ones(ids.shape, bool) if ignore is None else ids != ignore
    safe = np.where(keep, ids, 0)
    loss = np.where(keep, -np.take_along_axis(ls, safe[..., None], -1)[..., 0], 0.0)
    onehot = np.eye(x.shape[-1])[safe]
    grad = np.where(keep[..., None], np.exp(ls) - onehot, 0.0)
    return loss, grad, keep


def close(got, want, tol):
    got = np.asarray(got, np.float64)
    assert got.shape == np.shape(want), (got.shape, np.shape(want))
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def inp(name, array, datatype):
    i = grpcclient.InferInput(name, list(array.shape), datatype)
    i.set_data_from_numpy(array)
    return i


def rng_logits(shape, seed):
    return np.random.default_rng(seed).normal(0, 2, shape)


def test_liveness_readiness_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(DENSE) and client.is_model_ready(SPARSE, "1")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "xentd" and meta["version"]
    m = client.get_model_metadata(SPARSE, as_json=True)
    assert m["versions"] == ["1"] and m["platform"] == "xent"
    assert [(t["name"], t["datatype"], t["shape"]) for t in m["inputs"][:2]] == [
        ("logits", "FP32", ["-1", "-1"]),
        ("labels", "INT64", ["-1", "1"]),
    ]
    assert [t["name"] for t in m["outputs"]] == ["loss", "grad_logits"]
    dense_outputs = [t["name"] for t in client.get_model_metadata(DENSE, as_json=True)["outputs"]]
    assert dense_outputs == ["loss", "grad_logits", "grad_labels"]
    for call in (
        lambda: client.is_model_ready("resnet50"),
        lambda: client.get_model_metadata(DENSE, "2"),
    ):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert e.value.status() == "StatusCode.NOT_FOUND", e.value


def test_dense_float32_with_options_and_requested_outputs(client):
    x = rng_logits((5, 7), 1).astype(np.float32)
    y = np.random.default_rng(2).dirichlet(np.ones(7), 5).astype(np.float32)
    r = client.infer(
        DENSE,
        [inp("logits", x, "FP32"), inp("labels", y, "FP32")],
        outputs=[
            grpcclient.InferRequestedOutput("grad_labels"),
            grpcclient.InferRequestedOutput("loss"),
        ],
        request_id="dense-1",
    )
    loss, _, grad_labels = dense_ref(x, y)
    assert r.get_response().id == "dense-1"
    assert [o.name for o in r.get_response().outputs] == ["grad_labels", "loss"]
    assert r.as_numpy("grad_logits") is None, "not requested"
    close(r.as_numpy("loss"), loss, TOL[np.float32])
    close(r.as_numpy("grad_labels").reshape(5, 7), grad_labels, TOL[np.float32])

    # Options as request parameters, named as in xent.v1; a reduced loss is a scalar.
    r = client.infer(
        DENSE,
        [inp("logits", x, "FP32"), inp("labels", y, "FP32")],
        parameters={"label_smoothing": 0.1, "reduction": "sum", "axis": -1},
    )
    loss, grad, _ = dense_ref(x, y, eps=0.1)
    out = r.get_response().outputs
    assert [(o.name, o.datatype, list(o.shape)) for o in out] == [
        ("loss", "FP32", []),
        ("grad_logits", "FP32", [5, 7]),
    ], "default outputs: loss and grad_logits"
    close(r.as_numpy("loss").reshape(()), loss.sum(), TOL[np.float32])
    close(r.as_numpy("grad_logits"), grad, TOL[np.float32])


@pytest.mark.parametrize("ids_dtype,datatype", [(np.int32, "INT32"), (np.int64, "INT64")])
def test_sparse_float64_ignore_index_and_mean(client, ids_dtype, datatype):
    x = rng_logits((6, 4), 3)
    ids = np.array([0, 3, -100, 2, 1, -100], ids_dtype)
    r = client.infer(
        SPARSE,
        [inp("logits", x, "FP64"), inp("labels", ids, datatype)],
        parameters={"ignore_index": -100, "reduction": "mean"},
    )
    loss, grad, keep = sparse_ref(x, ids, ignore=-100)
    assert r.get_output("loss").datatype == "FP64"
    close(r.as_numpy("loss").reshape(()), loss.sum() / keep.sum(), TOL[np.float64])
    close(r.as_numpy("grad_logits"), grad / keep.sum(), TOL[np.float64])


@pytest.mark.parametrize("np_dtype,datatype", [(np.float16, "FP16"), (ml_dtypes.bfloat16, "BF16")])
def test_halves_travel_raw_and_keep_their_datatype(client, np_dtype, datatype):
    x = rng_logits((3, 5), 4).astype(np_dtype)
    ids = np.array([4, 0, 2], np.int64)
    sw = np.array([1.0, 0.5, 2.0], np.float32)
    r = client.infer(
        SPARSE,
        [
            inp("logits", x, datatype),
            inp("labels", ids, "INT64"),
            inp("sample_weights", sw, "FP32"),
        ],
    )
    loss, grad, _ = sparse_ref(x.astype(np.float64), ids)
    got = r.as_numpy("loss")
    assert r.get_output("loss").datatype == datatype and got.dtype == np_dtype
    close(got, loss * sw, TOL[np_dtype])
    close(r.as_numpy("grad_logits"), grad * sw[:, None], TOL[np_dtype])


def test_numerical_health_comes_back_as_response_parameters(client):
    x = rng_logits((3, 4), 8).astype(np.float32)
    x[1, 2] = np.nan
    y = np.full((3, 4), 0.3, np.float32)  # rows sum to 1.2
    r = client.infer(DENSE, [inp("logits", x, "FP32"), inp("labels", y, "FP32")])
    health = {k: v.int64_param for k, v in r.get_response().parameters.items()}
    assert health == {
        "nonfinite_inputs": 1,
        "unnormalized_label_rows": 3,
        "nonfinite_loss_rows": 1,
    }
    loss = r.as_numpy("loss")
    assert np.isnan(loss[1]) and np.isfinite(loss[[0, 2]]).all()


def test_typed_contents_get_typed_outputs(xentd):
    """Clients that fill InferTensorContents instead of raw bytes (tritonclient's own stubs)."""
    x = rng_logits((2, 3), 5).astype(np.float32)
    ids = np.array([2, 0], np.int64)
    req = service_pb2.ModelInferRequest(model_name=SPARSE, id="typed")
    logits = req.inputs.add(name="logits", datatype="FP32", shape=[2, 3])
    logits.contents.fp32_contents.extend(x.ravel())
    labels = req.inputs.add(name="labels", datatype="INT64", shape=[2])
    labels.contents.int64_contents.extend(ids)
    with grpc.insecure_channel(xentd.address) as channel:
        resp = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req)
    assert not resp.raw_output_contents and resp.id == "typed"
    loss, grad, _ = sparse_ref(x, ids)
    by_name = {o.name: o for o in resp.outputs}
    close(np.array(by_name["loss"].contents.fp32_contents), loss, TOL[np.float32])
    grad_logits = np.array(by_name["grad_logits"].contents.fp32_contents).reshape(2, 3)
    close(grad_logits, grad, TOL[np.float32])


def test_refusals_name_the_input_or_parameter(client):
    x = rng_logits((2, 3), 6).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[[0, 2]]

    def dense(labels=y):
        return [inp("logits", x, "FP32"), inp("labels", labels, "FP32")]

    def sparse(ids, datatype="INT64"):
        return [inp("logits", x, "FP32"), inp("labels", ids, datatype)]

    invalid = "INVALID_ARGUMENT"
    cases = [
        (DENSE, dense(y[:, :2].copy()), {}, invalid, "labels has shape [2, 2]"),
        (DENSE, dense(), {"label_smoothing": 2.0}, invalid, "label_smoothing is 2"),
        (DENSE, dense(), {"lable_smoothing": 0.1}, invalid, "lable_smoothing is not a parameter"),
        (DENSE, dense(), {"reduction": 1}, invalid, "reduction is int64_param 1"),
        (SPARSE, sparse(np.array([0, 3])), {}, invalid, "labels class id 3 at index [1]"),
        (SPARSE, sparse(np.array([0, 1], np.uint8), "UINT8"), {}, invalid, "labels has datatype"),
        ("gpt", dense(), {}, "NOT_FOUND", 'model "gpt"'),
    ]
    for model, inputs, params, status, start in cases:
        with pytest.raises(InferenceServerException) as e:
            client.infer(model, inputs, parameters=params or None)
        assert e.value.status() == f"StatusCode.{status}", e.value
        assert e.value.message().startswith(start), e.value.message()


def test_model_infer_is_counted_under_its_method(client, xentd):
    x = rng_logits((2, 3), 7).astype(np.float32)
    client.infer(SPARSE, [inp("logits", x, "FP32"), inp("labels", np.array([1, 2]), "INT64")])
    body = urllib.request.urlopen(f"http://{xentd.metrics}/metrics", timeout=10).read().decode()
    series = re.compile(
        r'^xent_calls_total\{(?=[^}]*method="(?P<method>\w+)")(?=[^}]*code="(?P<code>\w+)")'
        r"[^}]*\} (?P<value>\S+)$",
        re.M,
    )
    calls = {(m["method"], m["code"]): float(m["value"]) for m in series.finditer(body)}
    assert calls.get(("ModelInfer", "OK"), 0) >= 1, calls
    assert calls.get(("ModelInfer", "INVALID_ARGUMENT"), 0) >= 1, calls


def _reflected_file(address, symbol):
    """The FileDescriptorProto xentd's reflection serves for `symbol` (grpc.reflection.v1,
    with its two messages declared here so no reflection package is needed)."""
    T = descriptor_pb2.FieldDescriptorProto
    pkg = "xent_test_reflection"
    f = descriptor_pb2.FileDescriptorProto(name=f"{pkg}.proto", package=pkg, syntax="proto3")
    f.message_type.add(name="Request").field.add(
        name="file_containing_symbol", number=4, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL
    )
    f.message_type.add(name="Files").field.add(
        name="file_descriptor_proto", number=1, type=T.TYPE_BYTES, label=T.LABEL_REPEATED
    )
    f.message_type.add(name="Response").field.add(
        name="file_descriptor_response",
        number=4,
        type=T.TYPE_MESSAGE,
        type_name=f".{pkg}.Files",
        label=T.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)

    def message(name):
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{pkg}.{name}"))

    Request, Response = message("Request"), message("Response")
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=Request.SerializeToString,
            response_deserializer=Response.FromString,
        )
        (answer,) = list(call(iter([Request(file_containing_symbol=symbol)]), timeout=10))
    protos = [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in answer.file_descriptor_response.file_descriptor_proto
    ]
    return {p.name.rsplit("/", 1)[-1]: p for p in protos if p.package == "inference"}


def test_wire_format_matches_tritonclient(xentd):
    ours = _reflected_file(xentd.address, "inference.GRPCInferenceService")["grpc_service.proto"]
    assert "inference/model_config.proto" in ours.dependency
    theirs = descriptor_pb2.FileDescriptorProto()
    service_pb2.DESCRIPTOR.CopyToProto(theirs)
    assert ours.package == theirs.package == "inference"

    def messages(file):
        out = {}

        def walk(prefix, types):
            for m in types:
                out[prefix + m.name] = m
                walk(prefix + m.name + ".", m.nested_type)

        walk("", file.message_type)
        return out

    def fields(m):
        return {
            (f.name, f.number, f.type, f.label, f.type_name,
             f.oneof_index if f.HasField("oneof_index") else None)
            for f in m.field
        }

    ours_m, theirs_m = messages(ours), messages(theirs)
    assert set(ours_m) == set(theirs_m), "every message of the service, no other"
    for name, m in ours_m.items():
        assert fields(m) == fields(theirs_m[name]), name
    # Triton's model configuration, verbatim: every message and field as tritonclient has it.
    config = descriptor_pb2.FileDescriptorProto()
    model_config_pb2.DESCRIPTOR.CopyToProto(config)
    ours_c = messages(_reflected_file(xentd.address, "inference.ModelConfig")["model_config.proto"])
    theirs_c = messages(config)
    assert set(ours_c) == set(theirs_c)
    for name, m in ours_c.items():
        assert fields(m) == fields(theirs_c[name]), name
    (svc,) = ours.service
    their_svc = {s.name: s for s in theirs.service}[svc.name]
    their_methods = {m.name: m for m in their_svc.method}
    assert {m.name for m in svc.method} == set(their_methods), "every RPC is declared"
    for m in svc.method:
        t = their_methods[m.name]
        assert (m.input_type, m.output_type) == (t.input_type, t.output_type), m.name
        assert (m.client_streaming, m.server_streaming) == (t.client_streaming, t.server_streaming), m.name
