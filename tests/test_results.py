"""What `glad run` writes to disk: file names that never collide and a CSV that a spreadsheet
opens without running anything (issue 13, hole 11)."""

from __future__ import annotations

import csv
import json

import numpy as np

from pipeline.results import ResultWriter, _safe
from pipeline.schema import Message, pack_array


def score_message(frame_id: str, name: str | None = None) -> Message:
    heatmap = pack_array(np.zeros((16, 16), np.float16))
    return Message("score", frame_id, "line1", "cam", 1700000000.0,
                   {"score": 5.0, "anomalous": True, "threshold": 1.0, "status": "ok",
                    "heatmap": heatmap, "frame_shape": [16, 16]},
                   models={"score": 1}, stamps={"score": 1700000000.1},
                   meta={"name": name} if name else {})


def test_heatmap_file_names_never_collide() -> None:
    long = "x" * 130
    ids = ["coll/x", "coll_x", "coll\\x", long + "a", long + "b", "", "../../etc"]
    names = [_safe(frame_id) for frame_id in ids]
    assert len(set(names)) == len(ids)
    assert all("/" not in n and "\\" not in n and not n.startswith(".") for n in names)
    assert _safe("cam-1.png").startswith("cam-1.png-")  # readable part kept


def test_results_write_one_overlay_per_id_and_defuse_formulas(redis_server, tmp_path) -> None:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    writer = ResultWriter(tmp_path, client, _streams())
    formula = '=HYPERLINK("http://evil","click")'
    writer.process([score_message("coll/x", formula), score_message("coll_x", "@SUM(A1)"),
                    score_message("-2+3", "plain")])
    writer.close()
    assert len(list((tmp_path / "heatmaps").glob("*.png"))) == 3
    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    assert [r["name"] for r in rows] == ["'" + formula, "'@SUM(A1)", "plain"]
    assert rows[2]["frame_id"] == "'-2+3" and rows[0]["score"] == "5.0"
    records = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert records[0]["name"] == formula  # JSON keeps the value as sent


def _streams():
    from pipeline.streams import Streams

    return Streams("results-test")
