"""What the client is told to connect to: addresses, and names that resolve to addresses.

An endpoint is one address, `ip:port` (`[v6]:port` for IPv6) or `unix:path`, and gets a
channel of its own. A name (`host:port`, `dns:///host:port`) stands for every address it
resolves to, so a Kubernetes headless Service, which has one A record per ready pod, becomes
one endpoint per pod. The client resolves names itself, with `socket.getaddrinfo` unless it is
given a resolver: gRPC's own resolver re-resolves only after a connection fails, so it would
never see the pods a scale-up adds while the old ones stay healthy.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

DEFAULT_ADDRESS = "127.0.0.1:50051"

Resolver = Callable[[str, int], Iterable[str]]
"""resolver(host, port) -> the addresses ("ip:port") the name stands for now."""


@dataclass(frozen=True)
class Name:
    """A name to resolve: `host` at `port`."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def _split(entry: str, given: str) -> tuple[str, int]:
    host, sep, port = entry.rpartition(":")
    if not sep or not host:
        raise ValueError(f"endpoint {given!r} has no port (expected host:port)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"endpoint {given!r}: write an IPv6 address in brackets, [addr]:port")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"endpoint {given!r} has port {port!r}; expected 0-65535")
    return host, int(port)


def address(host: str, port: int) -> str:
    """The canonical form of an IP address and port: `1.2.3.4:5`, `[::1]:5`."""
    ip = ipaddress.ip_address(host)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def canonical(entry: str) -> str:
    """`entry` ("ip:port", "[v6]:port" or "unix:path") in canonical form; ValueError otherwise."""
    if entry.startswith(("unix:", "unix-abstract:")):
        return entry
    host, port = _split(entry, entry)
    try:
        return address(host, port)
    except ValueError:
        raise ValueError(f"{entry!r} is not an IP address and port") from None


def grpc_target(addr: str) -> str:
    """The gRPC target of one canonical address: a fixed address, never resolved again."""
    if addr.startswith("unix"):
        return addr
    return f"ipv6:{addr}" if addr.startswith("[") else f"ipv4:{addr}"


def parse(endpoints: str | Sequence[str] | None) -> list[str | Name]:
    """The addresses and names of `endpoints`: "host:port", a comma-separated list or a list
    of them; `dns:///host:port`, `ipv4:` and `ipv6:` lists and `unix:` paths as in gRPC. None
    means $XENT_ADDRESS, as for the xent CLI, or else 127.0.0.1:50051."""
    if endpoints is None:
        endpoints = os.environ.get("XENT_ADDRESS") or DEFAULT_ADDRESS
    if isinstance(endpoints, str):
        endpoints = [endpoints] if endpoints.startswith(("ipv4:", "ipv6:", "unix")) else endpoints.split(",")
    parsed: list[str | Name] = []
    for given in endpoints:
        entry = given.strip().removeprefix("http://")
        if not entry:
            continue
        if entry.startswith(("ipv4:", "ipv6:")):
            parsed += [canonical(a.strip()) for a in entry[5:].split(",") if a.strip()]
            continue
        if entry.startswith(("unix:", "unix-abstract:")):
            parsed.append(entry)
            continue
        if entry.startswith("dns:"):
            if not entry.startswith("dns:///"):
                raise ValueError(f"endpoint {given!r}: a DNS server in the target is not supported; write dns:///host:port")
            entry = entry.removeprefix("dns:///")
        host, port = _split(entry, given)
        try:
            parsed.append(address(host, port))
        except ValueError:
            parsed.append(Name(host, port))
    if not parsed:
        raise ValueError("no endpoint given")
    return parsed


def getaddrinfo(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (the system's resolver: /etc/hosts, then DNS), in the
    order the resolver gave them."""
    seen: dict[str, None] = {}
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        if family in (socket.AF_INET, socket.AF_INET6):
            seen[address(str(sockaddr[0]).split("%")[0], port)] = None
    return list(seen)
