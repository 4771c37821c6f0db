#!/usr/bin/env bash
# `npm run setup:python`: the Python device SDK's virtual environment in .dcp/python, with sdk/python
# installed (editable) with torch and the test tools. torch from PyPI brings its CUDA libraries: about 5 GB
# and a minute or more to install. Idempotent: skipped while the stamp holds the hash of pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.dcp/python
STAMP="$VENV/.dcp-stamp"
PYTHON="${PYTHON:-python3}"
want="$(sha256sum sdk/python/pyproject.toml | cut -d' ' -f1)"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  echo "setup:python: $VENV is up to date"
  exit 0
fi
echo "setup:python: creating $VENV and installing sdk/python[torch,test] (torch is about 5 GB)"
rm -f "$STAMP"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e "sdk/python[torch,test]"
echo "$want" > "$STAMP"
echo "setup:python: ready ($VENV/bin/python -m dcp_device --help)"
