"""Is a local port free? Checked before a long start, with the flag to change and a free port.

Two sites on one machine with the default ports used to collide deep inside Flower's SuperNode
(a retry loop) or after minutes of setup (`make demo`). This module asks the operating system
first and says which flag moves the port. Standard library only: `make demo` runs it before
anything is installed (`python3 -m common.ports FLAG=HOST:PORT ...`).
"""

from __future__ import annotations

import socket
import sys


class PortTaken(ValueError):
    """A port the command needs is in use; the message names the flag and a free port."""


def free_loopback_port() -> int:
    """A TCP port nothing listens on right now, on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bind_failure(host: str, port: int) -> OSError | None:
    """None when `host:port` can be listened on now, else the operating system's error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # as servers bind (SO_REUSEADDR): a port in TIME_WAIT after a previous run is free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc
    return None


def bind_error(host: str, port: int) -> str | None:
    """None when `host:port` can be listened on now, else the operating system's reason."""
    exc = bind_failure(host, port)
    return None if exc is None else exc.strerror or str(exc)


def free_port_after(
    host: str, port: int, avoid: set[int] | frozenset[int] = frozenset()
) -> int | None:
    """The first port above `port` free on `host` now (not in `avoid`); None: `host` is unusable."""
    if bind_error(host, 0) is not None:
        return None
    for candidate in range(port + 1, min(port + 200, 65536)):
        if candidate not in avoid and bind_error(host, candidate) is None:
            return candidate
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:  # crowded: any port offered
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def check_free(ports: dict[str, tuple[str, int]], *, how: str = "pass {flag} {free}") -> None:
    """Raise PortTaken for the first port in `ports` (flag: (host, port)) that is in use.

    `how` says how to move it, with {flag} and {free} filled in (a Makefile variable, say).
    Ports 0 (off) are skipped; the same port given to two flags is a clash too.
    """
    seen: dict[int, str] = {}
    wanted = {port for _, port in ports.values()}
    for flag, (host, port) in ports.items():
        if not port:
            continue
        if port in seen:
            free = free_port_after(host, port, avoid=wanted)
            raise PortTaken(
                f"{flag} {port} is also {seen[port]}; each needs its own port"
                + (f": {how.format(flag=flag, free=free)}" if free is not None else "")
            )
        seen[port] = flag
        reason = bind_error(host, port)
        if reason is not None:
            free = free_port_after(host, port, avoid=wanted)
            if free is None:
                raise PortTaken(
                    f"{flag} {port}: cannot listen on {host} ({reason}); give an address of "
                    "this machine (e.g. 127.0.0.1)"
                )
            raise PortTaken(
                f"{flag} {port}: {host}:{port} is in use ({reason}), perhaps by another site or "
                f"run on this machine; {how.format(flag=flag, free=free)} ({free} is free now)"
            )


def main(argv: list[str]) -> int:
    """`python3 -m common.ports [--how TEMPLATE] FLAG=HOST:PORT ...`: exit 2 naming a taken one."""
    how = "pass {flag} {free}"
    if len(argv) >= 2 and argv[0] == "--how":
        how, argv = argv[1], argv[2:]
    ports = {}
    for arg in argv:
        flag, _, address = arg.partition("=")
        host, _, port = address.rpartition(":")
        ports[flag] = (host or "127.0.0.1", int(port))
    try:
        check_free(ports, how=how)
    except PortTaken as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
