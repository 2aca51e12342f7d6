"""`regate zoo list`: the entries as a table, and the formats a checkpoint directory can have."""

from __future__ import annotations

from .catalog import entries
from .formats import FORMATS


def format_table() -> str:
    rows = [("name", "format", "availability", "reference LLM", "tokens", "results")]
    for e in entries().values():
        rows.append(
            (
                e.name,
                e.format,
                e.availability,
                e.reference_llm,
                f"{e.tokens_used:,}" if e.tokens_used else "-",
                e.headline(),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    table = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows)
    return f"{table}\n\ncheckpoint formats (`regate zoo load DIR` detects them): {', '.join(FORMATS.names())}"
