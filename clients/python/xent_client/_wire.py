"""The few protobuf messages the client reads and writes outside xent.v1, by hand.

`grpc.health.v1` (health checks) and `google.rpc.Status`/`RetryInfo` (the retry delay a server
attaches to UNAVAILABLE) are tiny. Coding them here keeps the package free of
grpcio-health-checking and googleapis-common-protos, whose version pins would narrow the
grpcio and protobuf ranges the client installs with, and of a second set of generated stubs
that could clash with another package registering the same .proto files.
"""

from __future__ import annotations

from typing import Iterator

# grpc.health.v1.Health
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
SERVING_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
SERVING = 1

RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field of a serialized message: an int for varints, the
    bytes for length-delimited and fixed-width fields. ValueError when it is malformed."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            n, i = _varint(data, i)
            if i + n > len(data):
                raise ValueError("truncated field")
            value, i = data[i : i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            if i + n > len(data):
                raise ValueError("truncated field")
            value, i = data[i : i + n], i + n
        else:
            raise ValueError(f"wire type {wire}")
        yield number, value


def health_request(service: str) -> bytes:
    """A serialized HealthCheckRequest for `service`."""
    name = service.encode()
    if len(name) > 127:
        raise ValueError("service name too long")
    return b"\x0a" + bytes([len(name)]) + name if name else b""


def health_status(data: bytes) -> int:
    """The ServingStatus of a serialized HealthCheckResponse."""
    status = 0
    for number, value in fields(data):
        if number == 1 and isinstance(value, int):
            status = value
    return status


def retry_delay(status_details: bytes) -> float | None:
    """The delay in seconds of the google.rpc.RetryInfo in a serialized google.rpc.Status
    (the `grpc-status-details-bin` trailer), or None when it has none or is malformed."""
    try:
        for number, detail in fields(status_details):
            if number != 3 or not isinstance(detail, bytes):
                continue
            any_fields = dict(fields(detail))
            if any_fields.get(1) != RETRY_INFO.encode():
                continue
            info = any_fields.get(2, b"")
            duration = next((v for n, v in fields(info) if n == 1 and isinstance(v, bytes)), b"") if isinstance(info, bytes) else b""
            parts = {n: v for n, v in fields(duration) if isinstance(v, int)}
            seconds, nanos = parts.get(1, 0), parts.get(2, 0)
            if seconds >= 1 << 63 or nanos >= 1 << 31:  # negative: not a delay
                return None
            return seconds + nanos / 1e9
    except ValueError:
        return None
    return None
