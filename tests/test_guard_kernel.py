"""Acceptance of the kernel guard: real jupyter_server, real ipykernel kernels via REST.

Every AI host name below is refused inside the kernel before name resolution, so no
packet leaves the machine; the only real connections go to servers on 127.0.0.x.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from guard_kernels import LocalServer, last_json, run_cell, start_notebook_kernel

NOTEBOOK = "study/survival-analysis.ipynb"
AI_HOSTS = [
    "api.openai.com",
    "API.OPENAI.COM.",
    "x.openai.azure.com",
    "bedrock-runtime.us-east-1.amazonaws.com",
]


pytestmark = pytest.mark.usefixtures("ledger_in_env")


@pytest.fixture
def guard_settings() -> dict[str, Any]:
    return {
        "data_paths": ["registry/**/*.csv"],
        "blocked_hosts": ["127.0.0.3"],
        "ai_packages": {"lab_nlp": {"distributions": ["lab-nlp"], "category": "nlp"}},
    }


@pytest.fixture
def jp_server_config(ledger_url, guard_settings, jp_root_dir) -> dict[str, Any]:
    (jp_root_dir / "study").mkdir()
    registry = jp_root_dir / "registry" / "2021"
    registry.mkdir(parents=True)
    # synthetic, generated here: not registry data
    (registry / "cases.csv").write_text("id,site,year\n1,C50,2021\n2,C61,2021\n")
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_dua_guard": True}},
        "DUAGuard": guard_settings,
    }


@pytest.fixture
def kernel(jp_fetch, jp_serverapp, jp_asyncio_loop):
    """A kernel for NOTEBOOK, started through POST /api/sessions (not async: the test
    plugin runs async tests but not async fixtures)."""
    kernel_id, client = jp_asyncio_loop.run_until_complete(
        start_notebook_kernel(jp_fetch, jp_serverapp, NOTEBOOK)
    )
    yield kernel_id, client
    client.stop_channels()


@pytest.fixture
def local_server():
    server = LocalServer()
    yield server
    server.close()


def records(url: str, kind: str | None = None) -> list[dict[str, Any]]:
    from jupyter_dua_guard.ledger import open_ledger

    ledger = open_ledger(url)
    try:
        return [r for r in ledger.records() if kind is None or r["kind"] == kind]
    finally:
        ledger.close()


ATTEMPTS = """
import asyncio, http.client, json, socket, sys, urllib.request
seen = []
sys.addaudithook(lambda e, a: seen.append(str(a[0])) if e == "socket.getaddrinfo" else None)
results = {}
def outcome(e):
    return type(e).__name__ + ("|DUA" if "NCCR DUA sec. 22" in str(e) else "")
def attempt(label, fn):
    try:
        fn()
        results[label] = "NO ERROR"
    except Exception as e:
        results[label] = outcome(e)
for h in HOSTS:
    attempt("urlopen " + h, lambda: urllib.request.urlopen(f"https://{h}/v1/models", timeout=5))
    attempt("http.client " + h, lambda: http.client.HTTPSConnection(h).request("GET", "/"))
    attempt("create_connection " + h, lambda: socket.create_connection((h, 443), timeout=5))
    attempt("getaddrinfo " + h, lambda: socket.getaddrinfo(h, 443))
    attempt("gethostbyname " + h, lambda: socket.gethostbyname(h))
    try:
        await asyncio.wait_for(asyncio.open_connection(h, 443), 10)
        results["asyncio " + h] = "NO ERROR"
    except Exception as e:
        results["asyncio " + h] = outcome(e)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
local = opener.open(f"http://127.0.0.1:{PORT}/x", timeout=10).read().decode()
print(json.dumps({"results": results, "seen": seen, "local": local}))
"""


async def test_ai_hosts_refused_before_dns_and_local_server_works(kernel, local_server) -> None:
    _, client = kernel
    code = f"HOSTS = {AI_HOSTS!r}\nPORT = {local_server.port}\n" + ATTEMPTS
    out, errors = await run_cell(client, code)
    assert not errors, errors
    result = last_json(out)
    assert len(result["results"]) == 6 * len(AI_HOSTS)
    for label, outcome in result["results"].items():
        assert outcome == "AIEndpointBlocked|DUA", (label, outcome)
    # Our hook refused before the audit event completed: a later hook never saw an AI host.
    assert all("127.0.0.1" in host for host in result["seen"]), result["seen"]
    assert "127.0.0.1" in result["seen"]
    assert result["local"] == LocalServer.body.decode()


async def test_error_message_names_host_rule_and_fix(kernel) -> None:
    _, client = kernel
    out, errors = await run_cell(
        client, "import socket\nsocket.getaddrinfo('API.OpenAI.com.', 443)"
    )
    assert len(errors) == 1
    message = errors[0]
    assert message.startswith("AIEndpointBlocked: ")
    assert "api.openai.com:443" in message
    assert "NCCR DUA sec. 22" in message
    assert "c.DUAGuard.allowed_hosts" in message
    out, _ = await run_cell(
        client,
        "from jupyter_dua_guard.guard import AIEndpointBlocked\n"
        "try:\n    socket.create_connection(('api.anthropic.com', 443))\n"
        "except PermissionError as e:\n    print(isinstance(e, AIEndpointBlocked), e.host, e.port)",
    )
    assert out.split() == ["True", "api.anthropic.com", "443"]


CHILD = (
    "import urllib.request\n"
    "try:\n"
    "    urllib.request.urlopen('https://api.openai.com/v1/models', timeout=5)\n"
    "    print('CHILD NO-ERROR')\n"
    "except Exception as e:\n"
    "    print('CHILD', type(e).__name__, 'NCCR DUA sec. 22' in str(e))\n"
)


async def test_children_are_refused_the_same_way(kernel, ledger_url) -> None:
    kernel_id, client = kernel
    code = textwrap.dedent(
        f"""
        import json, multiprocessing, os, socket, subprocess, sys
        CHILD = {CHILD!r}
        p = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True)
        print(p.stdout.strip() + " rc=" + str(p.returncode))
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            try:
                pool.apply(socket.getaddrinfo, ("bedrock-runtime.us-east-1.amazonaws.com", 443))
                print("SPAWN NO-ERROR")
            except Exception as e:
                print("SPAWN", type(e).__name__, "NCCR DUA sec. 22" in str(e))
            print("SPAWN-PID", pool.apply(os.getpid, ()), os.getpid())
        """
    )
    out, errors = await run_cell(client, code)
    assert not errors, errors
    assert "CHILD AIEndpointBlocked True rc=0" in out
    assert "SPAWN AIEndpointBlocked True" in out
    child_file = "child_probe.py"
    out2, errors = await run_cell(
        client, f"open({child_file!r}, 'w').write({CHILD!r})\n!{{sys.executable}} {child_file}"
    )
    assert "CHILD AIEndpointBlocked True" in out2, (out2, errors)
    blocked = records(ledger_url, "egress_blocked")
    pids = {r["context"]["pid"] for r in blocked}
    assert len(pids) >= 3  # subprocess, spawn child, ! child: each recorded its refusal
    assert all(r["context"]["kernel_id"] == kernel_id for r in blocked)


def _fake_distribution(root, name: str, version: str) -> None:
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"__version__ = {version!r}\n")
    info = root / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


async def test_ai_ml_imports_recorded_once_with_versions(kernel, ledger_url, tmp_path) -> None:
    kernel_id, client = kernel
    site = tmp_path / "fake-site"
    _fake_distribution(site, "transformers", "9.9.9")
    _fake_distribution(site, "seer_tables", "1.0.0")  # not an AI/ML package
    _fake_distribution(site, "lab_nlp", "0.3.1")  # catalogued by DUAGuard.ai_packages
    code = textwrap.dedent(
        f"""
        import sys, importlib
        sys.path.insert(0, {str(site)!r})
        import transformers
        import transformers
        del sys.modules["transformers"]
        import transformers
        import seer_tables, colorsys, json
        import lab_nlp
        print(transformers.__version__)
        """
    )
    out, errors = await run_cell(client, code)
    assert not errors, errors
    assert out.strip() == "9.9.9"
    imports = [
        r for r in records(ledger_url, "ai_ml_import") if r["data"]["name"] == "transformers"
    ]
    assert len(imports) == 1, imports
    record = imports[0]
    assert record["data"]["distribution"] == "transformers"
    assert record["data"]["version"] == "9.9.9"
    assert record["data"]["category"] == "nlp"
    ctx = record["context"]
    assert ctx["kernel_id"] == kernel_id
    assert ctx["notebook"] == NOTEBOOK
    assert ctx["user"] and ctx["host"] and record["time"]
    names = {r["data"]["name"]: r["data"] for r in records(ledger_url, "ai_ml_import")}
    assert not set(names) & {"seer_tables", "colorsys", "json"}
    assert names["lab_nlp"]["version"] == "0.3.1"
    assert names["lab_nlp"]["category"] == "nlp"


async def test_refusals_artifacts_and_data_reads_recorded(kernel, ledger_url, jp_root_dir) -> None:
    kernel_id, client = kernel
    code = textwrap.dedent(
        """
        import os, socket
        for host in ("api.openai.com", "x.openai.azure.com"):
            try:
                socket.create_connection((host, 8443), timeout=5)
            except PermissionError:
                pass
        with open("weights.safetensors", "wb") as f:
            f.write(b"synthetic")
        open("notes.txt", "w").write("not a model")
        import pathlib, pickle
        with pathlib.Path("clf.pkl").open("wb") as f:
            pickle.dump({"coef": [0.1]}, f)
        fd = os.open("encoder.onnx", os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        os.makedirs("out", exist_ok=True)
        open("out/pytorch_model.bin", "wb").close()
        for _ in range(2):
            with open(os.path.join(os.getcwd(), "..", "registry", "2021", "cases.csv")) as f:
                f.read()
        print("done")
        """
    )
    _, errors = await run_cell(client, code)
    assert not errors, errors
    blocked = records(ledger_url, "egress_blocked")
    assert {(r["data"]["host"], r["data"]["port"]) for r in blocked} == {
        ("api.openai.com", 8443),
        ("x.openai.azure.com", 8443),
    }
    for r in blocked:
        assert r["context"]["kernel_id"] == kernel_id
        assert r["context"]["notebook"] == NOTEBOOK
        assert r["time"]
    artifacts = sorted(r["data"]["path"] for r in records(ledger_url, "model_artifact_written"))
    study = os.path.realpath(jp_root_dir / "study")
    assert [os.path.realpath(p) for p in artifacts] == [
        os.path.join(study, "clf.pkl"),
        os.path.join(study, "encoder.onnx"),
        os.path.join(study, "out", "pytorch_model.bin"),
        os.path.join(study, "weights.safetensors"),
    ]
    reads = records(ledger_url, "data_read")
    assert len(reads) == 1
    assert reads[0]["data"]["path"].endswith("registry/2021/cases.csv")
    assert reads[0]["data"]["size"] == (jp_root_dir / "registry/2021/cases.csv").stat().st_size
    assert "C50" not in json.dumps(reads)  # never content
    started = records(ledger_url, "kernel_started")
    assert [r["data"]["kernel_id"] for r in started] == [kernel_id]
    # jupyter dua-guard log --json shows them
    env = {**os.environ, "JUPYTER_DUA_GUARD_LEDGER": ledger_url}
    env.pop("JUPYTER_DUA_GUARD_KERNEL_ID", None)
    proc = subprocess.run(
        [sys.executable, "-m", "jupyter_dua_guard.cli", "log", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    shown = proc.stdout
    assert "api.openai.com" in shown and "weights.safetensors" in shown
    assert kernel_id in shown


TAMPER = """
import importlib, json, os, socket, subprocess, sys
result = {}
def attempt(label, fn):
    try:
        fn()
        result[label] = "done"
    except PermissionError as e:
        result[label] = "refused"
def delete_var():
    del os.environ["JUPYTER_DUA_GUARD_POLICY"]
attempt("del env", delete_var)
attempt("unsetenv", lambda: os.unsetenv("JUPYTER_DUA_GUARD_KERNEL_ID"))
attempt("putenv", lambda: os.putenv("JUPYTER_DUA_GUARD_POLICY", "/dev/null"))
attempt("set env", lambda: os.environ.__setitem__("JUPYTER_DUA_GUARD_LEDGER", "sqlite:////tmp/x"))
attempt("gc", lambda: __import__("gc").get_objects())
importlib.reload(socket)
import jupyter_dua_guard.guard as g, jupyter_dua_guard.policy as p, jupyter_dua_guard._hook as h
permissive = p.Policy({"blocked_hosts": {}, "packages": {}})
g.install(permissive, protect_env=False)
g._status.clear()
p.normalize_host = lambda host: None
p.HostSet.match = lambda self, host: None
p.Policy.decide = lambda self, host, port=None: ("allow", "", "")
p.Decision.BLOCK = "nothing"
h.make_handlers = lambda *a, **k: {}
for mod in (g, p, h):
    importlib.reload(mod)
for name in list(sys.modules):
    if name.startswith("jupyter_dua_guard"):
        del sys.modules[name]
g.activate_from_environ()
attempt("still blocked", lambda: socket.getaddrinfo("api.openai.com", 443))
clean = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_DUA_GUARD")}
code = (
    "import socket\\ntry:\\n socket.getaddrinfo('api.openai.com', 443)\\n print('open')\\n"
    "except PermissionError:\\n print('refused')"
)
def child(env):
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return proc.stdout.strip()
result["child clean env"] = child(clean)
result["child empty env"] = child({})
names = ("JUPYTER_DUA_GUARD_POLICY", "JUPYTER_DUA_GUARD_KERNEL_ID")
result["env intact"] = all(os.environ.get(k) for k in names)
print(json.dumps(result))
"""


async def test_guard_cannot_be_switched_off_from_the_kernel(kernel) -> None:
    _, client = kernel
    out, errors = await run_cell(client, TAMPER)
    assert not errors, errors
    result = last_json(out)
    assert result == {
        "del env": "refused",
        "unsetenv": "refused",
        "putenv": "refused",
        "set env": "refused",
        "gc": "refused",
        "still blocked": "refused",
        "child clean env": "refused",
        "child empty env": "refused",
        "env intact": True,
    }


async def test_kernel_env_and_default_provisioner(kernel, jp_serverapp, ledger_url) -> None:
    from jupyter_client.provisioning.factory import KernelProvisionerFactory

    from jupyter_dua_guard.guard import AIEndpointBlocked

    kernel_id, client = kernel
    assert KernelProvisionerFactory.instance().default_provisioner_name == "dua-guard-provisioner"
    out, _ = await run_cell(
        client,
        "import os, json\nprint(json.dumps({k: v for k, v in os.environ.items() "
        "if k.startswith('JUPYTER_DUA_GUARD')}))",
    )
    env = last_json(out)
    assert env["JUPYTER_DUA_GUARD_KERNEL_ID"] == kernel_id
    assert env["JUPYTER_DUA_GUARD_LEDGER"] == ledger_url
    assert env["JUPYTER_DUA_GUARD_NOTEBOOK"] == NOTEBOOK
    with open(env["JUPYTER_DUA_GUARD_POLICY"]) as f:
        policy = json.load(f)
    assert policy["mode"] == "block"
    assert "127.0.0.3" in policy["blocked_hosts"]
    # the server process guards itself too
    import socket

    with pytest.raises(AIEndpointBlocked):
        socket.getaddrinfo("api.groq.com", 443)


async def test_site_blocked_host_refused(kernel) -> None:
    # 127.0.0.3 stands in for a site-blocked AI server (DUAGuard.blocked_hosts)
    server = LocalServer("127.0.0.3")
    try:
        _, client = kernel
        _, errors = await run_cell(
            client, f"import socket\nsocket.create_connection(('127.0.0.3', {server.port}))"
        )
    finally:
        server.close()
    assert len(errors) == 1 and errors[0].startswith("AIEndpointBlocked")
    assert "site block-list" in errors[0]


@pytest.mark.parametrize("guard_settings", [{"mode": "record", "blocked_hosts": ["127.0.0.3"]}])
async def test_record_mode_lets_through_and_records(kernel, ledger_url) -> None:
    server = LocalServer("127.0.0.3")
    try:
        _, client = kernel
        code = (
            "import urllib.request\n"
            "opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
            f"print(opener.open('http://127.0.0.3:{server.port}/', timeout=10).read().decode())"
        )
        out, errors = await run_cell(client, code)
    finally:
        server.close()
    assert not errors, errors
    assert LocalServer.body.decode() in out
    allowed = records(ledger_url, "egress_allowed_ai")
    assert allowed and all(r["data"]["host"] == "127.0.0.3" for r in allowed)
    assert "record-only" in allowed[0]["data"]["rule"]
    assert not records(ledger_url, "egress_blocked")


@pytest.mark.parametrize(
    "guard_settings",
    [
        {
            "blocked_hosts": ["127.0.0.3"],
            "allowed_hosts": ["127.0.0.3"],
            "model_servers": ["127.0.0.4"],
        }
    ],
)
async def test_allow_list_beats_block_list_and_model_servers_are_recorded(
    kernel, ledger_url
) -> None:
    approved, model_server = LocalServer("127.0.0.3"), LocalServer("127.0.0.4")
    try:
        _, client = kernel
        code = (
            "import urllib.request\n"
            "opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
            "for _ in range(3):\n"
            f"    a = opener.open('http://127.0.0.3:{approved.port}/', timeout=10).read()\n"
            f"    b = opener.open('http://127.0.0.4:{model_server.port}/', timeout=10).read()\n"
            "print(a == b, len(a))"
        )
        out, errors = await run_cell(client, code)
    finally:
        approved.close()
        model_server.close()
    assert not errors, errors
    assert out.split() == ["True", str(len(LocalServer.body))]
    allowed = records(ledger_url, "egress_allowed_ai")
    by_host = {(r["data"]["host"], r["data"]["port"]): r["data"]["rule"] for r in allowed}
    # once per destination and kernel, however many requests
    assert by_host == {
        ("127.0.0.3", approved.port): "DUAGuard.allowed_hosts",
        ("127.0.0.4", model_server.port): by_host[("127.0.0.4", model_server.port)],
    }
    assert "model server" in by_host[("127.0.0.4", model_server.port)]
    assert not records(ledger_url, "egress_blocked")
