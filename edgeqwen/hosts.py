"""Which address a server (`serve`) or worker (`worker`) listens on: checked in one place, before any work.

An empty host would make uvicorn listen on every interface and a name may resolve anywhere, so both are
resolved here and judged by the addresses they stand for: loopback (127.0.0.0/8, ::1) is this machine only;
a wildcard (0.0.0.0, ::) or any other address of this machine is reachable from the network.
"""
from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass

from .errors import UsageError

WILDCARDS = ("0.0.0.0", "::")


@dataclass(frozen=True)
class Host:
    name: str
    addresses: tuple[str, ...]
    loopback: bool     # every address it stands for is this machine's loopback

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.addresses[0] else socket.AF_INET


def check_host(host: str) -> Host:
    """--host as given -> the addresses it stands for; empty, unresolvable or not this machine's is a UsageError."""
    name = host.strip()
    if not name:
        raise UsageError("--host is empty: give 127.0.0.1 (this machine only) or an address of this machine "
                         "(0.0.0.0 for every interface)")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise UsageError(f"--host {host!r}: cannot resolve it ({getattr(e, 'strerror', None) or e})") from None
    addrs = tuple(sorted(dict.fromkeys(i[4][0].split("%")[0] for i in infos), key=lambda a: ":" in a))  # IPv4 first
    if not addrs:
        raise UsageError(f"--host {host!r}: resolves to no address")
    for a in addrs:
        if a in WILDCARDS:
            continue
        with socket.socket(socket.AF_INET6 if ":" in a else socket.AF_INET) as s:
            try:
                s.bind((a, 0))
            except OSError as e:
                if e.errno == errno.EADDRNOTAVAIL:
                    raise UsageError(f"--host {host!r}: {a} is not an address of this machine") from None
    return Host(name, addrs, all(ipaddress.ip_address(a).is_loopback for a in addrs))


def listen(host: Host, port: int) -> socket.socket:
    """A listening socket on host:port, or one UsageError naming them and the reason (port in use...)."""
    sock = socket.socket(host.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if host.family == socket.AF_INET6 and host.addresses[0] == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host.addresses[0], port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host.name}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock
