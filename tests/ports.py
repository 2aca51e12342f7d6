"""A free local TCP port for a test's process group, so that a port another job holds never fails a test."""

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
