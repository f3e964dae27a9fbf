"""How a consumer takes back entries that its group delivered and nobody acknowledged.

A worker that dies leaves its entries pending, and so does one whose processing failed (left for
a retry). After each (re)start a consumer re-reads its own pending entries once; entries idle in
any consumer's hands for longer than a given time (a dead worker's, or this one's own failures)
are claimed (XPENDING, then XCLAIM). Each comes with how often it was delivered, so that the
stage runner can dead-letter an entry that keeps failing instead of retrying it forever.
"""

from __future__ import annotations

import logging

import redis

from pipeline.streams import as_text

log = logging.getLogger(__name__)


class PendingEntries:
    """The pending entries of `group` on `stream`, as `consumer` takes them back; an entry whose
    delivery count cannot be read counts as delivered `max_deliveries` times."""

    def __init__(self, client: redis.Redis, stream: str, group: str, consumer: str,
                 max_deliveries: int):
        self.client, self.stream, self.group, self.consumer = client, stream, group, consumer
        self.max_deliveries = max_deliveries
        self._cursor: str | None = "0"  # own pending entries, re-read after (re)start

    def restart(self) -> None:
        """Re-read this consumer's own pending entries (after a start or a reconnect)."""
        self._cursor = "0"

    def own(self, count: int) -> tuple[list[tuple[str, dict]], dict[str, int]]:
        """Up to `count` more of this consumer's own pending entries, with their delivery
        counts: each once after a restart, then none."""
        if self._cursor is None:
            return [], {}
        response = self.client.xreadgroup(self.group, self.consumer, {self.stream: self._cursor},
                                          count=count)
        entries = entries_of(response)
        if entries:
            self._cursor = entries[-1][0]  # each pending entry once, then move on
            return entries, self._deliveries([e[0] for e in entries])
        self._cursor = None
        return [], {}

    def claim(self, idle_ms: int, count: int) -> tuple[list[tuple[str, dict]], dict[str, int]]:
        """Up to `count` entries left pending longer than `idle_ms` (a dead worker's, or this one's
        own failures to retry), with their delivery counts. An entry trimmed by MAXLEN meanwhile
        comes back without fields: the runner dead-letters it, so it never blocks the list."""
        stale = self.client.xpending_range(self.stream, self.group, min="-", max="+",
                                           count=count, idle=idle_ms)
        if not stale:
            return [], {}
        ids = [as_text(p["message_id"]) for p in stale]
        claimed = self.client.xclaim(self.stream, self.group, self.consumer, idle_ms, ids)
        found = {as_text(i): f for i, f in claimed if i is not None and f}
        missing = [i for i in ids if i not in found]
        if missing:  # trimmed ones are now ours (Redis 6.2) but have no fields left
            mine = self.client.xpending_range(self.stream, self.group, min=missing[0],
                                              max=missing[-1], count=len(ids),
                                              consumername=self.consumer)
            found |= {as_text(p["message_id"]): {} for p in mine if as_text(p["message_id"]) in missing}
        entries = [(i, found[i]) for i in ids if i in found]
        if entries:
            log.info("%s: claimed %d entries pending for over %d ms", self.group, len(entries),
                     idle_ms)
        counts = {as_text(p["message_id"]): int(p["times_delivered"]) + 1 for p in stale}
        return entries, counts

    def _deliveries(self, ids: list[str]) -> dict[str, int]:
        """How often each of this consumer's pending entries was delivered so far."""
        info = self.client.xpending_range(self.stream, self.group, min=ids[0], max=ids[-1],
                                          count=len(ids), consumername=self.consumer)
        counts = {as_text(p["message_id"]): int(p["times_delivered"]) for p in info}
        return {i: counts.get(i, self.max_deliveries) for i in ids}


def entries_of(response) -> list[tuple[str, dict]]:
    """Flatten an XREADGROUP reply to [(entry id, fields)]; a pending entry trimmed meanwhile
    has empty fields."""
    out = []
    for _, entries in response or []:
        out.extend((as_text(entry_id), fields or {}) for entry_id, fields in entries)
    return out
