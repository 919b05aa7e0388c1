"""Run a command under two of the unit's rules, as systemd would apply them, without systemd:

- ``--syscalls "@system-service ~@privileged"``: the ``SystemCallFilter=`` lines (groups
  expanded by ``systemd-analyze syscall-filter``; a call outside them fails with EPERM, as
  ``SystemCallErrorNumber=EPERM`` says), loaded with libseccomp;
- ``--families "AF_UNIX AF_INET AF_INET6"``: ``RestrictAddressFamilies=``: ``socket()``
  of any other family fails (with the filter above);
- ``--mdwe``: ``MemoryDenyWriteExecute=``: no memory both writable and executable, no
  memory made executable later (the kernel's PR_SET_MDWE, what systemd 253+ uses).

Run it with the system Python, which has libseccomp's binding (Debian: python3-seccomp):
``/usr/bin/python3 tests/sandbox.py [--syscalls FILTER] [--mdwe] -- COMMAND...``.
Both rules are inherited by every process the command starts.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import socket
import subprocess

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


def expand(name: str, seen: set[str]) -> set[str]:
    """The system calls of a ``@group`` (recursively), or the call itself."""
    if not name.startswith("@"):
        return {name}
    if name in seen:
        return set()
    seen.add(name)
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter", name], capture_output=True, text=True, check=True
    ).stdout
    calls: set[str] = set()
    for line in listing.splitlines()[1:]:
        word = line.strip()
        if word and not word.startswith("#"):
            calls |= expand(word, seen)
    return calls


def load_filter(spec: str, families: str) -> None:
    import seccomp

    allowed: set[str] = set()
    for item in spec.split():
        if item.startswith("~"):
            allowed -= expand(item[1:], set())
        else:
            allowed |= expand(item, set())
    rules = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
    if families and "socket" in allowed:
        allowed.discard("socket")
        for family in families.split():
            number = getattr(socket, family)
            rules.add_rule(seccomp.ALLOW, "socket", seccomp.Arg(0, seccomp.EQ, number))
    for call in sorted(allowed):
        try:
            rules.add_rule(seccomp.ALLOW, call)
        except (RuntimeError, ValueError):  # not a system call of this architecture
            continue
    rules.load()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--syscalls", default="", help="SystemCallFilter= lines, space-separated")
    p.add_argument("--families", default="", help="RestrictAddressFamilies=, space-separated")
    p.add_argument("--mdwe", action="store_true", help="MemoryDenyWriteExecute=yes")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.mdwe:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
            raise SystemExit(f"PR_SET_MDWE: {os.strerror(ctypes.get_errno())} (Linux 6.3+)")
    if args.syscalls:
        load_filter(args.syscalls, args.families)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
