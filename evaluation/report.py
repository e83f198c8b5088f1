"""The one formatter of result tables (evaluation's CLI, ``make demo``, ``make compare``): markdown, a row per
model, cells formatted by the caller."""

from __future__ import annotations


def markdown_table(columns: list[str], rows: dict[str, list[str]], first: str = "features") -> str:
    """``rows`` maps each row's name to its cells, one per column, already formatted."""
    lines = [f"| {first} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()]
    return "\n".join(lines)
