"""What a migration did (``MigrationReport``) and why one stopped (``MigrationError``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from eplb.errors import EplbError
from eplb.placement import Placement
from eplb.runtime.migration.plan import LayerTransfers

PHASES = ("plan", "stage", "verify", "vote", "commit")


@dataclass
class MigrationReport:
    """A ``migrate`` call's work. Counts and bytes are over all ranks (every rank derives them
    from the same plan, so every rank reports the same); times are this rank's.

    Attributes:
        moves: slots whose expert changed (``migration_cost(...).total_moves`` over the layers).
        filled_bytes: weight bytes written into slots at commit; with one expert size this is
            ``migration_cost(old, new, bytes_per_expert).bytes`` (a slot left empty costs none).
        local_copies: experts staged from the receiving rank's own slots.
        remote_receives: experts received from another rank (once per receiving rank, however
            many of its slots take the expert).
        bytes_intra_node: weight bytes sent between ranks of one node.
        bytes_inter_node: weight bytes sent between nodes.
        rounds: P2P rounds over all steps.
        steps: steps run (one per layer, more where ``staging_bytes`` split a layer).
        seconds: this rank's wall time per phase (``PHASES``), summed over steps.
        layers_committed: the layers now fully on the new placement, in order.
        serving: the placement now serving (new rows for the committed layers).
    """

    moves: int = 0
    filled_bytes: int = 0
    local_copies: int = 0
    remote_receives: int = 0
    bytes_intra_node: int = 0
    bytes_inter_node: int = 0
    rounds: int = 0
    steps: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    layers_committed: list[int] = field(default_factory=list)
    serving: Placement | None = None

    @property
    def bytes_sent(self) -> int:
        """Weight bytes sent between ranks (intra- plus inter-node)."""
        return self.bytes_intra_node + self.bytes_inter_node

    def add_step(self, t: LayerTransfers, bytes_per_slot: int) -> None:
        """Count a committed step ``t`` of slots of ``bytes_per_slot`` bytes."""
        self.moves += t.moves
        self.filled_bytes += len(t.fills) * bytes_per_slot
        self.local_copies += len(t.local)
        self.rounds += t.num_rounds
        self.steps += 1
        for m in t.messages:
            self.remote_receives += len(m.experts)
            size = len(m.experts) * bytes_per_slot
            if t.node(m.src) == t.node(m.dst):
                self.bytes_intra_node += size
            else:
                self.bytes_inter_node += size


class MigrationError(EplbError):
    """A migration step aborted on every rank; nothing of it was committed anywhere.

    Attributes:
        layer: the layer row of the step.
        part: the step's part of the layer (0 unless ``staging_bytes`` split it; earlier parts
            are committed and ``serving`` holds the row they reached).
        ranks: the ranks involved, the failing (or unresponsive) one first.
        cause: what went wrong, in one line.
        serving: the placement now serving on every rank: new rows for the layers (and parts)
            committed before the failure, old rows for the rest. Retry from it.
        report: the work committed before the failure.
    """

    def __init__(
        self, layer: int, part: int, ranks: tuple[int, ...], cause: str, serving: Placement, report: MigrationReport
    ) -> None:
        step = f"layer {layer}" + (f" part {part}" if part else "")
        super().__init__(
            f"migration of {step} aborted on every rank (ranks {list(ranks)}): {cause}; nothing of it was "
            f"committed (layers {report.layers_committed} were); retry with migrate(weights, error.serving, new, ...)"
        )
        self.layer, self.part, self.ranks, self.cause = layer, part, ranks, cause
        self.serving, self.report = serving, report
