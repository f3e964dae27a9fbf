"""The dashboard web server's limits, over real sockets (issue 13, hole 10): a client that sends
nothing, or trickles a request a byte at a time, is dropped after the request timeout; past the
connection cap a connection gets a quick 503 and no thread, and the server serves again once
connections end; a malformed Content-Length is a JSON 400 (a huge one 413), never a traceback."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager

import pytest
from dashboard_helpers import serving
from streaming import wait_for

from dashboard.server import DashboardServer


@contextmanager
def limited(redis_url: str, **limits):
    """A web server with `limits` (constructor arguments) on a fresh dashboard's consumer."""
    with serving(redis_url) as d:
        server = DashboardServer(d.consumer, "127.0.0.1", 0, **limits)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  daemon=True)
        thread.start()
        try:
            yield server
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)


def connect(server: DashboardServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10)


def raw_request(server: DashboardServer, method: str, path: str, headers: dict[str, str],
                body: bytes = b"") -> bytes:
    """A request written by hand (header values as Latin-1, as HTTP reads them)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{server.server_address[1]}",
             "Connection: close"] + [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def exchange(server: DashboardServer, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `request` on a new connection, read until the server closes it: (status, headers,
    body); status 0 when the connection was closed without an answer."""
    with connect(server) as sock:
        sock.sendall(request)
        answer = read_to_end(sock)
    if not answer:
        return 0, {}, b""
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, body


def read_to_end(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def closed_by_server(sock: socket.socket, more: bytes) -> bool:
    """Whether the server closed `sock` (or reset it, on unread bytes); if not, send `more`."""
    try:
        if sock.recv(1) == b"":
            return True
    except TimeoutError:
        pass
    except ConnectionResetError:
        return True
    try:
        sock.sendall(more)
    except (BrokenPipeError, ConnectionResetError):
        return True
    return False


def summary_status(server: DashboardServer) -> int:
    return exchange(server, raw_request(server, "GET", "/api/summary", {}))[0]


def handler_threads() -> int:
    return sum("process_request_thread" in thread.name for thread in threading.enumerate())


def test_a_silent_connection_is_closed_after_the_timeout(redis_server, capsys) -> None:
    with limited(redis_server.url, timeout_s=0.5) as server, connect(server) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server, well before the 10 s socket timeout
        assert time.monotonic() - started < 8
        assert summary_status(server) == 200
    assert "Traceback" not in capsys.readouterr().err


def test_a_trickling_request_is_dropped_at_its_deadline(redis_server, capsys) -> None:
    """A byte every 0.1 s never waits 0.5 s for one read, but the whole request must arrive in
    0.5 s (a slow-loris client holds no connection for longer)."""
    with limited(redis_server.url, timeout_s=0.5) as server, connect(server) as sock:
        sock.sendall(b"GET /api/summary HTTP/1.1\r\n")
        sock.settimeout(0.1)
        started = time.monotonic()
        while not closed_by_server(sock, b"X"):  # never a whole header line
            assert time.monotonic() - started < 8, "a request that never ends kept its connection"
    assert "Traceback" not in capsys.readouterr().err


def test_a_request_arriving_in_pieces_within_the_timeout_is_served(redis_server) -> None:
    with limited(redis_server.url, timeout_s=5.0) as server, connect(server) as sock:
        request = raw_request(server, "GET", "/api/summary", {})
        for start in range(0, len(request), 20):
            sock.sendall(request[start:start + 20])
            time.sleep(0.02)
        assert read_to_end(sock).startswith(b"HTTP/1.1 200 ")


def test_connections_past_the_cap_get_a_quick_503_and_no_thread(redis_server) -> None:
    wait_for(lambda: handler_threads() == 0, timeout=30, what="earlier tests' handlers to end")
    with limited(redis_server.url, max_connections=4, timeout_s=60.0) as server:
        idle = [connect(server) for _ in range(4)]  # accepted first: they hold the 4 slots
        try:
            wait_for(lambda: handler_threads() == 4, timeout=30, what="4 connections served")
            started = time.monotonic()
            status, headers, body = exchange(server, raw_request(server, "GET", "/api/summary", {}))
            assert time.monotonic() - started < 5
            assert status == 503 and headers["Retry-After"] == "1"
            assert "busy" in json.loads(body)["error"]
            for _ in range(20):  # a flood of silent connections: each answered and closed at once
                with connect(server) as sock:
                    assert read_to_end(sock).startswith(b"HTTP/1.1 503 ")
            assert handler_threads() == 4
        finally:
            for sock in idle:
                sock.close()
        wait_for(lambda: summary_status(server) == 200, timeout=30, what="a slot freed")
        wait_for(lambda: handler_threads() == 0, timeout=30, what="the handler threads to end")


@pytest.fixture(scope="module")
def default_server(redis_server):
    """One server with the default limits for the header tests."""
    with limited(redis_server.url) as server:
        yield server


@pytest.mark.parametrize(("length", "status"), [
    ("²", 400), ("¹", 400), ("-1", 400), ("+4", 400), ("abc", 400), ("", 400), ("1_0", 400),
    ("0x10", 400), ("4,4", 400), ("99999999999", 413), ("9" * 40, 413), (None, 411),
])
def test_malformed_content_length_is_a_clean_error(default_server, capsys, length, status) -> None:
    headers = {"Content-Type": "application/json"}
    if length is not None:
        headers["Content-Length"] = length
    request = raw_request(default_server, "POST", "/api/confirm", headers, b"{}")
    got, _, body = exchange(default_server, request)
    assert got == status, body
    assert json.loads(body)["error"]
    assert summary_status(default_server) == 200
    assert "Traceback" not in capsys.readouterr().err


def test_two_content_lengths_are_refused(default_server) -> None:
    request = raw_request(default_server, "POST", "/api/confirm",
                          {"Content-Type": "application/json", "Content-Length": "2"}, b"{}")
    twice = request.replace(b"Content-Length: 2\r\n", b"Content-Length: 2\r\nContent-Length: 9\r\n")
    got, _, body = exchange(default_server, twice)
    assert got == 400 and "one number" in json.loads(body)["error"]
