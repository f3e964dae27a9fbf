"""What the `glad` commands share: connection options, the Redis a command uses, the device, and
defaults that several commands show."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.connection import redis_url
from pipeline.embedded import EmbeddedRedis, answering, line_store
from pipeline.errors import PipelineError

DEFAULT_DASHBOARD_PORT = 8765


def add_connection(parser: argparse.ArgumentParser) -> None:
    from pipeline.registry import DEFAULT_ROOT

    parser.add_argument("--line", default="line1",
                        help="production line: namespaces every stream and model (default: "
                             "%(default)s)")
    parser.add_argument("--redis-url", default=None,
                        help="redis://[:password@]host:port/db, rediss:// for TLS, unix:///path "
                             "(default: $REDIS_URL)")
    parser.add_argument("--models", type=Path, default=DEFAULT_ROOT,
                        help="model registry folder, shared by every worker of the line; "
                             "`glad run`'s embedded line is kept beside it "
                             "(default: $GLAD_MODELS or %(default)s)")


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _running_url(args) -> str | None:
    """--redis-url or $REDIS_URL, else the server of a `glad run` going on beside the model
    folders (only `glad run` embeds one), else None."""
    return redis_url(args.redis_url) or answering(line_store(args.models))


def required_url(args) -> str:
    """The Redis URL of a command that needs a running Redis (`_running_url`)."""
    url = _running_url(args)
    if url is None:
        raise PipelineError("no Redis: pass --redis-url or set REDIS_URL, or start `glad run` "
                            "(it embeds one, which the other commands then find)")
    return url


def line_url(args) -> str:
    """The Redis URL of a command that reads or edits a line's records (status, models,
    confirm): `_running_url`, else the line `glad run` keeps beside the model folders, on a
    server started on its data for the life of this command."""
    url = _running_url(args)
    if url is not None:
        return url
    store = line_store(args.models)
    if not store.is_dir():
        raise PipelineError(f"no Redis: pass --redis-url or set REDIS_URL (no line of `glad run` "
                            f"in {store} either)")
    return EmbeddedRedis(store, persist=True).start().url
