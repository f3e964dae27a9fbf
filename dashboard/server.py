"""The dashboard's web server: the page, its JSON API, overlay images and Prometheus `/metrics`.

Standard library only (`ThreadingHTTPServer`): a handful of routes answered from the consumer's
memory, so a request never waits on the stream reader. Safety: it binds 127.0.0.1 unless told
otherwise; exposed on another address it refuses to start without an access token, which every
write (POST) must carry. On loopback it answers only requests addressed to loopback host names
(no DNS rebinding); writes must be same-origin JSON with a small body. Files are served from a
fixed list loaded at start and images only for frames the gallery holds: no path ever comes
from a request. Limits: each request must arrive whole within a timeout (a silent or trickling
client is dropped, not held), at most a fixed number of connections get a thread (the rest a
quick 503), and a Content-Length is plain ASCII digits or the request is refused.
"""

from __future__ import annotations

import contextlib
import hmac
import io
import ipaddress
import json
import logging
import re
import socket
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

import redis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dashboard.consumer import DashboardConsumer
from dashboard.plain import plain
from dashboard.prometheus import build_registry
from glad.errors import GladError
from pipeline.errors import MessageError, PipelineError
from pipeline.feedback import VERDICTS

log = logging.getLogger(__name__)

STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8"}
MAX_BODY = 4096  # bytes of a POST body
MAX_CONNECTIONS = 64  # connections served at once: a thread each; more are answered 503
REQUEST_TIMEOUT_S = 10.0  # for a request to arrive whole (from connecting or the last answer)
CONTENT_LENGTH = re.compile(r"[0-9]+")  # not isdigit() ("²", then int() fails) nor int() ("-1", "1_0")
MAX_FRAME_ID = 256
TOKEN_HEADER = "X-Glad-Token"
FRAME_PATH = re.compile(r"^/api/frames/([^/]{1,800})\.jpg$")
CONFIRM_FIELDS = {"frame_id", "verdict", "by", "note"}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_static() -> dict[str, tuple[bytes, str]]:
    """The page's files (shipped in the package), by name: the only files ever served."""
    folder = resources.files("dashboard") / "static"
    return {item.name: (item.read_bytes(), STATIC_TYPES[suffix]) for item in folder.iterdir()
            if (suffix := "." + item.name.rpartition(".")[2]) in STATIC_TYPES}


class DashboardServer(ThreadingHTTPServer):
    """Serves one consumer's line; `url` is where the page is.

    At most `max_connections` connections are served at once, each dropped when a request takes
    over `timeout_s` to arrive: idle sockets, slow clients and a flood of connections can neither
    pile up threads nor take the file descriptors that real requests need."""

    daemon_threads = True

    def __init__(self, consumer: DashboardConsumer, host: str = "127.0.0.1", port: int = 8765,
                 token: str | None = None, max_connections: int = MAX_CONNECTIONS,
                 timeout_s: float = REQUEST_TIMEOUT_S):
        if not is_loopback(host) and not token:
            raise PipelineError(f"--host {host} exposes the dashboard beyond this machine: pass "
                                "--token (or set GLAD_DASHBOARD_TOKEN) so that only holders can "
                                "confirm frames")
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            super().__init__((host, port), Handler)
        except OSError as error:
            raise PipelineError(f"cannot serve the dashboard on {host}:{port}: {error.strerror} "
                                "(pass --port, 0 picks a free one)") from None
        self.consumer = consumer
        self.slots = threading.BoundedSemaphore(max_connections)
        self.timeout_s = timeout_s
        self.token = token or None
        self.host = host
        self.static = load_static()
        self.registry = build_registry(consumer.summary)
        bound = self.server_address[1]
        self.allowed_hosts = {f"{name}:{bound}" for name in ("127.0.0.1", "localhost", "[::1]")} \
            if is_loopback(host) else None  # None: any Host header (exposed on purpose)

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1"
        return f"http://{host}:{self.server_address[1]}/"

    def process_request(self, request: socket.socket, client_address) -> None:
        """A thread for the connection while a slot is free; past the cap, a 503 right here."""
        if not self.slots.acquire(blocking=False):
            turn_away(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self.slots.release()  # no thread started, so none will release it
            raise

    def process_request_thread(self, request: socket.socket, client_address) -> None:
        """The connection's thread; its slot is freed however the handler ends."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class Handler(BaseHTTPRequestHandler):
    """One request; routes below."""

    server: DashboardServer
    protocol_version = "HTTP/1.1"  # keep-alive: a page's polls reuse their connections
    disable_nagle_algorithm = True  # headers and body go out at once, not 40 ms apart
    server_version = "glad-dashboard"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        """The socket's timeout (StreamRequestHandler sets it) and reads under a deadline."""
        self.timeout = self.server.timeout_s
        super().setup()
        self.rfile.close()  # the socket's own reader: an open one would keep the socket open
        self.reader = DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self) -> None:
        """One request, which must arrive whole in time; a timeout ends the connection with a
        debug line (the base class catches it), not a traceback."""
        self.reader.start()
        super().handle_one_request()

    # --- GET ------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        if not self._host_allowed():
            return
        path, _, query = self.path.partition("?")
        consumer = self.server.consumer
        try:
            if path in ("/", "/index.html"):
                self._static("index.html")
            elif path.startswith("/static/"):
                self._static(path[len("/static/"):])
            elif path == "/api/summary":
                summary = consumer.summary() | {"writes_need_token": self.server.token is not None}
                self._json(summary)
            elif path == "/api/series":
                latest, points = consumer.series(self._since(query))
                self._json({"seq": latest, "points": points})
            elif path == "/api/gallery":
                gallery = consumer.gallery_since(self._since(query))
                for item in gallery["items"]:
                    item["image"] = frame_url(item["frame_id"])
                self._json(gallery)
            elif path == "/metrics":
                self._send(HTTPStatus.OK, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
            elif (match := FRAME_PATH.match(path)) is not None:
                self._picture(urllib.parse.unquote(match.group(1)))
            else:
                self._error(HTTPStatus.NOT_FOUND, "not found")
        except BadRequest as error:
            self._error(HTTPStatus.BAD_REQUEST, str(error))
        except redis.RedisError:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, "Redis is unavailable; try again")

    def _static(self, name: str) -> None:
        found = self.server.static.get(name)
        if found is None:
            self._error(HTTPStatus.NOT_FOUND, "not found")
            return
        data, content_type = found
        self._send(HTTPStatus.OK, data, content_type, cache="no-cache")

    def _picture(self, frame_id: str) -> None:
        try:
            picture = self.server.consumer.picture(frame_id)
        except (MessageError, ValueError) as error:
            self._error(HTTPStatus.NOT_FOUND, f"no picture for this frame: {error}")
            return
        if picture is None:
            self._error(HTTPStatus.NOT_FOUND, "no such frame in the gallery")
            return
        self._send(HTTPStatus.OK, picture, "image/jpeg", cache="private, max-age=3600")

    @staticmethod
    def _since(query: str) -> int:
        values = urllib.parse.parse_qs(query).get("since", ["0"])
        if len(values) != 1 or not values[0].isdigit() or len(values[0]) > 18:
            raise BadRequest("since must be one non-negative integer")
        return int(values[0])

    # --- POST -----------------------------------------------------------------------------------

    def do_POST(self) -> None:
        if not self._host_allowed():
            return
        if self.path != "/api/confirm":
            self._error(HTTPStatus.NOT_FOUND, "not found")
            return
        try:
            self._authorize()
            frame_id, verdict, by, note = _confirmation(self._body())
            if not self.server.consumer.knows(frame_id):
                raise Refused(HTTPStatus.NOT_FOUND, f"frame {frame_id!r} was not scored recently "
                                                    "on this line")
            entry = self.server.consumer.confirm(frame_id, verdict, by, note)
        except (Refused, BadRequest, GladError, redis.RedisError) as error:
            self.close_connection = True  # the body may be left unread
            if isinstance(error, Refused):
                self._error(error.status, str(error))
            elif isinstance(error, redis.RedisError):
                self._error(HTTPStatus.SERVICE_UNAVAILABLE, "Redis is unavailable; try again")
            else:
                self._error(HTTPStatus.BAD_REQUEST, str(error))
            return
        log.info("frame %s confirmed %s by %s (%s)", frame_id, verdict, by, entry)
        self._json({"entry": entry, "frame_id": frame_id, "verdict": verdict})

    def _authorize(self) -> None:
        """The token (when the server has one) and same-origin (when the browser says)."""
        origin = self.headers.get("Origin")
        host = self.headers.get("Host", "")
        if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
            raise Refused(HTTPStatus.FORBIDDEN, "cross-origin writes are refused")
        if self.server.token is None:
            return
        given = self.headers.get(TOKEN_HEADER)
        authorization = self.headers.get("Authorization", "")
        if given is None and authorization.startswith("Bearer "):
            given = authorization[len("Bearer "):]
        if not given:
            raise Refused(HTTPStatus.UNAUTHORIZED, f"this dashboard needs its access token for "
                                                   f"writes (header {TOKEN_HEADER})")
        if not hmac.compare_digest(given.encode(), self.server.token.encode()):
            raise Refused(HTTPStatus.FORBIDDEN, "wrong access token")

    def _body(self) -> dict:
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise Refused(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the request as application/json")
        raw = self.rfile.read(self._content_length())
        try:
            request = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise BadRequest(f"body is not JSON: {error}") from None
        if not isinstance(request, dict):
            raise BadRequest("body must be a JSON object")
        return request

    def _content_length(self) -> int:
        """The body's size: one Content-Length of ASCII digits, at most MAX_BODY."""
        lengths = self.headers.get_all("Content-Length", [])
        if not lengths:
            raise Refused(HTTPStatus.LENGTH_REQUIRED, "a Content-Length is required")
        if len(lengths) > 1 or not CONTENT_LENGTH.fullmatch(lengths[0]):
            raise BadRequest("Content-Length must be one number of bytes (ASCII digits)")
        if len(lengths[0]) > 18 or int(lengths[0]) > MAX_BODY:
            raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY} bytes")
        return int(lengths[0])

    # --- answers --------------------------------------------------------------------------------

    def _host_allowed(self) -> bool:
        allowed = self.server.allowed_hosts
        if allowed is None or self.headers.get("Host", "") in allowed:
            return True
        self._error(HTTPStatus.BAD_REQUEST, "unexpected Host header")
        return False

    def _json(self, data) -> None:
        body = json.dumps(plain(data), separators=(",", ":"), allow_nan=False).encode()
        self._send(HTTPStatus.OK, body, "application/json")

    def _error(self, status: HTTPStatus, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, body, "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str,
              cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class DeadlineReader(io.RawIOBase):
    """A connection's reads under one deadline per request, so that a client trickling a byte
    at a time (slow loris) is dropped like a silent one instead of resetting a per-read timeout."""

    def __init__(self, connection: socket.socket, timeout_s: float):
        self.connection = connection
        self.timeout_s = timeout_s
        self.start()

    def start(self) -> None:
        """The next request must have arrived `timeout_s` from now."""
        self.deadline = time.monotonic() + self.timeout_s

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.connection.settimeout(left)
        try:
            return self.connection.recv_into(buffer)
        finally:
            self.connection.settimeout(self.timeout_s)  # writes keep the plain timeout


def busy_answer() -> bytes:
    """The whole 503 sent to connections past the cap (built once)."""
    body = json.dumps({"error": "the dashboard is busy; try again"}).encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)),
               "Cache-Control": "no-store", "Retry-After": "1", "Connection": "close"}
    lines = "".join(f"{name}: {value}\r\n" for name, value in (headers | SECURITY_HEADERS).items())
    return f"HTTP/1.1 503 Service Unavailable\r\n{lines}\r\n".encode() + body


BUSY = busy_answer()


def turn_away(request: socket.socket) -> None:
    """Answer a connection past the cap without waiting on it: what the client already sent is
    read (closing on unread bytes would reset the connection before the client reads the 503)
    and the answer fits a fresh socket's send buffer; whatever fails, the caller closes it."""
    request.setblocking(False)
    with contextlib.suppress(OSError):  # nothing sent yet (BlockingIOError) or already gone
        request.recv(65536)
    with contextlib.suppress(OSError):
        request.sendall(BUSY)


class BadRequest(Exception):
    """A request the client must fix (400)."""


class Refused(Exception):
    """A request refused with a given status."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def frame_url(frame_id: str) -> str:
    """The overlay image's path of a gallery frame (any frame id, quoted as one path segment)."""
    return f"/api/frames/{urllib.parse.quote(frame_id, safe='')}.jpg"


def _confirmation(request: dict) -> tuple[str, str, str, str]:
    """(frame id, verdict, by, note) of a confirm request, each checked."""
    unknown = set(request) - CONFIRM_FIELDS
    if unknown:
        raise BadRequest(f"unexpected fields {sorted(unknown)} (expected {sorted(CONFIRM_FIELDS)})")
    frame_id = request.get("frame_id")
    if not isinstance(frame_id, str) or not 0 < len(frame_id) <= MAX_FRAME_ID:
        raise BadRequest(f"frame_id must be a string of 1 to {MAX_FRAME_ID} characters")
    verdict = request.get("verdict")
    if verdict not in VERDICTS:
        raise BadRequest(f"verdict must be one of {list(VERDICTS)}")
    by = request.get("by", "dashboard")
    if not isinstance(by, str) or not 0 < len(by) <= 64 or not by.isprintable():
        raise BadRequest("by must be a printable string of 1 to 64 characters")
    note = request.get("note", "")
    if not isinstance(note, str) or len(note) > 500:
        raise BadRequest("note must be a string of at most 500 characters")
    return frame_id, verdict, by, note
