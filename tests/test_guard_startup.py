"""The ``.pth`` start-up path and the guard's failure modes, in fresh Python processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from jupyter_dua_guard.ledger import open_ledger

PROBE = textwrap.dedent(
    """
    import socket, sys
    try:
        socket.getaddrinfo("x.openai.azure.com", 443)
        print("OPEN")
    except PermissionError as e:
        print("REFUSED", type(e).__name__)
    """
)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_DUA_GUARD")}
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def kinds(url: str) -> list[str]:
    ledger = open_ledger(url)
    try:
        return [r["kind"] for r in ledger.records()]
    finally:
        ledger.close()


def test_pth_is_inert_without_guard_variables() -> None:
    proc = run_python("import sys; print(sorted(m for m in sys.modules if 'dua_guard' in m))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert proc.stderr == ""


def test_fail_closed_on_missing_policy(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/ledger.sqlite"
    proc = run_python(
        PROBE,
        JUPYTER_DUA_GUARD_POLICY=str(tmp_path / "gone.json"),
        JUPYTER_DUA_GUARD_LEDGER=url,
        JUPYTER_DUA_GUARD_KERNEL_ID="k-defaults",
    )
    assert proc.stdout.strip() == "REFUSED AIEndpointBlocked"
    assert "Traceback" not in proc.stderr
    assert kinds(url) == ["guard_defaults_used", "egress_blocked"]
    record = next(open_ledger(url).records())
    assert "gone.json is missing" in record["data"]["detail"]
    assert record["context"]["kernel_id"] == "k-defaults"


def test_corrupt_policy_fails_closed(tmp_path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text('{"mode": "block", "blocked_hosts": ')
    url = f"sqlite:///{tmp_path}/ledger.sqlite"
    proc = run_python(PROBE, JUPYTER_DUA_GUARD_POLICY=str(policy), JUPYTER_DUA_GUARD_LEDGER=url)
    assert proc.stdout.strip() == "REFUSED AIEndpointBlocked"
    assert kinds(url)[0] == "guard_defaults_used"


def test_unusable_ledger_never_breaks_user_code(tmp_path) -> None:
    (tmp_path / "not-a-ledger.sqlite").write_text("plain text, not SQLite")
    url = f"sqlite:///{tmp_path}/not-a-ledger.sqlite"
    code = PROBE + textwrap.dedent(
        """
        for _ in range(3):
            try:
                socket.getaddrinfo("api.openai.com", 1)
            except PermissionError:
                pass
        print("STILL RUNNING")
        """
    )
    proc = run_python(
        code, JUPYTER_DUA_GUARD_POLICY=str(tmp_path / "none.json"), JUPYTER_DUA_GUARD_LEDGER=url
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["REFUSED AIEndpointBlocked", "STILL RUNNING"]
    warnings = [line for line in proc.stderr.splitlines() if "could not record" in line]
    assert len(warnings) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "not-a-ledger.sqlite").read_text() == "plain text, not SQLite"


def test_pure_python_fallback_without_c_extension(tmp_path) -> None:
    code = (
        textwrap.dedent(
            """
        import sys
        sys.modules["jupyter_dua_guard._audit_fast"] = None  # as if no compiler had been there
        from jupyter_dua_guard import guard
        print(guard.activate_from_environ(), guard.status()["hook"])
        """
        )
        + PROBE
    )
    proc = run_python(
        "import sys; sys.modules.pop('jupyter_dua_guard.guard', None)\n" + code,
        JUPYTER_DUA_GUARD_KERNEL_ID="k-py",
        JUPYTER_DUA_GUARD_LEDGER=f"sqlite:///{tmp_path}/l.sqlite",
        JUPYTER_DUA_GUARD_POLICY=str(tmp_path / "none.json"),
    )
    # the .pth already guarded this process (C hook when built); the explicit path below
    # checks the Python hook on its own in a process where the .pth did not run
    assert "REFUSED AIEndpointBlocked" in proc.stdout, proc.stderr
    proc = subprocess.run(
        [sys.executable, "-S", "-c", "import sys; sys.path[:0] = " + repr(sys.path) + "\n" + code],
        env={
            "JUPYTER_DUA_GUARD_KERNEL_ID": "k-py",
            "JUPYTER_DUA_GUARD_POLICY": str(tmp_path / "none.json"),
            "JUPYTER_DUA_GUARD_LEDGER": f"sqlite:///{tmp_path}/l2.sqlite",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.split("\n")[:2] == ["True python", "REFUSED AIEndpointBlocked"], proc.stderr


def test_c_extension_used_when_built() -> None:
    try:
        from jupyter_dua_guard import _audit_fast  # noqa: F401
    except ImportError:
        pytest.skip("C extension not built here (no compiler): the Python hook is used")
    proc = run_python(
        "from jupyter_dua_guard import guard; print(guard.status()['hook'])",
        JUPYTER_DUA_GUARD_KERNEL_ID="k-c",
        JUPYTER_DUA_GUARD_LEDGER="sqlite:////nonexistent-dir/x.sqlite",
    )
    assert proc.stdout.strip() == "c"


def test_install_cannot_weaken_an_installed_guard(tmp_path) -> None:
    code = (
        textwrap.dedent(
            """
        from jupyter_dua_guard import guard, policy
        open_policy = policy.Policy({"blocked_hosts": {}, "packages": {}})
        guard.install(open_policy, protect_env=False, record=lambda kind, data: None)
        guard.install(open_policy, protect_env=False, record=lambda kind, data: None)
        """
        )
        + PROBE
    )
    proc = run_python(
        code,
        JUPYTER_DUA_GUARD_KERNEL_ID="k-w",
        JUPYTER_DUA_GUARD_POLICY=str(tmp_path / "none.json"),
        JUPYTER_DUA_GUARD_LEDGER=f"sqlite:///{tmp_path}/l.sqlite",
    )
    assert proc.stdout.strip() == "REFUSED AIEndpointBlocked", proc.stderr


def test_a_stuck_ledger_delays_but_never_hangs(tmp_path) -> None:
    """Another process holds the ledger's writer lock indefinitely: a refusal still
    raises promptly, the user's code goes on, and one warning says why."""
    import fcntl
    import time

    path = tmp_path / "ledger.sqlite"
    open_ledger(f"sqlite:///{path}").close()
    holder = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(holder, fcntl.LOCK_EX)
    code = (
        textwrap.dedent(
            f"""
        import os
        os.environ.update({{"JUPYTER_DUA_GUARD_KERNEL_ID": "k-stuck",
                           "JUPYTER_DUA_GUARD_LEDGER": "sqlite:///{path}"}})
        import jupyter_dua_guard.guard as g
        g.LEDGER_TIMEOUT = 1.0
        g.activate_from_environ()
        """
        )
        + PROBE
    )
    try:
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-c", code],
            env={k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_DUA_GUARD")},
            capture_output=True,
            text=True,
            timeout=60,
        )
        elapsed = time.monotonic() - started
    finally:
        os.close(holder)
    assert proc.stdout.strip() == "REFUSED AIEndpointBlocked", proc.stderr
    assert elapsed < 20
    assert "did not take" in proc.stderr and "Traceback" not in proc.stderr


def test_dotted_catalogue_names(tmp_path) -> None:
    """``google.genai`` lives in the shared ``google`` namespace: only that sub-package
    is recorded, with its distribution's version. (The older gRPC-based
    ``google.generativeai`` is refused at import by default.)"""
    site = tmp_path / "site"
    (site / "google" / "genai").mkdir(parents=True)
    (site / "google" / "genai" / "__init__.py").write_text("")
    (site / "google" / "protobuf_like").mkdir()
    (site / "google" / "protobuf_like" / "__init__.py").write_text("")
    info = site / "google_genai-0.8.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: google-genai\nVersion: 0.8.3\n")
    url = f"sqlite:///{tmp_path}/ledger.sqlite"
    code = (
        f"import sys\nsys.path.insert(0, {str(site)!r})\n"
        "import google.protobuf_like\nimport google.genai\n"
    )
    proc = run_python(
        code,
        JUPYTER_DUA_GUARD_POLICY=str(tmp_path / "none.json"),
        JUPYTER_DUA_GUARD_LEDGER=url,
        JUPYTER_DUA_GUARD_KERNEL_ID="k-ns",
    )
    assert proc.returncode == 0, proc.stderr
    ledger = open_ledger(url)
    imports = [r["data"] for r in ledger.records() if r["kind"] == "ai_ml_import"]
    ledger.close()
    assert [(d["name"], d["distribution"], d["version"]) for d in imports] == [
        ("google.genai", "google-genai", "0.8.3")
    ]


def test_c_hook_enters_python_only_for_its_events() -> None:
    try:
        from jupyter_dua_guard import _audit_fast  # noqa: F401
    except ImportError:
        pytest.skip("C extension not built here (no compiler): the Python hook is used")
    code = textwrap.dedent(
        """
        import sys, traceback
        from jupyter_dua_guard import _audit_fast
        for bad in [((print,), ("a", "b")), ((1,), ("a",)), ((print,), ("",))]:
            try:
                _audit_fast.install_handlers(*bad)
            except (TypeError, ValueError) as e:
                print(type(e).__name__)
        seen = []
        def refuse(args):
            raise PermissionError("refused " + str(args[0]))
        _audit_fast.install_handlers(
            (seen.append, seen.append, refuse), ("x.one", "import", "x.refuse")
        )
        sys.audit("x.one", 1)
        sys.audit("x.other", 2)
        sys.audit("y", 3)
        sys.audit("x.onf", 4)
        id(seen)
        sys.audit("x.one", 5)
        import colorsys
        try:
            sys.audit("x.refuse", 6)
        except PermissionError as e:
            print(e, len(traceback.extract_tb(e.__traceback__)))
        try:
            _audit_fast.install_handlers((print,), ("z",))
        except RuntimeError:
            print("RuntimeError")
        print(seen[0], seen[1], seen[2][0], len(seen))
        """
    )
    proc = run_python(code)
    assert proc.stdout.splitlines() == [
        "ValueError",
        "TypeError",
        "ValueError",
        "refused 6 1",
        "RuntimeError",
        "(1,) (5,) colorsys 3",
    ], proc.stderr
