"""Plain JSON data from whatever Redis records and statistics hold."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping


def plain(value, max_items: int | None = None, max_text: int | None = None, depth: int = 0):
    """`value` as JSON-ready data: non-finite floats become None (JSON has no NaN or infinity),
    bytes their size, keys strings. With `max_items` / `max_text` (for records written by other
    programs, such as model provenance), long lists become "[N items]" and long strings are cut."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value if max_text is None or len(value) <= max_text else value[:max_text] + "…"
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    if depth > 8:
        return "…"
    if isinstance(value, Mapping):
        return {str(k): plain(v, max_items, max_text, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset) or hasattr(value, "__iter__"):
        items = list(value)
        if max_items is not None and len(items) > max_items:
            return f"[{len(items)} items]"
        return [plain(v, max_items, max_text, depth + 1) for v in items]
    return str(value)
