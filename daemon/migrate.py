"""Configuration files of earlier echod versions: read them, and rewrite them.

A file carries its schema version (``schema_version = 2``, at the top); a file
without one was written before versions were kept: schema 1. Loading a file of
an older schema applies the changes of every later schema in turn: a renamed
setting is read under its new name and a removed one is dropped, each with a
warning that names the new setting, so an upgraded appliance boots with the
file it has. ``echod config migrate FILE`` writes the migrated file. A setting
that never existed is still an error, and so is a file of a newer schema.

To rename or remove a setting: raise :data:`SCHEMA` and list the change under it
in :data:`CHANGES`.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.errors import ConfigError

SCHEMA = 2
KEY = "schema_version"


@dataclass(frozen=True)
class Renamed:
    """``old`` is read as ``new`` (same meaning, new name or place)."""

    old: str
    new: str

    def apply(self, data: dict[str, Any], schema: int, where: str) -> str | None:
        if not _has(data, self.old):
            return None
        if _has(data, self.new):
            raise ConfigError(
                f"{where}: both '{self.old}' (its name before schema {schema}) and '{self.new}'"
                f" are set: keep '{self.new}' only"
            )
        value = _pop(data, self.old)
        _put(data, self.new, value)
        return (
            f"{where}: setting '{self.old}' is now '{self.new}' (schema {schema}); read as "
            f"'{self.new}' = {value!r}"
        )


@dataclass(frozen=True)
class Removed:
    """``old`` no longer means anything; ``instead`` says what replaced it."""

    old: str
    instead: str

    def apply(self, data: dict[str, Any], schema: int, where: str) -> str | None:
        if not _has(data, self.old):
            return None
        _pop(data, self.old)
        return f"{where}: setting '{self.old}' was removed in schema {schema}: {self.instead}"


Change = Renamed | Removed

# schema -> what it changed from the one before
CHANGES: Mapping[int, tuple[Change, ...]] = {
    # schema 1 -> 2 (versions begin). The phantom's own rate went when `source.fps` became
    # the rate of every source without timestamps (7591780): files of then still have it.
    2: (Removed("source.synthetic.fps", "the phantom runs at 'source.fps'"),),
}


def upgrade(
    data: dict[str, Any], where: str, changes: Mapping[int, tuple[Change, ...]] = CHANGES
) -> tuple[dict[str, Any], int, list[str]]:
    """``data`` (a parsed file) at the current schema, the schema it had, and one warning
    per setting that was moved or dropped. ``where`` names the file in messages."""
    schema = data.get(KEY, 1)
    if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
        raise ConfigError(f"{where}: {KEY} must be a whole number from 1 to {SCHEMA}")
    if schema > SCHEMA:
        raise ConfigError(
            f"{where}: {KEY} = {schema} is newer than this echod knows ({SCHEMA}): "
            "upgrade echod, or use the file of this version"
        )
    notes: list[str] = []
    for version in range(schema + 1, SCHEMA + 1):
        for change in changes.get(version, ()):
            note = change.apply(data, version, where)
            if note:
                notes.append(note)
    if schema < SCHEMA:
        data = {KEY: SCHEMA, **{k: v for k, v in data.items() if k != KEY}}
    return data, schema, notes


def write(data: dict[str, Any], path: Path, was: int) -> None:
    """Write ``data`` (the settings a file sets, migrated) as TOML to ``path``."""
    from daemon.config import _toml_value

    today = datetime.date.today().isoformat()
    lines = [
        f"# echod configuration, schema {SCHEMA} (migrated from schema {was} on {today} by",
        "# `echod config migrate`; every setting and its default: `echod config --defaults`)",
    ]

    def emit(table: dict[str, Any], name: str) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        if name and scalars:
            lines.extend(["", f"[{name}]"])
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        for key, value in table.items():
            if isinstance(value, dict):
                emit(value, f"{name}.{key}" if name else key)

    emit(data, "")
    path.write_text("\n".join(lines) + "\n")


def _has(data: dict[str, Any], dotted: str) -> bool:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _pop(data: dict[str, Any], dotted: str) -> Any:
    """Remove a setting; tables it leaves empty go too."""
    *parents, leaf = dotted.split(".")
    chain = [data]
    for part in parents:
        chain.append(chain[-1][part])
    value = chain[-1].pop(leaf)
    for parent, part in zip(reversed(chain[:-1]), reversed(parents), strict=True):
        if not parent[part]:
            del parent[part]
    return value


def _put(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot move a setting to '{dotted}': '{part}' is a value")
    node[leaf] = value
