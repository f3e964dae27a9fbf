"""Redis connections: from `REDIS_URL` (AUTH and TLS through the URL) or an embedded server;
a URL of any node of a Redis Cluster gives a cluster client (a line's keys share one hash slot).

`connect` never hangs silently and never spams tracebacks: while Redis is unreachable it logs one
line per attempt and retries with exponential backoff, then gives up with `RedisUnavailableError`
(or keeps trying forever, which is what long-running workers ask for).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.parse
from dataclasses import dataclass

import redis

from pipeline.errors import RedisUnavailableError

log = logging.getLogger(__name__)

TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: initial, initial x factor, ... capped at `maximum` seconds, for
    Redis and for live sources alike. `max_attempts` consecutive failures are where a caller
    gives up (None: never)."""

    initial: float = 0.2
    factor: float = 2.0
    maximum: float = 5.0
    max_attempts: int | None = None

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th consecutive failure (1-based)."""
        return min(self.maximum, self.initial * self.factor ** (failures - 1))

    def delays(self):
        """The waits after the 1st, 2nd, ... failure, without end."""
        failures = 0
        while True:
            failures += 1
            yield self.delay(failures)


def first_line(error: Exception) -> str:
    """An error's first line, or its type when it has no text (for one-line logs)."""
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__


def redis_url(url: str | None = None) -> str | None:
    """The Redis URL to use: `url`, else `REDIS_URL`, else None (start an embedded server)."""
    return url or os.environ.get("REDIS_URL") or None


def redact(url: str) -> str:
    """`url` without its password, for logs and messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def connect(url: str, wait: float | None = 30.0, backoff: Backoff = Backoff(),
            stop: threading.Event | None = None) -> redis.Redis:
    """A client for `url` (redis://, rediss:// for TLS, unix://), checked with PING.

    Retries for `wait` seconds (None: until `stop` is set) and raises `RedisUnavailableError`
    with the reason; wrong credentials fail at once.
    """
    tcp = {} if url.startswith("unix://") else {"socket_connect_timeout": 5,
                                                 "socket_keepalive": True}
    try:
        client = redis.Redis.from_url(url, health_check_interval=15, **tcp)
    except ValueError as error:
        raise RedisUnavailableError(f"bad Redis URL {redact(url)!r}: {error}") from None
    wait_until_reachable(client, url, wait, backoff, stop)
    if _cluster_enabled(client):  # any node's address will do: the client finds the others
        client.close()
        client = redis.RedisCluster.from_url(url, **tcp)
        wait_until_reachable(client, url, wait, backoff, stop)
    return client


def _cluster_enabled(client: redis.Redis) -> bool:
    """Whether the server is a Redis Cluster node (INFO's cluster section)."""
    try:
        return bool(client.info("cluster").get("cluster_enabled"))
    except redis.ResponseError:  # a proxy or server that hides INFO
        return False


def wait_until_reachable(client: redis.Redis, url: str, wait: float | None = 30.0,
                         backoff: Backoff = Backoff(), stop: threading.Event | None = None) -> None:
    """PING until it answers; one log line per failed attempt (no traceback)."""
    deadline = None if wait is None else time.monotonic() + wait
    for delay in backoff.delays():
        try:
            client.ping()
            return
        except (redis.AuthenticationError, redis.ResponseError) as error:
            text = str(error)
            if not credentials_refused(error):
                raise
            if urllib.parse.urlsplit(url).password is None:
                raise RedisUnavailableError(f"Redis at {redact(url)} needs a password: put it in "
                                            "the URL (redis://:PASSWORD@host:6379/0)") from None
            raise RedisUnavailableError(f"Redis at {redact(url)} refused the credentials: "
                                        f"{text}") from None
        except TRANSIENT as error:
            reason = first_line(error)
            if deadline is not None and time.monotonic() + delay > deadline:
                raise RedisUnavailableError(f"Redis at {redact(url)} is unreachable ({reason}); "
                                            "check REDIS_URL or unset it to use the embedded "
                                            "server") from None
            log.warning("Redis at %s unreachable (%s): retrying in %.1f s", redact(url), reason,
                        delay)
            if stop is not None and stop.wait(delay):
                raise RedisUnavailableError("stopped while waiting for Redis") from None
            if stop is None:
                time.sleep(delay)


def await_redis(client: redis.Redis, url: str, stop: threading.Event | None) -> bool:
    """After a lost connection, wait (backoff, one log line per attempt) until Redis answers:
    True when it does, False when `stop` was set first. Refused credentials (a rotated password)
    raise RedisUnavailableError at once: retrying cannot fix them, so a service ends with that
    one line instead of spinning on reconnects."""
    try:
        wait_until_reachable(client, url, wait=None, stop=stop)
    except RedisUnavailableError:
        if stop is not None and stop.is_set():
            return False
        raise
    return True


def credentials_refused(error: Exception) -> bool:
    """Whether a Redis error means the server refuses this client's credentials."""
    return isinstance(error, redis.AuthenticationError) or (
        isinstance(error, redis.ResponseError)
        and any(code in str(error) for code in ("NOAUTH", "WRONGPASS", "invalid password")))


def client_url(client: redis.Redis) -> str:
    """The URL a client connects to, rebuilt from its connection settings (with the password,
    which `redact` removes before anything is logged)."""
    if isinstance(client, redis.RedisCluster):
        node = client.get_default_node()
        settings = node.redis_connection.connection_pool.connection_kwargs
        return f"redis://{settings.get('host', node.host)}:{settings.get('port', node.port)}/0"
    settings = client.connection_pool.connection_kwargs
    password = settings.get("password")
    auth = f":{urllib.parse.quote(str(password), safe='')}@" if password else ""
    if settings.get("path"):
        return f"unix://{auth}{settings['path']}"
    return f"redis://{auth}{settings.get('host', 'localhost')}:{settings.get('port', 6379)}/" \
           f"{settings.get('db', 0)}"
