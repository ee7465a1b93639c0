"""Write nested dicts of scalars, lists and lists of tables as TOML (enough for recipes; no
dates)."""

from __future__ import annotations

import json
from typing import Any


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def dumps(data: dict[str, Any], comments: dict[str, str] | None = None) -> str:
    """TOML text for `data`; `comments` maps dotted keys to a comment placed above them."""
    comments = comments or {}
    lines: list[str] = []

    def table(prefix: str, node: dict[str, Any], header: str | None = None) -> None:
        arrays = {k: v for k, v in node.items() if _is_table_array(v)}
        tables = {k: v for k, v in node.items() if isinstance(v, dict)}
        scalars = {
            k: v for k, v in node.items() if k not in arrays and k not in tables and v is not None
        }
        if header is not None or (prefix and scalars):
            if lines:
                lines.append("")
            lines.append(header or f"[{prefix}]")
        for key, value in scalars.items():
            full = f"{prefix}.{key}" if prefix else key
            if full in comments:
                lines.append(f"# {comments[full]}")
            lines.append(f"{key} = {_value(value)}")
        for key, items in arrays.items():
            full = f"{prefix}.{key}" if prefix else key
            for item in items:
                table(full, item, header=f"[[{full}]]")
        for key, value in tables.items():
            table(f"{prefix}.{key}" if prefix else key, value)

    table("", data)
    return "\n".join(lines) + "\n"
