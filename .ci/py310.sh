#!/usr/bin/env bash
# Python 3.10, the oldest echod supports (JetPack 6 ships it), with the oldest numpy it
# supports and OpenVINO 2022.3 (the Neural Compute Stick's last release):
#   1. static: ruff (target-version py310), vermin (no stdlib or syntax newer than 3.10),
#      mypy (python_version 3.10, in make test's .venv);
#   2. the test suite without the slow tests, on those versions;
#   3. .ci/aarch64_wheels.py: the runtime dependencies resolve from aarch64 wheels for
#      Python 3.10 (run by 3.10, so that python_version markers are 3.10's).
# The interpreter: $PY310, else python3.10 on PATH (pyenv's here).
set -euo pipefail
cd "$(dirname "$0")/.."
PY310=${PY310:-}
if [ -z "$PY310" ]; then  # python3.10 on PATH, else pyenv's (its shim fails unless selected)
  for candidate in python3.10 "$(pyenv root 2>/dev/null)"/versions/3.10*/bin/python3.10; do
    if "$candidate" -c 'import sys' >/dev/null 2>&1; then PY310=$candidate; break; fi
  done
fi
if [ -z "$PY310" ]; then  # a machine without it: say so, do not fail the suite's result
  echo "py310: SKIPPED: no python3.10 on PATH (pyenv install 3.10, or set PY310)" >&2
  exit 0
fi
VENV=.venv310
NUMPY=1.24.0       # the floor of pyproject.toml's numpy requirement
OPENVINO=2022.3.2  # the last OpenVINO with the MYRIAD plugin (numpy < 1.25)
test -x "$VENV/bin/python" || "$PY310" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[onnxruntime,dev]" "numpy==$NUMPY" "openvino==$OPENVINO"
"$VENV/bin/python" - <<'PY'
import sys, numpy, openvino.runtime as ov
print(f"py310: Python {sys.version.split()[0]}, numpy {numpy.__version__}, OpenVINO {ov.get_version()}")
PY
"$VENV/bin/ruff" check daemon tests hil_tests bench .ci
"$VENV/bin/vermin" --target=3.10- --violations --eval-annotations --no-tips -q \
  --exclude long --exclude str.decode --exclude 'str.decode(errors)' daemon tests hil_tests bench .ci
.venv/bin/mypy  # python_version = 3.10 (pyproject.toml), numpy's current stubs (.venv: make test)
"$VENV/bin/python" -m pytest -p no:cacheprovider -m "not slow" tests hil_tests
"$VENV/bin/python" .ci/aarch64_wheels.py
