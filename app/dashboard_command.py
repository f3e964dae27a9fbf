"""`glad dashboard`: the metrics consumer and its web page for one line, in one process."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from app.options import DEFAULT_DASHBOARD_PORT, add_connection, required_url
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

TOKEN_ENV = "GLAD_DASHBOARD_TOKEN"


def add_command(commands) -> None:
    parser = commands.add_parser(
        "dashboard", help="live web dashboard, JSON API and Prometheus metrics of a line",
        description="Read a line's scores and events (its own consumer group), feedback and dead "
                    "letters; serve a live page (charts, model versions, the latest anomalies "
                    "with heat maps and buttons to confirm them), a JSON API under /api/ and "
                    "Prometheus metrics at /metrics.")
    add_connection(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: %(default)s, this machine only); any "
                             "other address needs --token")
    parser.add_argument("--port", type=int, default=DEFAULT_DASHBOARD_PORT,
                        help="TCP port (default: %(default)s; 0 picks a free one)")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                        help=f"access token that writes (confirm buttons) must carry; required "
                             f"with a non-loopback --host (default: ${TOKEN_ENV})")
    parser.add_argument("--group", default="dashboard",
                        help="consumer group on the scores and events streams; give each "
                             "dashboard of a line its own (default: %(default)s)")
    parser.add_argument("--history", type=float, default=300.0, metavar="SECONDS",
                        help="read back this many seconds of scores, feedback and dead letters "
                             "at start (default: %(default)s; 0 = only what comes next)")
    parser.add_argument("--gallery", type=int, default=32,
                        help="latest anomalies shown with their heat maps (default: %(default)s)")
    parser.set_defaults(handler=_dashboard)


def _dashboard(args) -> int:
    from dashboard.consumer import ConsumerConfig, DashboardConsumer
    from dashboard.server import DashboardServer
    from pipeline.connection import connect

    if not 0 <= args.port <= 65535:
        raise PipelineError(f"--port {args.port}: use 0 to 65535")
    if not 0 <= args.history <= 7 * 86400:
        raise PipelineError(f"--history {args.history}: use 0 to 604800 seconds")
    if not 1 <= args.gallery <= 500:
        raise PipelineError(f"--gallery {args.gallery}: use 1 to 500")
    if not args.group or not args.group.isprintable() or len(args.group) > 64:
        raise PipelineError(f"--group {args.group!r}: use 1 to 64 printable characters")
    url = required_url(args)
    client = connect(url, wait=5.0)
    consumer = DashboardConsumer(client, url, args.line, ConsumerConfig(
        group=args.group, history_s=args.history, gallery=args.gallery))
    server = DashboardServer(consumer, args.host, args.port, args.token)
    consumer.address = server.url
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: consumer.stop_event.set())
    reader = threading.Thread(target=consumer.run, name="dashboard-reader", daemon=True)
    web = threading.Thread(target=server.serve_forever, name="dashboard-web", daemon=True)
    reader.start()
    web.start()
    print(f"glad dashboard: {server.url} (line {args.line}; metrics at {server.url}metrics)",
          flush=True)
    try:
        while not consumer.stop_event.wait(0.5):
            if not reader.is_alive():
                raise PipelineError("the dashboard's stream reader stopped; see the log above")
    finally:
        consumer.stop_event.set()
        server.shutdown()
        server.server_close()
        reader.join(timeout=10)
    print("glad dashboard: stopped", file=sys.stderr)
    return 0
