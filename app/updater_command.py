"""`glad updater`: the online updater service of a line."""

from __future__ import annotations

import json
import logging
import signal

from app.line_commands import add_connection, required_url, resolve_device
from glad.errors import GladError
from pipeline.connection import connect
from pipeline.streams import Streams

log = logging.getLogger(__name__)


def add_command(commands) -> None:
    parser = commands.add_parser(
        "updater", help="learn online from confirmed-normal frames and publish checked versions",
        description="Consume the line's feedback stream (glad confirm, the dashboard, the client "
                    "API): frames confirmed normal are learned with online K-MLE (every "
                    "--holdback-every-th is held back to validate), frames confirmed defective "
                    "become canaries. A candidate is published as the line's next version only "
                    "if it passes the validation gate (sound parameters, no more false alarms on "
                    "held-back normals, recall and AUROC on canaries kept); otherwise it is kept "
                    "under MODELS/LINE/candidates with the reasons. One updater per line leads "
                    "(a lease in Redis); start a second one as a standby.")
    add_connection(parser)
    parser.add_argument("--device", default="cpu",
                        help="torch device for re-extracting features (default: %(default)s)")
    parser.add_argument("--half-life", type=float, default=5000.0,
                        help="images after which old statistics weigh half (default: %(default)s)")
    parser.add_argument("--holdback-every", type=int, default=4,
                        help="every n-th confirmed-normal frame validates instead of training "
                             "(default: %(default)s)")
    parser.add_argument("--min-held-back", type=int, default=4,
                        help="held-back normal frames needed before anything is published "
                             "(default: %(default)s)")
    parser.add_argument("--gate-frames", type=int, default=6,
                        help="most recent held-back normal frames, and canaries, the gate scores "
                             "each candidate on (default: %(default)s; every frame costs about "
                             "0.1 s per candidate on a CPU)")
    parser.add_argument("--once", action="store_true",
                        help="apply what the feedback stream holds now, then exit")
    parser.add_argument("--json", action="store_true", help="with --once: print a JSON summary")
    parser.set_defaults(handler=_updater)


def _updater(args) -> int:
    from dataclasses import replace

    from glad.online_kmle import OnlineConfig
    from online.gate import GateConfig
    from online.updater import Updater, UpdaterConfig
    from pipeline.registry import ModelRegistry

    if args.holdback_every < 1 or args.min_held_back < 1 or args.half_life <= 0:
        raise GladError("--holdback-every and --min-held-back must be >= 1, --half-life > 0")
    if args.gate_frames < args.min_held_back:
        raise GladError(f"--gate-frames ({args.gate_frames}) must be at least --min-held-back "
                        f"({args.min_held_back})")
    client = connect(required_url(args), wait=5.0)
    streams = Streams(args.line)
    config = UpdaterConfig(online=replace(OnlineConfig(), half_life=args.half_life),
                           gate=GateConfig(min_held_back=args.min_held_back,
                                           held_back=args.gate_frames, canaries=args.gate_frames),
                           holdback_every=args.holdback_every)
    updater = Updater(client, streams, ModelRegistry(args.models, client, streams), config,
                      resolve_device(args.device))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: updater.stop_event.set())
    updater.run(once=args.once)
    state = updater.state
    summary = {"line": args.line, "version": state.version, "confirmed_normal":
               state.confirmed_normal, "updates": state.updates, "last_entry": state.last_entry,
               "held_back": len(updater.gate.held_back), "canaries": len(updater.gate.canaries)}
    if args.json:
        print(json.dumps(summary))
    else:
        log.info("updater stopped: %s", summary)
    return 0
