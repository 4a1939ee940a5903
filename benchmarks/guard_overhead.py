"""Overhead of the kernel guard: ratio guarded / unguarded, measured in one run.

(a) kernel start-up (ipykernel until it answers kernel_info),
(b) a realistic analysis workload in a fresh Python process: import numpy, pandas and
    scikit-learn, groupby / crosstab / copy on a 200k-row frame, a scikit-learn fit,
(c) ``copy.deepcopy`` of a large nested structure (``builtins.id`` is an audit event, so
    every Python-level hook runs on each ``id()``), with the C hook and with the
    pure-Python hook. For reference, (c) also runs with a C hook that does nothing: once
    any hook exists, CPython builds an argument tuple for every event, so that ratio is
    the floor no audit hook can go below.

Goals: <= 1.02 on (b), <= 1.10 on (c). Runs are interleaved and medians compared, to
cancel drift on a shared machine; (b) and (c) compare CPU time of the measured code
(``time.process_time``), which other load on the machine disturbs least, and (b) also
shows wall-clock ratios. Needs the ``bench`` extra (numpy, pandas, scikit-learn).

    python benchmarks/guard_overhead.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Any

WORKLOAD = r"""
import time
t0, c0 = time.perf_counter(), time.process_time()
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
rng = np.random.default_rng(7)
n = 200_000
df = pd.DataFrame({
    "site": rng.choice(["C18", "C34", "C50", "C61", "C67"], n),
    "stage": rng.choice(["I", "II", "III", "IV"], n),
    "year": rng.integers(2000, 2021, n),
    "age": rng.integers(20, 95, n),
    "months": rng.exponential(40.0, n),
})
g = df.groupby(["site", "stage"]).agg(n=("age", "size"), m=("months", "median"))
ct = pd.crosstab(df["site"], df["stage"], margins=True)
df2 = df.copy()
df2["dead"] = (df2["months"] < 24).astype(int)
X = pd.get_dummies(df2[["site", "stage"]]).assign(age=df2["age"] / 100, year=df2["year"] - 2000)
LogisticRegression(max_iter=200).fit(X.to_numpy(float), df2["dead"].to_numpy())
print(time.perf_counter() - t0, time.process_time() - c0)
"""

DEEPCOPY = r"""
import copy, time
data = {f"patient{i}": {"codes": [i, i + 1, i + 2], "meta": {"site": "C50", "n": [i] * 3},
        "visits": [(i, j, f"v{j}") for j in range(3)]} for i in range(40_000)}
best = float("inf")
for _ in range(5):
    t0 = time.process_time()
    copy.deepcopy(data)
    best = min(best, time.process_time() - t0)
print(best)
"""


NULL_HOOK_C = r"""
#include <Python.h>
static int hook(const char *event, PyObject *args, void *data)
{
    (void)event; (void)args; (void)data;
    return 0;
}
static PyObject *install(PyObject *self, PyObject *unused)
{
    (void)self; (void)unused;
    if (PySys_AddAuditHook(hook, NULL) < 0) return NULL;
    Py_RETURN_NONE;
}
static PyMethodDef methods[] = {{"install", install, METH_NOARGS, NULL}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_dua_null_hook", .m_size = -1, .m_methods = methods};
PyMODINIT_FUNC PyInit__dua_null_hook(void) { return PyModule_Create(&module); }
"""


def build_null_hook(workdir: str) -> str | None:
    """Compile the do-nothing C hook into ``workdir``; None without a working compiler."""
    source = os.path.join(workdir, "_dua_null_hook.c")
    with open(source, "w") as f:
        f.write(NULL_HOOK_C)
    target = os.path.join(
        workdir, "_dua_null_hook" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")
    )
    ldshared = sysconfig.get_config_var("LDSHARED") or "cc -shared"
    cmd = [*shlex.split(ldshared), "-O2", "-fPIC", f"-I{sysconfig.get_paths()['include']}", source]
    try:
        done = subprocess.run([*cmd, "-o", target], capture_output=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return workdir if done.returncode == 0 else None


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_DUA_GUARD")}


def guard_vars(workdir: str) -> dict[str, str]:
    from jupyter_dua_guard.policy import build_policy, write_policy

    policy = write_policy(build_policy(), os.path.join(workdir, "policy.json"))
    return {
        "JUPYTER_DUA_GUARD_POLICY": policy,
        "JUPYTER_DUA_GUARD_LEDGER": f"sqlite:///{workdir}/ledger.sqlite",
        "JUPYTER_DUA_GUARD_KERNEL_ID": "benchmark",
    }


def python_hook_prefix(variables: dict[str, str]) -> str:
    """Code that guards a process with the pure-Python hook (as without a compiler)."""
    return (
        "import os, sys\n"
        f"os.environ.update({variables!r})\n"
        "sys.modules['jupyter_dua_guard._audit_fast'] = None\n"
        "from jupyter_dua_guard import guard\n"
        "assert guard.activate_from_environ() and guard.status()['hook'] == 'python'\n"
    )


def run(code: str, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds of the whole process, CPU seconds the code itself printed last)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed: {proc.stderr.strip().splitlines()[-1:]}")
    return wall, float(proc.stdout.split()[-1])


def start_kernel(env: dict[str, str]) -> tuple[Any, Any, float]:
    """A started ipykernel, its client and the seconds until it answered kernel_info."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    t0 = time.perf_counter()
    km.start_kernel(env=env)
    client = km.client()
    client.start_channels()
    client.wait_for_ready(timeout=120)
    return km, client, time.perf_counter() - t0


def stop_kernel(km: Any, client: Any) -> None:
    client.stop_channels()
    km.shutdown_kernel(now=True)


def kernel_startup(env: dict[str, str]) -> float:
    km, client, seconds = start_kernel(env)
    stop_kernel(km, client)
    return seconds


def kernel_workload(env: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU) seconds of WORKLOAD as one cell in a fresh kernel (start not counted)."""
    km, client, _ = start_kernel(env)
    out: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])

    try:
        t0 = time.perf_counter()
        reply = client.execute_interactive(WORKLOAD, timeout=600, output_hook=hook)
        wall = time.perf_counter() - t0
        if reply["content"]["status"] != "ok":
            raise SystemExit(f"workload failed in the kernel: {reply['content']}")
        return wall, float("".join(out).split()[-1])
    finally:
        stop_kernel(km, client)


def summary(guarded: list[float], plain: list[float]) -> dict[str, float]:
    """Medians and their ratio; also the ratio of minima (noise only ever adds time)."""
    return {
        "unguarded_s": statistics.median(plain),
        "guarded_s": statistics.median(guarded),
        "ratio": statistics.median(guarded) / statistics.median(plain),
        "ratio_of_minima": min(guarded) / min(plain),
    }


def line(label: str, r: dict[str, float], note: str = "") -> str:
    return (
        f"{label:<36} ratio {r['ratio']:.3f} (min/min {r['ratio_of_minima']:.3f}; "
        f"{r['guarded_s']:.3f}s vs {r['unguarded_s']:.3f}s) {note}"
    ).rstrip()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="interleaved runs per variant")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        variables = guard_vars(workdir)
        plain_env = base_env()
        guard_env = {**plain_env, **variables}

        kernel_startup(plain_env)  # warm the file cache
        a_plain, a_guard = [], []
        for _ in range(args.repeat):
            a_plain.append(kernel_startup(plain_env))
            a_guard.append(kernel_startup(guard_env))
        results["a_kernel_startup"] = summary(a_guard, a_plain)

        kernel_workload(plain_env)
        b_plain, b_guard = [], []
        for _ in range(args.repeat):
            b_plain.append(kernel_workload(plain_env))
            b_guard.append(kernel_workload(guard_env))
        results["b_kernel_cpu"] = summary([g[1] for g in b_guard], [p[1] for p in b_plain])
        results["b_kernel_wall"] = summary([g[0] for g in b_guard], [p[0] for p in b_plain])

        p_plain, p_guard = [], []
        for _ in range(args.repeat):
            p_plain.append(run(WORKLOAD, plain_env)[0])
            p_guard.append(run(WORKLOAD, guard_env)[0])
        results["b_new_process_wall"] = summary(p_guard, p_plain)

        null_dir = build_null_hook(workdir)
        null_env = {
            **plain_env,
            "PYTHONPATH": os.pathsep.join(filter(None, [null_dir, plain_env.get("PYTHONPATH")])),
        }
        null_code = "import _dua_null_hook\n_dua_null_hook.install()\n" + DEEPCOPY
        c_plain, c_c, c_py, c_null = [], [], [], []
        for _ in range(args.repeat):
            c_plain.append(run(DEEPCOPY, plain_env)[1])
            c_c.append(run(DEEPCOPY, guard_env)[1])
            c_py.append(run(python_hook_prefix(variables) + DEEPCOPY, plain_env)[1])
            if null_dir:
                c_null.append(run(null_code, null_env)[1])
        results["c_deepcopy_c_hook"] = summary(c_c, c_plain)
        results["c_deepcopy_python_hook"] = summary(c_py, c_plain)
        if c_null:
            results["c_deepcopy_null_c_hook"] = summary(c_null, c_plain)

    try:
        from jupyter_dua_guard import _audit_fast  # noqa: F401

        hook = "the C hook (_audit_fast)"
    except ImportError:
        hook = "the pure-Python hook (C extension not built)"
    print(f"jupyter-dua-guard overhead, guarded/unguarded, {args.repeat} interleaved runs; {hook}")
    print(line("(a) kernel start-up, wall", results["a_kernel_startup"]))
    print(line("(b) workload cell in a kernel, CPU", results["b_kernel_cpu"], "goal <= 1.02"))
    print(line("    same, wall clock", results["b_kernel_wall"]))
    print(line("    as a new python process, wall", results["b_new_process_wall"], "(+ start)"))
    print(line("(c) deepcopy CPU, C hook", results["c_deepcopy_c_hook"], "goal <= 1.10"))
    print(line("(c) deepcopy CPU, pure-Python hook", results["c_deepcopy_python_hook"]))
    if "c_deepcopy_null_c_hook" in results:
        floor = results["c_deepcopy_null_c_hook"]
        print(line("    do-nothing C hook (CPython floor)", floor, "not the guard's"))
    else:
        print("    do-nothing C hook (CPython floor): not measured, no C compiler")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
