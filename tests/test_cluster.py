"""Lines on a real local Redis Cluster (3 masters from the bundled redis-server): a line's keys
share one hash slot (`glad:{LINE}:`), so its transactions, scripts and multi-stream reads work,
and different lines live on different nodes (issue 13, scale-out)."""

from __future__ import annotations

import numpy as np
import pytest
import redis
from streaming import Line, wait_for

from pipeline.connection import connect
from pipeline.embedded import EmbeddedCluster
from pipeline.streams import Streams
from stages.capture import publish_frame


@pytest.fixture(scope="module")
def frames_of_nut(tiny_dataset):
    from glad.datasets import MVTecCategory
    from glad.images import read_image

    return [read_image(item.path) for item in MVTecCategory(tiny_dataset / "nut").test_items()][:6]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with EmbeddedCluster(tmp_path_factory.mktemp("cluster")) as started:
        yield started


def lines_on_two_nodes(cluster: EmbeddedCluster) -> list[str]:
    """Two line names whose keys live on different nodes."""
    names = [f"cl{i}" for i in range(50)]
    first = names[0]
    other = next(n for n in names if cluster.node_of(Streams(n).key("frames"))
                 != cluster.node_of(Streams(first).key("frames")))
    return [first, other]


def test_connect_gives_a_cluster_client_and_a_line_stays_in_one_slot(cluster) -> None:
    client = connect(cluster.url)
    assert isinstance(client, redis.RedisCluster)
    streams = Streams("anyline")
    keys = [streams.key(hop) for hop in ("frames", "scores", "events")] + [
        streams.counters, streams.workers, streams.model("current"), streams.updater_lease,
        streams.done("score", "f1")]
    assert len({redis.RedisCluster.keyslot(client, key) for key in keys}) == 1


@pytest.mark.slow
def test_two_lines_score_on_two_nodes(cluster, pipeline_model, frames_of_nut, tmp_path) -> None:
    names = lines_on_two_nodes(cluster)
    lines = [Line.create(name, cluster.url, tmp_path / "models", pipeline_model)
             for name in names]
    sent = {}
    for line in lines:
        sent[line.name] = [publish_frame(line.client, line.name, image=image,
                                         frame_id=f"{line.name}-{i}")
                           for i, image in enumerate(frames_of_nut)]
    runners = [line.running("align", "extract", "score") for line in lines]
    for context in runners:
        context.__enter__()
    try:
        for line in lines:
            wait_for(lambda line=line: line.client.xlen(line.streams.key("scores"))
                     == len(sent[line.name]), timeout=240, what=f"scores of {line.name}")
    finally:
        for context in runners:
            context.__exit__(None, None, None)
    for line in lines:
        scored = {m.frame_id: m for m in line.entries("scores")}
        assert set(scored) == set(sent[line.name])
        assert all(np.isfinite(m.body["score"]) for m in scored.values())
        assert line.deadletters() == []
    nodes = [cluster.node_of(line.streams.key("scores")) for line in lines]
    assert nodes[0] != nodes[1]
    for line, node in zip(lines, nodes, strict=True):  # the data is on that node
        direct = redis.Redis(unix_socket_path=str(cluster.nodes[node].socket))
        assert direct.xlen(line.streams.key("scores")) == len(sent[line.name])
