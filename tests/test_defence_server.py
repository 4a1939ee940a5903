"""Defence in depth against a real jupyter_server: proxy given to kernels, CSP and its
report endpoint, kernelspecs naming other provisioners, gRPC SDKs refused at import."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from typing import Any

import pytest
import tornado
from guard_kernels import LocalServer, last_json, run_cell, start_notebook_kernel

from jupyter_dua_guard.ledger import open_ledger

NOTEBOOK = "study/egress.ipynb"


pytestmark = pytest.mark.usefixtures("ledger_in_env")


@pytest.fixture
def extra_settings() -> dict[str, Any]:
    return {}


@pytest.fixture
def jp_server_config(ledger_url, jp_root_dir, extra_settings) -> dict[str, Any]:
    (jp_root_dir / "study").mkdir()
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_dua_guard": True}},
        "DUAGuard": {
            "ledger_url": ledger_url,
            "proxy_resolve": {"data.registry.test": "127.0.0.1"},
            **extra_settings,
        },
    }


@pytest.fixture
def local_server():
    server = LocalServer()
    yield server
    server.close()


def records(url: str, kind: str) -> list[dict[str, Any]]:
    ledger = open_ledger(url)
    try:
        return [r for r in ledger.records() if r["kind"] == kind]
    finally:
        ledger.close()


CURL_CELL = """
import json, os, subprocess, sys
NOHOOK = '''
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen("http://api.anthropic.com/v1/messages", timeout=20)
    print("NO ERROR")
except urllib.error.HTTPError as e:
    named = "api.anthropic.com" in e.read().decode()
    print(e.code, "jupyter_dua_guard.guard" in sys.modules, named)
'''
def curl(url, *extra):
    out = subprocess.run(["curl", "-s", "-m", "20", "-w", "\\n%{{http_code}} %{{http_connect}}",
                          *extra, url], capture_output=True, text=True).stdout
    body, _, codes = out.rpartition("\\n")
    return [body, codes]
print(json.dumps({{
    "env": {{k: os.environ.get(k) for k in ("HTTP_PROXY", "https_proxy", "ALL_PROXY",
                                          "all_proxy", "NO_PROXY")}},
    "ai_http": curl("http://api.openai.com/v1/models"),
    "ai_https": curl("https://x.openai.azure.com/openai/deployments"),
    "local": curl("http://data.registry.test:{port}/table"),
    # a Python process without the guard's hook (-S: no .pth start-up file)
    "nohook": subprocess.run([sys.executable, "-S", "-c", NOHOOK], capture_output=True,
                             text=True).stdout.strip(),
}}))
"""


async def test_kernel_curl_goes_through_proxy(jp_fetch, jp_serverapp, ledger_url, local_server):
    kernel_id, client = await start_notebook_kernel(jp_fetch, jp_serverapp, NOTEBOOK)
    try:
        out, errors = await run_cell(client, CURL_CELL.format(port=local_server.port))
    finally:
        client.stop_channels()
    assert errors == []
    result = last_json(out)
    env = result["env"]
    assert env["HTTP_PROXY"].startswith(f"http://{kernel_id}:")
    assert env["HTTP_PROXY"] == env["https_proxy"] == env["ALL_PROXY"] == env["all_proxy"]
    assert "127.0.0.1" in env["NO_PROXY"]
    body, codes = result["ai_http"]
    assert codes.startswith("403") and "api.openai.com" in body and "sec. 22" in body
    assert result["ai_https"][1].endswith("403")
    assert result["local"] == [LocalServer.body.decode(), "200 000"]
    assert result["nohook"] == "403 False True"
    blocked = [r for r in records(ledger_url, "egress_blocked") if r["data"].get("layer")]
    assert {r["data"]["host"] for r in blocked} == {
        "api.openai.com",
        "x.openai.azure.com",
        "api.anthropic.com",
    }
    assert {r["context"]["kernel_id"] for r in blocked} == {kernel_id}
    assert {r["context"]["notebook"] for r in blocked} == {NOTEBOOK}
    status = json.loads((await jp_fetch("dua-guard", "api", "status")).body)
    assert status["defence"]["proxy"]["port"] == int(env["HTTP_PROXY"].rsplit(":", 1)[1])
    assert status["defence"]["server_process_guarded"] is True


async def test_pages_carry_csp_with_connect_src_self_and_report_uri(
    http_server_client, jp_base_url
):
    response = await http_server_client.fetch(jp_base_url + "login", raise_error=False)
    assert response.code == 200
    csp = response.headers["Content-Security-Policy"]
    directives = {d.split()[0]: d.split()[1:] for d in csp.split("; ")}
    assert directives["frame-ancestors"] == ["'self'"]
    assert directives["connect-src"][0] == "'self'"
    assert not any("openai" in s or s in ("*", "https:", "wss:") for s in directives["connect-src"])
    assert directives["report-uri"] == [jp_base_url + "dua-guard/api/csp-report"]


REPORT = {
    "csp-report": {
        "document-uri": "http://127.0.0.1:8888/lab/tree/study/x.ipynb?token=secret",
        "blocked-uri": "https://api.openai.com/v1/chat/completions?key=abc",
        "violated-directive": "connect-src",
        "original-policy": "connect-src 'self'",
    }
}


async def test_csp_report_is_recorded_and_requires_authentication(
    jp_fetch, jp_serverapp, ledger_url, jp_base_url, http_server_client
):
    response = await jp_fetch(
        "dua-guard",
        "api",
        "csp-report",
        method="POST",
        body=json.dumps(REPORT),
        headers={"Content-Type": "application/csp-report"},
    )
    assert response.code == 204
    [record] = records(ledger_url, "csp_violation")
    assert record["data"]["host"] == "api.openai.com"
    assert record["data"]["directive"] == "connect-src"
    assert "key=abc" not in json.dumps(record) and "token=secret" not in json.dumps(record)
    with pytest.raises(tornado.httpclient.HTTPClientError) as e:
        await http_server_client.fetch(
            jp_base_url + "dua-guard/api/csp-report", method="POST", body=json.dumps(REPORT)
        )
    assert e.value.code == 403
    assert len(records(ledger_url, "csp_violation")) == 1
    with pytest.raises(tornado.httpclient.HTTPClientError) as e:
        await jp_fetch("dua-guard", "api", "csp-report", method="POST", body="{not json")
    assert e.value.code == 400


def write_kernelspec(kernel_dir: Any, name: str, provisioner: str) -> None:
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Own kernel {name}",
        "language": "python",
        "metadata": {"kernel_provisioner": {"provisioner_name": provisioner}},
    }
    path = os.path.join(str(kernel_dir), name)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "kernel.json"), "w") as f:
        json.dump(spec, f)


ENV_CELL = """
import json, os
print(json.dumps({k: os.environ.get(k) for k in ("JUPYTER_DUA_GUARD_POLICY", "HTTP_PROXY")}))
"""


async def test_kernelspec_naming_another_provisioner_is_guarded(
    jp_fetch, jp_serverapp, jp_kernel_dir
):
    write_kernelspec(jp_kernel_dir, "escape", "local-provisioner")
    response = await jp_fetch("api", "kernels", method="POST", body=json.dumps({"name": "escape"}))
    kernel_id = json.loads(response.body)["id"]
    client = jp_serverapp.kernel_manager.get_kernel(kernel_id).client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=90)
        out, errors = await run_cell(client, ENV_CELL)
        assert errors == []
    finally:
        client.stop_channels()
    env = last_json(out)
    assert env["JUPYTER_DUA_GUARD_POLICY"] and env["HTTP_PROXY"].startswith("http://")


@pytest.mark.parametrize("extra_settings", [{"kernelspec_provisioners": "refuse"}])
async def test_kernelspec_naming_another_provisioner_can_be_refused(
    jp_fetch, jp_kernel_dir, extra_settings
):
    write_kernelspec(jp_kernel_dir, "escape2", "local-provisioner")
    with pytest.raises(tornado.httpclient.HTTPClientError) as e:
        await jp_fetch("api", "kernels", method="POST", body=json.dumps({"name": "escape2"}))
    assert e.value.code == 403
    assert "local-provisioner" in e.value.response.body.decode()


GRPC_CELL = """
import json, os, sys
site = {site!r}
sys.path.insert(0, site)
out = {{}}
for name in ("vertexai", "google.ai.generativelanguage", "fakeplain"):
    try:
        __import__(name)
        out[name] = "imported"
    except ImportError as e:
        out[name] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"""


async def test_grpc_ai_sdks_are_refused_at_import(jp_fetch, jp_serverapp, tmp_path):
    site = tmp_path / "site"
    for pkg in ("vertexai", "google/ai/generativelanguage", "fakeplain"):
        (site / pkg).mkdir(parents=True)
        (site / pkg / "__init__.py").write_text("LOADED = True\n")
    _, client = await start_notebook_kernel(jp_fetch, jp_serverapp, NOTEBOOK)
    try:
        out, _ = await run_cell(client, GRPC_CELL.format(site=str(site)))
    finally:
        client.stop_channels()
    result = last_json(out)
    assert result["fakeplain"] == "imported"
    for name in ("vertexai", "google.ai.generativelanguage"):
        assert result[name].startswith("PackageRefused: ")
        assert "gRPC" in result[name] and "sec. 22" in result[name]


@pytest.mark.parametrize(
    "extra_settings", [{"refused_packages": {"fakeplain": "not approved by the site"}}]
)
async def test_grpc_refusal_is_configurable(jp_fetch, jp_serverapp, tmp_path, extra_settings):
    site = tmp_path / "site"
    for pkg in ("vertexai", "google/ai/generativelanguage", "fakeplain"):
        (site / pkg).mkdir(parents=True)
        (site / pkg / "__init__.py").write_text("")
    _, client = await start_notebook_kernel(jp_fetch, jp_serverapp, NOTEBOOK)
    try:
        out, _ = await run_cell(client, GRPC_CELL.format(site=str(site)))
    finally:
        client.stop_channels()
    result = last_json(out)
    assert result["vertexai"] == "imported"
    assert result["fakeplain"].startswith("PackageRefused: ")
    assert "not approved by the site" in result["fakeplain"]


def test_threat_model_doc_covers_every_bypass_path():
    path = os.path.join(os.path.dirname(__file__), "..", "README.md")
    with open(path, encoding="utf-8") as f:
        readme = f.read()
    start = readme.index("## Threat model")
    text = readme[start : readme.index("\n## ", start + 1)].lower()
    for path_name in (
        textwrap.dedent(
            """socket code|sdk|grpc|ctypes|subprocess|curl|r kernel|server extension|
        browser extension|copy-paste"""
        )
        .replace("\n", "")
        .split("|")
    ):
        assert path_name.strip() in text, path_name


def test_site_wide_proxy_url_without_secret_gives_plain_url():
    from jupyter_dua_guard.provisioner import kernel_guard_env

    env = kernel_guard_env({"proxy": {"host": "proxy.site.test", "port": 3128}}, "k1", None)
    assert env["HTTPS_PROXY"] == env["all_proxy"] == "http://proxy.site.test:3128"
    env = kernel_guard_env(
        {"proxy": {"host": "proxy.site.test", "port": 3128, "secret": b"s".hex()}}, "k1", None
    )
    assert env["HTTP_PROXY"].startswith("http://k1:") and env["http_proxy"].endswith(":3128")


def test_busy_proxy_port_stops_the_server_with_one_line(jp_configurable_serverapp, ledger_url):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as e:
            jp_configurable_serverapp(
                config={
                    "ServerApp": {"jpserver_extensions": {"jupyter_dua_guard": True}},
                    "DUAGuard": {"ledger_url": ledger_url, "proxy_port": port},
                }
            )
    assert "DUAGuard.proxy_port" in str(e.value) and "\n" not in str(e.value)
