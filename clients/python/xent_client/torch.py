"""PyTorch integration: the loss and its gradient computed by xentd inside autograd.

`CrossEntropy` is a `torch.autograd.Function`: forward sends the logits and targets to xentd
and asks for the loss and the logits gradient in one call; backward returns that saved
gradient times the incoming `grad_output` (broadcast over the class axis for per-example
losses). `cross_entropy` wraps it with `torch.nn.functional.cross_entropy`'s conventions
(class axis 1, reduction "mean"), so a training loop can swap one for the other.
"""

from __future__ import annotations

import numpy as np
import torch

from xent_client.client import Client

__all__ = ["CrossEntropy", "cross_entropy"]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _from_numpy(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    # A copy: arrays decoded from a response are read-only views of its bytes, and torch
    # tensors must be writable.
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
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, client: Client, options: dict):
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
    def backward(ctx, grad_output: torch.Tensor):
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
    **options,
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
    return CrossEntropy.apply(input, target, client, opts)
