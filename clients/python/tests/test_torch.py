"""The PyTorch integration against a real xentd: loss and gradient equal F.cross_entropy's.
Skipped where torch is not installed, unless XENT_TEST_TORCH=1 (as in CI): then they fail."""

from __future__ import annotations

import pytest
from conftest import import_torch

torch = import_torch()
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


def _compare(client, x, y, rtol, atol, **kwargs):
    """The remote and local loss and logits gradient of the same call (upstream 1.3)."""
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    remote = cross_entropy(a, y, client, **kwargs)
    local = F.cross_entropy(b, y, **kwargs)
    assert remote.dtype == local.dtype and remote.shape == local.shape
    torch.testing.assert_close(remote, local, rtol=rtol, atol=atol)
    (remote.sum() * 1.3).backward()
    (local.sum() * 1.3).backward()
    assert a.grad.dtype == x.dtype
    torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol)


def test_float32_spatial_class_axis_1(address):
    # (N, C, d1, d2) logits and (N, d1, d2) targets, as for segmentation.
    torch.manual_seed(1)
    x = torch.randn(3, 6, 4, 5)
    y = torch.randint(0, 6, (3, 4, 5))
    with Client(address, timeout=30) as client:
        _compare(client, x, y, 3e-5, 2e-6)
        _compare(client, x, y, 3e-5, 2e-6, reduction="none")


def test_probability_targets(address):
    torch.manual_seed(2)
    x = torch.randn(8, 5, dtype=torch.float64)
    y = torch.softmax(torch.randn(8, 5, dtype=torch.float64), dim=1)
    with Client(address, timeout=30) as client:
        _compare(client, x, y, 1e-9, 1e-12, label_smoothing=0.2)


def test_ignore_index_and_weighted_mean(address):
    torch.manual_seed(3)
    x = torch.randn(10, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, -100, 1, -100, 2, 0, 3])
    w = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    with Client(address, timeout=30) as client:
        _compare(client, x, y, 1e-9, 1e-12, weight=w, ignore_index=-100)
        # -100 is the default, as in PyTorch; another index works too.
        _compare(client, x, y, 1e-9, 1e-12, weight=w)
        _compare(client, x, torch.where(y == -100, 7, y), 1e-9, 1e-12, ignore_index=7)


def test_bfloat16(address):
    torch.manual_seed(4)
    x = torch.randn(16, 7).to(torch.bfloat16)
    y = torch.randint(0, 7, (16,))
    with Client(address, timeout=30) as client:
        _compare(client, x, y, 2e-2, 1e-2, reduction="none")


def test_single_example_without_batch_axis(address):
    x = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    y = torch.tensor(1)
    with Client(address, timeout=30) as client:
        _compare(client, x, y, 1e-9, 1e-12)


def test_out_of_range_target_is_invalid_argument(address):
    import grpc

    from xent_client import XentError

    x = torch.randn(2, 3, requires_grad=True)
    with Client(address, timeout=30) as client, pytest.raises(XentError) as err:
        cross_entropy(x, torch.tensor([1, 3]), client)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details.startswith("labels")


def test_a_client_of_several_replicas_survives_losing_one(replicas):
    # The autograd function sits on Client.evaluate, so it is balanced and retried like any
    # call: a replica killed between steps changes nothing in the losses and gradients.
    a, b = replicas(), replicas()
    torch.manual_seed(4)
    x = torch.randn(8, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (8,))
    with Client([a.address, b.address], timeout=30) as client:
        for step in range(8):
            if step == 4:
                a.process.kill()
                a.process.wait()
            _compare(client, x, y, 1e-9, 1e-12)
        assert client.calls == 8
        assert {s.address: s.state for s in client.endpoints()}[b.address] == "serving"
