"""Online expert-weight migration over ``torch.distributed``: two-phase per layer, nothing lost.

``migrate(ExpertWeights([...]), old, new, group)`` moves every rank's expert tensors from placement
``old`` to ``new`` in place (addresses never change, so CUDA graphs stay valid). Per layer every
rank stages the experts its changed slots need (local copies, and remote experts received once
per rank in rounds of at most ``max_peers`` peers), verifies bit-exact checksums, votes through
the store, and commits only when every rank is ready; otherwise every rank keeps its old weights
and raises the same ``MigrationError`` carrying the placement now serving.

Modules: ``weights`` (registration, byte rows), ``plan`` (the pure transfer plan and parts),
``transfer`` (staging, P2P rounds, commit), ``checksums`` (the bit-exact checksum), ``sync``
(the store handshakes and vote), ``migrate`` (the loop and ``Step``, its body for one part),
``config`` and ``report``.
"""

from eplb.runtime.migration.checksums import checksum
from eplb.runtime.migration.config import MigrationConfig
from eplb.runtime.migration.migrate import Session, Step, migrate
from eplb.runtime.migration.plan import LayerTransfers, Message, plan_layer, plan_parts
from eplb.runtime.migration.report import MigrationError, MigrationReport
from eplb.runtime.migration.weights import ExpertWeights

__all__ = [
    "ExpertWeights",
    "LayerTransfers",
    "Message",
    "MigrationConfig",
    "MigrationError",
    "MigrationReport",
    "Session",
    "Step",
    "checksum",
    "migrate",
    "plan_layer",
    "plan_parts",
]
