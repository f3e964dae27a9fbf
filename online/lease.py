"""The leader lease of a line's online updater: one updater publishes, a standby takes over
when the lease lapses (a Redis key with an expiry, renewed and released only by its holder)."""

from __future__ import annotations

import redis

from pipeline.streams import as_text

# Renew the lease only if we hold it, else take it if free; 1 when held afterwards.
_TAKE_OR_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class Lease:
    """A lease `key` that `holder` takes, renews for `ms` milliseconds, and hands back."""

    def __init__(self, client: redis.Redis, key: str, holder: str, ms: int):
        self.client, self.key, self.holder, self.ms = client, key, holder, ms
        self._take_or_renew = client.register_script(_TAKE_OR_RENEW)
        self._release = client.register_script(_RELEASE)

    def renew(self) -> bool:
        """Renew the lease (or take it when free); True while `holder` holds it."""
        return bool(self._take_or_renew(keys=[self.key], args=[self.holder, self.ms]))

    def release(self) -> None:
        """Hand the lease back, if `holder` still holds it."""
        self._release(keys=[self.key], args=[self.holder])

    def current_holder(self) -> str | None:
        value = self.client.get(self.key)
        return None if value is None else as_text(value)
