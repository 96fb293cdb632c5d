"""Python client of xentd: softmax cross-entropy losses and their gradients, numpy in and out.

`Client` (sync) and `AsyncClient` (asyncio) evaluate, balanced over every replica they are
given or a name resolves to; `xent_client.torch` plugs the remote loss into PyTorch's autograd
(imported on demand, so torch stays optional).
"""

from xent_client.client import (
    AsyncClient,
    Client,
    EndpointStats,
    Health,
    Result,
    RetryPolicy,
    XentError,
    build_request,
    decode_response,
    from_tensor,
    to_tensor,
)

__all__ = [
    "AsyncClient",
    "Client",
    "EndpointStats",
    "Health",
    "Result",
    "RetryPolicy",
    "XentError",
    "build_request",
    "decode_response",
    "from_tensor",
    "to_tensor",
]
__version__ = "0.1.0"
