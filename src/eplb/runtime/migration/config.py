"""``MigrationConfig``: the settings of an online expert-weight migration."""

from __future__ import annotations

import math
from dataclasses import dataclass

from eplb.cluster import require_count
from eplb.errors import EplbError
from eplb.runtime.backend import check_backend


@dataclass(frozen=True)
class MigrationConfig:
    """The knobs of ``migrate``; every bad value raises EplbError at construction. Every rank must
    pass the same config (the plan, the parts and the message sizes derive from it).

    Attributes:
        staging_bytes: per-rank bound on the buffers of one step: the rows a rank stages plus the
            most rows it packs to send in one round (each row one slot's bytes plus 16-byte
            alignment and its checksums). None: one step per layer, whatever its moved slots
            need. A layer that needs more is split into parts, each a valid placement on the way
            (``plan.plan_parts``), so memory stays bounded and every part is still two-phase; a
            bound too small for the smallest part (one slot, or a swap of sole replicas) is
            refused up front with the size to use.
        max_peers: the most peers a rank exchanges with in one round (1: a matching per round).
        timeout_s: bound on each wait for other ranks (a round handshake, the vote); a step that
            runs into it aborts on every rank and a retry works. It also bounds each gloo P2P op
            once both ends have posted it (with NCCL the process group's own timeout does): such
            an op only stalls when a process or link dies, which no retry on that group survives.
        verify: checksum every staged row against its source before the vote.
        chunk_bytes: the most bytes one P2P op carries; a larger message is sent in chunks.
        backend: the checksums' backend: ``"auto"`` (a Triton kernel on CUDA when triton imports,
            torch otherwise), ``"torch"`` or ``"triton"`` (``eplb.runtime.backend``).
    """

    staging_bytes: int | None = None
    max_peers: int = 1
    timeout_s: float = 60.0
    verify: bool = True
    chunk_bytes: int = 256 << 20
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.staging_bytes is not None:
            require_count("staging_bytes", self.staging_bytes, 1, fix="pass a byte count, or None for a whole layer")
        require_count("max_peers", self.max_peers, 1, fix="pass 1 for one peer per round")
        timeout = self.timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or (
            timeout <= 0
        ):
            raise EplbError(f"timeout_s must be a positive number of seconds, got {timeout!r}")
        if not isinstance(self.verify, bool):
            raise EplbError(f"verify must be True or False, got {self.verify!r}")
        require_count("chunk_bytes", self.chunk_bytes, 1, fix="pass the most bytes per P2P op, e.g. 256 << 20")
        check_backend(self.backend)
