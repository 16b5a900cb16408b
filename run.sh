#!/usr/bin/env bash
""":"
# tiedmoe entry point: valid bash AND valid Python.
#   ./run.sh [CONFIG.yaml] [key=value ...]   train (default: tiny tied MoE, 2 CPU ranks or all GPUs)
#   ./run.sh test [pytest args]             run the test suite
#   ./run.sh eval TARGET [--tasks ...]      evaluate a run / checkpoint / export (python -m trainer.evaluate)
#   deepspeed [--hostfile H] run.sh CONFIG.yaml [key=value ...]   the launcher runs this file with python
# As bash it creates .venv on first use, then hands over to Python; as Python (under a launcher)
# it goes straight to the trainer. The Python part sits in a bash heredoc, so the file parses as both.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
stamp="$venv/.tiedmoe-installed"
want="$(cat "$here/requirements.txt" | sha256sum | cut -c1-16)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "run.sh: setting up $venv (first run only)" >&2
  python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q torch==2.13.0
  DS_BUILD_OPS=0 "$venv/bin/pip" install -q -r "$here/requirements.txt"
  nodeps="$(sed -n 's/^#no-deps //p' "$here/requirements.txt")"  # data-only packages whose pins clash with ours
  if [ -n "$nodeps" ]; then "$venv/bin/pip" install -q --no-deps $nodeps; fi
  echo "$want" > "$stamp"
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning}"
export TIEDMOE_CALLER_CWD="$PWD"  # a relative CONFIG.yaml is the caller's, though we run from the repo root
cd "$here"
if [ "${1:-}" = "test" ]; then
  shift
  exec "$venv/bin/python" -m pytest -q "$@"
fi
if [ "${1:-}" = "eval" ]; then
  shift
  exec "$venv/bin/python" -m trainer.evaluate "$@"
fi
exec "$venv/bin/python" "$here/run.sh" "$@"
: <<'END_OF_PYTHON'
":"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trainer.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
# bash never reaches the Python part (exec above); this heredoc only keeps `bash -n run.sh` valid.
END_OF_PYTHON
