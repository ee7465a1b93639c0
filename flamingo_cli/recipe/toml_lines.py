"""Map dotted TOML keys to the line that sets them (tomllib keeps no positions)."""

from __future__ import annotations

import re

_BARE = re.compile(r"[A-Za-z0-9_-]+")
_TABLE = re.compile(r"^\s*(\[\[?)\s*(.+?)\s*\]\]?\s*(#.*)?$")


def _parse_key(text: str) -> tuple[list[str], str]:
    """Parse a dotted key (bare or quoted parts) from the start of `text`; return parts, rest."""
    parts: list[str] = []
    rest = text.lstrip()
    while rest:
        if rest[0] in "\"'":
            quote = rest[0]
            end = rest.find(quote, 1)
            if end < 0:
                break
            parts.append(rest[1:end])
            rest = rest[end + 1 :].lstrip()
        else:
            match = _BARE.match(rest)
            if not match:
                break
            parts.append(match.group(0))
            rest = rest[match.end() :].lstrip()
        if rest.startswith("."):
            rest = rest[1:].lstrip()
        else:
            break
    return parts, rest


def _bracket_balance(value: str) -> tuple[int, str | None]:
    """Net open brackets in `value` outside strings, and an unclosed multi-line string quote."""
    depth = 0
    i = 0
    while i < len(value):
        c = value[i]
        if value.startswith('"""', i) or value.startswith("'''", i):
            quote = value[i : i + 3]
            end = value.find(quote, i + 3)
            if end < 0:
                return depth, quote
            i = end + 3
            continue
        if c in "\"'":
            end = i + 1
            while end < len(value) and value[end] != c:
                end += 2 if c == '"' and value[end] == "\\" else 1
            i = end + 1
            continue
        if c == "#":
            break
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        i += 1
    return depth, None


def _inline_keys(value: str, prefix: list[str], line: int, out: dict[str, int]) -> None:
    """Record the keys of an inline table `{a = 1, b.c = 2}` written on one line."""
    body = value.strip()
    if not (body.startswith("{") and body.endswith("}")):
        return
    for item in body[1:-1].split(","):
        parts, rest = _parse_key(item)
        if parts and rest.startswith("="):
            out.setdefault(".".join(prefix + parts), line)


def key_lines(text: str) -> dict[str, int]:
    """Return {dotted key: 1-based line} for tables and keys defined in a TOML document.

    Arrays of tables are recorded with their index (`a.0.b`). Values spanning several lines
    (arrays, multi-line strings) are attributed to the line where the key appears.
    """
    out: dict[str, int] = {}
    table: list[str] = []
    array_counts: dict[str, int] = {}
    depth = 0
    open_quote: str | None = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if open_quote is not None:
            if open_quote in raw:
                remainder = raw.split(open_quote, 1)[1]
                delta, open_quote = _bracket_balance(remainder)
                depth = max(depth + delta, 0)
            continue
        if depth > 0:
            delta, open_quote = _bracket_balance(raw)
            depth = max(depth + delta, 0)
            continue
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        header = _TABLE.match(raw)
        if stripped.startswith("[") and header:
            parts, _ = _parse_key(header.group(2))
            name = ".".join(parts)
            if header.group(1) == "[[":
                index = array_counts.get(name, 0)
                array_counts[name] = index + 1
                table = [*parts, str(index)]
            else:
                table = parts
            out.setdefault(".".join(table), lineno)
            continue
        parts, rest = _parse_key(raw)
        if not parts or not rest.startswith("="):
            continue
        full = [*table, *parts]
        for i in range(len(table) + 1, len(full)):
            out.setdefault(".".join(full[:i]), lineno)
        out[".".join(full)] = lineno
        value = rest[1:]
        _inline_keys(value, full, lineno, out)
        delta, open_quote = _bracket_balance(value)
        depth = max(delta, 0)
    return out


def line_of(lines: dict[str, int], key: str) -> int | None:
    """The line of `key`, or of its nearest defined parent table."""
    parts = key.split(".")
    while parts:
        found = lines.get(".".join(parts))
        if found is not None:
            return found
        parts.pop()
    return None
