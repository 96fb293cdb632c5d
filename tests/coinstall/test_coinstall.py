"""xent_client, tritonclient[grpc] and kserve installed by one pip run into one environment,
each used against the real xentd as a user's program would use it.

Checked: pip sees one consistent environment; xent_client evaluates beside tritonclient in one
process and beside kserve in another (those two cannot share a process: both register the
`inference` protobuf package in the default pool); tritonclient and kserve's
InferenceGRPCClient infer; xent_client's stubs also load on the oldest protobuf it declares;
`import xent_client.torch` without torch says how to install torch; and the type information
the package ships holds under `mypy --strict`. Every loss is checked against a float64
computation of the same loss.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import textwrap
import tomllib

import numpy as np
import pytest
from conftest import REPO_ROOT, run_program

LOGITS = [[1.0, 2.0, 0.5], [0.2, 0.8, 1.5]]
CLASS_IDS = [1, 2]
SMOOTHING = 0.1
CLIENT_DIR = REPO_ROOT / "clients" / "python"
PREAMBLE = f"import json\nimport numpy as np\nLOGITS = {LOGITS!r}\nCLASS_IDS = {CLASS_IDS!r}\nSMOOTHING = {SMOOTHING!r}\n"


def reference_losses(smoothing: float = 0.0) -> np.ndarray:
    """Per-example sparse softmax cross-entropy with label smoothing, in float64."""
    x = np.array(LOGITS, np.float64)
    m = x.max(axis=1, keepdims=True)
    log_softmax = (x - m) - np.log(np.exp(x - m).sum(axis=1, keepdims=True))
    picked = log_softmax[np.arange(len(CLASS_IDS)), CLASS_IDS]
    return -(1 - smoothing) * picked - smoothing / x.shape[1] * log_softmax.sum(axis=1)


def assert_float32_close(got, want) -> None:
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=3e-5, atol=2e-6)


def program(body: str) -> str:
    return PREAMBLE + textwrap.dedent(body)


def test_one_consistent_environment():
    done = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    # The point of the exercise: the inference clients hold protobuf below 7.
    assert importlib.metadata.version("protobuf").startswith("6.")
    for name in ("xent-client", "tritonclient", "kserve"):
        assert importlib.metadata.version(name)
    assert importlib.util.find_spec("torch") is None, "this environment must not have torch"


XENT_CLIENT = """
from xent_client import Client
with Client(timeout=30) as xent:  # $XENT_ADDRESS
    x, y = np.array(LOGITS, np.float32), np.array(CLASS_IDS)
    per_example = xent.evaluate(x, y).loss.tolist()
    mean = float(xent.evaluate(x, y, reduction="mean", label_smoothing=SMOOTHING).loss)
"""


@pytest.mark.parametrize("beside", ["tritonclient.grpc", "kserve"])
def test_xent_client_evaluates(xentd, beside):
    body = f"import {beside}\n" + XENT_CLIENT + "print(json.dumps([per_example, mean]))"
    per_example, mean = run_program(program(body), env={"XENT_ADDRESS": xentd.address}).value
    assert_float32_close(per_example, reference_losses())
    assert_float32_close(mean, reference_losses(SMOOTHING).mean())


TRITONCLIENT = """
import xent_client
import tritonclient.grpc as tc
client = tc.InferenceServerClient(ADDRESS)
x = np.array(LOGITS, np.float32)
inputs = [tc.InferInput("logits", list(x.shape), "FP32"), tc.InferInput("labels", [len(CLASS_IDS)], "INT64")]
inputs[0].set_data_from_numpy(x)
inputs[1].set_data_from_numpy(np.array(CLASS_IDS, np.int64))
r = client.infer("sparse_softmax_cross_entropy", inputs, outputs=[tc.InferRequestedOutput("loss")],
                 parameters={"reduction": "mean", "label_smoothing": SMOOTHING}, client_timeout=30)
print(json.dumps([client.is_server_ready(), float(r.as_numpy("loss"))]))
"""


def test_tritonclient_infers(xentd):
    ready, mean = run_program(program(f"ADDRESS = {xentd.address!r}\n" + TRITONCLIENT)).value
    assert ready is True
    assert_float32_close(mean, reference_losses(SMOOTHING).mean())


# kserve's client has no double parameter (a float is refused by its to_grpc_parameters), so
# label smoothing travels as the string "0.1", which xentd reads as the number;
# `set_data_from_numpy`'s `binary_data` is kserve's default (True: raw contents and an input
# parameter `binary_data_size`) unless the test names it.
KSERVE = """
import asyncio
import grpc
import xent_client
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.infer_type import RequestedOutput

async def main():
    x, y = np.array(LOGITS, np.float32), np.array(CLASS_IDS, np.int64)
    logits, labels = InferInput("logits", list(x.shape), "FP32"), InferInput("labels", list(y.shape), "INT64")
    logits.set_data_from_numpy(x, **DATA)
    labels.set_data_from_numpy(y, **DATA)
    request = InferRequest("sparse_softmax_cross_entropy", [logits, labels], request_id="coinstall",
                           parameters={"reduction": "mean", "label_smoothing": str(SMOOTHING)},
                           request_outputs=[RequestedOutput("loss")])
    async with InferenceGRPCClient(ADDRESS, timeout=30) as client:
        ready = await client.is_server_ready()
        try:
            response = await client.infer(request)
        except grpc.aio.AioRpcError as err:
            return {"ready": ready, "code": err.code().name, "details": err.details()}
        return {"ready": ready, "code": "OK", "loss": float(response.outputs[0].as_numpy())}

print(json.dumps(asyncio.run(main())))
"""


def kserve_infers(address: str, data: dict) -> None:
    out = run_program(program(f"ADDRESS = {address!r}\nDATA = {data!r}\n" + KSERVE)).value
    assert out["ready"] is True
    assert out["code"] == "OK", f"{out['code']}: {out['details']}"
    assert_float32_close(out["loss"], reference_losses(SMOOTHING).mean())


def test_kserve_infers_on_its_default_path(xentd):
    kserve_infers(xentd.address, {})


def test_kserve_infers_with_typed_contents(xentd):
    kserve_infers(xentd.address, {"binary_data": False})


def declared_floor(package: str) -> str:
    dependencies = tomllib.loads((CLIENT_DIR / "pyproject.toml").read_text())["project"]["dependencies"]
    [spec] = [d for d in dependencies if re.match(rf"{package}\s*>=", d)]
    return re.match(rf"{package}\s*>=\s*([0-9.]+)", spec).group(1)


def test_stubs_load_on_the_oldest_protobuf_declared(xentd, tmp_path):
    floor = declared_floor("protobuf")
    target = tmp_path / "protobuf"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--target", str(target), f"protobuf=={floor}"],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    body = """
    import warnings
    warnings.simplefilter("error")
    import google.protobuf
    from xent_client import Client
    with Client(timeout=30) as xent:
        loss = xent.evaluate(np.array(LOGITS, np.float32), np.array(CLASS_IDS)).loss.tolist()
    print(json.dumps([google.protobuf.__version__, loss]))
    """
    version, loss = run_program(program(body), env={"PYTHONPATH": str(target), "XENT_ADDRESS": xentd.address}).value
    assert version == floor
    assert_float32_close(loss, reference_losses())


def test_torch_module_without_torch_says_how_to_install_it():
    body = """
    try:
        import xent_client.torch
    except ImportError as err:
        print(json.dumps([type(err).__name__, err.name, str(err)]))
    """
    kind, name, message = run_program(program(body)).value
    assert (kind, name) == ("ImportError", "torch")
    assert "pip install 'xent-client[torch]'" in message


TYPED_USE = """\
import numpy as np
import numpy.typing as npt

from xent_client import Client, Result


def mean_loss(client: Client, logits: npt.NDArray[np.float32], ids: npt.NDArray[np.int64]) -> float:
    r: Result = client.evaluate(logits, ids, reduction="mean", label_smoothing=0.1, class_weights=[1.0, 2.0, 1.0])
    assert r.loss is not None
    return float(r.loss)
"""

MISTYPED_USE = """\
import numpy as np

from xent_client import Client

client = Client(timeout="30")
client.evaluate(np.zeros((2, 3)), np.zeros(2, np.int64), reduction="avg")
client.evaluate(np.zeros((2, 3)), np.zeros(2, np.int64), label_smothing=0.1)
loss: str = client.evaluate(np.zeros((2, 3)), np.zeros(2, np.int64)).loss
"""


def mypy(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mypy", *args], capture_output=True, text=True, cwd=cwd)


def test_installed_package_is_typed(tmp_path):
    (tmp_path / "typed_use.py").write_text(TYPED_USE)
    (tmp_path / "mistyped_use.py").write_text(MISTYPED_USE)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    done = mypy("--strict", *cache, "typed_use.py", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    done = mypy("--strict", *cache, "mistyped_use.py", cwd=tmp_path)
    lines = {int(m.group(1)) for m in re.finditer(r"^mistyped_use\.py:(\d+): error", done.stdout, re.M)}
    # Each mistake is caught where it is made, so the signatures are not Any.
    assert lines == {5, 6, 7, 8}, done.stdout


def test_package_source_passes_mypy_strict(tmp_path):
    done = mypy("--cache-dir", str(tmp_path / "cache"), "-p", "xent_client", cwd=CLIENT_DIR)
    assert done.returncode == 0, done.stdout + done.stderr
