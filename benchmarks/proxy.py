"""Throughput through the egress proxy vs direct to a local server, measured in one run.

Prints the ratio proxy/direct (goal >= 0.8) for (a) many small requests, one connection
each (as curl, R's httr or urllib make them), and (b) one large download. The server
and the proxy run in their own processes, as in production; the proxy runs as
``jupyter dua-guard proxy`` does (:func:`jupyter_dua_guard.proxy.serve`). Direct and
proxied rounds alternate, so that other load on the machine falls on both; the ratio is
over all rounds, with the range of the per-round ratios. On Linux it also prints the CPU
time each process spent per request / per MiB, which other load disturbs less than
wall-clock time.

This is the worst case for a proxy: the server is on loopback (no network latency to
hide the extra hop behind) and shares the machine's cores with the proxy, and on
loopback the sending side pays for the receiving side's TCP processing, so the proxy
pays for two connections. When ``tinyproxy`` is installed, the same client measures it
too, as a reference for what the extra hop costs a proxy written in C.

    python benchmarks/proxy.py [--small N] [--large-mb M] [--rounds R]
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import socket
import subprocess
import sys
import tempfile
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
    from jupyter_dua_guard.proxy import EgressProxy, serve

    def ready(port):
        loop = type(asyncio.get_running_loop())
        print(port, f"{loop.__module__}.{loop.__name__}", flush=True)

    proxy = EgressProxy(
        Policy(build_policy()), secret=b"bench", resolve={"data.bench.test": "127.0.0.1"}
    )
    serve(proxy, 0, ready=ready)
    """
)

TINYPROXY_CONF = """Port {port}
Listen 127.0.0.1
Timeout 600
MaxClients 100
LogLevel Critical
Allow 127.0.0.1
DisableViaHeader Yes
"""


def start(code: str, *args: str) -> tuple[subprocess.Popen, int, str]:
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    port, _, note = proc.stdout.readline().strip().partition(" ")
    return proc, int(port), note


def start_tinyproxy(workdir: str) -> tuple[subprocess.Popen, int, str] | None:
    """tinyproxy on a free port, when installed (Debian: ``apt-get install tinyproxy``)."""
    exe = shutil.which("tinyproxy")
    if exe is None:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = os.path.join(workdir, "tinyproxy.conf")
    with open(conf, "w") as f:
        f.write(TINYPROXY_CONF.format(port=port))
    version = subprocess.run([exe, "-v"], capture_output=True, text=True).stdout.strip()
    proc = subprocess.Popen(
        [exe, "-d", "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port, version
        except OSError:
            time.sleep(0.05)
    proc.terminate()
    return None


def fetch(connect_port: int, request: bytes) -> int:
    """One request on a fresh connection, read to the end; returns body bytes received
    (proxies may rewrite the response head)."""
    with socket.create_connection(("127.0.0.1", connect_port)) as s:
        s.sendall(request)
        total = 0
        head = b""
        while True:
            chunk = s.recv(1 << 18)
            if not chunk:
                return total
            if head is not None:
                head += chunk
                end = head.find(b"\r\n\r\n")
                if end >= 0:
                    total, head = len(head) - end - 4, None
            else:
                total += len(chunk)


def credentials() -> str:
    from jupyter_dua_guard.proxy import kernel_token

    return base64.b64encode(f"bench:{kernel_token(b'bench', 'bench')}".encode()).decode()


def request(path: str, port: int, via: str) -> bytes:
    """The request a client sends: direct, through our proxy (with a kernel's
    credentials), or through tinyproxy (which resolves names itself: an IP address)."""
    if via == "direct":
        return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    if via == "tinyproxy":
        return (
            f"GET http://127.0.0.1:{port}{path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"
        ).encode()
    return (
        f"GET http://data.bench.test:{port}{path} HTTP/1.1\r\nHost: data.bench.test:{port}\r\n"
        f"Proxy-Authorization: Basic {credentials()}\r\n\r\n"
    ).encode()


def timed(n: int, connect_port: int, req: bytes) -> tuple[float, int]:
    start = time.perf_counter()
    received = 0
    for _ in range(n):
        received += fetch(connect_port, req)
    return time.perf_counter() - start, received


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux), NaN elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=2000, help="number of small requests")
    parser.add_argument("--large-mb", type=int, default=512, help="size of the download (MiB)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    args = parser.parse_args()
    load_before = load()
    server, server_port, _ = start(SERVER, str(args.large_mb))
    proxy, proxy_port, loop_name = start(PROXY)
    workdir = tempfile.mkdtemp(prefix="bench-proxy-")
    tiny = start_tinyproxy(workdir)
    routes: dict[str, tuple[int, int]] = {"proxy": (proxy_port, proxy.pid)}
    if tiny is not None:
        routes["tinyproxy"] = (tiny[1], tiny[0].pid)
    lines = []
    try:
        for label, path, n, unit in (
            (f"{args.small} small requests (512 B, new connection each)", "/small", args.small, 0),
            (f"one {args.large_mb} MiB download", "/large", 1, 1 << 20),
        ):
            # warm up every path, then alternate to share machine noise fairly
            for via, (port, _) in [("direct", (server_port, 0)), *routes.items()]:
                timed(min(n, 20), port, request(path, server_port, via))
            spent = {via: 0.0 for via in ["direct", *routes]}
            ratios: dict[str, list[float]] = {via: [] for via in routes}
            cpu = {via: [0.0, 0.0, 0.0] for via in ["direct", *routes]}  # server, proxy, client
            got: dict[str, int] = {}
            for _ in range(args.rounds):
                d = 0.0
                for via, (port, pid) in [("direct", (server_port, 0)), *routes.items()]:
                    before = (cpu_seconds(server.pid), cpu_seconds(pid), own_cpu_seconds())
                    t, got[via] = timed(n, port, request(path, server_port, via))
                    after = (cpu_seconds(server.pid), cpu_seconds(pid), own_cpu_seconds())
                    for i in range(3):
                        cpu[via][i] += after[i] - before[i]
                    spent[via] += t
                    if via == "direct":
                        d = t
                    else:
                        assert got[via] == got["direct"], f"{via} lost data"
                        ratios[via].append(d / t)
            lines.append(describe(label, n, unit, args.rounds, spent, ratios, cpu, got, tiny))
    finally:
        for proc in [proxy, server] + ([tiny[0]] if tiny else []):
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"egress proxy throughput ({os.cpu_count()} CPUs; load average {load_before} before, "
        f"{load()} after; {args.rounds} alternating rounds; proxy event loop {loop_name})"
    )
    print("\n".join(lines))


def describe(
    label: str,
    n: int,
    unit: int,
    rounds: int,
    spent: dict[str, float],
    ratios: dict[str, list[float]],
    cpu: dict[str, list[float]],
    got: dict[str, int],
    tiny: tuple[subprocess.Popen, int, str] | None,
) -> str:
    def per(seconds: float) -> str:
        if unit:
            return f"{seconds * 1e3 * unit / (rounds * got['direct']):.2f} ms/MiB"
        return f"{seconds * 1e6 / (rounds * n):.0f} us/request"

    rate = {via: rounds * got[via] / t / 1e6 for via, t in spent.items()}
    out = [f"  {label}: direct {rate['direct']:8.1f} MB/s"]
    for via, values in ratios.items():
        name = "via proxy" if via == "proxy" else f"reference: {tiny[2] if tiny else via}"
        out.append(
            f"    {name}: {rate[via]:8.1f} MB/s, ratio proxy/direct "
            f"{spent['direct'] / spent[via]:.2f} (rounds {min(values):.2f}-{max(values):.2f})"
            + (" (goal >= 0.8)" if via == "proxy" else "")
        )
    if not any(c != c for c in cpu["proxy"]):  # NaN: no /proc
        s, p, c = cpu["direct"]
        out.append(f"    CPU direct: server {per(s)}, client {per(c)}")
        s, p, c = cpu["proxy"]
        out.append(f"    CPU via proxy: server {per(s)}, proxy {per(p)}, client {per(c)}")
    return "\n".join(out)


if __name__ == "__main__":
    main()
