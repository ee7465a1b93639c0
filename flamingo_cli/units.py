"""Numbers as people read them, for messages the library writes and tables the UI draws."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """Binary units with one decimal: 512 B, 1.5 KiB, 37.3 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
