#!/usr/bin/env bash
# Create (or refresh) the project's Python 3.12 virtual environment in .venv with the pinned requirements.
# Idempotent: does nothing when .venv already holds exactly the current requirements.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  for cand in python3.12 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null
    then echo "$cand"; return; fi
  done
  # pyenv installs: a bare python3.12 shim fails unless the version is selected.
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare | grep -E '^3\.12(\.|$)'); do
      if PYENV_VERSION="$v" python3.12 -c '' 2>/dev/null; then echo "env PYENV_VERSION=$v python3.12"; return; fi
    done
  fi
  echo "error: Python 3.12 not found (JAX 0.11 needs it); set PYTHON=/path/to/python3.12" >&2
  exit 1
}

stamp=.venv/.requirements.sha256
want=$(cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
py=$(find_python)
echo "setting up .venv with $($py --version) ..." >&2
$py -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-dev.txt
.venv/bin/python -m pip install -q --no-deps -e .
echo "$want" > "$stamp"
