"""`python -m tests.offline MODULE ARGS...` runs `python -m MODULE ARGS...` with Python's network
limited to loopback: a connection to, or a name lookup of, any other host raises OSError and
is recorded in `$CRATE_JAX_NETWORK_LOG` (libraries may swallow the error; the log does not).

Native clients (tensorstore's curl, TensorFlow) do not go through Python's sockets; the tests
give them a proxy on a closed loopback port (`offline_env`), so they cannot leave either.
"""

import os
import runpy
import socket
import sys

LOOPBACK = {"127.0.0.1", "localhost", "::1", "", None}


def offline_env(env: dict) -> dict:
    """`env` without proxies of its own; any host but loopback goes to a closed local port."""
    env = {k: v for k, v in env.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens there
    return env | {"http_proxy": closed, "https_proxy": closed, "HTTP_PROXY": closed, "HTTPS_PROXY": closed,
                  "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}  # fmt: skip


def _refuse(what: str):
    with open(os.environ["CRATE_JAX_NETWORK_LOG"], "a") as f:
        f.write(what + "\n")
    raise OSError(f"tests.offline: {what} refused (only loopback is allowed)")


def _guard() -> None:
    connect, connect_ex, getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def allowed(sock, address) -> bool:
        return sock.family == socket.AF_UNIX or address[0] in LOOPBACK

    def guarded_connect(sock, address):
        return connect(sock, address) if allowed(sock, address) else _refuse(f"connect to {address}")

    def guarded_connect_ex(sock, address):
        return connect_ex(sock, address) if allowed(sock, address) else _refuse(f"connect to {address}")

    def guarded_getaddrinfo(host, *args, **kwargs):
        host_str = host.decode() if isinstance(host, bytes) else host
        if host_str not in LOOPBACK:
            _refuse(f"name lookup of {host_str}")
        return getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex = guarded_connect, guarded_connect_ex
    socket.getaddrinfo = guarded_getaddrinfo


if __name__ == "__main__":
    _guard()
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
