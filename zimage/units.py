"""The one formatter of byte counts for people (logs, panels, the operations card)."""

from __future__ import annotations


def human_bytes(n: float | None, decimals: int = 2) -> str:
    """1536 -> '1.50 KiB'; whole bytes below 1 KiB; '–' when unknown."""
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{decimals}f} {unit}"
        n /= 1024
    return f"{n:.{decimals}f} TiB"
