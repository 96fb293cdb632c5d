"""PyTorch integration: the loss and its gradient computed by xentd inside autograd.

`CrossEntropy` is a `torch.autograd.Function`: forward sends the logits and targets to xentd
and asks for the loss and the logits gradient in one call; backward returns that saved
gradient times the incoming `grad_output` (broadcast over the class axis for per-example
losses). `cross_entropy` wraps it with `torch.nn.functional.cross_entropy`'s conventions
(class axis 1, reduction "mean"), so a training loop can swap one for the other.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

try:
    import torch
except ModuleNotFoundError as err:
    if err.name != "torch":
        raise
    # torch is an optional dependency (the `torch` extra): say how to get it.
    raise ImportError(
        "xent_client.torch needs PyTorch, which is not installed: "
        "pip install 'xent-client[torch]' (or pip install torch)",
        name="torch",
    ) from err

from xent_client.client import Client

__all__ = ["CrossEntropy", "cross_entropy"]


def _to_numpy(t: torch.Tensor) -> npt.NDArray[Any]:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        halves: npt.NDArray[Any] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return halves
    array: npt.NDArray[Any] = t.numpy()
    return array


def _from_numpy(a: npt.NDArray[Any] | None, like: torch.Tensor) -> torch.Tensor:
    # A copy: arrays decoded from a response are read-only views of its bytes, and torch
    # tensors must be writable.
    if a is None:
        raise ValueError("xentd's answer lacks an output that was asked for")
    if a.dtype.name == "bfloat16":
        t = torch.from_numpy(np.array(a).view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.array(a))
    return t.to(device=like.device)


class CrossEntropy(torch.autograd.Function):
    """apply(logits, target, client, options): the remote loss, differentiable w.r.t. logits.

    `target` holds class ids (integer tensor, logits' shape without the class axis) or
    probabilities (logits' shape and dtype). `options` is a dict of xent options (axis,
    reduction, label_smoothing, class_weights, ignore_index, z_loss, ...).
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, client: Client, options: dict[str, Any]) -> torch.Tensor:
        options = dict(options)
        for key in ("class_weights", "sample_weights"):
            if isinstance(options.get(key), torch.Tensor):
                options[key] = _to_numpy(options[key]).astype(np.float64)
        r = client.evaluate(_to_numpy(logits), _to_numpy(target), outputs=("loss", "grad_logits"), **options)
        ctx.axis = options.get("axis", -1) % logits.dim()
        ctx.reduced = options.get("reduction", "none") != "none"
        ctx.save_for_backward(_from_numpy(r.grad_logits, logits))
        return _from_numpy(r.loss, logits)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (grad,) = ctx.saved_tensors
        g = grad_output if ctx.reduced else grad_output.unsqueeze(ctx.axis)
        return grad * g.to(grad.dtype), None, None, None


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    client: Client,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    axis: int = 1,
    **options: Any,
) -> torch.Tensor:
    """Like torch.nn.functional.cross_entropy (class axis 1 by default, reduction "mean"),
    computed by xentd. As in PyTorch, ignore_index (-100 by default) applies to class-index
    targets only; None turns it off. Unlike PyTorch, a mean over only ignored targets is 0
    instead of NaN (the contract's safe division)."""
    if input.dim() == 1:
        axis = 0
    opts = dict(options, axis=axis, reduction=reduction, label_smoothing=label_smoothing)
    if weight is not None:
        opts["class_weights"] = weight
    if ignore_index is not None and not target.is_floating_point():
        opts["ignore_index"] = ignore_index
    loss: torch.Tensor = CrossEntropy.apply(input, target, client, opts)
    return loss
