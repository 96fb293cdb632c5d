"""Evaluate softmax cross-entropy losses and their gradients with xentd from Python.

    python3 -m venv .venv && .venv/bin/pip install ./clients/python
    cargo run --release --bin xentd                                # in another terminal
    .venv/bin/python examples/python/quickstart.py                 # --address, or $XENT_ADDRESS

xent_client sends numpy arrays as raw little-endian tensors and returns numpy arrays in the
logits' dtype. For the bare gRPC API (stubs generated from proto/xent/v1/xent.proto), see
xent_stubs.py beside this file and tests/python.
"""

import argparse
import os

import numpy as np

from xent_client import Client, XentError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--address", default=os.environ.get("XENT_ADDRESS") or "127.0.0.1:50051", help="xentd's HOST:PORT"
    )
    args = parser.parse_args()
    np.set_printoptions(precision=7, suppress=True)

    # Two examples, three classes. Each dense label row is a distribution (here one-hot).
    logits = np.array([[1.0, 2.0, 0.5], [0.2, 0.8, 1.5]], dtype=np.float32)
    labels = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    class_ids = np.array([1, 2])

    with Client(args.address, timeout=10) as xent:
        # Float labels shaped like the logits: softmax_cross_entropy, per example (reduction
        # "none", the default), with d loss / d logits.
        r = xent.evaluate(logits, labels)
        print("per-example loss:", r.loss)
        print("d loss / d logits:")
        print(r.grad_logits)

        # The same batch as class ids (sparse_softmax_cross_entropy), reduced to the mean. The
        # gradient is that of the mean (times the upstream gradient, 1 when none is sent).
        r = xent.evaluate(logits, class_ids, reduction="mean")
        print("mean loss:", r.loss)
        print("d mean loss / d logits:")
        print(r.grad_logits)

        # PyTorch's weight is xent's class_weights, and reduction "mean" is the weighted mean.
        r = xent.evaluate(logits, class_ids, class_weights=[1.0, 2.0, 0.5], reduction="mean", label_smoothing=0.1)
        print("weighted mean with label smoothing 0.1:", r.loss)

        # A bad request is INVALID_ARGUMENT, with a message that names the field at fault.
        try:
            xent.evaluate(logits, np.array([1, 3]))
        except XentError as err:
            print(err)


if __name__ == "__main__":
    main()
