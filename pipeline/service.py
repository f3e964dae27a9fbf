"""One lifecycle for every long-running service of a line (stage workers, the dashboard's reader,
the online updater), in the shape of rq's worker: bootstrap, then step until stopped, then
teardown.

What each service used to re-implement lives here once: the stop event, waiting out a Redis
outage (backoff, one log line per attempt) and bootstrapping again after it, backoff on Redis
error replies, and the errors that end a service with one line instead of retrying forever
(credentials Redis refuses, `RedisUnavailableError`). Subclasses say what one step is.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import redis

from pipeline.connection import (
    TRANSIENT,
    Backoff,
    await_redis,
    client_url,
    credentials_refused,
    first_line,
)
from pipeline.errors import RedisUnavailableError

log = logging.getLogger(__name__)


class Service:
    """A loop of `step`s on one Redis, with `bootstrap` before it (and after every reconnect)
    and `teardown` after it. `run` returns when `stop_event` is set, when a step set `done`, or
    when nothing came for `max_idle_s`. `url` (for messages and reconnects) defaults to the
    client's own address."""

    name = "service"

    def __init__(self, client: redis.Redis, url: str | None = None,
                 stop_event: threading.Event | None = None):
        self.client = client
        self.url = url or client_url(client)
        self.stop_event = stop_event or threading.Event()
        self.done = False  # a step sets it when the work is over (a source that ended)
        self.reconnects = 0

    # --- what a service defines -----------------------------------------------------------------

    def bootstrap(self) -> None:
        """Create what the steps need in Redis (consumer groups...); again after a reconnect."""

    def step(self) -> int:
        """Do one unit of work; returns how many items it handled (0: idle)."""
        raise NotImplementedError

    def teardown(self) -> None:
        """Leave cleanly (remove the heartbeat, hand a lease over); Redis may be gone."""

    def on_error_reply(self, error: redis.ResponseError, delay: float) -> None:
        """A Redis error reply (out of memory, a read-only replica after failover, a group lost
        with Redis's data): by default wait `delay` and bootstrap again."""
        log.warning("%s: Redis refused a command (%s); retrying in %.1f s", self.name,
                    first_line(error), delay)
        self.stop_event.wait(delay)
        with contextlib.suppress(redis.RedisError):
            self.bootstrap()

    # --- the lifecycle --------------------------------------------------------------------------

    def run(self, max_idle_s: float | None = None) -> None:
        """bootstrap -> step... -> teardown; refused credentials end it (RedisUnavailableError)."""
        try:
            if not self._attempt(self.bootstrap):
                return
            idle_since = time.monotonic()
            delays = Backoff().delays()
            while not self.stop_event.is_set() and not self.done:
                try:
                    handled = self.step()
                except redis.ResponseError as error:
                    if credentials_refused(error):
                        raise self._refused(error) from None
                    self.on_error_reply(error, next(delays))
                    continue
                except TRANSIENT as error:
                    if not self._reconnect(error):
                        break
                    continue
                delays = Backoff().delays()
                if handled:
                    idle_since = time.monotonic()
                elif max_idle_s is not None and time.monotonic() - idle_since > max_idle_s:
                    break
        finally:
            with contextlib.suppress(*TRANSIENT):
                self.teardown()

    def _attempt(self, action) -> bool:
        """Run `action`, waiting out Redis outages; False when stopped first."""
        while not self.stop_event.is_set():
            try:
                action()
                return True
            except TRANSIENT as error:
                if not self._reconnect(error, then_bootstrap=False):
                    return False
        return False

    def _reconnect(self, error: Exception, then_bootstrap: bool = True) -> bool:
        """Wait for Redis after `error` (a lost connection), then bootstrap again; False when
        stopped while waiting."""
        if credentials_refused(error):
            raise self._refused(error) from None
        self.reconnects += 1
        log.warning("%s: lost Redis (%s); reconnecting", self.name, first_line(error))
        if not await_redis(self.client, self.url, self.stop_event):
            return False
        return not then_bootstrap or self._attempt(self.bootstrap)

    def _refused(self, error: Exception) -> RedisUnavailableError:
        return RedisUnavailableError(f"{self.name}: Redis refused the credentials "
                                     f"({first_line(error)})")
