"""Evaluate a softmax cross-entropy loss and its gradient with xentd from Python.

    pip install -r tests/python/requirements.txt
    cargo run --bin xentd -- --listen 127.0.0.1:50051     # in another terminal
    python examples/python/quickstart.py --address 127.0.0.1:50051

The xent.v1 stubs are generated from proto/xent/v1/xent.proto when the script starts (see
xent_stubs.py beside it); to generate them once instead, run from the repository root

    python -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. xent/v1/xent.proto

and import `xent.v1.xent_pb2` and `xent.v1.xent_pb2_grpc` directly.
"""

import argparse

import grpc
import numpy as np

import xent_stubs
from xent_stubs import from_tensor, to_tensor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50051", help="xentd's HOST:PORT")
    args = parser.parse_args()

    stubs = xent_stubs.load()
    pb = stubs.pb

    # Two examples, three classes. Each label row is a probability distribution (here one-hot).
    logits = np.array([[1.0, 2.0, 0.5], [0.2, 0.8, 1.5]], dtype=np.float32)
    labels = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)

    with grpc.insecure_channel(args.address) as channel:
        xent = stubs.grpc.XentStub(channel)

        # Per-example losses and d loss / d logits. to_tensor sends the arrays as little-endian
        # raw bytes; the response comes back the same way and from_tensor reads it with numpy.
        response = xent.Evaluate(
            pb.EvaluateRequest(
                request_id="quickstart-1",
                loss=pb.LOSS_KIND_SOFTMAX_CROSS_ENTROPY,
                logits=to_tensor(pb, logits),
                labels=to_tensor(pb, labels),
            ),
            timeout=10,
        )
        print("per-example loss:", from_tensor(pb, response.loss))  # [0.4643688 0.5704806]
        print("d loss / d logits:")
        print(from_tensor(pb, response.grad_logits))

        # The same batch as class ids, reduced to the mean loss (a shape [] tensor). The gradient
        # is that of the mean, scaled by the upstream gradient (1 when none is sent).
        class_ids = np.array([1, 2], dtype=np.int64)
        response = xent.Evaluate(
            pb.EvaluateRequest(
                request_id="quickstart-2",
                loss=pb.LOSS_KIND_SPARSE_SOFTMAX_CROSS_ENTROPY,
                logits=to_tensor(pb, logits),
                labels=to_tensor(pb, class_ids),
                reduction=pb.REDUCTION_MEAN,
            ),
            timeout=10,
        )
        print("mean loss:", float(from_tensor(pb, response.loss)))  # 0.5174247
        print("d mean loss / d logits:")
        print(from_tensor(pb, response.grad_logits))


if __name__ == "__main__":
    main()
