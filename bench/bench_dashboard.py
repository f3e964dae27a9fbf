"""Throughput, page load and memory of the dashboard, on an embedded Redis (unix socket).

Score messages come from `dashboard.synthetic.ScoreFeed`: what the score stage writes (stamps and
timings per stage, model versions), 10 % anomalies with a 256x256 float16 heat map and their frame
in the frames stream, 1 % alignment failures.

1. Drain: N messages are written first, then read back in this process by (a) a plain loop,
   XREADGROUP of 500 entries with NOACK + `decode_entry` (the floor of any Python consumer), and
   (b) the dashboard's consumer (the same reads plus river statistics, drift detection, the
   gallery, its group counter, the feedback and dead-letter cursors and the once-a-second poll
   of lag, workers and model versions). Messages/s = N / time to read all; CPU = this process's
   CPU time per message.
2. Page load: with the gallery full (32 anomalies, their pictures made ahead as on a live line),
   Debian's chromium (Playwright, headless) loads the page; time from navigation start until the
   first poll is drawn (tiles, charts) and every gallery picture is loaded. First visit: a new
   browser; second: a new browser context (empty browser cache) in the same browser.
3. Soak (`--soak-minutes M`): `glad dashboard` as its own process; a publisher process writes
   score messages at `--rate` for M minutes while a poller requests what an open page requests
   (summary, series and gallery since its cursors, each new gallery picture) once a second; the
   dashboard's RSS is sampled every 10 s.

    python3 bench/bench_dashboard.py                       # drain 20000 + page load
    python3 bench/bench_dashboard.py --soak-minutes 10     # + the 10-minute soak at 1000 msg/s
    python3 bench/bench_dashboard.py --messages 4000 --soak-minutes 0.5   # smoke run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dashboard.consumer import ConsumerConfig, DashboardConsumer  # noqa: E402
from dashboard.server import DashboardServer  # noqa: E402
from dashboard.synthetic import ScoreFeed  # noqa: E402
from pipeline.connection import connect  # noqa: E402
from pipeline.embedded import EmbeddedRedis  # noqa: E402
from pipeline.schema import decode_entry  # noqa: E402
from pipeline.streams import Streams  # noqa: E402

CHROMIUM = os.environ.get("GLAD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
BATCH = 500
TARGET_RATE = 1000.0  # score messages/s the consumer must keep up with
TARGET_PAGE_S = 1.0
SAMPLE_S = 10.0


# --- 1. drain -------------------------------------------------------------------------------------


def drain(url: str, messages: int) -> tuple[dict, DashboardConsumer]:
    """Messages/s and CPU per message of the plain loop and of the dashboard's consumer."""
    client = connect(url)
    line = "bench-drain"
    feed = ScoreFeed(client, line)
    for start in range(0, messages, BATCH):
        feed.publish(min(BATCH, messages - start))
    stream = Streams(line).key("scores")
    client.xgroup_create(stream, "plain", id="0")
    wall, cpu = time.perf_counter(), time.process_time()
    count = 0
    while count < messages:
        for _, entries in client.xreadgroup("plain", "plain", {stream: ">"}, count=BATCH,
                                            noack=True) or []:
            for _, fields in entries:
                decode_entry(fields, "score")
                count += 1
    plain = _rates(messages, wall, cpu)
    consumer = DashboardConsumer(client, url, line, ConsumerConfig(history_s=3600))
    wall, cpu = time.perf_counter(), time.process_time()
    reader = threading.Thread(target=consumer.run, daemon=True)
    reader.start()
    while consumer.metrics.frames < messages:
        time.sleep(0.005)
    full = _rates(messages, wall, cpu)
    return {"messages": messages, "anomalies": consumer.metrics.anomalies, "plain": plain,
            "dashboard": full}, consumer


def _rates(messages: int, wall: float, cpu: float) -> dict:
    seconds = time.perf_counter() - wall
    return {"seconds": seconds, "per_s": messages / seconds,
            "cpu_us": 1e6 * (time.process_time() - cpu) / messages}


# --- 2. page load ---------------------------------------------------------------------------------


def page_load(consumer: DashboardConsumer) -> dict:
    """Navigation start to the page drawn with every gallery picture, first and second visit
    (ms), once the consumer has made the gallery's pictures."""
    if not Path(CHROMIUM).is_file():
        return {"error": f"{CHROMIUM} is missing (bash tests/setup.sh installs it)"}
    from playwright.sync_api import sync_playwright

    server = DashboardServer(consumer, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    size = consumer.gallery.size
    deadline = time.monotonic() + 30
    while consumer.gallery.unrendered(set()) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    ready = ("(n) => document.getElementById('status').classList.contains('ok') && "
             "[...document.querySelectorAll('.card img')].filter(i => i.complete && "
             "i.naturalWidth > 0).length === n")
    out = {"gallery": len(consumer.gallery.since(0)[2])}
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for label in ("first", "second"):
                context = browser.new_context(viewport={"width": 1400, "height": 1000})
                page = context.new_page()
                page.goto(server.url)
                page.wait_for_function(ready, arg=size, timeout=30_000, polling=10)
                out[f"{label}_ms"] = page.evaluate("performance.now()")
                out[f"{label}_dom_ms"] = page.evaluate(
                    "performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd")
                context.close()
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    return out


# --- 3. soak --------------------------------------------------------------------------------------


def soak(url: str, minutes: float, rate: float) -> dict:
    """A `glad dashboard` process under `rate` messages/s for `minutes`: RSS over time."""
    line = "bench-soak"
    dashboard = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "dashboard", "--line", line, "--redis-url", url,
         "--port", "0", "--history", "0"], stdout=subprocess.PIPE, text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"})
    publisher = None
    try:
        address = dashboard.stdout.readline().split()[2]
        seconds = 60.0 * minutes
        publisher = mp.get_context("spawn").Process(target=_publish, args=(url, line, rate, seconds))
        stop = threading.Event()
        poller = threading.Thread(target=_poll_like_a_page, args=(address, stop), daemon=True)
        started = time.monotonic()
        cpu_before = _cpu_seconds(dashboard.pid)
        publisher.start()
        poller.start()
        samples = []
        while publisher.is_alive() or not samples:
            elapsed = time.monotonic() - started
            summary = _get(address + "api/summary")
            samples.append({"t": elapsed, "rss_mb": _rss_mb(dashboard.pid),
                            "frames": summary["frames"],
                            "lag": summary["lags"].get("dashboard", {}).get("lag")})
            _say(f"soak {elapsed:5.0f} s: RSS {samples[-1]['rss_mb']:.0f} MB, "
                 f"{summary['frames']} frames read, lag {samples[-1]['lag']}")
            publisher.join(timeout=SAMPLE_S)
        wall = time.monotonic() - started
        time.sleep(2.0)  # the last messages
        summary = _get(address + "api/summary")
        cpu = _cpu_seconds(dashboard.pid) - cpu_before
        stop.set()
        poller.join(timeout=5)
    finally:
        if publisher is not None and publisher.is_alive():
            publisher.terminate()
        dashboard.terminate()
        dashboard.wait(timeout=20)
    published = int(connect(url).hget(Streams(line).counters, "scores:added") or 0)
    half = [s["rss_mb"] for s in samples if s["t"] >= wall / 2]
    return {"minutes": minutes, "rate": rate, "published": published,
            "published_per_s": published / wall, "read": summary["frames"],
            "lag_end": summary["lags"].get("dashboard", {}).get("lag"),
            "cpu_percent": 100.0 * cpu / wall, "samples": samples,
            "rss_1min_mb": next((s["rss_mb"] for s in samples if s["t"] >= 60), samples[-1]["rss_mb"]),
            "rss_end_mb": samples[-1]["rss_mb"], "rss_max_mb": max(s["rss_mb"] for s in samples),
            "rss_second_half_growth_mb": max(half) - min(half) if half else 0.0}


def _publish(url: str, line: str, rate: float, seconds: float) -> None:
    """Write `rate` score messages/s for `seconds`, in 10 batches a second."""
    feed = ScoreFeed(connect(url), line, seed=1)
    batch = max(1, round(rate / 10))
    start = time.monotonic()
    sent = 0
    while time.monotonic() - start < seconds:
        feed.publish(batch)
        sent += batch
        ahead = sent / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)


def _poll_like_a_page(address: str, stop: threading.Event) -> None:
    """What an open page requests once a second, new gallery pictures included."""
    series = gallery = 0
    while not stop.wait(1.0):
        try:
            _get(address + "api/summary")
            series = _get(f"{address}api/series?since={series}")["seq"]
            answer = _get(f"{address}api/gallery?since={gallery}")
            gallery = answer["seq"]
            for item in answer["items"]:
                with urllib.request.urlopen(address + item["image"].lstrip("/"), timeout=10):
                    pass
        except OSError:  # a picture that left the ring meanwhile (404) or a slow answer
            continue


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _rss_mb(pid: int) -> float:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1]) / 1024.0
    return float("nan")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- report ---------------------------------------------------------------------------------------


def report(result: dict) -> None:
    before, after = result["load_average"]
    print(f"$ {result['command']}")
    print(f"machine: {os.cpu_count()} cores, load average {before:.2f} before / {after:.2f} after; "
          f"embedded Redis on a unix socket\n")
    d = result["drain"]
    print(f"drain of {d['messages']} score messages ({d['anomalies']} anomalies with heat maps)")
    print(f"{'':34s}{'messages/s':>12s}{'CPU us/msg':>12s}{'seconds':>10s}")
    for label, key in (("plain XREADGROUP + decode", "plain"), ("dashboard consumer", "dashboard")):
        row = d[key]
        print(f"{label:34s}{row['per_s']:12.0f}{row['cpu_us']:12.0f}{row['seconds']:10.2f}")
    rate = d["dashboard"]["per_s"]
    print(f"dashboard / plain: {rate / d['plain']['per_s']:.2f}; target >= {TARGET_RATE:.0f}/s: "
          f"{'PASS' if rate >= TARGET_RATE else 'FAIL'}\n")
    page = result["page"]
    if "error" in page:
        print(f"page load: not measured: {page['error']}\n")
    else:
        worst = max(page["first_ms"], page["second_ms"]) / 1000.0
        print(f"page load with a full gallery ({page['gallery']} pictures), navigation start to "
              f"drawn with every picture:")
        print(f"  first visit (new browser) {page['first_ms']:.0f} ms "
              f"(DOMContentLoaded {page['first_dom_ms']:.0f} ms)")
        print(f"  second visit (new context, empty cache) {page['second_ms']:.0f} ms "
              f"(DOMContentLoaded {page['second_dom_ms']:.0f} ms)")
        print(f"  target <= {TARGET_PAGE_S:.1f} s: {'PASS' if worst <= TARGET_PAGE_S else 'FAIL'}\n")
    s = result.get("soak")
    if s:
        print(f"soak: `glad dashboard` process, {s['minutes']:g} min at {s['rate']:.0f} msg/s "
              f"offered ({s['published_per_s']:.0f}/s achieved by the publisher), a page's "
              f"polling once a second")
        print(f"  published {s['published']}, read {s['read']}, dashboard lag at the end "
              f"{s['lag_end']}, dashboard CPU {s['cpu_percent']:.0f} % of a core")
        print(f"  RSS: {s['rss_1min_mb']:.0f} MB after 1 min, {s['rss_end_mb']:.0f} MB at the end, "
              f"max {s['rss_max_mb']:.0f} MB; second half spread {s['rss_second_half_growth_mb']:.1f} "
              "MB")
        print("  RSS samples (s: MB): " + ", ".join(f"{x['t']:.0f}: {x['rss_mb']:.0f}"
                                                    for x in s["samples"]))


def _say(text: str) -> None:
    print(f"bench_dashboard: {text}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000, help="drain size (default: %(default)s)")
    parser.add_argument("--soak-minutes", type=float, default=0.0,
                        help="soak duration, 0 = no soak (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=TARGET_RATE,
                        help="soak rate, score messages/s (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    result = {"command": shlex.join([Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]]),
              "load_average": [os.getloadavg()[0]]}
    with EmbeddedRedis() as redis_server:
        _say(f"drain of {args.messages} messages")
        result["drain"], consumer = drain(redis_server.url, args.messages)
        _say("page load")
        result["page"] = page_load(consumer)
        consumer.stop_event.set()
        if args.soak_minutes > 0:
            _say(f"soak for {args.soak_minutes:g} min at {args.rate:.0f} msg/s")
            result["soak"] = soak(redis_server.url, args.soak_minutes, args.rate)
    result["load_average"].append(os.getloadavg()[0])
    if args.json:
        print(json.dumps(result))
    else:
        report(result)


if __name__ == "__main__":
    main()
