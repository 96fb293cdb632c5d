"""examples/python/train_both_ways.py, run as a user runs it against a real xentd: the model
trained with F.cross_entropy and the one trained with the loss and gradient from xentd follow
the same loss curve, and the curve goes down (the model learned, through xentd's gradients)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import import_torch

import_torch()  # skips where torch is not installed, fails where it is required

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "python" / "train_both_ways.py"
STEPS = 25
TOLERANCE = 1e-5  # float32 losses of a 4-class problem, after STEPS steps of SGD


def test_train_both_ways_curves_match(address):
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), "--address", address, "--steps", str(STEPS)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line.split() for line in run.stdout.splitlines()]
    curve = [(int(r[0]), float(r[1]), float(r[2])) for r in rows if len(r) == 4 and r[0].isdigit()]
    assert [step for step, _, _ in curve] == list(range(STEPS)), run.stdout
    for step, local, remote in curve:
        assert abs(local - remote) <= TOLERANCE, f"step {step}: F.cross_entropy {local}, xentd {remote}"
    first, last = curve[0][1], curve[-1][1]
    assert last < first - 0.1, f"the loss did not go down: {first} -> {last}"
    assert "largest difference" in run.stdout
