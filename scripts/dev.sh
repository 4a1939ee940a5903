#!/usr/bin/env bash
# Set up jupyter-dua-guard on a fresh machine, then either start the demo or run every test.
#
#   bash scripts/dev.sh demo   install everything, start JupyterLab with the guard on examples/demo.ipynb
#   bash scripts/dev.sh test   install everything, run lint, Python tests and browser tests
set -euo pipefail

mode="${1:-}"
case "$mode" in
  demo | test) ;;
  *)
    echo "usage: bash scripts/dev.sh demo|test" >&2
    exit 2
    ;;
esac

cd "$(dirname "$0")/.."
root="$(pwd)"

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "dev.sh: '$*' needs root; run it as root or install sudo." >&2
    exit 2
  fi
}

# System packages: Node.js builds the lab extension, the SQLite and OpenSSL headers the C
# chain walk and libpq's the C report pass over a PostgreSQL ledger (without them the build
# falls back to Python), Chromium runs the browser tests,
# PostgreSQL (server binaries only; the tests start their own cluster on loopback) backs the
# hub-ledger tests.
missing=()
command -v node >/dev/null || missing+=(nodejs npm)
[ -f /usr/include/sqlite3.h ] || missing+=(libsqlite3-dev)
[ -f /usr/include/openssl/sha.h ] || missing+=(libssl-dev)
[ -f /usr/include/postgresql/libpq-fe.h ] || missing+=(libpq-dev)
if [ "$mode" = test ]; then
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "dev.sh: installing ${missing[*]} from Debian"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Python: one virtual environment in .venv; `pip install .` builds the lab extension with jlpm.
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
source .venv/bin/activate
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
pip install --quiet --upgrade pip
if [ "$mode" = demo ]; then
  pip install --quiet ".[demo]"
else
  pip install --quiet ".[test]"
fi

if [ "$mode" = demo ]; then
  cd "$root/examples"
  extra=()
  [ "$(id -u)" = 0 ] && extra+=(--allow-root)
  exec jupyter lab "${extra[@]}" demo.ipynb
fi

export CI="${CI:-}"
echo "== lint"
ruff check jupyter_dua_guard tests benchmarks
ruff format --check jupyter_dua_guard tests benchmarks
jlpm install --immutable >/dev/null
jlpm lint:check
echo "== browser tests (Galata + Debian Chromium)"
jlpm test:ui
echo "== Python tests"
pytest
