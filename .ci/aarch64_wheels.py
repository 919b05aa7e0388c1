"""Can echod install on a Jetson (aarch64, Python 3.10) from wheels alone?

Resolves ``[project.dependencies]`` of pyproject.toml, then each optional extra with
them, for ``manylinux_2_28_aarch64`` / CPython 3.10 with ``--only-binary=:all:``
(``pip install --dry-run --report``: the resolution ``pip download`` would make, reading
only the wheels' metadata). A package with no such wheel would need building there.

The few sdists that build *without a compiler* (``PURE_SDISTS``) are built here with the
compiler disabled, as pure-Python wheels, and offered to the resolution: that proves
they install on the target without one.

Exit status 1 when the runtime dependencies do not resolve; extras that do not are
listed (optional: echod runs without them) and leave it 0. ``--python``/``--platform``
pick another target. Needs the package index (PyPI).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
# sdist -> why a pure-Python build is acceptable on the target
PURE_SDISTS = {
    "crcmod==1.7": (
        "pyigtl's CRC-64; no wheels on PyPI. Without a compiler its setup.py installs the "
        "pure-Python version; echod checks no CRC-64 unless source.igtl.check_crc is set "
        "(then install python3-crcmod from apt, or build-essential, for the C extension)"
    ),
}
MISSING = re.compile(r"No matching distribution found for (\S+)")


def pure_wheels(where: Path) -> None:
    """Build PURE_SDISTS as pure-Python wheels with no compiler (CC=false) into ``where``."""
    env = {**os.environ, "CC": "false", "CXX": "false"}
    for sdist in PURE_SDISTS:
        cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-cache-dir"]
        cmd += ["--no-binary", sdist.split("==")[0], "-w", str(where), sdist]
        subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
        built = [w.name for w in where.glob(f"{sdist.split('==')[0]}-*.whl")]
        if not built or not all(w.endswith("-py3-none-any.whl") for w in built):
            raise SystemExit(f"{sdist} did not build as a pure-Python wheel: {built}")


def platforms(tag: str) -> list[str]:
    """pip takes no older glibc for a ``--platform``: ``manylinux_2_28_aarch64`` and every
    manylinux tag down to 2.17 (``manylinux2014``), the oldest for aarch64."""
    m = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", tag)
    if m is None:
        return [tag]
    major, minor, arch = int(m.group(1)), int(m.group(2)), m.group(3)
    return [f"manylinux_{major}_{y}_{arch}" for y in range(minor, 16, -1)] + [
        f"manylinux2014_{arch}"
    ]


def resolve(requirements: list[str], args: argparse.Namespace, links: Path) -> tuple[dict, str]:
    """``({name: version}, "")`` for what pip would install, or ``({}, pip's error lines)``."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed"]
        cmd += ["--quiet", "--only-binary=:all:"]
        cmd += [arg for tag in platforms(args.platform) for arg in ("--platform", tag)]
        cmd += ["--python-version", args.python, "--implementation", "cp"]
        cmd += ["--abi", "cp" + args.python.replace(".", ""), "--find-links", str(links)]
        cmd += ["--report", str(report), *requirements]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            errors = [ln for ln in done.stderr.splitlines() if ln.startswith("ERROR")]
            return {}, "; ".join(errors) or done.stderr.strip()[-500:]
        items = json.loads(report.read_text())["install"]
        return {i["metadata"]["name"]: i["metadata"]["version"] for i in items}, ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default="3.10")
    parser.add_argument("--platform", default="manylinux_2_28_aarch64")
    args = parser.parse_args()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core: list[str] = project["dependencies"]
    extras: dict[str, list[str]] = project["optional-dependencies"]
    target = f"CPython {args.python}, {args.platform}"
    with tempfile.TemporaryDirectory() as tmp:
        links = Path(tmp)
        pure_wheels(links)
        for sdist, why in PURE_SDISTS.items():
            print(f"{sdist}: sdist only, builds as pure Python without a compiler: {why}")
        found, error = resolve(core, args, links)
        if error:
            print(f"runtime dependencies: do NOT resolve for {target}: {error}")
            for req in core:  # which ones
                _, why = resolve([req], args, links)
                if why:
                    print(f"  {req}: {', '.join(MISSING.findall(why)) or why}")
            return 1
        versions = ", ".join(f"{k} {v}" for k, v in sorted(found.items()))
        print(f"runtime dependencies: resolve for {target} from wheels ({versions})")
        for extra, reqs in extras.items():
            got, why = resolve([*core, *reqs], args, links)
            if why:
                missing = ", ".join(MISSING.findall(why)) or why
                print(f"extra {extra}: optional, no {target} wheel for: {missing}")
            else:
                new = sorted(set(got) - set(found))
                print(f"extra {extra}: resolves ({', '.join(f'{k} {got[k]}' for k in new)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
