"""Throughput through the egress proxy vs direct to a local server, measured in one run.

Prints the ratio proxy/direct (goal >= 0.8) for (a) many small requests, one connection
each (as curl, R's httr or urllib make them), and (b) one large download. The server
and the proxy run in their own processes, as in production.

    python benchmarks/proxy.py [--small N] [--large-mb M]
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import subprocess
import sys
import textwrap
import time

SERVER = textwrap.dedent(
    """
    import asyncio, sys
    SMALL = b"x" * 512
    LARGE = b"y" * (1 << 20)
    LARGE_MB = int(sys.argv[1])
    HEAD = b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n"

    async def handle(reader, writer):
        head = await reader.readuntil(b"\\r\\n\\r\\n")
        path = head.split(b" ", 2)[1]
        if path.endswith(b"/large"):
            writer.write(HEAD % (LARGE_MB << 20))
            for _ in range(LARGE_MB):
                writer.write(LARGE)
                await writer.drain()
        else:
            writer.write(HEAD % 512 + SMALL)
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    asyncio.run(main())
    """
)

PROXY = textwrap.dedent(
    """
    import asyncio
    from jupyter_dua_guard.policy import Policy, build_policy
    from jupyter_dua_guard.proxy import EgressProxy

    async def main():
        proxy = EgressProxy(
            Policy(build_policy()), secret=b"bench", resolve={"data.bench.test": "127.0.0.1"}
        )
        print(proxy.listen_loopback(0), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def start(code: str, *args: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    return proc, port


def fetch(connect_port: int, request: bytes) -> int:
    """One request on a fresh connection; returns bytes received."""
    with socket.create_connection(("127.0.0.1", connect_port)) as s:
        s.sendall(request)
        total = 0
        while True:
            chunk = s.recv(1 << 18)
            if not chunk:
                return total
            total += len(chunk)


def request(path: str, port: int, via_proxy: bool) -> bytes:
    if not via_proxy:
        return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    from jupyter_dua_guard.proxy import kernel_token

    cred = base64.b64encode(f"bench:{kernel_token(b'bench', 'bench')}".encode()).decode()
    return (
        f"GET http://data.bench.test:{port}{path} HTTP/1.1\r\nHost: data.bench.test:{port}\r\n"
        f"Proxy-Authorization: Basic {cred}\r\n\r\n"
    ).encode()


def timed(n: int, connect_port: int, req: bytes) -> tuple[float, int]:
    start = time.perf_counter()
    received = 0
    for _ in range(n):
        received += fetch(connect_port, req)
    return time.perf_counter() - start, received


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=2000, help="number of small requests")
    parser.add_argument("--large-mb", type=int, default=512, help="size of the download (MiB)")
    args = parser.parse_args()
    server, server_port = start(SERVER, str(args.large_mb))
    proxy, proxy_port = start(PROXY)
    try:
        rows = []
        for label, path, n in (
            (f"{args.small} small requests (512 B, new connection each)", "/small", args.small),
            (f"one {args.large_mb} MiB download", "/large", 1),
        ):
            # warm up both paths, then alternate to share machine noise fairly
            timed(min(n, 20), server_port, request(path, server_port, False))
            timed(min(n, 20), proxy_port, request(path, server_port, True))
            direct = via = 0.0
            for _ in range(3):
                d, got_d = timed(n, server_port, request(path, server_port, False))
                p, got_p = timed(n, proxy_port, request(path, server_port, True))
                assert got_p >= got_d * 0.99, "proxy lost data"
                direct, via = direct + d, via + p
            rate_d, rate_p = 3 * got_d / direct, 3 * got_p / via
            rows.append((label, rate_d, rate_p, direct / via))
        print(f"egress proxy throughput (cpu count {os.cpu_count()}), 3 rounds each")
        for label, rate_d, rate_p, ratio in rows:
            print(
                f"  {label}: direct {rate_d / 1e6:8.1f} MB/s, via proxy {rate_p / 1e6:8.1f} MB/s,"
                f" ratio proxy/direct {ratio:.2f} (goal >= 0.8)"
            )
    finally:
        for proc in (proxy, server):
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
