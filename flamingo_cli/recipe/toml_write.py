"""Write nested dicts of scalars and lists as TOML (enough for recipes; no dates)."""

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


def dumps(data: dict[str, Any], comments: dict[str, str] | None = None) -> str:
    """TOML text for `data`; `comments` maps dotted keys to a comment placed above them."""
    comments = comments or {}
    lines: list[str] = []

    def table(prefix: str, node: dict[str, Any]) -> None:
        scalars = {k: v for k, v in node.items() if not isinstance(v, dict) and v is not None}
        tables = {k: v for k, v in node.items() if isinstance(v, dict)}
        if prefix and scalars:
            if lines:
                lines.append("")
            lines.append(f"[{prefix}]")
        for key, value in scalars.items():
            full = f"{prefix}.{key}" if prefix else key
            if full in comments:
                lines.append(f"# {comments[full]}")
            lines.append(f"{key} = {_value(value)}")
        for key, value in tables.items():
            table(f"{prefix}.{key}" if prefix else key, value)

    table("", data)
    return "\n".join(lines) + "\n"
