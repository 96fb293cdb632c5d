"""The PyTorch integration against a real xentd: loss and gradient equal F.cross_entropy's.
Skipped where torch is not installed."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from xent_client import Client  # noqa: E402
from xent_client.torch import cross_entropy  # noqa: E402


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_f_cross_entropy(address, reduction):
    torch.manual_seed(0)
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (16,))
    w = torch.rand(5, dtype=torch.float64) + 0.5
    upstream = torch.rand(16, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    with Client(address, timeout=30) as client:
        a = x.clone().requires_grad_()
        b = x.clone().requires_grad_()
        remote = cross_entropy(a, y, client, weight=w, label_smoothing=0.1, reduction=reduction)
        local = F.cross_entropy(b, y, weight=w, label_smoothing=0.1, reduction=reduction)
        torch.testing.assert_close(remote, local, rtol=1e-9, atol=1e-12)
        (remote * upstream).sum().backward()
        (local * upstream).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)
