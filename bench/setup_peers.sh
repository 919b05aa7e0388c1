#!/usr/bin/env bash
# The peers' environment for bench/us_table1.py, ct_table3.py and wsi_table4.py:
#   - pyFAST (FAST's Python bindings) in a venv of its own, .venv-peers, so that FAST's
#     bundled libraries never meet echod's; with Debian's PoCL (an OpenCL driver: FAST
#     needs one even for its CPU engines) and libusb, installed when run as root;
#   - MONAI (and torch) there too, for ct_table3, which adds that venv's site-packages
#     after echod's: echod's own venv stays as `make` made it.
# The benchmarks take .venv-peers by default (--pyfast / --fast-python name another).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=""
  for p in pocl-opencl-icd libusb-1.0-0; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing; fi
fi
PY=${PYTHON:-python3}
test -x .venv-peers/bin/python || "$PY" -m venv .venv-peers
.venv-peers/bin/python -m pip install -q --upgrade pip pyfast 'monai>=1.3' 'torch>=2.4'
.venv-peers/bin/python -c "import fast" >/dev/null 2>&1 || { echo "pyFAST in .venv-peers does not import" >&2; exit 1; }
.venv-peers/bin/python -c "import monai" || { echo "MONAI in .venv-peers does not import" >&2; exit 1; }
echo "peers ready in .venv-peers: pyFAST, MONAI"
