"""The streaming commands of `glad`: run, stage, status, models, confirm.

Every worker command reads its Redis from `--redis-url`, else `REDIS_URL`; `glad run` starts an
embedded Redis when neither is set.
"""

from __future__ import annotations

import itertools
import json
import logging
import signal
import threading
import time
from pathlib import Path

import msgpack

from app.options import add_connection, line_url, required_url, resolve_device
from glad.errors import GladError
from pipeline.connection import connect, redact
from pipeline.errors import MessageError, PipelineError
from pipeline.runner import RunnerConfig, StageRunner
from pipeline.schema import decode
from pipeline.streams import DEFAULT_MAXLEN, PIPELINE_GROUPS, STALE_AFTER_S, Streams, heartbeats

log = logging.getLogger(__name__)

WORKER_STAGES = ("capture", "align", "extract", "score", "results")


def add_commands(commands) -> None:
    _add_run(commands)
    _add_stage(commands)
    _add_status(commands)
    _add_models(commands)
    _add_confirm(commands)


# --- run ----------------------------------------------------------------------------------------


def _add_run(commands) -> None:
    from app.run import DEFAULT_SOURCE

    parser = commands.add_parser(
        "run", help="run the whole pipeline (capture, align, extract, score) on this machine",
        description="Run the streaming pipeline on one machine. With no options: an embedded "
                    "Redis, the default backbone, a built-in synthetic inspection camera (normal "
                    "nuts with occasional defects), a model fitted on its first normal frames; "
                    "scores in OUT/scores.jsonl and OUT/scores.csv, heat maps of anomalies in "
                    "OUT/heatmaps, worker logs in OUT/logs.")
    parser.add_argument("--source", default=DEFAULT_SOURCE,
                        help="video file, rtsp:// or http:// stream, camera index (0) or "
                             "/dev/videoN, image folder or glob, or synth://nut|pcb|weave"
                             "?defect_rate=0.1&seed=0 (default: %(default)s)")
    parser.add_argument("--model", type=Path, help="model directory from `glad fit` (default: "
                        "the line's current model, else fit one on the first normal frames)")
    parser.add_argument("--out", type=Path, default=Path("glad-data/run"),
                        help="results folder (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=None,
                        help="stop after this many frames (default: 300 for the synthetic "
                             "camera, 0 = until the source ends, for anything else)")
    parser.add_argument("--fps", type=float, default=None,
                        help="pace the source at this rate, 0 = as fast as the pipeline takes "
                             "frames (default: 5 for the synthetic camera, a rate a 2-core CPU "
                             "sustains; 0 for anything else)")
    parser.add_argument("--loop", action="store_true", help="replay a video or folder forever")
    parser.add_argument("--fit-frames", type=int, default=40,
                        help="normal frames to fit a model on when the line has none "
                             "(default: %(default)s)")
    parser.add_argument("--scale", action="append", default=[], metavar="STAGE=N",
                        help="worker processes for a stage, e.g. --scale extract=2")
    parser.add_argument("--fresh", action="store_true",
                        help="start the embedded line over: forget its model pointer, streams "
                             "and counters (kept by default beside the --models folder, e.g. "
                             "glad-data/redis, so a rerun, `glad status` and `glad models` find "
                             "them; model folders stay on disk)")
    parser.add_argument("--device", default="auto",
                        help="torch device for extract and score: auto (cuda when available), "
                             "cpu, cuda, cuda:1... (default: %(default)s)")
    parser.add_argument("--encoding", choices=("png", "jpeg", "raw"), default="png",
                        help="how captured frames travel (default: %(default)s, lossless)")
    parser.add_argument("--json", action="store_true", help="print the final summary as JSON")
    parser.add_argument("--dashboard-port", type=int, default=None,
                        help="port of the dashboard on 127.0.0.1 (default: 8765, or a free one "
                             "when taken; 0 = a free one)")
    parser.add_argument("--no-dashboard", action="store_true", help="run without the dashboard")
    parser.add_argument("--no-updater", action="store_true",
                        help="run without the online updater (confirmations are then kept in "
                             "the feedback stream until an updater runs)")
    add_connection(parser)
    parser.set_defaults(handler=_run)


def _run(args) -> int:
    from app.run import RunOptions, run_pipeline

    scale = {}
    for item in args.scale:
        stage, _, count = item.partition("=")
        if stage not in ("align", "extract", "score") or not count.isdigit() or int(count) < 1:
            raise PipelineError(f"--scale {item!r}: use align|extract|score=N with N >= 1")
        scale[stage] = int(count)
    synthetic = args.source.startswith("synth://")
    frames = args.frames if args.frames is not None else (300 if synthetic else 0)
    fps = args.fps if args.fps is not None else (5.0 if synthetic else 0.0)
    options = RunOptions(source=args.source, model=args.model, line=args.line, out=args.out,
                         models=args.models, frames=frames, fps=fps, loop=args.loop,
                         fit_frames=args.fit_frames, redis_url=args.redis_url,
                         fresh=args.fresh, device=resolve_device(args.device), scale=scale,
                         encoding=args.encoding, quiet=args.json,
                         dashboard=not args.no_dashboard, dashboard_port=args.dashboard_port,
                         updater=not args.no_updater)
    summary = run_pipeline(options)
    if args.json:
        print(json.dumps(summary.to_dict() | {"out": str(args.out)}))
    else:
        print(summary.line())
        print(f"results: {args.out / 'scores.jsonl'}, {args.out / 'scores.csv'}, "
              f"heat maps in {args.out / 'heatmaps'}")
    return 0


# --- stage --------------------------------------------------------------------------------------


def _add_stage(commands) -> None:
    parser = commands.add_parser(
        "stage", help="run one pipeline worker (for compose / several machines)",
        description="Run one worker of a stage. Workers of a stage share its consumer group, "
                    "on any machine that reaches the line's Redis: start more to scale out. "
                    "SIGTERM finishes the batch in flight and exits.")
    parser.add_argument("name", choices=WORKER_STAGES, help="the stage to run")
    add_connection(parser)
    parser.add_argument("--device", default="auto",
                        help="torch device for extract and score: auto (cuda when available), "
                             "cpu, cuda, cuda:1... (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=8, help="messages per read")
    parser.add_argument("--claim-idle-ms", type=int, default=30_000,
                        help="claim entries another worker left pending this long")
    parser.add_argument("--max-deliveries", type=int, default=3,
                        help="attempts before a failing message goes to the dead-letter stream")
    parser.add_argument("--max-backlog", type=int, default=16,
                        help="stop reading (capture: stop publishing) while the next stage has "
                             "more than this many entries in flight; bounds latency and Redis "
                             "memory (default: %(default)s)")
    capture = parser.add_argument_group("capture")
    capture.add_argument("--source", help="what to capture (see `glad run --help`)")
    capture.add_argument("--frames", type=int, default=0, help="stop after N frames (0: never)")
    capture.add_argument("--skip", type=int, default=0, help="skip the first N source frames")
    capture.add_argument("--fps", type=float, default=0.0, help="pace at this rate")
    capture.add_argument("--loop", action="store_true", help="replay a file or folder forever")
    capture.add_argument("--encoding", choices=("png", "jpeg", "raw"), default="png")
    results = parser.add_argument_group("results")
    results.add_argument("--out", type=Path, default=Path("glad-data/results"),
                         help="results folder (default: %(default)s)")
    parser.set_defaults(handler=_stage)


def _stage(args) -> int:
    url = required_url(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        client = connect(url, wait=None, stop=stop)
    except GladError:
        if stop.is_set():  # asked to stop while Redis was away: a clean exit
            return 0
        raise
    streams = Streams(args.line)
    if args.name == "capture":
        return _capture(args, client, url, stop)
    stage = _build_stage(args, client, streams)
    config = RunnerConfig(batch_size=args.batch_size, claim_idle_ms=args.claim_idle_ms,
                          max_deliveries=args.max_deliveries, max_backlog=args.max_backlog)
    runner = StageRunner(stage, client, streams, url, config)
    runner.stop_event = stop
    runner.run()
    if hasattr(stage, "close"):
        stage.close()
    return 0


def _build_stage(args, client, streams: Streams):
    if args.name == "results":
        from pipeline.results import ResultWriter

        return ResultWriter(args.out, client, streams)
    from pipeline.registry import ModelFollower, ModelRegistry
    from stages.align import AlignStage
    from stages.extract import ExtractStage
    from stages.score import ScoreStage

    follower = ModelFollower(ModelRegistry(args.models, client, streams),
                             resolve_device(args.device))
    return {"align": AlignStage, "extract": ExtractStage, "score": ScoreStage}[args.name](follower)


def _capture(args, client, url: str, stop: threading.Event) -> int:
    from stages.capture import Capture
    from stages.sources import open_source, paced

    if not args.source:
        raise PipelineError("the capture stage needs --source")
    with open_source(args.source, loop=args.loop) as source:
        frames = itertools.islice(source, args.skip, args.skip + args.frames if args.frames
                                  else None)
        capture = Capture(client, url, args.line, encoding=args.encoding,
                          max_backlog=args.max_backlog, stop=stop)
        count = capture.run(paced(frames, args.fps or None))
    log.info("capture: published %d frames", count)
    return 0


# --- status -------------------------------------------------------------------------------------


def _add_status(commands) -> None:
    parser = commands.add_parser(
        "status", help="health of a line's workers and streams",
        description="Show each worker's heartbeat (stage, host, state, messages processed), "
                    "each stream's length, lag and pending entries, the dead-letter count and "
                    "the current model version.")
    add_connection(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_status)


def line_status(client, streams: Streams) -> dict:
    """Workers, streams and model of a line, as plain data."""
    now = time.time()
    workers = []
    for name, record in sorted(heartbeats(client, streams).items()):
        age = now - record.get("seen", 0)
        workers.append({"worker": name, **record, "age_s": round(age, 1),
                        "healthy": age < STALE_AFTER_S})
    hops = {}
    for hop in DEFAULT_MAXLEN:
        key = streams.key(hop)
        info = {"length": int(client.xlen(key))}
        group = PIPELINE_GROUPS.get(hop)
        if group is not None and client.exists(key):
            info["group"] = group
            info["lag"] = streams.lag(client, hop, group)
            pending = [g for g in client.xinfo_groups(key) if g["name"].decode() == group]
            info["pending"] = int(pending[0]["pending"]) if pending else 0
        hops[hop] = info
    last_dead = client.xrevrange(streams.key("deadletter"), count=1)
    current = client.get(streams.model("current"))
    return {"line": streams.line, "model_version": int(current) if current else None,
            "workers": workers, "streams": hops,
            "last_deadletter": _dead_letter(last_dead[0][1][b"m"]) if last_dead else None}


def _dead_letter(packed: bytes) -> dict:
    """What an operator needs of a dead letter: the stage that parked it, why, and which frame
    (its id and file name) when its payload is a readable message (a poison entry is not)."""
    record = msgpack.unpackb(packed, raw=False)
    out = {"stage": record.get("stage"), "reason": record.get("reason"), "frame_id": None,
           "name": None}
    try:
        message = decode(record.get("payload") or b"")
    except MessageError:
        return out
    return out | {"frame_id": message.frame_id, "name": message.meta.get("name")}


def _status(args) -> int:
    url = line_url(args)
    client = connect(url, wait=5.0)
    status = line_status(client, Streams(args.line))
    if args.json:
        print(json.dumps(status | {"redis": redact(url)}))
        return 0
    print(f"line {status['line']} on {redact(url)}: model version {status['model_version']}")
    print(f"{'worker':40s} {'stage':8s} {'state':12s} {'model':>5s} {'processed':>9s} "
          f"{'dead':>5s} {'seen':>7s}")
    for w in status["workers"]:
        state = w["state"] if w["healthy"] else "STALE"
        model = "-" if w.get("model") is None else f"v{w['model']}"
        # stages count dead letters, the updater and the dashboard do not: "-" where absent
        processed, dead = (str(w.get(key, "-")) for key in ("processed", "deadlettered"))
        print(f"{w['worker'][:40]:40s} {w['stage']:8s} {state:12s} {model:>5s} {processed:>9s} "
              f"{dead:>5s} {w['age_s']:6.1f}s")
    print(f"{'stream':12s} {'length':>8s} {'lag':>6s} {'pending':>8s}")
    for hop, info in status["streams"].items():
        print(f"{hop:12s} {info['length']:8d} {info.get('lag', ''):>6} {info.get('pending', ''):>8}")
    dead = status["last_deadletter"]
    if dead:
        frame = " ".join(str(part) for part in (dead["frame_id"], dead["name"]) if part)
        print(f"last dead letter ({dead['stage']}): {frame or 'unreadable entry'}: {dead['reason']}")
    return 0


# --- models -------------------------------------------------------------------------------------


def _add_models(commands) -> None:
    parser = commands.add_parser("models", help="a line's model versions",
                                 description="Publish and list a line's model versions.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    publish = actions.add_parser("publish", help="publish a fitted model as the next version "
                                 "and make it current (scorers hot-swap to it)")
    publish.add_argument("model", type=Path, help="model directory from `glad fit`")
    publish.add_argument("--note", default="", help="why this version exists")
    add_connection(publish)
    publish.add_argument("--json", action="store_true")
    publish.set_defaults(handler=_models_publish)
    listing = actions.add_parser("list", help="list the line's versions")
    add_connection(listing)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_models_list)
    show = actions.add_parser("show", help="one version: provenance, threshold, K per layer")
    show.add_argument("version", type=int)
    add_connection(show)
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=_models_show)
    diff = actions.add_parser("diff", help="what differs between two versions")
    diff.add_argument("old", type=int)
    diff.add_argument("new", type=int)
    add_connection(diff)
    diff.add_argument("--json", action="store_true")
    diff.set_defaults(handler=_models_diff)
    promote = actions.add_parser("promote", help="make a published version current")
    promote.add_argument("version", type=int)
    add_connection(promote)
    promote.set_defaults(handler=_models_promote)
    rollback = actions.add_parser("rollback", help="make the previous current version current "
                                  "again (repeat to step further back)")
    add_connection(rollback)
    rollback.set_defaults(handler=_models_rollback)


def _add_confirm(commands) -> None:
    parser = commands.add_parser(
        "confirm", help="confirm frames as normal (or as defects) for the online updater",
        description="Write operator confirmations to the line's feedback stream. Only frames "
                    "confirmed normal ever train the model.")
    parser.add_argument("frame_ids", nargs="+", metavar="FRAME_ID")
    verdict = parser.add_mutually_exclusive_group()
    verdict.add_argument("--normal", dest="verdict", action="store_const", const="normal",
                         help="the part is fine (default)")
    verdict.add_argument("--anomalous", dest="verdict", action="store_const", const="anomalous",
                         help="the part is defective")
    parser.add_argument("--by", default="operator", help="who confirms (kept with the feedback)")
    parser.add_argument("--note", default="")
    add_connection(parser)
    parser.set_defaults(handler=_confirm, verdict="normal")


def _confirm(args) -> int:
    from pipeline.feedback import confirm

    url = line_url(args)  # like status: `glad run`'s own line needs no --redis-url
    client = connect(url, wait=5.0)
    for frame_id in args.frame_ids:
        entry = confirm(client, args.line, frame_id, args.verdict, args.by, args.note)
        print(f"{frame_id}: confirmed {args.verdict} ({entry})")
    return 0


def _registry(args):
    from pipeline.registry import ModelRegistry

    return ModelRegistry(args.models, connect(line_url(args), wait=5.0), Streams(args.line))


def _models_publish(args) -> int:
    registry = _registry(args)
    version = registry.publish(args.model, note=args.note)
    if args.json:
        print(json.dumps({"line": args.line, "version": version}))
    else:
        print(f"line {args.line}: version {version} is current")
    return 0


def _models_show(args) -> int:
    from glad.validation import format_selection, format_validation

    record = _registry(args).record(args.version)
    if args.json:
        print(json.dumps(record))
        return 0
    manifest = record["manifest"]
    print(f"line {args.line} version {args.version}: {record.get('note', '')}")
    print(f"  parent {record.get('parent')}  created {manifest['created']}  "
          f"backbone {manifest['backbone']['name']}  sha256 {manifest['arrays_sha256'][:12]}")
    print(f"  threshold {manifest['threshold']:.3f}  radius {manifest['radius']}  K per layer "
          f"{[layer['n_components'] for layer in manifest['layers']]}  trained on "
          f"{manifest['training']['n_images']} images")
    quality = manifest["training"].get("jpeg_noise")
    print(f"  Gaussians floored at the feature change of a JPEG round trip at quality {quality}"
          if quality else "  no compression noise floor (glad fit --jpeg-noise)")
    print(f"  {format_validation(manifest.get('calibration'), manifest.get('validation'))}")
    selection = manifest["training"].get("selection") or {}
    if selection and all(isinstance(row, dict) for row in selection.values()):
        print("  localisation chosen on held-back normals and canaries:")
        print("\n".join(f"    {line}" for line in format_selection(selection).splitlines()))
    for key, value in (record.get("provenance") or {}).items():
        print(f"  {key}: {value}")
    return 0


def model_diff(old: dict, new: dict) -> dict:
    """Fields that differ between two `ModelRegistry.record`s: name -> [old, new]."""
    def summary(record: dict) -> dict:
        manifest = record["manifest"]
        return {"backbone": manifest["preprocessing_hash"], "threshold": manifest["threshold"],
                "radius": manifest["radius"], "alignment": manifest["alignment"]["enabled"],
                "components": [layer["n_components"] for layer in manifest["layers"]],
                "training_images": manifest["training"]["n_images"],
                "arrays_sha256": manifest["arrays_sha256"], "parent": record.get("parent")}
    a, b = summary(old), summary(new)
    return {key: [a[key], b[key]] for key in a if a[key] != b[key]}


def _models_diff(args) -> int:
    registry = _registry(args)
    changes = model_diff(registry.record(args.old), registry.record(args.new))
    if args.json:
        print(json.dumps({"old": args.old, "new": args.new, "changes": changes}))
        return 0
    if not changes:
        print(f"versions {args.old} and {args.new} are identical")
    for key, (before, after) in changes.items():
        print(f"{key:16s} {before}  ->  {after}")
    return 0


def _models_promote(args) -> int:
    _registry(args).set_current(args.version)
    print(f"line {args.line}: version {args.version} is current")
    return 0


def _models_rollback(args) -> int:
    version = _registry(args).rollback()
    print(f"line {args.line}: rolled back to version {version}")
    return 0


def _models_list(args) -> int:
    registry = _registry(args)
    current = registry.current()
    records = registry.versions()
    if args.json:
        print(json.dumps({"line": args.line, "current": current, "versions": records}))
        return 0
    for record in records:
        mark = "*" if record["version"] == current else " "
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(record["created"]))
        print(f"{mark} v{record['version']:<4d} {record['backbone']:20s} threshold "
              f"{record['threshold']:.3f}  {created}  {record['note']}")
    return 0

