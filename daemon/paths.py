"""Paths from the outside are confined to configured roots; the runtime directory is private."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from daemon.errors import ConfigError

NAME_MAX, PATH_MAX = 255, 4096  # bytes in one name, in a whole path (Linux)


def confine(path: str | Path, roots: Sequence[Path], *, what: str, must_exist: bool = True) -> Path:
    """``path`` resolved (symlinks followed, ``..`` collapsed) if it lies inside one of ``roots``.

    A path that escapes every root, through ``..`` or a symlink, is refused
    with the roots named; so is a missing file when ``must_exist``, and a name
    no file can have (a NUL byte, too long).
    """
    if "\0" in str(path):
        raise ConfigError(f"{what} path {shown(path)} contains a NUL byte: no file has such a name")
    real = Path(os.path.realpath(Path(path).expanduser()))
    raw = os.fsencode(real)
    if len(raw) >= PATH_MAX or any(len(part) > NAME_MAX for part in raw.split(b"/")):
        raise ConfigError(
            f"{what} path {shown(path)} is too long (at most {NAME_MAX} bytes a name, "
            f"{PATH_MAX} in all)"
        )
    for root in roots:
        base = Path(os.path.realpath(root.expanduser()))
        if real == base or base in real.parents:
            if must_exist and _kind(real, what) is None:
                raise ConfigError(f"{what} {shown(path)}: no such file")
            return real
    listed = ", ".join(str(r) for r in roots) or "none configured"
    raise ConfigError(
        f"{what} {shown(path)} is outside the allowed folders ({listed}): add its folder to "
        "control.roots"
    )


def check_new_file(path: Path, what: str) -> Path:
    """``path`` if a file can be written there: not a folder, and in a folder that exists
    (nothing is made on the way); else ConfigError."""
    if _kind(path, what) == "folder":
        raise ConfigError(f"{what} {path} is a folder: name a file in it, e.g. {path / 'now.png'}")
    parent = _kind(path.parent, what)
    if parent != "folder":
        why = "does not exist" if parent is None else "is not a folder"
        raise ConfigError(f"{what} {path}: {path.parent} {why}: create the folder first")
    return path


def check_folder(path: Path, what: str) -> Path:
    """``path`` if it is a folder or nothing yet (made when first used); else ConfigError."""
    if _kind(path, what) == "file":
        raise ConfigError(f"{what}: {path} is not a folder")
    return path


def _kind(path: Path, what: str) -> str | None:
    """``"folder"``, ``"file"`` (anything else) or None (nothing there); ConfigError when
    the file system cannot say (no permission to look, ...)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise ConfigError(f"{what} {shown(path)}: {e.strerror}") from None
    return "folder" if stat.S_ISDIR(st.st_mode) else "file"


def shown(path: str | Path) -> str:
    """``path`` for a message: quoted, cut short when long."""
    text = str(path)
    return repr(text if len(text) <= 160 else f"{text[:100]}...{text[-50:]}")


def private_dir(path: Path, what: str) -> Path:
    """``path``, a folder only this user may change: created 0700 when missing; refused
    (ConfigError) when it is a symbolic link, not a folder, owned by another user, or
    writable by group or others (its sockets could be replaced under the daemon)."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass  # checked below, whatever it is
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be made ({e.strerror})") from None
    st = os.lstat(path)
    problem = (
        "is a symbolic link"
        if stat.S_ISLNK(st.st_mode)
        else "is not a folder"
        if not stat.S_ISDIR(st.st_mode)
        else f"is owned by uid {st.st_uid}, not {os.geteuid()}"
        if st.st_uid != os.geteuid()
        else f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
        if st.st_mode & 0o022
        else None
    )
    if problem is not None:
        raise ConfigError(
            f"{what} {path} {problem}: use a folder of this user's own, mode 0700 or 0750 "
            "(or remove it and echod makes one)"
        )
    return path
