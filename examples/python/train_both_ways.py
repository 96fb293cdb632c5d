"""Trains the same small model twice, once with F.cross_entropy and once with the loss and
gradient computed by xentd, and prints both loss curves side by side: they must agree within
1e-5 at every step (the exit status says whether they did).

    pip install ./clients/python torch
    python examples/python/train_both_ways.py --address 127.0.0.1:50051
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from xent_client import Client
from xent_client.torch import cross_entropy


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 20, generator=g)
    true_w = torch.randn(20, 4, generator=g)
    y = (x @ true_w + 0.5 * torch.randn(512, 4, generator=g)).argmax(dim=1)
    return x, y


def train(loss_fn, steps: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    curve = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    local = train(lambda z, y: F.cross_entropy(z, y), args.steps)
    with Client(args.address, timeout=30) as client:
        remote = train(lambda z, y: cross_entropy(z, y, client), args.steps)
    print(f"{'step':>4}  {'F.cross_entropy':>16}  {'xentd':>16}  {'difference':>10}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(local, remote)):
        worst = max(worst, abs(a - b))
        print(f"{i:>4}  {a:>16.8f}  {b:>16.8f}  {abs(a - b):>10.2e}")
    print(f"largest difference {worst:.2e}")
    if worst > 1e-5:
        raise SystemExit("the curves differ by more than 1e-5")


if __name__ == "__main__":
    main()
