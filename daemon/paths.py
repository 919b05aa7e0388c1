"""Path arguments from the outside are confined to configured roots."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from daemon.errors import ConfigError


def confine(path: str | Path, roots: Sequence[Path], *, what: str, must_exist: bool = True) -> Path:
    """``path`` resolved (symlinks followed, ``..`` collapsed) if it lies inside one of ``roots``.

    A path that escapes every root, through ``..`` or a symlink, is refused
    with the roots named; so is a missing file when ``must_exist``.
    """
    real = Path(os.path.realpath(Path(path).expanduser()))
    for root in roots:
        base = Path(os.path.realpath(root.expanduser()))
        if real == base or base in real.parents:
            if must_exist and not real.exists():
                raise ConfigError(f"{what} {path}: no such file")
            return real
    listed = ", ".join(str(r) for r in roots) or "none configured"
    raise ConfigError(
        f"{what} {path} is outside the allowed folders ({listed}): add its folder to control.roots"
    )
