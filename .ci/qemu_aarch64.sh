#!/usr/bin/env bash
# Optional smoke run of the ring on aarch64 Python under qemu-user (not part of .ci/run):
# Debian's arm64 CPython 3.11 (bookworm has no 3.10) and PyPI's aarch64 wheels, the ring's
# tests (its cross-process stress test included) and hil_tests/test_ring_litmus.py.
#
# What it shows: the aarch64 builds of numpy and atomics (patomic's ARM atomics), the futex
# system calls and spawned processes work as the ring uses them. What it cannot show: ARM's
# weak memory ordering. qemu runs the guest's memory accesses on this x86-64 host's
# stronger model, so only a real ARM machine (a Jetson) tests that.
#
# Needs root (it adds dpkg's arm64 architecture to download, not install, arm64 packages),
# Debian's archive and PyPI. About 5 minutes on 2 cores. ROOT=/path picks the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${ROOT:-/tmp/echod-aarch64}
PY=${PYTHON:-.venv/bin/python}  # a host Python with pip, for the aarch64 wheels
DEBS="gcc-12-base libbz2-1.0 libc6 libcom-err2 libcrypt1 libdb5.3 libexpat1 libffi8 libgcc-s1
libgssapi-krb5-2 libk5crypto3 libkeyutils1 libkrb5-3 libkrb5support0 liblzma5 libncursesw6
libnsl2 libpython3.11-minimal libpython3.11-stdlib libreadline8 libsqlite3-0 libssl3 libtinfo6
libtirpc3 libuuid1 python3.11-minimal zlib1g libstdc++6"

command -v qemu-aarch64-static >/dev/null || {
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user-static
}
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  dpkg --add-architecture arm64  # for apt-get download only; removed again at exit
  trap 'dpkg --remove-architecture arm64 && apt-get update -q >/dev/null' EXIT
  apt-get update -q
fi
mkdir -p "$ROOT/debs" "$ROOT/sysroot" "$ROOT/site" "$ROOT/boot"
if [ ! -x "$ROOT/sysroot/usr/bin/python3.11" ]; then
  # shellcheck disable=SC2046
  (cd "$ROOT/debs" && apt-get download -q $(for p in $DEBS; do echo "$p:arm64"; done))
  for deb in "$ROOT"/debs/*.deb; do dpkg -x "$deb" "$ROOT/sysroot"; done
fi
"$PY" -m pip install -q --upgrade --target "$ROOT/site" --only-binary=:all: \
  --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
  --platform manylinux2014_aarch64 --python-version 3.11 --implementation cp --abi cp311 \
  "numpy>=1.24" "atomics>=1.0.2,<1.1" psutil pytest pytest-timeout
cat > "$ROOT/python" <<EOF
#!/bin/sh
exec qemu-aarch64-static -L "$ROOT/sysroot" "$ROOT/sysroot/usr/bin/python3.11" "\$@"
EOF
chmod +x "$ROOT/python"
cat > "$ROOT/boot/sitecustomize.py" <<'EOF'
import multiprocessing
import os

if os.environ.get("ECHOD_QEMU_PYTHON"):  # processes it spawns run under qemu too
    multiprocessing.set_executable(os.environ["ECHOD_QEMU_PYTHON"])
EOF
export ECHOD_QEMU_PYTHON="$ROOT/python" PYTHONPATH="$ROOT/boot:$ROOT/site:$PWD"
"$ROOT/python" -c 'import platform, sys; print("qemu:", platform.machine(), sys.version.split()[0])'
"$ROOT/python" -m pytest -p no:cacheprovider -q tests/test_ring.py hil_tests/test_ring_litmus.py
