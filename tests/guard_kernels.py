"""Helpers for tests that run code in real kernels started through the server's REST API."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


async def start_notebook_kernel(jp_fetch: Any, serverapp: Any, path: str) -> tuple[str, Any]:
    """POST /api/sessions for a notebook; return (kernel id, ready AsyncKernelClient)."""
    response = await jp_fetch(
        "api",
        "sessions",
        method="POST",
        body=json.dumps({"path": path, "type": "notebook", "kernel": {"name": "python3"}}),
    )
    kernel_id = json.loads(response.body)["kernel"]["id"]
    client = serverapp.kernel_manager.get_kernel(kernel_id).client()
    client.start_channels()
    await client.wait_for_ready(timeout=90)
    return kernel_id, client


async def run_cell(client: Any, code: str, timeout: float = 120) -> tuple[str, list[str]]:
    """Execute ``code`` over the kernel protocol; return (printed text, error lines)."""
    out: list[str] = []
    errors: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out.append(content["text"])
        elif kind == "error":
            errors.append(f"{content['ename']}: {content['evalue']}")
        elif kind in ("execute_result", "display_data"):
            out.append(content["data"].get("text/plain", ""))

    await client.execute_interactive(code, output_hook=hook, timeout=timeout)
    return "".join(out), errors


def last_json(text: str) -> Any:
    """The last line of ``text`` that parses as JSON (cells print their results so)."""
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    raise AssertionError(f"no JSON in cell output: {text!r}")


class LocalServer:
    """An HTTP server on a loopback address that answers every GET with a fixed body."""

    body = b"hello from a local non-AI server"

    def __init__(self, host: str = "127.0.0.1") -> None:
        body = self.body

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
