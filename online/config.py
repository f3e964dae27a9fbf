"""How the online updater reads, learns and gates (`glad updater`'s options); shared by the
service (`online.updater`) and its learner (`online.learner`)."""

from __future__ import annotations

from dataclasses import dataclass

from glad.online_kmle import OnlineConfig
from online.gate import GateConfig


@dataclass(frozen=True)
class UpdaterConfig:
    online: OnlineConfig = OnlineConfig()
    gate: GateConfig = GateConfig()
    holdback_every: int = 4  # every n-th confirmed normal validates instead of training
    consolidate_every: int = 16  # updates between consolidations (replay re-assignment)
    batch: int = 32  # confirmations read at once
    block_ms: int = 500
    lease_ms: int = 15_000
    index_size: int = 5_000  # frames whose score messages are remembered
    applied_memory: int = 10_000  # frame ids remembered as applied (duplicates; > index_size)
