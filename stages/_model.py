"""What the model-driven stages (align, extract, score) share: following the line's model."""

from __future__ import annotations

from pipeline.registry import ModelFollower


class ModelStage:
    """A stage that works with the line's current model, hot-swapped between batches."""

    name = ""
    input = ""
    output: str | None = None
    idempotent = False

    def __init__(self, follower: ModelFollower):
        self.follower = follower

    @property
    def model(self):
        return self.follower.model

    @property
    def model_version(self) -> int | None:
        return self.follower.version

    def ready(self) -> bool:
        return self.follower.refresh()
