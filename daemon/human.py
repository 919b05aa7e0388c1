"""Results as people read them: aligned tables and ``key  value`` lines.

:func:`render` shows any JSON-like result without knowing its keys, so a reply
that gains or changes fields still reads well: a scalar as itself, a list of
scalars comma-separated, a dict of scalars as ``k=v`` pairs, a dict of dicts
(``stages``) or a list of dicts (``engines``, ``classes``) as a table, anything
deeper as compact JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    """``rows`` (the first is the header) with their columns aligned; the last column is
    not padded, so a long reason or note does not widen the others."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join([*(v.ljust(w) for v, w in zip(row, widths, strict=False)), row[-1]]).rstrip()
        for row in rows
    ]


def render(value: Any) -> str:
    """``value`` (a decoded JSON result) as text; see the module docstring."""
    if isinstance(value, dict):
        return "\n".join(_block(value))
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return "\n".join(_records(value))
    return cell(value)


def cell(value: Any) -> str:
    """One value on one line: ``-`` for none, ``yes``/``no``, numbers to 4 significant
    digits (whole numbers whole), ``a, b`` for lists, ``k=v k=v`` for dicts."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1e4 or value.is_integer() else f"{value:.4g}"
    if isinstance(value, list | tuple | dict) and not value:
        return "-"
    if isinstance(value, list | tuple):
        return ", ".join(map(_item, value))
    if isinstance(value, dict):
        return " ".join(f"{k}={_item(v)}" for k, v in value.items())
    return str(value)


def _item(value: Any) -> str:
    """A value inside a list or a ``k=v`` pair: a flat list comma-joined without spaces,
    anything deeper as compact JSON."""
    if isinstance(value, list | tuple) and value and all(map(_scalar, value)):
        return ",".join(map(cell, value))
    if _scalar(value) or not value:
        return cell(value)
    return json.dumps(value, separators=(",", ":"))


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def _block(result: dict[str, Any]) -> list[str]:
    """``key  value`` lines for the flat entries, then a titled table per nested one."""
    flat = [(k, v) for k, v in result.items() if not _tabular(v)]
    width = max((len(k) for k, _ in flat), default=0)
    lines = [f"{k.ljust(width)}  {cell(v)}" for k, v in flat]
    for key, v in result.items():
        if _tabular(v):
            rows = (
                _records(list(v.values()), first=(_singular(key), list(v)))
                if isinstance(v, dict)
                else _records(v)
            )
            lines += ["", f"{key}:", *rows]
    return lines


def _tabular(v: Any) -> bool:
    """A dict of dicts or a list of dicts (one row each)."""
    values: Iterable[Any] = v.values() if isinstance(v, dict) else v if isinstance(v, list) else []
    values = list(values)
    return bool(values) and all(isinstance(x, dict) for x in values)


def _records(
    records: list[dict[str, Any]], first: tuple[str, list[str]] | None = None
) -> list[str]:
    """One row per record, a column per key (in order of first appearance); ``first``
    is a leading column: its title and its values (a dict's keys)."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    header = ([first[0]] if first else []) + keys
    rows = [[h.upper() for h in header]]
    for i, r in enumerate(records):
        rows.append(([first[1][i]] if first else []) + [_column(r.get(k)) for k in keys])
    return table(rows)


def _column(value: Any) -> str:
    return cell(value) if isinstance(value, dict) else _item(value)


def _singular(key: str) -> str:
    return key[:-1] if key.endswith("s") and len(key) > 1 else key


def run_summary(s: dict[str, Any]) -> list[str]:
    """The end of ``echod run``: counts that add up, figures as the status line gives
    them, and what each count means when a consumer skips label maps."""
    if "frames_in" not in s:  # no live pipeline: a workstation that took jobs
        return [f"echod: stopped ({s.get('stopped_by')}); {s.get('source')}"]
    dropped = s.get("dropped") or {}
    causes = ", ".join(f"{k} {v}" for k, v in dropped.items())
    lat = s.get("latency_ms") or {}
    models = s.get("models") or []
    each = [_model_line(m, s["frames_in"]) for m in models] if len(models) > 1 else []
    lines = [
        *each,
        f"echod: {s['frames_in']} frames in = {s['frames_out']} out + "
        f"{sum(dropped.values())} dropped{f' ({causes})' if causes else ''} | "
        f"{s.get('fps') or 0:.1f} fps | latency p50 {lat.get('p50', float('nan')):.1f} ms "
        f"p99 {lat.get('p99', float('nan')):.1f} ms | {s.get('engine')} {s.get('device')}, "
        f"{s.get('model')}"
    ]
    withheld = s.get("withheld") or {}
    if withheld.get("frames"):
        lines.append(
            f"echod: overlay withheld on {withheld['frames']} of {s['frames_out']} frames "
            "(no confident finding, or the frame is unlike the model's training data)"
        )
    for consumer, n in (s.get("skipped") or {}).items():
        if n:
            lines.append(
                f"echod: {consumer} skipped {n} of {s['frames_out']} label maps (it takes the "
                "newest; in mode all every label map reaches every consumer)"
            )
    return lines


def _model_line(m: dict[str, Any], frames_in: int) -> str:
    """One model of several in the run summary: its counts, latency and Table 2 timings."""
    dropped = m.get("dropped") or {}
    lat = m.get("latency_ms") or {}
    stages = (m.get("stages") or {}).items()
    table2 = ", ".join(f"{name} {t.get('mean_ms', float('nan')):.1f} ms" for name, t in stages)
    return (
        f"echod: {m['stage']} ({m.get('model')}, {m.get('engine')} {m.get('device')}): "
        f"{frames_in} in = {m['frames_out']} out + {sum(dropped.values())} dropped | "
        f"{m.get('fps') or 0:.1f} fps | latency p50 {lat.get('p50', float('nan')):.1f} ms p99 "
        f"{lat.get('p99', float('nan')):.1f} ms | {table2 or 'no timings'}"
    )
