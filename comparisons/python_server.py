"""The baseline a user could write in an afternoon: xent.v1's Evaluate in Python with grpcio and
numpy (float32/float64, class axis last, dense or class-id labels, per-example loss and the
logits gradient). It is what `BENCHMARKS.md` compares xentd's service throughput against; it is
not part of the product.

    .venv/bin/python comparisons/python_server.py --address 127.0.0.1:50053 --workers 4
"""

from __future__ import annotations

import argparse
import sys
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "python"))
import xent_stubs  # noqa: E402

stubs = xent_stubs.load()
pb = stubs.pb


class Evaluator(stubs.grpc.XentServicer):
    def Evaluate(self, request, context):
        x = xent_stubs.from_tensor(pb, request.logits)
        y = xent_stubs.from_tensor(pb, request.labels)
        m = x.max(axis=-1, keepdims=True)
        z = x - m
        log_s = np.log(np.exp(z).sum(axis=-1, keepdims=True))
        log_softmax = z - log_s
        softmax = np.exp(log_softmax)
        if request.loss == pb.LOSS_KIND_SPARSE_SOFTMAX_CROSS_ENTROPY:
            rows = np.arange(x.shape[0])
            loss = -log_softmax[rows, y]
            grad = softmax
            grad[rows, y] -= 1.0
        else:
            loss = -(y * log_softmax).sum(axis=-1)
            grad = softmax * y.sum(axis=-1, keepdims=True) - y
        return pb.EvaluateResponse(
            request_id=request.request_id,
            loss=xent_stubs.to_tensor(pb, loss.astype(x.dtype)),
            grad_logits=xent_stubs.to_tensor(pb, grad.astype(x.dtype)),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", default="127.0.0.1:50053")
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    limit = 256 << 20
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.workers),
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
    )
    stubs.grpc.add_XentServicer_to_server(Evaluator(), server)
    server.add_insecure_port(args.address)
    server.start()
    print(f"listening on {args.address}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
