"""Online learning on a line whose normal appearance shifts: frozen model, online updates, full refit.

The line makes synthetic nuts (`--category`); a new supplier's variant (`--variant`, default the
recoloured part) then arrives. One base model (`GladModel()` defaults, as `glad run` fits it) is
fitted on `--fit` normal frames of the old variant.

1. Adaptation. An operator confirms `--confirm` frames of the new variant as normal. As the
   updater does, every 4th is held back for validation (with a canary defect pasted on it) and
   the others are learned with online K-MLE in batches of `--batch`; the gate derives the
   threshold the version is published with. On unseen frames (old and new variant normals, and
   defects on both) the table gives each model's false-alarm rate per variant at its own
   threshold and its image AUROC: the frozen base model, the online-updated one, and a full refit
   on every frame (old + confirmed new ones) for comparison. Targets: the new variant's
   false-alarm rate falls to the old variant's level, AUROC within 0.5 points of the refit.
2. Cost. The `glad updater` service on an embedded Redis, against a scores stream that already
   holds `--seen` entries (filler score messages): the time from `confirm()` until the updater
   has learned the frame, gated the candidate, published it (or kept it as rejected) and
   committed its state, per confirmation, for a line that has seen few and many frames, and the
   process's peak memory.

    python3 bench/bench_online.py                      # the figures in bench/README.md
    python3 bench/bench_online.py --fit 16 --confirm 12 --seen 1000   # smoke run
    python3 bench/bench_online.py --parts cost --model glad-data/model  # cost only, no fit
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glad import synth  # noqa: E402
from glad.features import feature_batches  # noqa: E402
from glad.metrics import image_auroc  # noqa: E402
from glad.model import GladModel  # noqa: E402
from glad.online_kmle import OnlineGlad  # noqa: E402
from online.gate import CANARY_SUFFIX, Example, Gate  # noqa: E402


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def normals(category: str, count: int, seed: int, variant: str | None) -> list[np.ndarray]:
    return [synth.render_normal(category, rng(seed + i), 256, variant=variant) for i in range(count)]


def defects(category: str, count: int, seed: int, variant: str | None) -> list[np.ndarray]:
    kinds = synth.defect_types(category)
    return [synth.add_defect(image, category, kinds[i % len(kinds)], rng(seed + 50_000 + i))[0]
            for i, image in enumerate(normals(category, count, seed, variant))]


def examples(model: GladModel, images: list[np.ndarray], ids: list[str]) -> tuple[list[Example], list]:
    """Registered images' features as the gate and the updater hold them, and the registered images."""
    registered, valid, _ = model.register(images)
    out = []
    for start in range(0, len(registered), 8):
        batch = next(iter(feature_batches(model.backbone_, registered[start:start + 8], 8, False, "")))
        for row in range(len(batch[0])):
            out.append(Example(ids[start + row], [f[row].to(torch.float16).numpy() for f in batch],
                               valid[start + row]))
    return out, registered


def updater_candidate(base: GladModel, confirmed: list[np.ndarray], batch: int) -> tuple[GladModel, dict]:
    """What `glad updater` makes of confirmed-normal images: every 4th held back with a canary
    defect pasted on it, the others learned in batches; the candidate with the gate's threshold,
    and the gate's record."""
    online, gate = OnlineGlad(base), Gate()
    held_images = confirmed[::4]
    held, registered = examples(base, held_images, [f"held{i}" for i in range(len(held_images))])
    for index, (example, image) in enumerate(zip(held, registered, strict=True)):
        pasted, _ = synth.paste_defect(image, example.valid & base.roi_.numpy(), rng(index))
        gate.held_back.append(example)
        gate.canaries.append(examples(base, [pasted], [example.frame_id + CANARY_SUFFIX])[0][0])
    learned = [image for i, image in enumerate(confirmed) if i % 4]
    for start in range(0, len(learned), batch):
        chunk, _ = examples(base, learned[start:start + batch],
                            [f"learn{i}" for i in range(start, start + batch)])
        online.learn([torch.from_numpy(np.stack([e.features[i] for e in chunk])).float()
                      for i in range(len(chunk[0].features))], np.stack([e.valid for e in chunk]))
    candidate = online.model()
    candidate.threshold_, record = gate.evaluate(
        candidate, base, [layer.mixture.n_components for layer in base.layers_])
    return candidate, record


def evaluate(model: GladModel, test: dict[str, list[np.ndarray]]) -> dict:
    scores = {name: model.score(images).scores for name, images in test.items()}
    normal = np.r_[scores["old"], scores["new"]]
    labels = np.r_[np.zeros(len(normal)), np.ones(len(scores["defects"]))]
    return {"far_old": float((scores["old"] > model.threshold_).mean()),
            "far_new": float((scores["new"] > model.threshold_).mean()),
            "recall": float((scores["defects"] > model.threshold_).mean()),
            "auroc": 100 * image_auroc(labels, np.r_[normal, scores["defects"]]),
            "threshold": float(model.threshold_)}


def adaptation(args, base: GladModel, old: list[np.ndarray]) -> dict:
    test = {"old": normals(args.category, args.test, 20_000, None),
            "new": normals(args.category, args.test, 30_000, args.variant),
            "defects": defects(args.category, args.test // 2, 40_000, None)
            + defects(args.category, args.test // 2, 60_000, args.variant)}
    confirmed = normals(args.category, args.confirm, 10_000, args.variant)
    rows = {"frozen": evaluate(base, test)}

    started = time.perf_counter()
    candidate, record = updater_candidate(base, confirmed, args.batch)
    online_seconds = time.perf_counter() - started
    rows["online"] = evaluate(candidate, test) | {"gate": "passed" if record["passed"] else
                                                  "; ".join(record["reasons"]),
                                                  "seconds": online_seconds}
    started = time.perf_counter()
    refit = GladModel().fit(old + confirmed)
    rows["refit"] = evaluate(refit, test) | {"seconds": time.perf_counter() - started}
    return rows


def cost(args, model_dir: Path) -> dict:
    """Confirmation -> published version through the real service, for few and many frames seen."""
    from online.updater import Updater, UpdaterConfig
    from pipeline.connection import connect
    from pipeline.embedded import EmbeddedRedis
    from pipeline.feedback import confirm
    from pipeline.registry import ModelFollower, ModelRegistry
    from pipeline.runner import RunnerConfig, StageRunner
    from pipeline.schema import FIELD, Message
    from pipeline.streams import Streams
    from stages.align import AlignStage
    from stages.capture import publish_frame
    from stages.extract import ExtractStage
    from stages.score import ScoreStage

    out = {}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis") as server:
        client = connect(server.url)
        for seen in (100, args.seen):
            line = f"cost{seen}"
            streams = Streams(line)
            registry = ModelRegistry(Path(tmp) / "models", client, streams)
            registry.publish(model_dir, note="base")
            pipe = client.pipeline(transaction=False)
            for i in range(seen):  # the history of a busy line: small score messages
                filler = Message("score", f"old{i}", line, "cam", time.time(), {
                    "score": 1.0, "anomalous": False, "threshold": 2.0, "status": "ok",
                    "heatmap": None, "frame_shape": [256, 256]})
                pipe.xadd(streams.key("scores"), {FIELD: filler.encode()}, maxlen=100_000)
                if i % 5000 == 4999:
                    pipe.execute()
            pipe.execute()
            images = normals(args.category, 12 + args.updates, 70_000, args.variant)
            ids = [publish_frame(client, line, image=image, frame_id=f"f{i}")
                   for i, image in enumerate(images)]
            runners = [StageRunner(cls(ModelFollower(ModelRegistry(Path(tmp) / "models",
                                                                   connect(server.url), streams))),
                                   connect(server.url), streams, server.url,
                                   RunnerConfig(block_ms=50))
                       for cls in (AlignStage, ExtractStage, ScoreStage)]
            threads = [threading.Thread(target=r.run, daemon=True) for r in runners]
            for thread in threads:
                thread.start()
            while int(client.hget(streams.counters, "scores:added") or 0) < len(ids):
                time.sleep(0.2)
            for runner in runners:
                runner.stop_event.set()
            for thread in threads:
                thread.join()
            config = UpdaterConfig(holdback_every=2, block_ms=20)  # the default gate: 6 + 6 frames
            warmup = Updater(client, streams, registry, config)
            for frame_id in ids[:12]:  # 6 held back (the gate's default), 6 learned
                confirm(client, line, frame_id, "normal")
            warmup.run(once=True)
            client.delete(Streams(line).updater_lease)
            # the timed confirmations all train (none is held back), each on its own
            updater = Updater(client, streams, registry, replace(config, holdback_every=10**9))
            thread = threading.Thread(target=updater.run, daemon=True)
            thread.start()
            while updater.state is None or updater._pending:  # leading, pending entries read
                time.sleep(0.01)
            latencies, published, parts = [], 0, []
            for frame_id in ids[12:]:
                version = registry.current()
                started = time.perf_counter()
                entry = confirm(client, line, frame_id, "normal")
                while not decided(client, streams, updater, entry):
                    time.sleep(0.02)  # coarse: this thread shares the GIL with the updater
                latencies.append(time.perf_counter() - started)
                published += registry.current() != version
                parts.append(updater.timings)
            updater.stop_event.set()
            thread.join()
            out[seen] = {"first_s": latencies[0], "p50_s": float(np.median(latencies[1:])),
                         "max_s": float(np.max(latencies[1:])),
                         "all_s": [round(x, 2) for x in latencies], "parts": parts,
                         "decisions": len(latencies), "published": published,
                         "version": registry.current(),
                         "parts_p50_s": {k: float(np.median([p.get(k, 0.0) for p in parts[1:]]))
                                         for k in parts[0]}}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def decided(client, streams, updater, entry: str) -> bool:
    """Whether the updater has learned, gated, published (or parked) and acknowledged `entry`."""
    return (updater.state.last_entry == entry
            and client.xpending(streams.key("feedback"), "updater")["pending"] == 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--category", default="nut", choices=("nut", "pcb", "weave"))
    parser.add_argument("--variant", default="recoloured")
    parser.add_argument("--fit", type=int, default=40, help="old-variant frames the base model fits")
    parser.add_argument("--confirm", type=int, default=20, help="new-variant frames confirmed")
    parser.add_argument("--batch", type=int, default=5, help="confirmations learned at once")
    parser.add_argument("--test", type=int, default=30, help="unseen frames per group")
    parser.add_argument("--seen", type=int, default=100_000, help="score entries already on the line")
    parser.add_argument("--updates", type=int, default=10, help="confirmations timed per line")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--model", type=Path, help="a fitted base model instead of fitting one "
                        "(its training frames are taken to be the first --fit old-variant ones)")
    parser.add_argument("--parts", nargs="+", choices=("adaptation", "cost"),
                        default=["adaptation", "cost"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    old = normals(args.category, args.fit, 0, None)
    started = time.perf_counter()
    base = GladModel.load(args.model) if args.model else GladModel().fit(old)
    fit_seconds = time.perf_counter() - started
    rows, costs = {}, {}
    if "adaptation" in args.parts:
        rows = adaptation(args, base, old)
        if not args.json:
            print_adaptation(args, rows, fit_seconds)
    if "cost" in args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            costs = cost(args, base.save(Path(tmp) / "base"))
    report = {"category": args.category, "variant": args.variant, "fit_seconds": fit_seconds,
              "confirmed": args.confirm, "adaptation": rows, "cost": costs,
              "load_average": os.getloadavg()[0], "cores": os.cpu_count()}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    if not costs:
        return
    print("confirmation -> published version (glad updater, embedded Redis):")
    for seen, row in costs.items():
        if seen != "peak_rss_mb":
            print(f"  line with {seen:>7d} frames seen: first after start {row['first_s']:.2f} s "
                  f"(production's gate scores computed once), then p50 {row['p50_s']:.2f} s, max "
                  f"{row['max_s']:.2f} s; {row['published']} of {row['decisions']} published "
                  f"(now v{row['version']})")
            print("    p50 per part: " + ", ".join(f"{k} {v:.2f} s" for k, v in
                                                    row["parts_p50_s"].items()))
    print(f"peak memory of the process: {costs['peak_rss_mb']:.0f} MB; load "
          f"{report['load_average']:.2f}")


def print_adaptation(args, rows: dict, fit_seconds: float) -> None:
    print(f"{args.category}, new variant '{args.variant}': base fit on {args.fit} frames "
          f"({fit_seconds:.0f} s); {args.confirm} frames of the variant confirmed normal; "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    print(f"{'model':8s} {'FAR old':>8s} {'FAR new':>8s} {'recall':>7s} {'AUROC':>7s} "
          f"{'threshold':>10s}  notes")
    for name, row in rows.items():
        notes = row.get("gate", "")
        if "seconds" in row:
            notes = f"{notes} ({row['seconds']:.1f} s)".strip()
        print(f"{name:8s} {row['far_old']:8.2f} {row['far_new']:8.2f} {row['recall']:7.2f} "
              f"{row['auroc']:7.2f} {row['threshold']:10.2f}  {notes}")
    gap = rows["refit"]["auroc"] - rows["online"]["auroc"]
    print(f"online vs refit AUROC: {-gap:+.2f} points (target >= -0.5); new-variant false alarms "
          f"{rows['frozen']['far_new']:.2f} -> {rows['online']['far_new']:.2f} "
          f"(old variant, frozen: {rows['frozen']['far_old']:.2f})", flush=True)


if __name__ == "__main__":
    main()
